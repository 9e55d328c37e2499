"""Cross-validation folds: disjoint test folds T, with L, V and U carved from the rest.

The paper's split (shared/IPB.md, "Training"): per fold, T is a tenth of the
single-labelled colonies, L another tenth, and U the remaining labelled colonies (their
labels hidden from training) plus every multi-label colony; 10-fold cross-validation.
We also hold out a stratified share of L as a validation split V for model selection,
so T is never used to pick a checkpoint.

How a plan is drawn (all choices seeded; rows are sorted by ``colony_id`` first, so the
row order of the catalog does not change the plan):

1. Each class's single-labelled colonies are shuffled and dealt round-robin onto the k
   test folds, continuing where the previous class stopped. Every labelled colony is in
   exactly one T, per-class counts across folds differ by at most one, and so do the
   fold sizes.
2. Fold f draws ``L_f`` from the labelled colonies outside ``T_f``: round-half-up of
   ``labelled_fraction * N_labelled`` colonies, apportioned to classes by their share
   (largest remainders), at least one of each class present. The rest of the labelled
   colonies, every multi-label colony and every colony without a label go to U.
3. ``L_f`` is split into training (role ``"L"``) and validation (role ``"V"``) by
   ``val_fraction``, again stratified, keeping at least one training colony per class.
   V is taken from the same seeded per-class order as L, so changing ``val_fraction``
   moves colonies between L and V only.

Grouped plans (``split.group_by``): on time-lapse data one colony is imaged hourly, so
per-colony folds put the same colony in L/U and in T. Given a group per colony (a well,
a sequence, a track; see :func:`ipb_ray.data.catalog.colony_groups`), step 1 deals whole groups instead:
groups in a seeded order, largest first, each onto the test fold that has fewest
colonies of the group's majority class so far (then fewest colonies, then the lowest
index). Every labelled colony of a group is then in the same T_f, and L_f/V_f are drawn
from colonies outside T_f only, so from other groups. A colony without a single label
whose group is in T_f can be neither tested nor left in U beside its own group's test
colonies: it gets role ``"E"`` (excluded from fold f). A colony with no group name is a
group of its own. Per-class counts and fold sizes are then only as even as the group
sizes allow.

Balanced resampling of L for teacher pre-training is recorded, not materialised:
:meth:`FoldPlan.class_weights` gives each class the weight 1/count in L, so every class
is drawn equally often.

Stored as ``catalog/folds.parquet`` (long format, one row per fold and colony; the plan
parameters ride in the schema metadata) and ``catalog/folds.json`` (the same parameters
plus per-fold sizes and class weights, for people and dashboards).

Pure numpy/pyarrow; no Ray import.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ipb_ray.config import ConfigError

__all__ = [
    "check_folds", "FoldPlan", "FOLDS_JSON", "FOLDS_PARQUET", "FOLDS_VERSION", "GROUP_FIELD", "make_folds",
    "read_folds", "ROLES", "SCHEMA", "write_folds",
]

log = logging.getLogger(__name__)

#: Roles of a colony within one fold: unlabelled, labelled (training), validation
#: (held out of L for model selection), test, and excluded (grouped plans only: no single
#: label, but its group is in the test fold; training uses it nowhere).
ROLES = ("U", "L", "V", "T", "E")
_U, _L, _V, _T, _E = range(len(ROLES))

FOLDS_PARQUET = "folds.parquet"
FOLDS_JSON = "folds.json"
FOLDS_VERSION = 1
_META_KEY = b"ipb_ray.folds"  # an on-disk identifier (catalogs written before the package move carry it): keep

#: One row per (fold, colony). ``label`` is the true label, kept for every role (U's
#: labels are hidden from training but score the pseudo-labels); null for multi-label
#: and unlabelled colonies.
SCHEMA = pa.schema([
    pa.field("fold", pa.int16(), nullable=False),
    pa.field("colony_id", pa.string(), nullable=False),
    pa.field("role", pa.string(), nullable=False),
    pa.field("label", pa.string()),
])
#: Extra column of a grouped plan: the colony's group (null = a group of its own).
GROUP_FIELD = pa.field("group", pa.string())

# Independent random streams (SeedSequence([seed, stream, ...])), so that e.g. the
# test folds do not move when the labelled fraction changes.
_TEST_STREAM = 0
_LABELLED_STREAM = 1


# --------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class FoldPlan:
    """A k-fold plan: which role every colony plays in every fold.

    ``table`` has the columns of :data:`SCHEMA` (``role`` may be dictionary-encoded),
    plus :data:`GROUP_FIELD` when ``group_by`` is set; ``class_names`` are the single
    labels, sorted; ``group_by`` is how the groups were named (``split.group_by``), None
    for a per-colony plan.
    """

    table: pa.Table
    class_names: tuple[str, ...]
    k: int
    labelled_fraction: float
    val_fraction: float
    seed: int
    group_by: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        missing = [n for n in SCHEMA.names if n not in self.table.column_names]
        if missing:
            raise ValueError(f"fold table lacks column(s) {missing}; expected {SCHEMA.names}")
        if self.group_by is not None and GROUP_FIELD.name not in self.table.column_names:
            raise ValueError(f"fold table of a plan grouped by {self.group_by!r} lacks the "
                             f"{GROUP_FIELD.name!r} column")

    def _check_fold(self, fold: int) -> int:
        if not 0 <= int(fold) < self.k:
            raise IndexError(f"fold {fold} is out of range; this plan has folds 0..{self.k - 1}")
        return int(fold)

    def roles(self, fold: int) -> dict[str, list[str]]:
        """Role -> colony ids (sorted) of ``fold``; every role in :data:`ROLES` is a key."""
        fold = self._check_fold(fold)
        rows = self.table.filter(pc.equal(self.table["fold"], fold))
        out: dict[str, list[str]] = {r: [] for r in ROLES}
        for cid, role in zip(rows["colony_id"].to_pylist(), rows["role"].to_pylist()):
            out[role].append(cid)
        for ids in out.values():
            ids.sort()
        return out

    @cached_property
    def _counts(self) -> np.ndarray:
        """(k, len(ROLES), len(class_names) + 1) colony counts; the last bin is "no label"."""
        c = len(self.class_names)
        fold = _to_numpy(self.table["fold"]).astype(np.int64)
        role = _codes(self.table["role"], ROLES)
        label = _codes(self.table["label"], self.class_names)
        label = np.where(label < 0, c, label)
        ok = (fold >= 0) & (fold < self.k) & (role >= 0)
        flat = (fold[ok] * len(ROLES) + role[ok]) * (c + 1) + label[ok]
        counts = np.bincount(flat, minlength=self.k * len(ROLES) * (c + 1))
        return counts.reshape(self.k, len(ROLES), c + 1)

    def class_weights(self, fold: int) -> dict[str, float]:
        """Balanced-resampling weight of each class in L of ``fold``: 1 / (its count in L).

        A class with no colony in L gets 0.0 (it cannot be drawn).
        """
        counts = self._counts[self._check_fold(fold), _L, :-1]
        return {name: (1.0 / int(n) if n else 0.0) for name, n in zip(self.class_names, counts)}

    def summary(self) -> list[dict[str, Any]]:
        """Per fold: sizes of U/L/V/T (and E in a grouped plan), labelled colonies inside U,
        per-class counts of L, V, T."""
        roles = ROLES if self.group_by is not None else ROLES[:_E]
        out = []
        for f in range(self.k):
            counts = self._counts[f]
            row: dict[str, Any] = {"fold": f}
            row.update({r: int(counts[i].sum()) for i, r in enumerate(roles)})
            row["U_labelled"] = int(counts[_U, :-1].sum())
            for r in ("L", "V", "T"):
                row[f"{r}_counts"] = {n: int(v) for n, v in
                                      zip(self.class_names, counts[ROLES.index(r), :-1])}
            out.append(row)
        return out


# --------------------------------------------------------------------------- making

def make_folds(colony_ids: Iterable[str], labels: Iterable[str | None],
               multi_label: Iterable[bool], k: int = 10, labelled_fraction: float = 0.1,
               val_fraction: float = 0.2, seed: int = 0,
               groups: Iterable[str | None] | None = None, group_by: str | None = None) -> FoldPlan:
    """Draw a k-fold plan over a colony table (see the module docstring for the rules).

    ``colony_ids``: unique strings; ``labels``: the single label or None (multi-label or
    never labelled); ``multi_label``: one flag per colony (a flagged colony is treated as
    having no single label). Lists, numpy or pyarrow arrays all work. The result depends
    only on the set of (id, label, flag) rows and the parameters, not on row order.

    ``groups``: one group name per colony (None = a group of its own), e.g. from
    :func:`ipb_ray.data.catalog.colony_groups`; whole groups are then dealt onto the test folds. ``group_by``
    says how the names were made and is stored with the plan (default ``"groups"``).
    """
    _check_params(k, labelled_fraction, val_fraction, seed)
    ids, labs, grp = _normalise(colony_ids, labels, multi_label, groups)
    class_names = tuple(sorted({lab for lab in labs if lab is not None}))
    index = {name: i for i, name in enumerate(class_names)}
    cls = np.array([index[lab] if lab is not None else -1 for lab in labs], dtype=np.int64)
    n, n_labelled = len(ids), int((cls >= 0).sum())
    if n_labelled < k:
        raise ValueError(f"only {n_labelled} single-labelled colonies for {k} folds; every test "
                         "fold needs at least one (label more colonies or lower split.folds)")

    if grp is None:
        gcode = None
        test_fold = _deal_test_folds(cls, class_names, k, seed)
    else:
        group_by = group_by or "groups"
        gcode = _group_codes(grp)
        test_fold = _deal_test_groups(cls, gcode, grp, class_names, k, seed, group_by)
    budget = _round_half_up(labelled_fraction * n_labelled)
    role = np.full((k, n), _U, dtype=np.int8)
    for f in range(k):
        role[f] = _fold_roles(f, cls, class_names, test_fold, budget, val_fraction, seed)
        if gcode is not None:  # no single label, but its group is under test: sits the fold out
            role[f][(cls < 0) & np.isin(gcode, gcode[test_fold == f])] = _E

    take = np.tile(np.arange(n), k)
    columns = {
        "fold": pa.array(np.repeat(np.arange(k), n).astype(np.int16), pa.int16()),
        "colony_id": pa.array(ids, pa.string()).take(take),
        "role": pa.array(np.asarray(ROLES, dtype=object)[role.ravel()], pa.string()),
        "label": pa.array(labs, pa.string()).take(take),
    }
    schema = SCHEMA
    if grp is not None:
        columns[GROUP_FIELD.name] = pa.array(grp, pa.string()).take(take)
        schema = SCHEMA.append(GROUP_FIELD)
    return FoldPlan(table=pa.table(columns, schema=schema), class_names=class_names, k=k,
                    labelled_fraction=float(labelled_fraction), val_fraction=float(val_fraction),
                    seed=int(seed), group_by=group_by if grp is not None else None)


def _check_params(k: int, labelled_fraction: float, val_fraction: float, seed: int) -> None:
    # config.SplitConfig checks the same; direct callers get the same message.
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"{k!r} folds; need a whole number >= 2", key="split.folds")
    if not 0.0 < labelled_fraction < 1.0:
        raise ConfigError(f"{labelled_fraction!r} should lie in (0, 1)",
                          key="split.labelled_fraction")
    if labelled_fraction + 1.0 / k >= 1.0:
        raise ConfigError(
            f"{labelled_fraction} plus the test share 1/{k} leaves no unlabelled data; lower "
            "split.labelled_fraction or raise split.folds", key="split.labelled_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"{val_fraction!r} should lie in [0, 1)", key="split.val_fraction")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{seed!r} should be a whole number >= 0", key="seed")


def _normalise(colony_ids: Iterable[str], labels: Iterable[str | None],
               multi_label: Iterable[bool], groups: Iterable[str | None] | None = None
               ) -> tuple[list[str], list[str | None], list[str | None] | None]:
    """Ids, effective single labels and groups, sorted by id; rejects mismatches and duplicates."""
    ids, labs, multi = _as_list(colony_ids), _as_list(labels), _as_list(multi_label)
    if not len(ids) == len(labs) == len(multi):
        raise ValueError(f"colony_ids, labels and multi_label differ in length "
                         f"({len(ids)}, {len(labs)}, {len(multi)})")
    grp = None if groups is None else _as_list(groups)
    if grp is not None:
        if len(grp) != len(ids):
            raise ValueError(f"groups has {len(grp)} entries for {len(ids)} colonies; give one group "
                             "name (or None) per colony")
        for cid, g in zip(ids, grp):
            if g is not None and (not isinstance(g, str) or not g):
                raise ValueError(f"colony {cid!r}: group {g!r} should be a non-empty string or None")
    for cid in ids:
        if not isinstance(cid, str) or not cid:
            raise ValueError(f"colony id {cid!r} is not a non-empty string")
    for cid, lab in zip(ids, labs):
        if lab is not None and (not isinstance(lab, str) or not lab):
            raise ValueError(f"colony {cid!r}: label {lab!r} should be a non-empty string or None")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for dup in ids:
            if dup in seen:
                break
            seen.add(dup)
        raise ValueError(f"colony id {dup!r} occurs more than once; ids must be unique")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return ([ids[i] for i in order],
            [None if multi[i] else labs[i] for i in order],
            None if grp is None else [grp[i] for i in order])


def _as_list(values: Iterable[Any]) -> list[Any]:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_pylist()
    if isinstance(values, np.ndarray):
        return values.tolist()
    return list(values)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *stream]))


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _deal_test_folds(cls: np.ndarray, class_names: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Test fold of every colony (-1 when it has no single label)."""
    rng = _rng(seed, _TEST_STREAM)
    fold = np.full(cls.size, -1, dtype=np.int64)
    start = 0  # carry on where the last class stopped, so fold sizes stay even too
    for c, name in enumerate(class_names):
        members = rng.permutation(np.flatnonzero(cls == c))
        fold[members] = (start + np.arange(members.size)) % k
        start = (start + members.size) % k
        if members.size < k:
            log.warning("class %r has %d single-labelled colonies, fewer than the %d folds; "
                        "%d test folds have none of it", name, members.size, k, k - members.size)
    return fold


def _group_codes(groups: Sequence[str | None]) -> np.ndarray:
    """Integer code per colony: named groups by sorted name, then one code per unnamed colony."""
    names = sorted({g for g in groups if g is not None})
    index = {g: i for i, g in enumerate(names)}
    codes = np.empty(len(groups), dtype=np.int64)
    spare = len(names)
    for i, g in enumerate(groups):
        if g is None:
            codes[i], spare = spare, spare + 1
        else:
            codes[i] = index[g]
    return codes


def _deal_test_groups(cls: np.ndarray, gcode: np.ndarray, groups: Sequence[str | None],
                      class_names: Sequence[str], k: int, seed: int, group_by: str) -> np.ndarray:
    """Test fold of every colony, dealing whole groups (-1 for colonies without a single
    label; see the module docstring for the order)."""
    c = len(class_names)
    labelled = cls >= 0
    # (groups, classes) counts of single-labelled colonies; groups without any are never tested
    counts = np.zeros((int(gcode.max()) + 1, c), dtype=np.int64)
    np.add.at(counts, (gcode[labelled], cls[labelled]), 1)
    tested = np.flatnonzero(counts.sum(axis=1) > 0)
    if tested.size < k:
        held = "group holds" if tested.size == 1 else "groups hold"
        raise ValueError(f"only {tested.size} {held} single-labelled colonies (split.group_by={group_by}), "
                         f"for {k} folds; every test fold needs a group of its own (lower split.folds, or "
                         "group by something finer)")
    n_labelled = int(labelled.sum())
    size = counts.sum(axis=1)
    big = tested[size[tested] > n_labelled / k]
    if big.size:
        g = int(big[np.argmax(size[big])])
        log.warning("group %r holds %d of the %d single-labelled colonies, more than a test fold's "
                    "share (1/%d); the test folds will differ in size", _group_name(groups, gcode, g),
                    int(size[g]), n_labelled, k)
    order = _rng(seed, _TEST_STREAM).permutation(tested)
    order = order[np.argsort(-size[order], kind="stable")]  # largest first, ties in seeded order
    fold_of_group = np.full(counts.shape[0], -1, dtype=np.int64)
    per_class = np.zeros((k, c), dtype=np.int64)
    for g in order:
        major = int(np.argmax(counts[g]))  # ties: the earlier class
        key = per_class[:, major] * (n_labelled + 1) + per_class.sum(axis=1)
        f = int(np.argmin(key))  # ties: the lower fold
        fold_of_group[g] = f
        per_class[f] += counts[g]
    for i, name in enumerate(class_names):
        if (per_class[:, i] == 0).any():
            log.warning("class %r lies in too few groups to reach every test fold; %d test folds "
                        "have none of it", name, int((per_class[:, i] == 0).sum()))
    return np.where(labelled, fold_of_group[gcode], -1)


def _group_name(groups: Sequence[str | None], gcode: np.ndarray, code: int) -> str | None:
    return groups[int(np.flatnonzero(gcode == code)[0])]


def _fold_roles(f: int, cls: np.ndarray, class_names: Sequence[str], test_fold: np.ndarray,
                budget: int, val_fraction: float, seed: int) -> np.ndarray:
    """Role codes of every colony in fold ``f``."""
    rng = _rng(seed, _LABELLED_STREAM, f)
    role = np.full(cls.size, _U, dtype=np.int8)
    role[test_fold == f] = _T
    # Per class, the labelled colonies outside T_f in a seeded order; L takes a prefix.
    pools = [rng.permutation(np.flatnonzero((cls == c) & (test_fold != f)))
             for c in range(len(class_names))]
    available = np.array([p.size for p in pools], dtype=np.int64)
    present = int((available > 0).sum())
    for c in np.flatnonzero(available == 0):
        log.warning("fold %d: class %r has no labelled colony outside the test fold, so L has "
                    "none of it", f, class_names[c])
    if budget < present:
        log.warning("fold %d: %d labelled colonies cannot cover %d classes; L takes one of each "
                    "class instead (raise split.labelled_fraction)", f, budget, present)
        budget = present
    n_l = _apportion(budget, available, available, minimum=1)
    n_v = _apportion(_round_half_up(val_fraction * n_l.sum()), n_l, np.maximum(n_l - 1, 0),
                     minimum=0)
    for pool, size, n_val in zip(pools, n_l, n_v):
        role[pool[:n_val]] = _V
        role[pool[n_val:size]] = _L
    return role


def _apportion(total: int, weights: np.ndarray, caps: np.ndarray, minimum: int) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights``, each part within
    [min(minimum, cap), cap] (largest remainders; ties go to the earlier class)."""
    weights = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    total = int(min(total, caps.sum()))
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(caps.size, dtype=np.int64)
    quota = total * weights / weights.sum()
    floor = np.minimum(minimum, caps)
    parts = np.clip(np.floor(quota).astype(np.int64), floor, caps)
    while parts.sum() < total:
        room = np.where(parts < caps, quota - parts, -np.inf)
        parts[int(np.argmax(room))] += 1
    while parts.sum() > total:
        spare = parts > floor
        if not spare.any():
            break
        parts[int(np.argmax(np.where(spare, parts - quota, -np.inf)))] -= 1
    return parts


# --------------------------------------------------------------------------- checking

def _to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_numpy())


def _codes(column: pa.ChunkedArray | pa.Array, vocabulary: Sequence[str]) -> np.ndarray:
    """Index of each value in ``vocabulary``; -1 for null or unknown values."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    idx = pc.index_in(column, value_set=pa.array(list(vocabulary), pa.string()))
    return _to_numpy(idx.fill_null(-1)).astype(np.int64)


def check_folds(plan: FoldPlan) -> None:
    """Raise ValueError naming the colony and fold where an invariant of the plan fails.

    Checked: no nulls in fold/colony_id/role; folds in 0..k-1 and roles in :data:`ROLES`;
    labels among ``class_names``; one row per (fold, colony) and every colony in every
    fold; a colony's label is the same in every fold; multi-label and unlabelled colonies
    are always U; every labelled colony is in exactly one test fold. In a grouped plan
    also: a colony's group is the same in every fold, no colony of a group in T_f is in
    L, V or U of fold f, and role E is only for colonies without a single label whose
    group is in T_f (E does not occur in a per-colony plan).
    """
    t = plan.table
    for name in ("fold", "colony_id", "role"):
        if t[name].null_count:
            raise ValueError(f"fold table: column {name!r} has {t[name].null_count} null value(s)")
    fold = _to_numpy(t["fold"]).astype(np.int64)
    ids = pc.unique(t["colony_id"])
    n, k = len(ids), plan.k
    cid = _codes(t["colony_id"], ids.to_pylist())
    names = ids.to_pylist()
    role = _codes(t["role"], ROLES)
    label = _codes(t["label"], plan.class_names)
    has_label = _to_numpy(t["label"].is_valid())

    bad = np.flatnonzero((fold < 0) | (fold >= k))
    if bad.size:
        i = bad[0]
        raise ValueError(f"colony {names[cid[i]]!r} is in fold {fold[i]}, outside 0..{k - 1}")
    bad = np.flatnonzero(role < 0)
    if bad.size:
        i = bad[0]
        raise ValueError(f"fold {fold[i]}: colony {names[cid[i]]!r} has role "
                         f"{t['role'][int(i)].as_py()!r}; roles are {', '.join(ROLES)}")
    bad = np.flatnonzero(has_label & (label < 0))
    if bad.size:
        i = bad[0]
        raise ValueError(f"fold {fold[i]}: colony {names[cid[i]]!r} has label "
                         f"{t['label'][int(i)].as_py()!r}, not one of {list(plan.class_names)}")

    key = fold * n + cid
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(np.diff(key[order]) == 0)
    if dup.size:
        a, b = order[dup[0]], order[dup[0] + 1]
        raise ValueError(f"fold {fold[a]}: colony {names[cid[a]]!r} appears twice "
                         f"(roles {ROLES[role[a]]} and {ROLES[role[b]]}); a colony has one "
                         "role per fold")
    per_fold = np.bincount(fold, minlength=k)
    short = np.flatnonzero(per_fold != n)
    if short.size:
        f = int(short[0])
        seen = np.zeros(n, dtype=bool)
        seen[cid[fold == f]] = True
        raise ValueError(f"fold {f} is missing colony {names[int(np.flatnonzero(~seen)[0])]!r} "
                         f"({n - per_fold[f]} of {n} colonies missing)")

    # From here on every fold holds every colony exactly once.
    first, i = _fold0_disagreement(label, fold, cid, n)
    if i is not None:
        raise ValueError(f"fold {fold[i]}: colony {names[cid[i]]!r} has label "
                         f"{t['label'][int(i)].as_py()!r}, but {_name(plan, first[cid[i]])} "
                         "in fold 0; a colony's label is the same in every fold")
    bad = np.flatnonzero((label < 0) & (role != _U) & (role != _E))
    if bad.size:
        i = bad[0]
        raise ValueError(f"fold {fold[i]}: colony {names[cid[i]]!r} has no single label "
                         f"(multi-label or unlabelled) but role {ROLES[role[i]]}; such colonies "
                         "belong to U (or E, beside a test group)")
    if plan.group_by is None:
        bad = np.flatnonzero(role == _E)
        if bad.size:
            i = bad[0]
            raise ValueError(f"fold {fold[i]}: colony {names[cid[i]]!r} has role E, which only a "
                             "grouped plan (split.group_by) has")
    else:
        _check_groups(plan, fold, cid, names, role, label)
    in_test = np.bincount(cid[role == _T], minlength=n)
    bad = np.flatnonzero((first >= 0) & (in_test != 1))
    if bad.size:
        c = int(bad[0])
        folds = sorted(int(x) for x in fold[(cid == c) & (role == _T)])
        where = f"the test folds of folds {folds}" if folds else "no test fold"
        raise ValueError(f"labelled colony {names[c]!r} is in {where}; each labelled colony "
                         "belongs to exactly one test fold")


def _fold0_disagreement(values: np.ndarray, fold: np.ndarray, cid: np.ndarray, n: int
                        ) -> tuple[np.ndarray, int | None]:
    """Each colony's value in fold 0, and the first row whose value differs from it (None
    when every fold agrees)."""
    first = np.full(n, -1, dtype=np.int64)
    in0 = fold == 0
    first[cid[in0]] = values[in0]
    bad = np.flatnonzero(values != first[cid])
    return first, (int(bad[0]) if bad.size else None)


def _check_groups(plan: FoldPlan, fold: np.ndarray, cid: np.ndarray, names: Sequence[str],
                  role: np.ndarray, label: np.ndarray) -> None:
    """The group invariants of :func:`check_folds` (every fold holds every colony once)."""
    column = plan.table[GROUP_FIELD.name]
    group_names = pc.unique(column.drop_null()).to_pylist()
    n, g_named = len(names), len(group_names)
    group = _codes(column, group_names)
    group = np.where(group < 0, g_named + cid, group)  # unnamed: a group of its own

    def shown(code: int) -> str:
        return repr(group_names[code]) if code < g_named else "(none)"

    first, i = _fold0_disagreement(group, fold, cid, n)
    if i is not None:
        raise ValueError(f"fold {fold[i]}: colony {names[cid[i]]!r} is in group {shown(group[i])}, but "
                         f"in group {shown(first[cid[i]])} in fold 0; a colony's group is the same in "
                         "every fold")
    n_groups = g_named + n
    key = fold * n_groups + group
    tested = np.zeros(plan.k * n_groups, dtype=bool)
    tested[key[role == _T]] = True
    under_test = tested[key]
    bad = np.flatnonzero(under_test & (role != _T) & (role != _E))
    if bad.size:
        i = bad[0]
        other = np.flatnonzero((key == key[i]) & (role == _T))[0]
        raise ValueError(f"fold {fold[i]}: colony {names[cid[i]]!r} of group {shown(group[i])} has role "
                         f"{ROLES[role[i]]}, but colony {names[cid[other]]!r} of the same group is in "
                         "the test fold; a group is never split across T and L/U/V "
                         f"(split.group_by={plan.group_by})")
    bad = np.flatnonzero((role == _E) & ~under_test)
    if bad.size:
        i = bad[0]
        raise ValueError(f"fold {fold[i]}: colony {names[cid[i]]!r} has role E, but its group "
                         f"{shown(group[i])} is not in the test fold; E is only for colonies of a "
                         "group under test")
    bad = np.flatnonzero((role == _E) & (label >= 0))
    if bad.size:
        i = bad[0]
        raise ValueError(f"fold {fold[i]}: labelled colony {names[cid[i]]!r} has role E; the labelled "
                         "colonies of a group under test belong to T")


def _name(plan: FoldPlan, code: int) -> str:
    return repr(plan.class_names[code]) if code >= 0 else "no label"


# --------------------------------------------------------------------------- storage

def _metadata(plan: FoldPlan) -> dict[str, Any]:
    return {"version": FOLDS_VERSION, "k": plan.k, "labelled_fraction": plan.labelled_fraction,
            "val_fraction": plan.val_fraction, "seed": plan.seed,
            "class_names": list(plan.class_names), "group_by": plan.group_by}


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_folds(plan: FoldPlan, catalog_dir: str | Path) -> Path:
    """Check ``plan`` and write ``catalog_dir/folds.parquet`` and ``folds.json``.

    Each file is written to a temporary name and renamed, so a crash never leaves a
    half-written file. The Parquet file is complete on its own (the parameters ride in
    its schema metadata); the JSON adds per-fold sizes and class weights for reading.
    Returns the Parquet path.
    """
    check_folds(plan)
    root = Path(catalog_dir)
    root.mkdir(parents=True, exist_ok=True)
    meta = _metadata(plan)
    table = plan.table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    parquet = root / FOLDS_PARQUET
    _atomic_write(parquet, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    report = {**meta,
              "colonies": plan.table.num_rows // plan.k,
              "summary": plan.summary(),
              "class_weights": {str(f): plan.class_weights(f) for f in range(plan.k)}}
    text = json.dumps(report, indent=2)
    _atomic_write(root / FOLDS_JSON, lambda tmp: Path(tmp).write_text(text))
    return parquet


def read_folds(catalog_dir: str | Path) -> FoldPlan:
    """Read and check the plan that :func:`write_folds` left in ``catalog_dir``."""
    root = Path(catalog_dir)
    path = root / FOLDS_PARQUET
    if not root.is_dir():
        raise FileNotFoundError(f"catalog directory {root} does not exist; build it with "
                                "`ipb preprocess`, then draw folds with `ipb folds`")
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {FOLDS_PARQUET}; draw the cross-validation folds "
                                "with `ipb folds` (after `ipb preprocess` has built the catalog)")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path} has no fold-plan metadata; it was not written by "
                         "ipb-ray's fold writer. Rerun `ipb folds` to replace it")
    meta = json.loads(raw)
    if meta.get("version") != FOLDS_VERSION:
        raise ValueError(f"{path} has fold-plan version {meta.get('version')}, this ipb_ray "
                         f"reads version {FOLDS_VERSION}; rerun `ipb folds`")
    plan = FoldPlan(table=table.replace_schema_metadata(None), class_names=meta["class_names"],
                    k=int(meta["k"]), labelled_fraction=float(meta["labelled_fraction"]),
                    val_fraction=float(meta["val_fraction"]), seed=int(meta["seed"]),
                    group_by=meta.get("group_by"))  # absent in plans written before grouping
    try:
        check_folds(plan)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; rerun `ipb folds` to redraw the folds") from None
    report = root / FOLDS_JSON
    if not report.is_file():
        log.warning("%s is missing; the folds are still usable (rerun `ipb folds` to restore "
                    "the report)", report)
    return plan
