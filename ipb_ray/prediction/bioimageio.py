"""A BioImage Model Zoo package (bioimage.io model spec 0.5) of a trained ipb-ray model.

The package holds the fold ensemble as TorchScript and ONNX weights, both with the inputs
``global_patch`` (batch, 1, S, S) and, for a multi-scale model, ``local_patch`` (batch, 1, s, s):
grey patches scaled to [0, 1], the data set's normalisation inside the weights. The
output ``probabilities`` (batch, classes) names each class on its channel axis. The test
input is a batch of real patches (cut as ``ipb predict`` cuts them) and the test output
is what the PyTorch model says for them, so a consumer (bioimageio.core, deepImageJ,
ilastik) can check that it runs the model right. ``bioimageio.spec`` validates the
written package (format, files and hashes; :func:`validate_package`) and
:func:`test_package` runs each weight format on the test input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ipb_ray.prediction.formats import TOLERANCE, ExportError

__all__ = ["CITATION", "CITATION_URL", "PACKAGE_DIR", "test_package", "validate_package", "write_package"]

PACKAGE_DIR = "bioimageio"
CITATION = ("Witmer, A. and Bhanu, B. Iterative pseudo balancing for stem cell microscopy image "
            "classification. Scientific Reports (2024).")
#: Where to find the paper (the zoo needs a DOI or a URL; a title search needs no guessed DOI).
CITATION_URL = ("https://scholar.google.com/scholar?q=%22Iterative+pseudo+balancing+for+stem+cell+microscopy"
                "+image+classification%22")


def _need_spec() -> Any:
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise ExportError("--format bioimageio needs the bioimageio.spec package: pip install "
                          "'bioimageio.spec>=0.5.14'") from exc
    from bioimageio.spec.model import v0_5

    return v0_5


def _cover(x: np.ndarray, path: Path) -> Path:
    """Up to 8 sample patches side by side (2:1, as the zoo prefers), 8-bit grey PNG."""
    import cv2

    tiles = [np.clip(p[0] * 255.0, 0, 255).astype(np.uint8) for p in x[:8]]
    while len(tiles) < 8:
        tiles.append(np.zeros_like(tiles[0]))
    side = tiles[0].shape[0]
    grid = np.vstack([np.hstack(tiles[:4]), np.hstack(tiles[4:8])])
    grid = cv2.resize(grid, (512, 256), interpolation=cv2.INTER_NEAREST if side < 64 else cv2.INTER_AREA)
    cv2.imwrite(str(path), grid)
    return path


def _readme(predictor: Any, path: Path) -> Path:
    data = predictor.cfg.data
    inputs = (f"`global_patch` (batch, 1, {data.global_patch}, {data.global_patch}) and its centre `local_patch` (batch, 1, "
              f"{data.local_patch}, {data.local_patch})" if data.multi_scale
              else f"`global_patch` (batch, 1, {data.patch_size}, {data.patch_size})")
    path.write_text(f"""# {predictor.cfg.name or 'ipb-ray'} colony classifier

Classifies colony (or cell) patches of live-cell microscopy into {len(predictor.class_names)} classes:
{', '.join(predictor.class_names)}. Trained with ipb-ray ({predictor.cfg.method.name}, backbone
{predictor.cfg.model.backbone}); exported from `{predictor.source}`.

## Inputs and output

- Inputs: {inputs}: grey pixels scaled to [0, 1], at {data.pixel_size_um:g} µm per pixel. The
  data set's normalisation is inside the weights.
- Output: `probabilities` (batch, classes), the mean of the fold networks' softmax, classes in
  the order above.

Patches are windows cut inside segmented colonies (`data.window: {data.window}`); see the ipb-ray
README ("Predict a new plate") for how `ipb predict` cuts them.
""")
    return path


def _channel_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "class"


def write_package(predictor: Any, out: Path, inputs: list[np.ndarray], want: np.ndarray, files: dict[str, str],
                  two: Any) -> dict[str, str]:
    """Write the package folder ``out/bioimageio`` (its ``rdf.yaml`` and every file it
    names) and ``out/<name>.zip``; returns their paths. ``inputs``: the model's inputs for
    the sample windows (:func:`ipb_ray.prediction.export.model_inputs`: the global patches,
    and their centres for a multi-scale model); ``want``: the PyTorch model's probabilities
    for them."""
    import torch
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder


    m = _need_spec()
    data = predictor.cfg.data
    work = out / "bioimageio-files"
    work.mkdir(parents=True, exist_ok=True)
    names = ["global_patch", "local_patch"][: len(inputs)]
    for name, arr in zip(names, inputs):
        np.save(work / f"{name}.npy", arr)
    np.save(work / "probabilities.npy", want.astype(np.float32))
    # the two-input TorchScript graph (the one-patch graph of --format torchscript cuts the
    # centre itself; here both inputs are explicit, as in the ONNX graph); test_package
    # below runs it and the ONNX graph on the test input
    with torch.no_grad():
        traced = torch.jit.trace(two, tuple(torch.from_numpy(a) for a in inputs), check_trace=False)
    traced.save(str(work / "model_two_inputs.pt"))

    batch = m.BatchAxis()
    tensors = []
    for name, arr in zip(names, inputs):
        side = int(arr.shape[-1])
        tensors.append(m.InputTensorDescr(
            id=m.TensorId(name),
            description=f"grey patch, [0, 1], {side} px at {data.pixel_size_um:g} µm per pixel"
                        + (" (the centre of global_patch)" if name == "local_patch" else ""),
            axes=[batch, m.ChannelAxis(channel_names=[m.Identifier("grey")]),
                  m.SpaceInputAxis(id=m.AxisId("y"), size=side), m.SpaceInputAxis(id=m.AxisId("x"), size=side)],
            test_tensor=m.FileDescr(source=work / f"{name}.npy"),
            data=m.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0))))
    output = m.OutputTensorDescr(
        id=m.TensorId("probabilities"), description="class probabilities, the mean of the fold networks",
        axes=[batch, m.ChannelAxis(channel_names=[m.Identifier(_channel_name(c)) for c in predictor.class_names])],
        test_tensor=m.FileDescr(source=work / "probabilities.npy"),
        data=m.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
    version = torch.__version__.split("+")[0]
    descr = m.ModelDescr(
        name=f"ipb-ray {predictor.cfg.name or 'colony'} classifier",
        description=f"Colony patch classifier ({', '.join(predictor.class_names)}) trained with ipb-ray",
        authors=[m.Author(name="ipb-ray")],
        cite=[m.CiteEntry(text=CITATION, url=CITATION_URL)],
        license=m.LicenseId("Apache-2.0"),
        documentation=m.FileDescr(source=_readme(predictor, work / "README.md")),
        covers=[m.FileDescr(source=_cover(inputs[0], work / "cover.png"))],
        tags=["classification", "microscopy", "live-cell", "ipb-ray", "2d"],
        inputs=tensors, outputs=[output],
        weights=m.WeightsDescr(
            torchscript=m.TorchscriptWeightsDescr(source=work / "model_two_inputs.pt",
                                                  pytorch_version=m.Version(version)),
            onnx=m.OnnxWeightsDescr(source=Path(files["onnx"]), opset_version=18)),
        config={"ipb_ray": {"class_names": list(predictor.class_names), "source": predictor.source,
                            "pixel_size_um": data.pixel_size_um}},
    )
    folder = out / PACKAGE_DIR
    saved = Path(save_bioimageio_package_as_folder(descr, output_path=folder))
    rdf = saved / "rdf.yaml" if saved.is_dir() else saved
    status, details = validate_package(rdf)
    if status not in ("passed", "valid-format"):
        raise ExportError(f"bioimage.io: the package in {folder} does not validate ({status}): {details}")
    reproduced = test_package(rdf)
    archive = save_bioimageio_package(descr, output_path=out / "model.bioimageio.zip")
    (out / "bioimageio-validation.json").write_text(json.dumps({"status": status, "test_output_max_abs_diff":
                                                                reproduced}, indent=2) + "\n")
    return {"bioimageio": str(folder), "rdf": str(rdf), "bioimageio_zip": str(archive)}


def validate_package(rdf: str | Path) -> tuple[str, str]:
    """(status, details) of ``bioimageio.spec``'s validation of a written package (its
    format and every file it names, with their hashes)."""
    from bioimageio.spec import load_description

    descr = load_description(str(rdf), perform_io_checks=True)
    summary = descr.validation_summary
    return summary.status, summary.format() if summary.status not in ("passed", "valid-format") else ""


def test_package(rdf: str | Path, atol: float | None = None) -> dict[str, float]:
    """Run every weight format of a written package on its test inputs, as a consumer
    would (ONNX with onnxruntime, TorchScript with torch.jit), and compare with its test
    output: {weight format: max abs difference}. Raises ExportError above ``atol``.

    (bioimageio.core's ``test_model`` does the same; its 0.11 release pins bioimageio.spec
    0.5.12, which fails on pydantic 2.14, the version Ray and MLflow bring here.)"""
    import torch
    import yaml


    atol = TOLERANCE if atol is None else atol
    rdf = Path(rdf)
    root = rdf.parent
    spec = yaml.safe_load(rdf.read_text())
    inputs = [np.load(root / t["test_tensor"]["source"]) for t in spec["inputs"]]
    want = np.load(root / spec["outputs"][0]["test_tensor"]["source"])
    got: dict[str, np.ndarray] = {}
    weights = spec["weights"]
    if "onnx" in weights:
        import onnxruntime as ort

        session = ort.InferenceSession(str(root / weights["onnx"]["source"]), providers=["CPUExecutionProvider"])
        feeds = {i.name: a for i, a in zip(session.get_inputs(), inputs)}
        got["onnx"] = session.run(None, feeds)[0]
    if "torchscript" in weights:
        module = torch.jit.load(str(root / weights["torchscript"]["source"]))
        with torch.no_grad():
            got["torchscript"] = module(*[torch.from_numpy(a) for a in inputs]).numpy()
    diffs = {k: float(np.max(np.abs(v - want))) for k, v in got.items()}
    bad = {k: d for k, d in diffs.items() if not d <= atol}
    if bad or not diffs:
        raise ExportError(f"{rdf}: the test output is not reproduced: {bad or 'no weights run'}")
    return diffs
