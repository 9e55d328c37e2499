"""The pure half of `ipb predict` (ipb_ray.prediction.tables): frame names, summaries,
time courses and suggestions, in milliseconds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ipb_ray.prediction.tables import (compile_pattern, entropy, frame_keys, per_frame, per_well, prob_column,
                                       suggest, time_course)

NAMES = ("Dense", "Spread", "Debris")


def _rows():
    rng = np.random.default_rng(0)
    n = 12
    probs = rng.dirichlet(np.ones(3), n)
    probs[0] = [0.34, 0.33, 0.33]   # the most uncertain colony
    probs[1] = [0.98, 0.01, 0.01]   # a sure one
    rows = {"frame": np.array([f"f{i // 4}" for i in range(n)], object),
            "well": np.array(["A"] * 8 + ["B"] * 4, object), "time": np.array([0.0] * 4 + [1.0] * 4 + [0.0] * 4),
            "area_px": np.arange(n, dtype=float) + 100, "labels": np.array([""] * n, object)}
    for c, name in enumerate(NAMES):
        rows[prob_column(name)] = probs[:, c]
    rows["predicted"] = np.array([NAMES[i] for i in probs.argmax(1)], object)
    rows["entropy"] = entropy(probs)
    rows["disagreement"] = np.zeros(n)
    rows["member_probs"] = [np.concatenate([p, p]) for p in probs]
    return rows


def test_pattern_and_frame_keys():
    p = compile_pattern("{well}_t{time}")
    assert frame_keys("plate1/A01_t12.tif", p) == ("A01", 12.0)
    assert frame_keys("B7_t0.5.png", p) == ("B7", 0.5)
    with pytest.raises(ValueError, match=r"'B2-3' does not match --pattern"):
        frame_keys("frames/B2-3.png", p)
    with pytest.raises(ValueError, match="names no field"):
        compile_pattern("plate")
    with pytest.raises(ValueError, match="names a field twice"):
        compile_pattern("{well}_{well}")
    # without a pattern: the annotation table's well and time (or frame index)
    assert frame_keys("x.png", None, {"well": "C3", "time": "4"}) == ("C3", 4.0)
    well, t = frame_keys("x.png", None, {}, None)
    assert well == "" and math.isnan(t)


def test_summaries_add_up():
    rows = _rows()
    frames = per_frame(rows, NAMES)
    assert [f["frame"] for f in frames] == ["f0", "f1", "f2"] and sum(f["colonies"] for f in frames) == 12
    for f in frames:
        assert sum(f[f"count/{c}"] for c in NAMES) == f["colonies"]
    wells = per_well(rows, NAMES)
    assert [(w["well"], w["time"], w["colonies"], w["frames"]) for w in wells] == [("A", 0.0, 4, 1), ("A", 1.0, 4, 1),
                                                                                ("B", 0.0, 4, 1)]
    assert sum(w[f"area_px/{c}"] for w in wells for c in NAMES) == pytest.approx(rows["area_px"].sum())
    course = time_course(rows, NAMES)
    assert list(course) == ["A", "B"] and course["A"]["time"].tolist() == [0.0, 1.0]
    assert course["A"]["colonies"].tolist() == [4, 4]
    assert np.allclose(course["A"]["share"].sum(1), 1) and np.allclose(course["A"]["expected"].sum(1), 1)
    assert np.allclose(course["A"]["spread"], 0)  # identical members: no spread


def test_frames_without_a_time_point_group_together():
    rows = _rows()
    rows["time"] = np.full(12, np.nan)  # no --pattern and no time column
    wells = per_well(rows, NAMES)
    assert [(w["well"], w["time"], w["colonies"], w["frames"]) for w in wells] == [("A", None, 8, 2), ("B", None, 4, 1)]
    course = time_course(rows, NAMES)
    assert course["A"]["colonies"].tolist() == [8]


def test_suggestions_prefer_uncertain_and_rare_and_skip_labelled():
    probs = np.array([[0.34, 0.33, 0.33], [0.98, 0.01, 0.01], [0.1, 0.1, 0.8]] + [[0.7, 0.2, 0.1]] * 7)
    rows = {"predicted": np.array([NAMES[i] for i in probs.argmax(1)], object), "entropy": entropy(probs),
            "disagreement": np.zeros(len(probs)), "labels": np.array([""] * len(probs), object)}
    # the one colony of a rare predicted class first, then the most uncertain, never the sure one
    picked = suggest(rows, NAMES, 3)
    assert picked[:2] == [2, 0] and 1 not in picked and len(picked) == 3
    rows["disagreement"][1] = 1.0  # the fold networks disagree on it: now worth a label
    assert 1 in suggest(rows, NAMES, 3)
    rows["labels"][2] = "Debris"  # labelled already: never suggested
    assert 2 not in suggest(rows, NAMES, 10) and len(suggest(rows, NAMES, 10)) == 9
    assert suggest(rows, NAMES, 0) == []
