"""Names and safe loading of a training checkpoint's files (the layout of their content: docs/methods.md).

The training loop (:mod:`ipb_ray.distributed.training`) writes them; MLflow packaging
(:mod:`ipb_ray.tracking.runs`) and the CLI read them. Kept here so neither side imports
the other.
"""

from __future__ import annotations

import os

__all__ = ["CHECKPOINT_FILE", "HISTORY_FILE", "UnsafeCheckpointError", "load_state"]

#: the state torch.save-d by rank 0 in every checkpoint directory
CHECKPOINT_FILE = "state.pt"
#: the run's per-epoch history so far, beside it
HISTORY_FILE = "history.json"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds more than weights and plain data."""


def load_state(path: str | os.PathLike[str]) -> dict:
    """A checkpoint's state, read with ``torch.load(weights_only=True)``: tensors, numbers,
    strings and containers only, so a checkpoint from someone else cannot run code when it
    is opened. Everything ipb-ray writes loads this way; a file that needs more (a pickled
    object) is refused with :class:`UnsafeCheckpointError` naming it."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path} holds more than weights and plain data ({first[:200]}); ipb-ray opens checkpoints with "
            "torch.load(weights_only=True) so that a file from someone else cannot run code. Use a checkpoint "
            "written by ipb-ray (`ipb train`/`ipb cv`), or, only for a file you trust, load it yourself and "
            "re-save its state dict.") from None
