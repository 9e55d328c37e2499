"""``ipb export``: a trained model in the formats other tools load.

* **onnx**: one graph, inputs ``global_patch`` (N, 1, S, S) and, for a multi-scale model,
  ``local_patch`` (N, 1, s, s), both grey in [0, 1]; output ``probabilities`` (N, C), the mean
  of the fold networks' softmax. The data set's normalisation is inside the graph. Class
  names, patch sides and pixel size are in the model's metadata properties.
* **torchscript**: one patch in, ``(N, 1 or 3, S, S)`` in [0, 1] (RGB is turned grey with
  the BT.601 weights ipb-ray reads frames with), the local patch cut from its centre
  inside; with ``config.json`` in the shape WSInfer (and QuPath's WSInfer extension)
  reads: patch size, µm per pixel, class names, ``Resize`` + ``ToTensor``.
* **bioimageio**: a BioImage Model Zoo package (spec 0.5): ``rdf.yaml``, the TorchScript
  and ONNX weights, a test input and its expected output from real patches, a cover image
  and a README; validated with ``bioimageio.spec`` before it is written.

The exported graph is checked against the PyTorch model on the sample patches before
anything is kept (:func:`check_same`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ipb_ray.patches.geometry import centre_crop
from ipb_ray.prediction.formats import TOLERANCE, ExportError

__all__ = [
    "check_same", "export_model", "export_modules", "Exported", "ExportError", "FORMATS", "GREY_WEIGHTS",
    "model_inputs", "one_patch", "reference_probs", "run_onnx", "sample_patches", "wsinfer_config",
]

FORMATS = ("onnx", "torchscript", "bioimageio")
GREY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class Exported:
    format: str
    files: dict[str, str]
    max_abs_diff: float


def _members(module: Any, fold: int | None) -> list[Any]:
    """The fold networks (each maps one (N, 1, S, S) batch to probabilities), or the one chosen."""
    nets = list(getattr(module, "nets", [module]))
    if fold is None:
        return nets
    if not 0 <= fold < len(nets):
        raise ExportError(f"--fold {fold}: the model holds {len(nets)} fold network(s) (0..{len(nets) - 1})")
    return [nets[fold]]


def export_modules(module: Any, fold: int | None = None) -> tuple[Any, Any]:
    """(two-input module for ONNX/bioimage.io, one-patch module for TorchScript/WSInfer)."""
    import torch
    from torch import nn

    members = _members(module, fold)
    multi = bool(getattr(members[0], "multi_scale", False))
    local = int(getattr(members[0], "local_patch", 0))

    class TwoScales(nn.Module):
        """global (N, 1, S, S) [, local (N, 1, s, s)] in [0, 1] -> mean probabilities (N, C)."""

        def __init__(self) -> None:
            super().__init__()
            self.nets = nn.ModuleList([m.net for m in members])
            self.multi_scale = multi

        def forward(self, global_patch: torch.Tensor, local_patch: torch.Tensor | None = None) -> torch.Tensor:
            probs = []
            for net in self.nets:
                logits = net(global_patch, local_patch)[0] if self.multi_scale else net(global_patch)[0]
                probs.append(torch.softmax(logits.float(), dim=-1))
            return torch.stack(probs).mean(0)

    two = TwoScales().eval()
    return two, one_patch(two, multi, local)


def one_patch(two: Any, multi_scale: bool, local_patch: int) -> Any:
    """One patch in: ``(N, 1 or 3, S, S)`` in [0, 1] (RGB made grey with :data:`GREY_WEIGHTS`),
    the local patch cut from its centre, ``two`` (the two-input module, plain or traced) applied."""
    import torch
    from torch import nn

    class OnePatch(nn.Module):
        __constants__ = ["multi", "local"]  # constants to TorchScript: the branch not taken is not compiled

        def __init__(self) -> None:
            super().__init__()
            self.two = two
            self.multi = bool(multi_scale)
            self.local = int(local_patch)
            self.register_buffer("grey", torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            if x.shape[1] == 3:
                x = (x * self.grey).sum(1, keepdim=True)
            if not self.multi:
                return self.two(x)
            h, w = x.shape[-2], x.shape[-1]
            y0, x0 = (h - self.local) // 2, (w - self.local) // 2
            return self.two(x, x[:, :, y0:y0 + self.local, x0:x0 + self.local])

    return OnePatch().eval()


def sample_patches(predictor: Any, catalog: str | None = None, n: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` real test-mode windows (N, 1, S, S) float32 in [0, 1] cut from the colonies of
    ``catalog`` (default: the model's ``data.catalog``) exactly as ``ipb predict`` cuts them."""
    from ipb_ray.data import catalog as cat
    from ipb_ray.patches.core import StreamSpec, patch_batch
    from ipb_ray.patches.geometry import PatchGeometry

    root = catalog or predictor.cfg.data.catalog
    try:
        table = cat.read_catalog(root, ["colony_id", "image", "mask"])
    except Exception as exc:
        raise ExportError(f"sample patches: cannot read the catalog {root!r} ({exc}); pass --sample CATALOG, "
                          "a catalog of the images the model is for (its patches become the test input)") from None
    if table.num_rows == 0:
        raise ExportError(f"sample patches: the catalog {root!r} holds no colonies; pass --sample CATALOG")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    rows = table.take(pick).to_pydict()
    geometry = PatchGeometry.from_config(predictor.cfg.data)
    spec = StreamSpec(geometry, tuple(predictor.class_names), seed=seed, mode="test", tta=1)
    windows = patch_batch({"colony_id": np.asarray(rows["colony_id"], object), "image": np.asarray(rows["image"], object),
                           "mask": np.asarray(rows["mask"], object), "label": [None] * len(pick)}, spec)
    x = np.asarray(windows[f"x{geometry.size}"], np.float32)
    return x[: len(pick)]


def model_inputs(predictor: Any, x: np.ndarray) -> list[np.ndarray]:
    data = predictor.cfg.data
    return [x, np.ascontiguousarray(centre_crop(x, data.local_patch))] if data.multi_scale else [x]


def reference_probs(predictor: Any, x: np.ndarray, fold: int | None = None) -> np.ndarray:
    """What the PyTorch model says for the windows ``x`` (what every export must reproduce)."""
    import torch

    members = _members(predictor.module, fold)
    with torch.no_grad():
        t = torch.from_numpy(x)
        return torch.stack([m(t) for m in members]).mean(0).numpy()


def check_same(what: str, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    if not diff <= TOLERANCE:
        raise ExportError(f"{what}: its probabilities differ from the PyTorch model's by {diff:.2e} "
                          f"(more than {TOLERANCE:g}); the export is not kept")
    return diff


def _onnx(two: Any, predictor: Any, x: np.ndarray, path: Path) -> None:
    import torch

    inputs = tuple(torch.from_numpy(a) for a in model_inputs(predictor, x))
    names = ["global_patch", "local_patch"][: len(inputs)]
    torch.onnx.export(two, inputs, str(path), input_names=names, output_names=["probabilities"],
                      dynamic_axes={**{n: {0: "batch"} for n in names}, "probabilities": {0: "batch"}},
                      opset_version=18, dynamo=False)
    import onnx

    model = onnx.load(str(path))
    for key, value in _metadata(predictor).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))


def run_onnx(path: Path, predictor: Any, x: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("checking the ONNX export needs onnxruntime: pip install onnxruntime") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()], model_inputs(predictor, x)))
    return session.run(["probabilities"], feeds)[0]


def _torchscript(two: Any, predictor: Any, x: np.ndarray, path: Path) -> Any:
    """The two-input module traced, behind a scripted one-patch front (so grey and RGB
    batches of any size both take the right branch), saved and loaded back."""
    import torch

    data = predictor.cfg.data
    with torch.no_grad():
        traced = torch.jit.trace(two, tuple(torch.from_numpy(a) for a in model_inputs(predictor, x)), check_trace=False)
    scripted = torch.jit.script(one_patch(traced, data.multi_scale, data.local_patch))
    scripted.save(str(path))
    return torch.jit.load(str(path))


def _metadata(predictor: Any) -> dict[str, Any]:
    from ipb_ray.tracking.registry import package_version

    data = predictor.cfg.data
    return {"class_names": list(predictor.class_names), "global_patch": data.global_patch if data.multi_scale
            else data.patch_size, "local_patch": data.local_patch if data.multi_scale else None,
            "pixel_size_um": data.pixel_size_um, "window": data.window, "source": predictor.source,
            "ipb_ray_version": package_version(), "input": "grey patches in [0, 1]; normalisation is inside"}


def wsinfer_config(predictor: Any) -> dict[str, Any]:
    """The ``config.json`` WSInfer reads beside a TorchScript model (its model-config
    schema 1.0): the model takes ``patch_size_pixels`` px at ``spacing_um_px``."""
    data = predictor.cfg.data
    side = data.global_patch if data.multi_scale else data.patch_size
    return {"spec_version": "1.0", "architecture": f"ipb-ray {predictor.cfg.model.backbone}",
            "num_classes": len(predictor.class_names), "class_names": list(predictor.class_names),
            "patch_size_pixels": int(side), "spacing_um_px": float(data.pixel_size_um),
            "transform": [{"name": "Resize", "arguments": {"size": int(side)}}, {"name": "ToTensor"}]}


def export_model(predictor: Any, fmt: str, out: str | Path, *, fold: int | None = None,
                 sample: str | None = None, n_sample: int = 8) -> Exported:
    """Write ``predictor`` as ``fmt`` (one of :data:`FORMATS`) into the folder ``out``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    from ipb_ray.cluster.paths import check_output_dir

    check_output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    x = sample_patches(predictor, sample, n_sample)
    want = reference_probs(predictor, x, fold)
    two, _ = export_modules(predictor.module, fold)
    files: dict[str, str] = {}
    with warnings.catch_warnings():  # tracing warns about the shape checks, fixed for an export
        warnings.simplefilter("ignore")
        diff = _write(predictor, fmt, out, fold, x, want, two, files)
    (out / "export.json").write_text(json.dumps({"format": fmt, "fold": fold, "max_abs_diff": diff,
                                                 "sample_patches": len(x), **_metadata(predictor)}, indent=2) + "\n")
    files["export"] = str(out / "export.json")
    return Exported(fmt, files, diff)


def _write(predictor: Any, fmt: str, out: Path, fold: int | None, x: np.ndarray, want: np.ndarray, two: Any,
           files: dict[str, str]) -> float:
    import torch

    diff = 0.0
    if fmt in ("onnx", "bioimageio"):
        path = out / "model.onnx"
        _onnx(two, predictor, x, path)
        diff = max(diff, check_same("the ONNX export", run_onnx(path, predictor, x), want))
        files["onnx"] = str(path)
    if fmt in ("torchscript", "bioimageio"):
        path = out / "model.pt"
        loaded = _torchscript(two, predictor, x, path)
        with torch.no_grad():
            diff = max(diff, check_same("the TorchScript export", loaded(torch.from_numpy(x)).numpy(), want))
        files["torchscript"] = str(path)
        if fmt == "torchscript":
            (out / "config.json").write_text(json.dumps(wsinfer_config(predictor), indent=2) + "\n")
            files["config"] = str(out / "config.json")
    if fmt == "bioimageio":
        from ipb_ray.prediction.bioimageio import write_package

        files.update(write_package(predictor, out, model_inputs(predictor, x), want, files, two))
    return diff
