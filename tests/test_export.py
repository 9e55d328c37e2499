"""`ipb export` of a single-scale model, and the one-patch front WSInfer feeds RGB into."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ipb_ray.config import load_config

pytest.importorskip("onnxruntime")


def _predictor(cfg, names, members=1, seed=0):
    from ipb_ray.nn.ensemble import FoldEnsemble
    from ipb_ray.nn.models import build_model
    from ipb_ray.tracking.registry import Predictor
    from ipb_ray.tracking.packaging import probability_model

    torch.manual_seed(seed)
    nets = [probability_model(build_model(cfg, len(names)).eval(), cfg.data.multi_scale, cfg.data.local_patch)
            for _ in range(members)]
    module = FoldEnsemble(nets).eval() if members > 1 else nets[0]
    return Predictor(module, cfg, tuple(names), "test", {})


def test_single_scale_model_exports_to_onnx_and_torchscript_on_catalog_patches(tiny_catalog, tmp_path):
    """A single-scale network (one input) through both exports, on patches of a real
    catalog; a --sample catalog that does not exist is named with what to do."""
    import onnxruntime as ort

    from ipb_ray.prediction.export import ExportError, export_model, reference_probs, sample_patches

    cfg = load_config(preset="demo", overrides=["data.multi_scale=false", "data.patch_size=40",
                                                 f"data.catalog={tiny_catalog}"])
    predictor = _predictor(cfg, ("Debris", "Dense", "Spread"))
    done = export_model(predictor, "onnx", tmp_path / "onnx", n_sample=6)
    assert done.max_abs_diff <= 1e-4
    x = sample_patches(predictor, n=6, seed=1)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["global_patch"]
    np.testing.assert_allclose(session.run(None, {"global_patch": x})[0], reference_probs(predictor, x), atol=1e-4)
    export_model(predictor, "torchscript", tmp_path / "ts", n_sample=6)
    ts = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(ts(torch.from_numpy(x)).numpy(), reference_probs(predictor, x), atol=1e-4)
    config = json.loads((tmp_path / "ts" / "config.json").read_text())
    assert config["patch_size_pixels"] == 40 and config["num_classes"] == 3
    assert json.loads((tmp_path / "ts" / "export.json").read_text())["sample_patches"] == 6
    with pytest.raises(ExportError, match="cannot read the catalog .*nowhere.*--sample CATALOG"):
        export_model(predictor, "onnx", tmp_path / "x", sample=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        (tmp_path / "file").write_text("")
        export_model(predictor, "onnx", tmp_path / "file")


def test_one_patch_front_makes_rgb_grey_and_cuts_the_centre():
    """The TorchScript front: an RGB batch gives what its BT.601 grey gives, and a
    multi-scale network sees the exact centre as its local patch."""
    from ipb_ray.prediction.export import GREY_WEIGHTS, export_modules, one_patch

    cfg = load_config(preset="demo", overrides=["data.global_patch=48", "data.local_patch=24"])
    predictor = _predictor(cfg, ("a", "b"), members=2)
    two, one = export_modules(predictor.module)
    rgb = torch.rand(3, 3, 48, 48)
    grey = (rgb * torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
    with torch.no_grad():
        want = two(grey, grey[:, :, 12:36, 12:36])
        torch.testing.assert_close(one(rgb), want)
        torch.testing.assert_close(one(grey), want)
        scripted = torch.jit.script(one_patch(torch.jit.trace(two, (grey, grey[:, :, 12:36, 12:36])), True, 24))
        torch.testing.assert_close(scripted(rgb), want)
        torch.testing.assert_close(predictor.module(grey), want)  # the ensemble's own mean
