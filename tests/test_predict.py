"""`ipb predict` end to end: a model cross-validated on one synthetic world, registered in
the MLflow Model Registry, applied through Ray Data to a second world written as a
time-lapse of wells (plus a corrupt frame); the tables, rerun, rejects, suggestions and the
HTML page (opened in headless Chromium where installed)."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess

import numpy as np
import pytest

from ipb_ray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# frame_000k of the second world -> its well and time point
LAYOUT = {0: ("A01", 0), 1: ("A01", 1), 2: ("A01", 2), 3: ("B02", 0), 4: ("B02", 1), 5: ("B02", 2)}


def _world(root, frames, seed):
    from ipb_ray.data import synth

    synth.write_world(synth.SynthConfig(frames=frames, frame_size=768, colonies_per_frame=16, colony_scale=0.35,
                                        seed=seed, image_format="png"), root)
    return root


@pytest.fixture(scope="module")
def registered(tmp_path_factory, ray_local):
    """A supervised model cross-validated (2 folds) on world A and registered as ``colonies@champion``."""
    from ipb_ray.distributed.cv import run_cv
    from ipb_ray.distributed.preprocess import build_catalog
    from ipb_ray.tracking.registry import register_configuration

    root = tmp_path_factory.mktemp("predict-train")
    _world(root / "world", 8, 3)
    cfg = load_config(preset="demo", overrides=[
        f"data.frames={root / 'world'}", "data.annotations=null", f"data.catalog={root / 'catalog'}",
        f"tracking.storage_path={root / 'runs'}", f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.experiment=predict-test", "split.folds=2", "split.labelled_fraction=0.4", "method.name=supervised",
        "method.epochs=4", "method.steps_per_epoch=15", "data.global_patch=48", "data.local_patch=24",
        "resources.num_workers=0", "name=pred"])
    build_catalog(cfg)
    result = run_cv(cfg, [0, 1], log_model=True)
    info = register_configuration(cfg.tracking.tracking_uri, "predict-test", result.parent_run_id, "colonies")
    return cfg, info


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """World B as a time-lapse: frames named {well}_t{time}.png, the annotations renamed
    alike, and one corrupt frame."""
    root = tmp_path_factory.mktemp("plate")
    world = _world(root / "world", len(LAYOUT), 11)
    (root / "frames").mkdir()
    names = {}
    for k, (well, t) in LAYOUT.items():
        names[f"frames/frame_{k:04d}.png"] = f"{well}_t{t}.png"
        shutil.copy(world / "frames" / f"frame_{k:04d}.png", root / "frames" / f"{well}_t{t}.png")
    (root / "frames" / "C03_t0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with (world / "annotations.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["frame", "x0", "y0", "x1", "y1", "labels"])
        for r in rows:  # the last frame's colonies are named but not labelled: candidates to suggest
            last = r["frame"] == f"frames/frame_{len(LAYOUT) - 1:04d}.png"
            w.writerow([f"frames/{names[r['frame']]}", r["x0"], r["y0"], r["x1"], r["y1"], "" if last else r["labels"]])
    return root, [r for r in rows if r["frame"] != f"frames/frame_{len(LAYOUT) - 1:04d}.png"]


def test_register_predict_rerun_and_page(registered, plate, tmp_path):
    import pyarrow.parquet as pq

    from ipb_ray.distributed.predict import run_predict
    from ipb_ray.tracking.registry import load_predictor, set_alias

    cfg, info = registered
    root, truth = plate
    assert info["uri"] == "models:/colonies@champion" and info["folds"] == [0, 1]
    predictor = load_predictor(info["uri"], cfg.tracking.tracking_uri)
    assert predictor.members == 2 and predictor.class_names and predictor.cfg.data.global_patch == 48
    out = tmp_path / "out"
    summary = run_predict(predictor, str(root / "frames"), out, annotations=str(root / "labels.csv"),
                          pattern="{well}_t{time}", cfg=cfg, workers=1, suggest=5, overlays=2)
    assert summary.frames == len(LAYOUT) + 1 and summary.frames_skipped == 0

    # the corrupt frame is a reject with its reason; every other frame was predicted
    with (out / "rejects.csv").open() as fh:
        rejects = list(csv.DictReader(fh))
    assert any(r["frame"].endswith("C03_t0.png") and "unreadable" in r["reason"] for r in rejects)
    table = pq.read_table(out / "colonies.parquet").to_pylist()
    assert {r["frame"].rsplit("/", 1)[-1] for r in table} == {f"{w}_t{t}.png" for w, t in LAYOUT.values()}
    # every annotated colony is predicted, or named in rejects (matched no segmented colony)
    unmatched = sum("matches no segmented colony" in r["reason"] for r in rejects)
    labelled = [r for r in table if r["labels"]]
    assert len(labelled) + unmatched >= len(truth) - sum(r["labels"] == "" for r in truth)
    assert len(labelled) >= 0.9 * len(truth)
    # well and time come from the file names
    for r in table:
        well, t = r["frame"].rsplit("/", 1)[-1].removesuffix(".png").split("_t")
        assert (r["well"], r["time"]) == (well, float(t))
    # accuracy against the hidden labels is near the cross-validated estimate
    single = [r for r in labelled if ";" not in r["labels"]]
    accuracy = np.mean([r["predicted"] == r["labels"] for r in single])
    estimate = predictor.cv_estimate["accuracy"]
    print(f"accuracy on the new plate {accuracy:.3f} ({len(single)} colonies), cross-validated {estimate:.3f}")
    assert abs(accuracy - estimate) < 0.15
    for r in table:
        probs = [r[f"prob/{c}"] for c in predictor.class_names]
        assert math.isclose(sum(probs), 1.0, rel_tol=1e-4) and r["predicted"] == predictor.class_names[int(np.argmax(probs))]
        assert len(r["member_probs"]) == 2 * len(predictor.class_names) and r["disagreement"] >= 0

    # the time course sums to the colony counts, per well and overall
    with (out / "per_well.csv").open() as fh:
        wells = list(csv.DictReader(fh))
    assert sum(int(w["colonies"]) for w in wells) == len(table) == summary.colonies
    for w in wells:
        assert sum(int(w[f"count/{c}"]) for c in predictor.class_names) == int(w["colonies"])
    assert {(w["well"], float(w["time"])) for w in wells} == {(a, float(b)) for a, b in LAYOUT.values()}
    with (out / "per_frame.csv").open() as fh:
        assert sum(int(f["colonies"]) for f in csv.DictReader(fh)) == len(table)

    # suggestions: unlabelled colonies only, in the annotation table's columns
    with (out / "suggestions.csv").open() as fh:
        picked = list(csv.DictReader(fh))
    assert 0 < len(picked) <= 5 and set(picked[0]) >= {"frame", "x0", "y0", "x1", "y1", "labels"}
    unlabelled = {(r["frame"], r["x0"], r["y0"]) for r in table if not r["labels"]}
    assert all((p["frame"], int(p["x0"]), int(p["y0"])) in unlabelled for p in picked)

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # the time course and two overlays
    assert "C03_t0.png" in html and "models:/colonies@champion" in html
    _screenshot_shows_the_figures(out / "report.html", tmp_path)

    # a rerun skips every finished frame (the corrupt one too) and writes the same tables
    again = run_predict(predictor, str(root / "frames"), out, annotations=str(root / "labels.csv"),
                        pattern="{well}_t{time}", cfg=cfg, workers=1, overlays=0)
    assert again.frames_skipped == again.frames == summary.frames and again.colonies == summary.colonies

    # the alias moves; a missing version is refused with the versions that exist
    set_alias(cfg.tracking.tracking_uri, "colonies", "staging", info["version"])
    with pytest.raises(ValueError, match="has no version 99; versions: 1"):
        set_alias(cfg.tracking.tracking_uri, "colonies", "champion", 99)



def _screenshot_shows_the_figures(page, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("headless Chromium is not installed (apt-get install chromium): the page was not looked at")
        return
    import cv2

    shot = tmp_path / "page.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", f"--screenshot={shot}", "--window-size=1200,2400",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[0] >= 2000
    # the page shows the figures' colours (class lines and outlines), not only black text on white
    colourful = np.mean(np.ptp(img.astype(int), axis=2) > 60)
    assert colourful > 0.005, colourful


def test_predict_over_an_ome_tiff_gives_a_per_well_time_course_from_its_t_axis(registered, tmp_path):
    """An OME-TIFF time-lapse (T=3, two stage positions) with no --pattern: each position is
    a well and each plane a time point, and the overlay reads its plane from the stack."""
    import cv2
    import tifffile

    from ipb_ray.distributed.predict import run_predict
    from ipb_ray.tracking.registry import load_predictor

    cfg, info = registered
    world = _world(tmp_path / "world", 6, 21)
    planes = [cv2.imread(str(world / "frames" / f"frame_{k:04d}.png"), cv2.IMREAD_GRAYSCALE) for k in range(6)]
    (tmp_path / "frames").mkdir()
    with tifffile.TiffWriter(tmp_path / "frames" / "plate.ome.tif", ome=True) as w:
        for i, well in enumerate(("A1", "B2")):
            w.write(np.stack(planes[3 * i:3 * i + 3]), metadata={"axes": "TYX", "Name": well,
                                                                 "PhysicalSizeX": 0.8, "PhysicalSizeY": 0.8})
    predictor = load_predictor(info["uri"], cfg.tracking.tracking_uri)
    out = tmp_path / "out"
    summary = run_predict(predictor, str(tmp_path / "frames"), out, cfg=cfg, workers=1, overlays=1)
    assert summary.frames == 6 and summary.colonies > 0
    with (out / "per_well.csv").open() as fh:
        wells = list(csv.DictReader(fh))
    assert {(w["well"], float(w["time"])) for w in wells} == {(a, float(t)) for a in ("A1", "B2") for t in range(3)}
    assert all(int(w["colonies"]) > 0 for w in wells)
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2  # time course + one overlay


def test_export_onnx_torchscript_and_bioimageio_reproduce_the_model_on_real_patches(registered, tmp_path):
    """`ipb export` of the registered fold ensemble: ONNX (run with onnxruntime) and
    TorchScript (grey and RGB input) give the PyTorch model's probabilities within 1e-4 on
    patches cut from the catalog's colonies; the bioimage.io package validates with
    bioimageio.spec and its weights reproduce its test output."""
    import json as _json

    import onnxruntime as ort
    import torch
    import yaml
    from typer.testing import CliRunner

    from ipb_ray.cli import app
    from ipb_ray.prediction.bioimageio import test_package, validate_package
    from ipb_ray.prediction.export import reference_probs, sample_patches
    from ipb_ray.tracking.registry import load_predictor

    cfg, info = registered
    predictor = load_predictor(info["uri"], cfg.tracking.tracking_uri)
    x = sample_patches(predictor, n=16, seed=3)
    assert x.shape == (16, 1, 48, 48) and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.01  # real pixels
    want = reference_probs(predictor, x)
    runner = CliRunner()
    for fmt in ("onnx", "torchscript", "bioimageio"):
        res = runner.invoke(app, ["export", info["uri"], "--format", fmt, "--out", str(tmp_path / fmt),
                                  "--tracking-uri", cfg.tracking.tracking_uri])
        assert res.exit_code == 0, res.output
        assert "reproduces the PyTorch model" in res.output
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["global_patch", "local_patch"]
    got = session.run(None, {"global_patch": x, "local_patch": x[:, :, 12:36, 12:36].copy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    meta = {p.key: p.value for p in __import__("onnx").load(str(tmp_path / "onnx" / "model.onnx")).metadata_props}
    assert _json.loads(meta["class_names"]) == list(predictor.class_names)

    ts = torch.jit.load(str(tmp_path / "torchscript" / "model.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(ts(torch.from_numpy(x)).numpy(), want, atol=1e-4)
        rgb = torch.from_numpy(x).repeat(1, 3, 1, 1)  # what WSInfer's ToTensor hands over
        np.testing.assert_allclose(ts(rgb).numpy(), want, atol=1e-4)
    config = _json.loads((tmp_path / "torchscript" / "config.json").read_text())
    assert {"spec_version", "architecture", "num_classes", "patch_size_pixels", "spacing_um_px", "class_names",
            "transform"} <= set(config)
    assert config["class_names"] == list(predictor.class_names) and config["patch_size_pixels"] == 48

    rdf = tmp_path / "bioimageio" / "bioimageio" / "rdf.yaml"
    status, details = validate_package(rdf)
    assert status in ("passed", "valid-format"), details
    diffs = test_package(rdf)
    assert set(diffs) == {"onnx", "torchscript"} and max(diffs.values()) <= 1e-4
    spec = yaml.safe_load(rdf.read_text())
    assert spec["outputs"][0]["axes"][1]["channel_names"] == list(predictor.class_names)
    assert (tmp_path / "bioimageio" / "model.bioimageio.zip").stat().st_size > 0

    # bad input: a format that does not exist, a fold the ensemble does not hold
    res = runner.invoke(app, ["export", info["uri"], "--format", "keras", "--out", str(tmp_path / "k"),
                              "--tracking-uri", cfg.tracking.tracking_uri])
    assert res.exit_code == 2 and "choose one of onnx, torchscript, bioimageio" in res.output
    res = runner.invoke(app, ["export", info["uri"], "--format", "onnx", "--fold", "5", "--out", str(tmp_path / "f"),
                              "--tracking-uri", cfg.tracking.tracking_uri])
    assert res.exit_code == 2 and "--fold 5: the model holds 2 fold network(s)" in res.output
