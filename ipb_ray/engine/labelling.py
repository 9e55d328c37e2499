"""The labelling pass's arithmetic, whoever runs it: a network's pseudo-labels for a batch
of label-mode patch rows (:func:`label_rows`), and the parts of a pass collected into a
:class:`ipb_ray.patches.pseudo_labels.LabelTable` (:func:`collect_labels`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from ipb_ray.patches.core import StreamSpec
from ipb_ray.patches.pseudo_labels import LabelTable

__all__ = ["LABEL_COLUMNS", "collect_labels", "empty_labels", "label_rows"]

LABEL_COLUMNS = ("colony_id", "truth", "x", "y", "scale", "pseudo", "confidence", "probs")


def empty_labels() -> dict[str, np.ndarray]:
    return {"colony_id": np.array([], dtype=object), "truth": np.zeros(0, np.int64), "x": np.zeros(0, np.int32),
            "y": np.zeros(0, np.int32), "scale": np.zeros(0, np.float32), "pseudo": np.zeros(0, np.int64),
            "confidence": np.zeros(0, np.float32), "probs": np.zeros((0, 0), np.float32)}


def label_rows(model: Any, rows: Mapping[str, np.ndarray], spec: StreamSpec, device: Any) -> dict[str, np.ndarray]:
    """``model`` (in eval mode) on patch rows of ``spec`` (mode ``label``): each row's
    window, its hidden truth, the pseudo-label, its confidence and the class probabilities."""
    import torch

    if not len(rows["colony_id"]):
        return empty_labels()
    with torch.no_grad():
        out = model(*[torch.from_numpy(rows[c]).to(device) for c in spec.patch_columns()])
        probs = torch.softmax((out[0] if isinstance(out, (tuple, list)) else out).float(), dim=1).cpu()
    confidence, pseudo = probs.max(dim=1)
    return {"colony_id": rows["colony_id"], "truth": rows["label"], "x": rows["x"], "y": rows["y"],
            "scale": rows["scale"], "pseudo": pseudo.numpy().astype(np.int64),
            "confidence": confidence.numpy().astype(np.float32), "probs": probs.numpy().astype(np.float32)}


def collect_labels(batches: Iterable[Mapping[str, Any]]) -> LabelTable:
    """The rows of a labelling pass's batches (:data:`LABEL_COLUMNS`) as one table."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in LABEL_COLUMNS}
    for batch in batches:
        for k in LABEL_COLUMNS:
            parts[k].append(np.asarray(batch[k]))
    parts["probs"] = [p for p in parts["probs"] if p.size]  # empty batches carry a (0, 0) block
    cols = {k: np.concatenate(v) if v else empty_labels()[k] for k, v in parts.items()}
    cols["colony_id"] = cols["colony_id"].astype(object)
    return LabelTable.from_rows(cols)
