"""The epochs the stream benchmarks stream: the same draws, in the same order, for every pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def stream_spec(stream: str, class_names: tuple[str, ...]):
    """The labelled stream: ``train`` mode (one augmented view); the unlabelled one:
    ``uda`` mode (weak and strong views), as the IPB student reads them."""
    from ipb_ray.config import DataConfig
    from ipb_ray.patches.core import StreamSpec
    from ipb_ray.patches.geometry import PatchGeometry

    return StreamSpec(geometry=PatchGeometry.from_config(DataConfig()), class_names=class_names, seed=0,
                      mode="train" if stream == "labelled" else "uda")


def ids_and_labels(catalog_dir: Path) -> tuple[list[str], list[Any]]:
    """The catalog's colony ids and labels, in file order."""
    import pyarrow.parquet as pq

    ids, labels = [], []
    for path in sorted((Path(catalog_dir) / "parts").glob("*.parquet")):
        table = pq.read_table(path, columns=["colony_id", "label"])
        ids.extend(table.column("colony_id").to_pylist())
        labels.extend(table.column("label").to_pylist())
    return ids, labels


def epoch_counts(stream: str, ids: list[str], labels: list[Any], class_names: tuple[str, ...],
                 epoch: int) -> dict[str, int]:
    """Copies per colony of one epoch.

    ``labelled``: a class-balanced draw of as many patches as there are labelled colonies
    (as ``method.balance_labelled`` draws L). ``unlabelled``: IPB's pseudo-balanced
    multinomial over every colony of the catalog, as many draws as colonies, with each
    colony's known class as its pseudo-label (a seeded random class where it has none)."""
    import numpy as np

    from ipb_ray.patches.balance import pseudo_balance, resample_counts

    index = {n: i for i, n in enumerate(class_names)}
    if stream == "labelled":
        known = [(c, index[lab]) for c, lab in zip(ids, labels) if lab in index]
        counts = resample_counts(np.array([k for _, k in known]), len(known), 0, epoch, balanced=True)
        return {c: int(n) for (c, _), n in zip(known, counts) if n}
    rng = np.random.default_rng(0)
    pseudo = np.array([index.get(lab, int(rng.integers(len(class_names)))) for lab in labels])
    pb = pseudo_balance(pseudo, len(class_names), 0, epoch, n_draws=len(ids))
    return {c: int(n) for c, n in zip(ids, pb.counts) if n}


def epoch_plan(stream: str, ids: list[str], labels: list[Any], class_names: tuple[str, ...],
               epoch: int) -> dict[str, Any]:
    """The epoch's draw, shuffled over the whole epoch (:mod:`ipb_ray.patches.plan`)."""
    from ipb_ray.patches.plan import stream_plan

    return stream_plan(None, seed=0, epoch=epoch, stream=stream,
                       counts=epoch_counts(stream, ids, labels, class_names, epoch))
