"""Cross-validation aggregation and paired A/B tests over fold reports."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from scipy import stats as sps

from ipb_ray.evaluation.metrics import classification_report
from ipb_ray.evaluation.stats import aggregate_folds, format_comparison, paired_tests

NAMES = ["a", "b", "c"]

# Three tiny folds; hand-derived values in the comments (rows of cm = truth).
FOLD0 = classification_report([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], NAMES)
#   cm [[1,1,0],[0,2,0],[1,0,1]]  tpr .5/1/.5  f1 .5/.8/(2/3)  macro_tpr 2/3  acc 4/6
FOLD1 = classification_report([0, 0, 1, 1], [0, 0, 1, 0], NAMES)
#   cm [[2,0,0],[1,1,0],[0,0,0]]  tpr 1/.5/NaN (c absent)  f1 .8/(2/3)/NaN  macro_tpr .75
FOLD2 = classification_report([0, 1, 2, 2], [0, 1, 2, 1], NAMES)
#   cm [[1,0,0],[0,1,0],[0,1,1]]  tpr 1/1/.5  macro_tpr 5/6  acc .75


def _plain(x) -> bool:
    """True when x is built only from plain JSON types (no numpy scalars)."""
    if isinstance(x, dict):
        return all(type(k) is str and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return type(x) in (str, int, float, bool)


def test_aggregate_matches_hand_computed_values():
    agg = aggregate_folds([FOLD0, FOLD1, FOLD2])
    assert agg["folds"] == 3 and agg["class_names"] == NAMES
    # tpr a = [.5, 1, 1]: mean 5/6, sample var ((1/3)^2 + 2 (1/6)^2) / 2 = 1/12
    assert agg["tpr"]["mean"]["a"] == pytest.approx(5 / 6)
    assert agg["tpr"]["std"]["a"] == pytest.approx(math.sqrt(1 / 12))
    # tpr c = [.5, NaN, .5]: the NaN fold is ignored
    assert agg["tpr"]["mean"]["c"] == pytest.approx(0.5)
    assert agg["tpr"]["std"]["c"] == 0.0
    assert agg["tpr"]["n"] == {"a": 3, "b": 3, "c": 2}
    # f1 b = [.8, 2/3, 2/3]
    assert agg["f1"]["mean"]["b"] == pytest.approx((0.8 + 4 / 3) / 3)
    # precision a = [.5, 2/3, 1]
    assert agg["precision"]["mean"]["a"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    # macro_tpr = [2/3, 3/4, 5/6]: mean 3/4, std 1/12
    assert agg["macro_tpr"]["mean"] == pytest.approx(0.75)
    assert agg["macro_tpr"]["std"] == pytest.approx(1 / 12)
    assert agg["balanced_accuracy"]["mean"] == pytest.approx(0.75)
    assert agg["accuracy"]["mean"] == pytest.approx((4 / 6 + 0.75 + 0.75) / 3)
    assert agg["accuracy"]["n"] == 3
    assert agg["confusion_matrix"] == [[4, 1, 0], [1, 4, 0], [1, 1, 2]]


def test_aggregate_std_is_nan_below_two_values_and_output_is_json_ready():
    agg = aggregate_folds([FOLD0, FOLD1])
    assert agg["tpr"]["mean"]["c"] == 0.5 and agg["tpr"]["n"]["c"] == 1
    assert math.isnan(agg["tpr"]["std"]["c"])           # one value left after dropping NaN
    single = aggregate_folds([FOLD1])
    assert math.isnan(single["macro_f1"]["std"]) and single["macro_f1"]["n"] == 1
    assert math.isnan(single["tpr"]["mean"]["c"]) and single["tpr"]["n"]["c"] == 0
    assert _plain(agg) and _plain(single)
    assert json.loads(json.dumps(agg))["confusion_matrix"] == agg["confusion_matrix"]


def test_aggregate_rejects_mismatched_class_names_and_empty_input():
    other = classification_report([0, 1], [0, 1], ["a", "x", "c"])
    with pytest.raises(ValueError, match=r"reports\[1\] has class_names \['a', 'x', 'c'\] "
                                         r"but reports\[0\] has \['a', 'b', 'c'\]"):
        aggregate_folds([FOLD0, other])
    with pytest.raises(ValueError, match="empty"):
        aggregate_folds([])
    with pytest.raises(ValueError, match=r"reports\[0\] lacks \['tpr'\]"):
        aggregate_folds([{k: v for k, v in FOLD0.items() if k != "tpr"}])


def _report(correct: list[int], per_class: int = 10) -> dict:
    """A report whose class i has TPR correct[i] / per_class (misses go to the next class)."""
    y_true, y_pred = [], []
    k = len(correct)
    for i, c in enumerate(correct):
        y_true += [i] * per_class
        y_pred += [i] * c + [(i + 1) % k] * (per_class - c)
    return classification_report(y_true, y_pred, ["x", "y", "z"][:k])


def test_paired_tests_agree_with_scipy_called_directly():
    a_x, b_x = [5, 6, 4, 7, 5], [6, 8, 4, 9, 8]      # B better on x, one tie
    a_y, b_y = [7, 7, 8, 6, 9], [6, 8, 7, 7, 8]      # mixed signs on y
    a = [_report([ax, ay]) for ax, ay in zip(a_x, a_y)]
    b = [_report([bx, by]) for bx, by in zip(b_x, b_y)]
    rows = paired_tests(a, b)
    assert [(r["name"], r["metric"]) for r in rows] == [
        ("x", "tpr"), ("y", "tpr"), ("macro TPR", "macro_tpr"), ("macro F1", "macro_f1")]

    ta, tb = [v / 10 for v in a_x], [v / 10 for v in b_x]
    x = rows[0]
    assert x["n"] == 5
    assert x["mean_a"] == pytest.approx(sum(ta) / 5) and x["mean_b"] == pytest.approx(sum(tb) / 5)
    assert x["diff"] == pytest.approx(x["mean_b"] - x["mean_a"]) and x["diff"] > 0
    assert x["p_t"] == pytest.approx(sps.ttest_rel(tb, ta).pvalue)
    assert x["p_w"] == pytest.approx(sps.wilcoxon(tb, ta).pvalue)
    assert x["significant_t"] == (x["p_t"] < 0.05) and x["significant_w"] == (x["p_w"] < 0.05)

    fa, fb = [r["macro_f1"] for r in a], [r["macro_f1"] for r in b]
    f1row = rows[3]
    assert f1row["p_t"] == pytest.approx(sps.ttest_rel(fb, fa).pvalue)
    assert f1row["p_w"] == pytest.approx(sps.wilcoxon(fb, fa).pvalue)
    # alpha only moves the significance flags
    loose = paired_tests(a, b, alpha=0.5)[0]
    assert loose["p_t"] == x["p_t"] and loose["significant_t"] == (x["p_t"] < 0.5)


def test_paired_tests_drop_nan_folds_per_row():
    # class c absent from fold 1's truth in both configurations
    a = [FOLD0, FOLD1, FOLD2, FOLD0]
    b = [FOLD2, FOLD1, FOLD0, FOLD2]
    row_c = paired_tests(a, b)[2]
    assert row_c["name"] == "c" and row_c["n"] == 3
    ca = [FOLD0["tpr"]["c"], FOLD2["tpr"]["c"], FOLD0["tpr"]["c"]]   # .5, .5, .5
    cb = [FOLD2["tpr"]["c"], FOLD0["tpr"]["c"], FOLD2["tpr"]["c"]]
    assert ca == cb and row_c["mean_a"] == pytest.approx(sum(ca) / 3)
    assert row_c["p_t"] == 1.0 and row_c["p_w"] == 1.0                # all kept diffs are 0
    row_a = paired_tests(a, b)[0]
    assert row_a["n"] == 4
    assert row_a["p_w"] == pytest.approx(sps.wilcoxon(
        [r["tpr"]["a"] for r in b], [r["tpr"]["a"] for r in a]).pvalue)


def test_paired_tests_all_equal_and_single_fold_do_not_crash():
    folds = [FOLD0, FOLD1, FOLD2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no RuntimeWarning leaks out either
        rows = paired_tests(folds, list(folds))
        one = paired_tests([FOLD0], [FOLD2])
    for r in rows:
        assert r["diff"] == 0.0 and r["p_t"] == 1.0 and r["p_w"] == 1.0
        assert not r["significant_t"] and not r["significant_w"]
    for r in one:
        assert r["n"] == 1 and math.isnan(r["p_t"]) and math.isnan(r["p_w"])
        assert not r["significant_t"] and not r["significant_w"]


def test_paired_tests_reject_bad_inputs_with_clear_messages():
    with pytest.raises(ValueError, match="a has 3 fold reports but b has 2"):
        paired_tests([FOLD0, FOLD1, FOLD2], [FOLD0, FOLD1])
    other = classification_report([0, 1], [0, 1], ["a", "x", "c"])
    with pytest.raises(ValueError, match=r"a has class_names \['a', 'b', 'c'\] "
                                         r"but b has \['a', 'x', 'c'\]"):
        paired_tests([FOLD0], [other])
    with pytest.raises(ValueError, match=r"b\[1\] has class_names"):
        paired_tests([FOLD0, FOLD1], [FOLD0, other])
    with pytest.raises(ValueError, match="alpha must lie strictly between 0 and 1; got 1.5"):
        paired_tests([FOLD0], [FOLD0], alpha=1.5)


def test_format_comparison_marks_significant_p_values():
    # six folds: B beats A on x every time (Wilcoxon p = 2/2**6 < .05), y identical
    a_x, b_x = [4, 5, 3, 6, 4, 5], [6, 8, 5, 7, 7, 9]
    a = [_report([ax, 7]) for ax in a_x]
    b = [_report([bx, 7]) for bx in b_x]
    rows = paired_tests(a, b)
    assert rows[0]["p_w"] == pytest.approx(2 / 2 ** 6)
    table = format_comparison(rows, "baseline", "IPB")
    lines = table.splitlines()
    assert lines[0] == ("| metric | baseline mean | IPB mean | IPB − baseline | "
                        "t-test p | Wilcoxon p | n |")
    row_x = next(ln for ln in lines if ln.startswith("| TPR (x) |"))
    row_y = next(ln for ln in lines if ln.startswith("| TPR (y) |"))
    cells_x = [c.strip() for c in row_x.strip("|").split("|")]
    cells_y = [c.strip() for c in row_y.strip("|").split("|")]
    assert cells_x[3].startswith("+") and cells_x[4].endswith("*") and cells_x[5].endswith("*")
    assert cells_x[6] == "6"
    assert cells_y[3] == "+0.000" and cells_y[4] == "1" and cells_y[5] == "1"
    assert "*" not in row_y
    assert "`*` p < 0.05" in table


def test_format_comparison_shows_missing_p_values_as_na():
    rows = paired_tests([FOLD0], [FOLD2])
    line = format_comparison(rows, "A", "B").splitlines()[2]
    assert line.startswith("| TPR (a) |") and line.count("n/a") == 2 and "*" not in line
