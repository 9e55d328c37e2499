"""Per-colony predictions -> the tables of ``ipb predict`` (pure numpy/pyarrow).

A prediction row (one colony, :data:`PREDICTION_COLUMNS`): the frame it came from, the
frame's well and time point, its box and area, the probability of every class (the mean
over the model's fold networks), the predicted class, its confidence, the predictive
entropy, the ensemble's disagreement (mean over classes of the members' standard deviation;
0 for one network) and, when the frames were annotated, the colony's label set.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "compile_pattern", "entropy", "frame_keys", "per_frame", "per_well", "PREDICTION_COLUMNS",
    "prob_column", "records", "suggest", "time_course",
]

#: Columns of a prediction row besides the ``prob/<class>`` ones.
PREDICTION_COLUMNS = ("colony_id", "frame", "frame_key", "well", "time", "x0", "y0", "x1", "y1", "area_px",
                      "predicted", "confidence", "entropy", "disagreement", "labels")
_FIELD = re.compile(r"\{(\w+)\}")
#: What a ``{name}`` of a filename pattern matches: digits for time, anything else up to the next literal.
_FIELD_RE = {"time": r"(?P<time>\d+(?:\.\d+)?)"}


def prob_column(name: str) -> str:
    return f"prob/{name}"


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A filename pattern such as ``'{well}_t{time}'`` as a regular expression matched
    against a frame's file name without its suffix (``{time}`` takes a number, any other
    ``{field}`` the shortest run of characters before the next literal part)."""
    fields = _FIELD.findall(pattern)
    if not fields:
        raise ValueError(f"--pattern {pattern!r} names no field; write e.g. '{{well}}_t{{time}}'")
    if len(set(fields)) != len(fields):
        raise ValueError(f"--pattern {pattern!r} names a field twice")
    parts, last = [], 0
    for m in _FIELD.finditer(pattern):
        parts.append(re.escape(pattern[last:m.start()]))
        parts.append(_FIELD_RE.get(m.group(1), rf"(?P<{m.group(1)}>.+?)"))
        last = m.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("^" + "".join(parts) + "$")


def frame_keys(frame: str, pattern: re.Pattern[str] | None, columns: Mapping[str, Any] | None = None,
               frame_index: Any = None) -> tuple[str, float]:
    """(well, time) of a frame: from the filename ``pattern`` when given (a name that does
    not match raises, naming the pattern and the file), else from the annotation table's
    ``well`` and ``time`` / ``frame_index`` columns; missing: well "" and time NaN."""
    if pattern is not None:
        stem = re.sub(r"\.[A-Za-z0-9]+$", "", frame.replace("\\", "/").rsplit("/", 1)[-1])
        m = pattern.match(stem)
        if m is None:
            raise ValueError(f"frame {frame!r}: its name {stem!r} does not match --pattern {pattern.pattern!r}")
        found = m.groupdict()
        return str(found.get("well", "")), float(found["time"]) if found.get("time") is not None else math.nan
    columns = columns or {}
    well = str(columns.get("well", ""))
    time = columns.get("time", frame_index)
    try:
        return well, float(time) if time not in (None, "") else math.nan
    except (TypeError, ValueError):
        return well, math.nan


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy (nats) of each row of an (N, C) probability array."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def _key(value: Any) -> Any:
    """A grouping key: a missing time (NaN, which equals nothing) becomes None."""
    return None if isinstance(value, (float, np.floating)) and math.isnan(value) else value


def _by(rows: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[tuple, np.ndarray]:
    index: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(*(rows[k] for k in keys))):
        index.setdefault(tuple(_key(v) for v in key), []).append(i)
    return {k: np.asarray(v) for k, v in index.items()}


def per_frame(rows: Mapping[str, np.ndarray], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One record per frame: its well and time, the colony count and area (px) per predicted class."""
    return _counts(rows, class_names, ("frame", "well", "time"))


def per_well(rows: Mapping[str, np.ndarray], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One record per (well, time point): frames, colonies and area per predicted class."""
    out = _counts(rows, class_names, ("well", "time"))
    frames = _by(rows, ("well", "time"))
    for rec in out:
        rec["frames"] = len(set(np.asarray(rows["frame"])[frames[(rec["well"], rec["time"])]]))
    return out


def _counts(rows: Mapping[str, np.ndarray], class_names: Sequence[str], keys: Sequence[str]) -> list[dict[str, Any]]:
    pred, area = np.asarray(rows["predicted"], object), np.asarray(rows["area_px"], np.float64)
    out = []
    for key, idx in sorted(_by(rows, keys).items(), key=lambda kv: tuple(map(_sortable, kv[0]))):
        rec: dict[str, Any] = dict(zip(keys, key))
        rec["colonies"] = len(idx)
        for name in class_names:
            hit = idx[pred[idx] == name]
            rec[f"count/{name}"] = len(hit)
            rec[f"area_px/{name}"] = float(area[hit].sum())
        out.append(rec)
    return out


def _sortable(v: Any) -> Any:
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return (1, 0.0, "")
    return (0, float(v), "") if isinstance(v, (int, float, np.integer, np.floating)) else (0, 0.0, str(v))


def time_course(rows: Mapping[str, np.ndarray], class_names: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per well: ``time`` (sorted time points), ``share`` (T, C) the share of colonies
    predicted as each class, ``expected`` (T, C) the mean class probability (its
    uncertainty-aware counterpart) and ``spread`` (T, C) the standard deviation of that
    mean over the ensemble's members (0 for a single network), and ``colonies`` (T,)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    probs = np.stack([np.asarray(rows[prob_column(c)], np.float64) for c in class_names], 1)
    members = rows.get("member_probs")
    pred = np.asarray(rows["predicted"], object)
    for well in sorted(set(map(str, rows["well"]))):
        in_well = np.asarray([str(w) == well for w in rows["well"]])
        t_well = np.asarray(rows["time"], np.float64)[in_well]
        times = sorted(set(t_well[~np.isnan(t_well)].tolist())) + ([math.nan] if np.isnan(t_well).any() else [])
        share, expected, spread, count = [], [], [], []
        for t in times:
            tt = np.asarray(rows["time"], np.float64)
            idx = np.flatnonzero(in_well & ((tt == t) | (np.isnan(tt) & math.isnan(t))))
            count.append(len(idx))
            share.append([float(np.mean(pred[idx] == c)) for c in class_names])
            expected.append(probs[idx].mean(0))
            if members is not None and len(idx):
                m = np.stack([np.asarray(members[i], np.float64).reshape(-1, len(class_names)) for i in idx])  # (n, K, C)
                spread.append(m.mean(0).std(0))
            else:
                spread.append(np.zeros(len(class_names)))
        out[well] = {"time": np.asarray(times), "share": np.asarray(share), "expected": np.asarray(expected),
                     "spread": np.asarray(spread), "colonies": np.asarray(count)}
    return out


def suggest(rows: Mapping[str, np.ndarray], class_names: Sequence[str], n: int) -> list[int]:
    """Indices of the ``n`` colonies whose labels would help most: the most uncertain
    (normalised entropy plus the ensemble's disagreement) weighted towards rare predicted
    classes (by 1 / sqrt of the predicted class's share), so the labelling budget is not
    spent on the head class alone. Ties keep the input order; unlabelled colonies only
    (rows whose ``labels`` are empty)."""
    if n <= 0:
        return []
    k = max(len(class_names), 2)
    unc = np.asarray(rows["entropy"], np.float64) / math.log(k) + np.asarray(rows["disagreement"], np.float64)
    pred = np.asarray(rows["predicted"], object)
    share = {c: max(float(np.mean(pred == c)), 1e-9) for c in class_names}
    score = unc / np.sqrt(np.asarray([share.get(p, 1.0) for p in pred]))
    labelled = np.asarray([bool(str(x).strip()) for x in rows.get("labels", [""] * len(pred))])
    score[labelled] = -np.inf
    order = np.argsort(-score, kind="stable")
    return [int(i) for i in order[:n] if np.isfinite(score[i])]


def records(rows: Mapping[str, Iterable[Any]]) -> list[dict[str, Any]]:
    """Columns -> list of row dicts."""
    keys = list(rows)
    return [dict(zip(keys, vals)) for vals in zip(*(rows[k] for k in keys))]
