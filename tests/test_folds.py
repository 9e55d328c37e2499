"""Cross-validation folds: invariants, stratification, determinism, storage."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ipb_ray.config import ConfigError
from ipb_ray.data.folds import (FOLDS_JSON, FOLDS_PARQUET, ROLES, FoldPlan, check_folds, make_folds,
                           read_folds, write_folds)

# Imbalanced like the paper's Table 1: four classes at 49/18/17/3 % of all colonies,
# 12 % multi-label and a few never-labelled colonies.
SHARES = {"Spread": 0.49, "Dense": 0.18, "Debris": 0.17, "Diff": 0.03}
N = 2000


def _colonies(n=N, seed=1):
    rng = np.random.default_rng(seed)
    counts = {name: int(round(share * n)) for name, share in SHARES.items()}
    n_multi = int(round(0.12 * n))
    n_none = n - sum(counts.values()) - n_multi
    labels = [name for name, c in counts.items() for _ in range(c)]
    labels += [None] * (n_multi + n_none)
    multi = [False] * sum(counts.values()) + [True] * n_multi + [False] * n_none
    ids = [f"c{i:05d}" for i in rng.permutation(n)]
    return ids, labels, multi


@pytest.fixture(scope="module")
def colonies():
    return _colonies()


@pytest.fixture(scope="module")
def plan(colonies):
    return make_folds(*colonies)


def _by_fold(plan):
    return [plan.roles(f) for f in range(plan.k)]


def test_invariants_hold(plan, colonies):
    ids, labels, multi = colonies
    check_folds(plan)
    true = dict(zip(ids, labels))
    labelled = {cid for cid, lab, m in zip(ids, labels, multi) if lab is not None and not m}
    no_label = set(ids) - labelled
    test_count = Counter()
    for roles in _by_fold(plan):
        members = [cid for r in ROLES for cid in roles[r]]
        assert len(members) == len(set(members)) == len(ids)  # one role per colony
        assert no_label <= set(roles["U"])  # multi-label and unlabelled: always U
        test_count.update(roles["T"])
        assert {true[c] for c in roles["T"] + roles["L"] + roles["V"]} <= set(SHARES)
    assert set(test_count) == labelled and set(test_count.values()) == {1}


def test_table_keeps_true_labels_and_schema(plan, colonies):
    ids, labels, _ = colonies
    assert plan.table.num_rows == plan.k * len(ids)
    assert plan.table.schema.field("fold").type == pa.int16()
    assert plan.class_names == tuple(sorted(SHARES))
    fold0 = plan.table.filter(pc.equal(plan.table["fold"], 0))
    got = dict(zip(fold0["colony_id"].to_pylist(), fold0["label"].to_pylist()))
    assert got == dict(zip(ids, labels))  # U keeps its (hidden) labels for scoring


def test_sizes_and_stratification(plan, colonies):
    _, labels, _ = colonies
    overall = Counter(lab for lab in labels if lab is not None)
    n_lab = sum(overall.values())
    budget = round(0.1 * n_lab)
    t_sizes = [row["T"] for row in plan.summary()]
    assert max(t_sizes) - min(t_sizes) <= 1 and sum(t_sizes) == n_lab
    for row in plan.summary():
        assert abs(row["L"] + row["V"] - budget) <= len(overall)
        assert row["V"] == pytest.approx(0.2 * (row["L"] + row["V"]), abs=1)
        assert row["U"] == N - row["T"] - row["L"] - row["V"]
        for name, count in overall.items():
            share = count / n_lab
            assert row["T_counts"][name] / row["T"] == pytest.approx(share, abs=0.01)
            lv = row["L_counts"][name] + row["V_counts"][name]
            assert lv / (row["L"] + row["V"]) == pytest.approx(share, abs=0.02)
            assert row["L_counts"][name] >= 1  # training keeps every class
    # per-class test counts differ by at most one across folds
    for name in overall:
        per_fold = [row["T_counts"][name] for row in plan.summary()]
        assert max(per_fold) - min(per_fold) <= 1


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.5, 0.8])
def test_labelled_fraction_sweep(colonies, fraction):
    _, labels, _ = colonies
    n_lab = sum(lab is not None for lab in labels)
    plan = make_folds(*colonies, k=10, labelled_fraction=fraction)
    check_folds(plan)
    for row in plan.summary():
        assert abs(row["L"] + row["V"] - round(fraction * n_lab)) <= len(SHARES)
        assert all(v >= 1 for v in row["L_counts"].values())
        assert row["U_labelled"] == n_lab - row["T"] - row["L"] - row["V"] >= 0


def test_test_folds_do_not_depend_on_labelled_fraction(colonies):
    small = make_folds(*colonies, labelled_fraction=0.05)
    large = make_folds(*colonies, labelled_fraction=0.5)
    for f in range(10):
        assert small.roles(f)["T"] == large.roles(f)["T"]


def test_val_fraction_zero_and_val_moves_only_within_l(colonies):
    none = make_folds(*colonies, val_fraction=0.0)
    some = make_folds(*colonies, val_fraction=0.3)
    for f in range(10):
        a, b = none.roles(f), some.roles(f)
        assert a["V"] == [] and sorted(a["L"]) == sorted(b["L"] + b["V"])


def test_same_seed_same_plan_other_seed_other_plan(colonies, plan):
    assert make_folds(*colonies).table.equals(plan.table)
    other = make_folds(*colonies, seed=1)
    assert not other.table.equals(plan.table)
    check_folds(other)


def test_row_order_does_not_matter(colonies, plan):
    ids, labels, multi = colonies
    order = np.random.default_rng(7).permutation(len(ids))
    shuffled = make_folds([ids[i] for i in order], [labels[i] for i in order],
                          np.array(multi)[order])
    assert shuffled.table.equals(plan.table)


def test_pyarrow_inputs_work(colonies, plan):
    ids, labels, multi = colonies
    table = pa.table({"colony_id": ids, "label": labels, "multi_label": multi})
    got = make_folds(table["colony_id"], table["label"], table["multi_label"])
    assert got.table.equals(plan.table)


def test_multi_label_flag_wins_over_a_label():
    ids = [f"c{i}" for i in range(40)]
    labels = ["A", "B"] * 20
    multi = [i == 3 for i in range(40)]
    plan = make_folds(ids, labels, multi, k=5, labelled_fraction=0.2)
    for f in range(5):
        assert "c3" in plan.roles(f)["U"]


def _corrupt(plan, fold, colony, role):
    t = plan.table
    hit = pc.and_(pc.equal(t["fold"], fold), pc.equal(t["colony_id"], colony))
    roles = pc.if_else(hit, pa.scalar(role), t["role"])
    return FoldPlan(t.set_column(t.schema.get_field_index("role"), "role", roles),
                    plan.class_names, plan.k, plan.labelled_fraction, plan.val_fraction, plan.seed)


def test_check_catches_multi_label_outside_u(plan, colonies):
    ids, _, multi = colonies
    victim = next(c for c, m in zip(ids, multi) if m)
    with pytest.raises(ValueError, match=rf"fold 4: colony '{victim}'.*belong to U"):
        check_folds(_corrupt(plan, 4, victim, "L"))


def test_check_catches_colony_in_two_test_folds(plan):
    victim = plan.roles(2)["T"][0]
    with pytest.raises(ValueError, match=rf"'{victim}' is in the test folds of folds \[2, 5\]"):
        check_folds(_corrupt(plan, 5, victim, "T"))


def test_check_catches_two_roles_and_missing_colonies(plan):
    victim = plan.roles(6)["L"][0]
    row = plan.table.filter(pc.and_(pc.equal(plan.table["fold"], 6),
                                    pc.equal(plan.table["colony_id"], victim)))
    doubled = row.set_column(2, row.schema.field("role"), pa.array(["U"]))
    twice = FoldPlan(pa.concat_tables([plan.table, doubled]), plan.class_names, plan.k,
                     plan.labelled_fraction, plan.val_fraction, plan.seed)
    with pytest.raises(ValueError, match=rf"fold 6: colony '{victim}' appears twice \(roles L and U\)"):
        check_folds(twice)
    keep = pc.invert(pc.and_(pc.equal(plan.table["fold"], 6),
                             pc.equal(plan.table["colony_id"], victim)))
    missing = FoldPlan(plan.table.filter(keep), plan.class_names, plan.k,
                       plan.labelled_fraction, plan.val_fraction, plan.seed)
    with pytest.raises(ValueError, match=rf"fold 6 is missing colony '{victim}'"):
        check_folds(missing)


def test_check_catches_unknown_role(plan):
    victim = plan.roles(0)["U"][0]
    with pytest.raises(ValueError, match=rf"fold 0: colony '{victim}' has role 'X'"):
        check_folds(_corrupt(plan, 0, victim, "X"))


def test_class_weights_are_inverse_counts(plan):
    for f in range(plan.k):
        counts = Counter(plan.table.filter(pc.and_(pc.equal(plan.table["fold"], f),
                                                   pc.equal(plan.table["role"], "L")))
                         ["label"].to_pylist())
        weights = plan.class_weights(f)
        assert set(weights) == set(plan.class_names)
        for name, w in weights.items():
            assert w == pytest.approx(1.0 / counts[name])
        # each class then carries the same total weight: balanced draws
        assert {round(w * counts[n], 12) for n, w in weights.items()} == {1.0}


def test_write_read_round_trip(plan, tmp_path):
    path = write_folds(plan, tmp_path / "catalog")
    assert path == tmp_path / "catalog" / FOLDS_PARQUET
    assert not list(path.parent.glob(".*.tmp"))
    back = read_folds(tmp_path / "catalog")
    assert back.table.equals(plan.table) and back.class_names == plan.class_names
    assert (back.k, back.labelled_fraction, back.val_fraction, back.seed) == (10, 0.1, 0.2, 0)
    assert back.summary() == plan.summary()
    report = json.loads((path.parent / FOLDS_JSON).read_text())
    assert report["k"] == 10 and report["class_names"] == list(plan.class_names)
    assert report["summary"] == plan.summary()
    assert report["class_weights"]["3"] == plan.class_weights(3)


def test_read_folds_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*ipb preprocess"):
        read_folds(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path.name} has no folds.parquet.*ipb folds"):
        read_folds(tmp_path)


def test_write_refuses_a_broken_plan(plan, colonies, tmp_path):
    ids, _, multi = colonies
    victim = next(c for c, m in zip(ids, multi) if m)
    with pytest.raises(ValueError, match=victim):
        write_folds(_corrupt(plan, 1, victim, "T"), tmp_path)
    assert not (tmp_path / FOLDS_PARQUET).exists()


def test_tiny_class_warns_and_keeps_invariants(caplog):
    ids = [f"c{i:03d}" for i in range(120)]
    labels = ["Big"] * 80 + ["Mid"] * 30 + ["Tiny"] * 4 + [None] * 6
    multi = [False] * 114 + [True] * 6
    with caplog.at_level(logging.WARNING, logger="ipb_ray.data.folds"):
        plan = make_folds(ids, labels, multi, k=10, labelled_fraction=0.1)
    check_folds(plan)
    assert any("'Tiny' has 4 single-labelled colonies, fewer than the 10 folds" in r.message
               for r in caplog.records)
    tiny_tests = [row["T_counts"]["Tiny"] for row in plan.summary()]
    assert sorted(tiny_tests) == [0] * 6 + [1] * 4
    for row in plan.summary():
        assert row["L_counts"]["Tiny"] >= 1  # three Tiny colonies remain outside any T_f


def test_class_missing_from_l_warns(caplog):
    ids = [f"c{i:02d}" for i in range(41)]
    labels = ["A"] * 20 + ["B"] * 20 + ["Solo"]
    with caplog.at_level(logging.WARNING, logger="ipb_ray.data.folds"):
        plan = make_folds(ids, labels, [False] * 41, k=5, labelled_fraction=0.2)
    check_folds(plan)
    solo_fold = next(f for f in range(5) if "c40" in plan.roles(f)["T"])
    assert plan.class_weights(solo_fold)["Solo"] == 0.0
    assert any(f"fold {solo_fold}: class 'Solo' has no labelled colony" in r.message
               for r in caplog.records)


@pytest.mark.parametrize("kwargs, key", [
    ({"labelled_fraction": 0.9}, "split.labelled_fraction"),
    ({"k": 5, "labelled_fraction": 0.8}, "split.labelled_fraction"),
    ({"k": 1}, "split.folds"),
    ({"val_fraction": 1.0}, "split.val_fraction"),
    ({"seed": -1}, "seed"),
])
def test_bad_parameters_name_the_key(colonies, kwargs, key):
    with pytest.raises(ConfigError) as info:
        make_folds(*colonies, **kwargs)
    assert info.value.key == key


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="differ in length"):
        make_folds(["a", "b"], ["A"], [False, False])
    with pytest.raises(ValueError, match="'a' occurs more than once"):
        make_folds(["a", "a"], ["A", "B"], [False, False])
    with pytest.raises(ValueError, match="only 3 single-labelled colonies for 10 folds"):
        make_folds(["a", "b", "c", "d"], ["A", "B", "A", None], [False] * 4)


# --------------------------------------------------------------------------- grouped folds (split.group_by)

def _time_lapse(n_wells=60, seed=3):
    """Wells imaged hourly: every colony of a well shares its group, mostly of the well's
    class; some multi-label and unlabelled colonies, a few with no group name at all."""
    rng = np.random.default_rng(seed)
    names = list(SHARES)
    ids, labels, multi, groups = [], [], [], []
    for w in range(n_wells):
        major = names[w % len(names)] if w % 7 else names[-1]  # the rare class in a few wells
        for colony in range(int(rng.integers(1, 4))):
            for hour in range(int(rng.integers(2, 8))):
                r = rng.random()
                ids.append(f"w{w:02d}-c{colony}-t{hour:02d}")
                labels.append(major if r < 0.75 else (names[int(rng.integers(len(names)))] if r < 0.85 else None))
                multi.append(0.85 <= r < 0.92)
                groups.append(f"well{w:02d}")
    for i in range(15):  # colonies the annotation table gave no well
        ids.append(f"loose{i:02d}")
        labels.append(names[i % len(names)])
        multi.append(False)
        groups.append(None)
    return ids, labels, multi, groups


@pytest.fixture(scope="module")
def lapse():
    return _time_lapse()


@pytest.fixture(scope="module")
def grouped(lapse):
    ids, labels, multi, groups = lapse
    return make_folds(ids, labels, multi, k=5, labelled_fraction=0.2, groups=groups, group_by="column:well")


def test_grouped_plan_never_splits_a_group_across_t_and_luv(grouped, lapse):
    ids, labels, multi, groups = lapse
    check_folds(grouped)
    group_of = dict(zip(ids, groups))
    labelled = {c for c, lab, m in zip(ids, labels, multi) if lab is not None and not m}
    in_test = Counter()
    for f, roles in enumerate(_by_fold(grouped)):
        test_groups = {group_of[c] for c in roles["T"]} - {None}
        assert test_groups, f"fold {f} tests no named group"
        for role in ("L", "V", "U"):
            leaked = {group_of[c] for c in roles[role]} & test_groups
            assert not leaked, f"fold {f}: groups {sorted(leaked)} are in T and in {role}"
        # E: exactly the colonies without a single label whose group is under test
        assert set(roles["E"]) == {c for c in ids if c not in labelled and group_of[c] in test_groups}
        assert len([c for r in ROLES for c in roles[r]]) == len(ids)
        in_test.update(roles["T"])
    assert set(in_test) == labelled and set(in_test.values()) == {1}  # every labelled colony in one T
    # a group's labelled colonies all sit in one test fold
    fold_of_group = {}
    for f, roles in enumerate(_by_fold(grouped)):
        for c in roles["T"]:
            assert fold_of_group.setdefault(group_of[c] or c, f) == f


def test_grouped_plan_is_stratified_as_far_as_groups_allow(grouped, lapse):
    _, labels, multi, _ = lapse
    n_lab = sum(lab is not None and not m for lab, m in zip(labels, multi))
    rows = grouped.summary()
    assert all("E" in row for row in rows)
    sizes = [row["T"] for row in rows]
    assert sum(sizes) == n_lab and max(sizes) <= 1.5 * min(sizes)
    for name in SHARES:  # every class, even the rare one, is tested and trained on in every fold
        assert all(row["T_counts"][name] >= 1 and row["L_counts"][name] >= 1 for row in rows)
    budget = round(0.2 * n_lab)
    assert all(abs(row["L"] + row["V"] - budget) <= len(SHARES) for row in rows)


def test_grouped_plan_is_seeded_and_ignores_row_order(grouped, lapse):
    ids, labels, multi, groups = lapse
    order = np.random.default_rng(11).permutation(len(ids))
    again = make_folds([ids[i] for i in order], [labels[i] for i in order], [multi[i] for i in order],
                       k=5, labelled_fraction=0.2, groups=[groups[i] for i in order], group_by="column:well")
    assert again.table.equals(grouped.table)
    other = make_folds(ids, labels, multi, k=5, labelled_fraction=0.2, groups=groups, group_by="column:well",
                       seed=1)
    assert not other.table.equals(grouped.table)
    check_folds(other)


def test_per_colony_plan_has_no_group_column_nor_e(plan):
    assert plan.group_by is None and "group" not in plan.table.column_names
    assert "E" not in plan.summary()[0]
    assert all(roles["E"] == [] for roles in _by_fold(plan))
    assert make_folds(*_colonies(), groups=None).table.equals(plan.table)


def test_grouped_plan_round_trips_with_its_groups(grouped, tmp_path):
    write_folds(grouped, tmp_path)
    back = read_folds(tmp_path)
    assert back.group_by == "column:well" and back.table.equals(grouped.table)
    assert json.loads((tmp_path / FOLDS_JSON).read_text())["group_by"] == "column:well"
    assert back.summary() == grouped.summary()


def _set_role(plan, fold, colony, role):
    bad = _corrupt(plan, fold, colony, role)
    return FoldPlan(bad.table, plan.class_names, plan.k, plan.labelled_fraction, plan.val_fraction,
                    plan.seed, group_by=plan.group_by)


def test_check_catches_a_group_split_across_t_and_l(grouped, lapse):
    ids, _, _, groups = lapse
    group_of = dict(zip(ids, groups))
    roles = grouped.roles(2)
    victim = next(c for c in roles["T"] if group_of[c] is not None
                  and sum(group_of[o] == group_of[c] for o in roles["T"]) > 1)
    with pytest.raises(ValueError, match=rf"fold 2: colony '{victim}' of group '{group_of[victim]}' has "
                                         r"role L, but colony .* is in the test fold; a group is never split"):
        check_folds(_set_role(grouped, 2, victim, "L"))
    outsider = roles["U"][0]
    with pytest.raises(ValueError, match=rf"'{outsider}' has role E, but its group .* is not in the test fold"):
        check_folds(_set_role(grouped, 2, outsider, "E"))
    if roles["E"]:
        with pytest.raises(ValueError, match=rf"fold 2: colony '{roles['E'][0]}' of group .* has role U"):
            check_folds(_set_role(grouped, 2, roles["E"][0], "U"))


def test_check_refuses_e_in_a_per_colony_plan(plan, colonies):
    ids, _, multi = colonies
    victim = next(c for c, m in zip(ids, multi) if m)
    with pytest.raises(ValueError, match=rf"fold 3: colony '{victim}' has role E, which only a grouped plan"):
        check_folds(_corrupt(plan, 3, victim, "E"))


def test_too_few_groups_and_bad_groups_are_explained():
    ids = [f"c{i:02d}" for i in range(20)]
    labels = ["A", "B"] * 10
    with pytest.raises(ValueError, match=r"only 3 groups hold single-labelled colonies "
                                         r"\(split.group_by=column:well\), for 5 folds"):
        make_folds(ids, labels, [False] * 20, k=5, groups=[f"g{i % 3}" for i in range(20)],
                   group_by="column:well")
    with pytest.raises(ValueError, match="groups has 2 entries for 20 colonies"):
        make_folds(ids, labels, [False] * 20, k=5, groups=["a", "b"])
    with pytest.raises(ValueError, match=r"colony 'c00': group 7 should be a non-empty string"):
        make_folds(ids, labels, [False] * 20, k=5, groups=[7] * 20)


def test_one_huge_group_warns_that_test_folds_differ(caplog):
    ids = [f"c{i:03d}" for i in range(100)]
    groups = ["big"] * 60 + [f"g{i}" for i in range(40)]
    with caplog.at_level(logging.WARNING, logger="ipb_ray.data.folds"):
        plan = make_folds(ids, ["A", "B"] * 50, [False] * 100, k=5, groups=groups, group_by="column:well")
    check_folds(plan)
    assert any("group 'big' holds 60 of the 100 single-labelled colonies" in r.message for r in caplog.records)


# --------------------------------------------------------------------------- naming groups (catalog rows)

def _rows(sources, annotation=None):
    prov = [json.dumps({"annotation": a} if a else {}) for a in (annotation or [None] * len(sources))]
    return pa.table({"colony_id": [f"c{i}" for i in range(len(sources))], "source": sources,
                     "frame_index": list(range(len(sources))), "provenance": prov})


def test_colony_groups_from_a_catalog_column_an_annotation_column_or_a_regex(caplog):
    from ipb_ray.data.catalog import colony_groups

    rows = _rows(["seqA/well3_t01.png", "seqA/well3_t02.png", "seqB/well12_t01.png"],
                 [{"well": "3"}, {"well": "3"}, None])
    assert colony_groups(rows, "column:source") == rows["source"].to_pylist()
    assert colony_groups(rows, "column:frame_index") == ["0", "1", "2"]
    with caplog.at_level(logging.WARNING, logger="ipb_ray.data.catalog"):
        assert colony_groups(rows, "column:well", catalog="cat") == ["3", "3", None]
    assert any("1 of 3 colonies have no 'well'; each is a group of its own" in r.message for r in caplog.records)
    assert colony_groups(rows, r"regex:(well\d+)_t") == ["well3", "well3", "well12"]
    assert colony_groups(rows, r"regex:^(seq\w)/") == ["seqA", "seqA", "seqB"]


def test_colony_groups_name_the_column_the_catalog_and_the_fix():
    from ipb_ray.data.catalog import colony_groups

    rows = _rows(["a/w1.png", "b/x.png"], [{"well": "1"}, {"well": "2"}])
    with pytest.raises(ConfigError) as info:
        colony_groups(rows, "column:track", catalog="/data/catalog")
    msg = str(info.value)
    assert info.value.key == "split.group_by" and msg.startswith("/data/catalog: split.group_by: ")
    assert "no column 'track' in /data/catalog" in msg and "source, frame_index" in msg
    assert "annotation columns it kept are well" in msg and "rerun `ipb preprocess`" in msg
    with pytest.raises(ConfigError, match=r"regex '\(w\\d\+\)' finds no group name in the source path of 1 of 2 "
                                          r"colonies, e.g. 'b/x.png'"):
        colony_groups(rows, r"regex:(w\d+)", catalog="/data/catalog")


@pytest.mark.parametrize("value, fragment", [
    ("well", "is not a grouping; write column:<name>"),
    ("colum:well", "is not a grouping"),
    ("track:well", "is not a grouping"),
    (r"regex:well\d+", "has 0 capture groups; it needs exactly one"),
    (r"regex:(a)(b)", "has 2 capture groups"),
    ("regex:(well", "is not a valid regular expression"),
])
def test_split_group_by_is_checked_when_the_config_loads(value, fragment):
    from ipb_ray.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"split.group_by={value}"])
    assert info.value.key == "split.group_by" and fragment in str(info.value)
    ok = load_config(overrides=[r"split.group_by=regex:(well\d+)_t"])
    assert ok.split.group_by == r"regex:(well\d+)_t"
    assert load_config().split.group_by is None


def test_on_disk_identifiers_survive_module_moves(tmp_path):
    """Catalogs and worlds written before the package move carry these names: renaming
    them would make every existing catalog unreadable ("no fold-plan metadata")."""
    from ipb_ray.data import folds, synth

    assert folds._META_KEY == b"ipb_ray.folds"
    synth.write_world(synth.SynthConfig(frames=1, frame_size=256, colonies_per_frame=2, colony_scale=0.2, seed=0,
                                        image_format="png"), tmp_path / "w")
    assert json.loads((tmp_path / "w" / "world.json").read_text())["generator"] == "ipb_ray.synth"
