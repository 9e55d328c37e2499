"""What every export format shares: its error and the agreement it must reach with the
PyTorch model (:mod:`ipb_ray.prediction.export` writes ONNX and TorchScript,
:mod:`ipb_ray.prediction.bioimageio` the BioImage Model Zoo package on top of them)."""

from __future__ import annotations

__all__ = ["TOLERANCE", "ExportError"]

#: What an export must agree with the PyTorch model to, on the sample patches (max abs difference).
TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that cannot be made; the message says why and what to do."""
