"""A catalog's cross-validation folds, and the views that hold other fold plans of it.

The folds a catalog stores (``ipb preprocess`` draws them, :func:`make_catalog_folds`)
serve one ``split.*``; a run that asks for another (another labelled fraction, a
grouping) gets a *view* of the catalog, ``<catalog>/views/<plan>/``
(:func:`fold_catalog`), which shares the colony Parquet files and holds its own plan, so
sweeps never overwrite each other's folds. ``ipb train``, ``ipb cv`` and ``ipb tune`` all
resolve their catalog here (:func:`resolve_fold_catalog`), so ``split.*`` (and
``split.group_by``) is never silently ignored. Files and numpy only; no Ray.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

from ipb_ray.config import ExperimentConfig
from ipb_ray.data import catalog
from ipb_ray.params import ConfigError

__all__ = ["VIEWS", "fold_catalog", "make_catalog_folds", "resolve_fold_catalog", "view_name", "why_no_folds"]

log = logging.getLogger(__name__)

#: the folder, inside a catalog, of its fold views
VIEWS = "views"


def _plan_matches(plan: Any, cfg: ExperimentConfig) -> bool:
    s = cfg.split
    return (plan.k == s.folds and math.isclose(plan.labelled_fraction, s.labelled_fraction)
            and math.isclose(plan.val_fraction, s.val_fraction) and plan.seed == cfg.seed
            and plan.group_by == s.group_by)


def view_name(cfg: ExperimentConfig) -> str:
    """Folder name, under ``<catalog>/views/``, of the view holding ``cfg.split``'s folds."""
    s = cfg.split
    name = f"k{s.folds}-lf{s.labelled_fraction:g}-vf{s.val_fraction:g}-s{cfg.seed}"
    if s.group_by is None:
        return name
    kind, _, arg = s.group_by.partition(":")
    if kind == "column" and re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", arg):
        return f"{name}-by-{arg}"
    return f"{name}-by-{kind}-{hashlib.sha1(s.group_by.encode()).hexdigest()[:10]}"


def resolve_fold_catalog(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``data.catalog`` set to :func:`fold_catalog`, so a run trains on the
    folds ``cfg.split`` asks for (``ipb train`` and ``ipb tune``, as ``ipb cv`` does)."""
    root = fold_catalog(cfg)
    if root == str(cfg.data.catalog):
        return cfg
    log.info("split %s: training on the folds of the catalog view %s", cfg.split, root)
    return cfg.replace(f"data.catalog={root}")


def fold_catalog(cfg: ExperimentConfig) -> str:
    """The catalog directory whose stored folds match ``cfg.split`` (drawing them into a
    view of the catalog when the catalog's own plan differs)."""
    from ipb_ray.data.folds import read_folds

    root = Path(cfg.data.catalog)
    catalog.read_manifest(root)
    try:
        if _plan_matches(read_folds(root), cfg):
            return str(root)
    except FileNotFoundError:
        plan = make_catalog_folds(root, cfg)
        if plan is None:
            why = why_no_folds(root, cfg) or (f"too few single-labelled colonies for "
                                              f"split.folds={cfg.split.folds}; lower split.folds")
            raise ValueError(f"{root}: {why}") from None
        return str(root)
    s = cfg.split
    view = root / VIEWS / view_name(cfg)
    try:
        if _plan_matches(read_folds(view), cfg):
            return str(view)
    except (FileNotFoundError, ValueError):
        pass
    view.mkdir(parents=True, exist_ok=True)
    if not (view / "parts").exists():
        try:
            (view / "parts").symlink_to((root / "parts").resolve(), target_is_directory=True)
        except FileExistsError:  # another trial of a search made it first
            pass
    shutil.copyfile(root / catalog.MANIFEST, view / catalog.MANIFEST)
    if make_catalog_folds(view, cfg) is None:
        raise ValueError(f"{root} has too few single-labelled colonies for split.folds={s.folds} at "
                         f"split.labelled_fraction={s.labelled_fraction}")
    log.info("folds for %s drawn in the catalog view %s", cfg.split, view)
    return str(view)


def make_catalog_folds(root: str | Path, cfg: ExperimentConfig):
    """Draw the CV folds of a finished catalog with ``cfg.split`` and store them beside it.

    Returns the :class:`~ipb_ray.data.folds.FoldPlan`, or None (with a warning) when the
    catalog has too few single-labelled colonies for ``split.folds`` folds. With
    ``split.group_by`` whole groups go to the test folds (:mod:`ipb_ray.data.folds`); a
    grouping the catalog cannot give, or too few groups, raises ConfigError.
    """
    from ipb_ray.data.folds import make_folds, write_folds

    group_by = cfg.split.group_by
    wanted = ["colony_id", "label", "multi_label"]
    if group_by:  # everything a grouping may name, but the pixels
        wanted = [n for n in catalog.SCHEMA.names if n not in ("image", "mask")]
    table = catalog.read_catalog(root, columns=wanted)
    groups = catalog.colony_groups(table, group_by, catalog=str(root)) if group_by else None
    try:
        plan = make_folds(table.column("colony_id").to_pylist(), table.column("label").to_pylist(),
                          table.column("multi_label").to_pylist(), k=cfg.split.folds,
                          labelled_fraction=cfg.split.labelled_fraction,
                          val_fraction=cfg.split.val_fraction, seed=cfg.seed,
                          groups=groups, group_by=group_by)
    except ConfigError:
        raise
    except ValueError as exc:
        why = why_no_folds(root, cfg)
        if not why and group_by:  # labels enough, groups too few: a setting to change
            raise ConfigError(str(exc), key="split.group_by", source=str(root)) from None
        log.warning("%s: no folds drawn: %s", root, why or exc)
        return None
    write_folds(plan, root)
    return plan


def why_no_folds(root: str | Path, cfg: ExperimentConfig) -> str:
    """Why the finished catalog ``root`` has too few labels for ``split.folds`` folds, and
    what to do; "" when it has enough.

    A catalog without labels usually means the annotation rows were rejected (a frame
    path that resolves nowhere, an unknown class, a box on no colony), so the message
    counts them and quotes the first reason.
    """
    table = catalog.read_catalog(root, columns=["label", "multi_label"])
    labels, multi = table.column("label").to_pylist(), table.column("multi_label").to_pylist()
    single = sum(1 for lab, m in zip(labels, multi) if lab is not None and not m)
    k = cfg.split.folds
    if single >= k:
        return ""
    n_multi = sum(1 for m in multi if m)
    if single == 0:
        head = (f"no colony has a single label ({len(labels)} colonies: {n_multi} multi-label, "
                f"{len(labels) - n_multi} unlabelled)")
    else:
        head = f"only {single} single-labelled colonies for split.folds={k}; every test fold needs one"
    rejects = (catalog.read_rejects(root).to_pylist() if (Path(root) / "rejects").is_dir() else [])
    rows = [r for r in rejects if " row " in r["item"]]  # rows of the annotation table
    see = f"see {root}/rejects/ (Parquet: source, item, reason)"
    if rows:
        were = "row was" if len(rows) == 1 else "rows were"
        cause = (f"{len(rows)} annotation {were} rejected, first reason ({rows[0]['item']}): "
                 f"{rows[0]['reason']}; {see}")
        fix = "fix those rows (or data.frames/data.annotations) and rerun `ipb preprocess`"
    elif rejects:
        were = "input was" if len(rejects) == 1 else "inputs were"
        cause = f"{len(rejects)} {were} rejected, first reason ({rejects[0]['source']}): " \
                f"{rejects[0]['reason']}; {see}"
        fix = "fix those inputs and rerun `ipb preprocess`"
    else:
        importer = catalog.read_manifest(root).get("importer")
        if single:
            cause = "nothing was rejected; the inputs label too few colonies"
            fix = "label more colonies and rerun `ipb preprocess`"
        elif importer in ("frames", "synth"):
            cause = "the import read no annotation rows (data.annotations unset or empty)"
            fix = ("set data.annotations to a table with columns frame, x0,y0,x1,y1 (or x,y), label "
                   "and rerun `ipb preprocess`")
        elif importer == "imagefolder":
            cause = "no crops sit in a <root>/<class>/ folder (only multi_label/ or unlabeled/)"
            fix = "put single-label crops in <root>/<class>/ and rerun `ipb preprocess`"
        else:
            cause, fix = "nothing was rejected", "label more colonies and rerun `ipb preprocess`"
    if 2 <= single < k:
        fix += f", or lower split.folds (to at most {single})"
    return f"{head}: {cause}. To fix: {fix}"
