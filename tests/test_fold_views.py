"""Folds drawn from a catalog on disk: split.group_by, and catalog views for `ipb train`/`ipb tune`.

The catalog is written row by row (no segmentation, no Ray), so these run in a second.
"""

from __future__ import annotations

import numpy as np
import pytest

from ipb_ray.data import catalog
from ipb_ray.config import ConfigError, load_config
from ipb_ray.data.folds import FOLDS_PARQUET, read_folds

WELLS, HOURS = 12, 3


@pytest.fixture()
def lapse_catalog(tmp_path):
    """Twelve wells imaged at three hours; the annotation table named each colony's well."""
    root = tmp_path / "catalog"
    crop, mask = np.full((4, 4), 100, np.uint8), np.ones((4, 4), bool)
    rows = []
    for w in range(WELLS):
        for h in range(HOURS):
            labels = [] if h == 2 and w % 3 == 0 else ["AB"[w % 2]]  # a few unlabelled sightings
            rows.append(catalog.colony_row(
                source=f"plate1/well{w:02d}_t{h}.png", bbox=(0, 0, 4, 4), crop=crop, mask=mask, labels=labels,
                frame_index=h, importer="frames", provenance={catalog.ANNOTATION_COLUMNS: {"well": f"{w:02d}"}}))
    catalog.begin_build(root, ["s0"])
    catalog.write_shard(root, "s0", rows, [])
    catalog.finish_build(root, ["s0"], {"importer": "frames", "inputs": "test"})
    return root


def _cfg(root, *extra):
    return load_config(preset="demo", overrides=[f"data.catalog={root}", "split.folds=3",
                                                 "split.labelled_fraction=0.3", *extra])


def _well(cid, table):
    return dict(zip(table["colony_id"].to_pylist(), table["source"].to_pylist()))[cid].split("_t")[0]


def test_catalog_folds_keep_every_well_in_one_test_fold(lapse_catalog):
    from ipb_ray.data.fold_views import make_catalog_folds

    plan = make_catalog_folds(lapse_catalog, _cfg(lapse_catalog, "split.group_by=column:well"))
    assert plan.group_by == "column:well" and read_folds(lapse_catalog).group_by == "column:well"
    rows = catalog.read_catalog(lapse_catalog, columns=["colony_id", "source"])
    tested_in: dict[str, int] = {}
    for f in range(plan.k):
        roles = plan.roles(f)
        tested = {_well(c, rows) for c in roles["T"]}
        assert tested and not tested & {_well(c, rows) for r in ("L", "V", "U") for c in roles[r]}
        for well in tested:
            assert tested_in.setdefault(well, f) == f
        assert {_well(c, rows) for c in roles["E"]} <= tested  # unlabelled sightings of a tested well
    assert len(tested_in) == WELLS
    # the same wells named by a pattern on the frame path give the same test folds
    by_path = make_catalog_folds(lapse_catalog, _cfg(lapse_catalog, r"split.group_by=regex:(well\d+)_t"))
    assert all(by_path.roles(f)["T"] == plan.roles(f)["T"] for f in range(plan.k))


def test_a_grouping_the_catalog_cannot_give_is_an_error_not_a_warning(lapse_catalog):
    from ipb_ray.data.fold_views import make_catalog_folds

    with pytest.raises(ConfigError, match=rf"{lapse_catalog}: split.group_by: no column 'track' in "
                                          rf"{lapse_catalog}: its catalog columns are colony_id, source"):
        make_catalog_folds(lapse_catalog, _cfg(lapse_catalog, "split.group_by=column:track"))
    with pytest.raises(ConfigError, match=r"regex 'plate2/\(\\w\+\)' finds no group name in the source path "
                                          r"of 36 of 36 colonies, e.g. 'plate1/well00_t0.png'"):
        make_catalog_folds(lapse_catalog, _cfg(lapse_catalog, r"split.group_by=regex:plate2/(\w+)"))
    with pytest.raises(ConfigError, match=r"only 1 group holds single-labelled colonies .* for 3 folds"):
        make_catalog_folds(lapse_catalog, _cfg(lapse_catalog, r"split.group_by=regex:^(plate\d)/"))
    assert not (lapse_catalog / FOLDS_PARQUET).exists()


def test_resolve_fold_catalog_uses_the_stored_plan_or_draws_a_view(lapse_catalog):
    from ipb_ray.data.fold_views import resolve_fold_catalog
    from ipb_ray.data.fold_views import make_catalog_folds

    make_catalog_folds(lapse_catalog, _cfg(lapse_catalog))
    stored = read_folds(lapse_catalog).table
    same = _cfg(lapse_catalog)
    assert resolve_fold_catalog(same) is same  # the catalog's own folds match split.*
    other = resolve_fold_catalog(_cfg(lapse_catalog, "split.labelled_fraction=0.5"))
    assert other.data.catalog == str(lapse_catalog / "views" / "k3-lf0.5-vf0.2-s0")
    assert read_folds(other.data.catalog).labelled_fraction == pytest.approx(0.5)
    grouped = resolve_fold_catalog(_cfg(lapse_catalog, "split.group_by=column:well"))
    assert grouped.data.catalog.endswith("views/k3-lf0.3-vf0.2-s0-by-well")
    assert read_folds(grouped.data.catalog).group_by == "column:well"
    by_regex = resolve_fold_catalog(_cfg(lapse_catalog, r"split.group_by=regex:(well\d+)_t"))
    assert "-by-regex-" in by_regex.data.catalog and by_regex.data.catalog != grouped.data.catalog
    again = resolve_fold_catalog(_cfg(lapse_catalog, "split.group_by=column:well"))
    assert again.data.catalog == grouped.data.catalog  # reused, not redrawn
    assert read_folds(lapse_catalog).table.equals(stored)  # the catalog's own plan is untouched


class _Stop(Exception):
    pass


def _capture(monkeypatch):
    """Stub the Ray side of a run; train_fold records the config it was given and stops."""
    import ipb_ray.cluster.paths
    import ipb_ray.distributed.ray_setup
    import ipb_ray.distributed.training

    seen = {}

    def train_fold(cfg, fold, **kwargs):
        seen["catalog"], seen["fold"] = cfg.data.catalog, fold
        raise _Stop

    monkeypatch.setattr(ipb_ray.distributed.training, "train_fold", train_fold)
    monkeypatch.setattr(ipb_ray.distributed.ray_setup, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(ipb_ray.cluster.paths, "check_cluster_paths", lambda *a, **k: None)
    return seen


def test_ipb_train_trains_on_the_folds_split_asks_for(lapse_catalog, monkeypatch):
    from ipb_ray.cli import _train_and_report
    from ipb_ray.data.fold_views import make_catalog_folds

    make_catalog_folds(lapse_catalog, _cfg(lapse_catalog))  # stored: per colony, 30 % labelled
    seen = _capture(monkeypatch)
    with pytest.raises(_Stop):
        _train_and_report(_cfg(lapse_catalog, "split.group_by=column:well", "split.fold=1"), 1)
    assert seen == {"catalog": str(lapse_catalog / "views" / "k3-lf0.3-vf0.2-s0-by-well"), "fold": 1}
    with pytest.raises(_Stop):
        _train_and_report(_cfg(lapse_catalog), 0)
    assert seen["catalog"] == str(lapse_catalog)


def test_a_tune_trial_trains_on_the_folds_of_its_own_split(lapse_catalog, monkeypatch):
    pytest.importorskip("ray.tune")
    import ray.tune

    from ipb_ray.config import to_dict
    from ipb_ray.data.fold_views import make_catalog_folds
    from ipb_ray.distributed.search import _trial

    make_catalog_folds(lapse_catalog, _cfg(lapse_catalog))
    seen = _capture(monkeypatch)

    class _Context:
        def get_trial_name(self):
            return "trial_1"

    monkeypatch.setattr(ray.tune, "get_context", lambda: _Context())
    config = {"__base__": to_dict(_cfg(lapse_catalog)), "__meta__": {"objective": "kfold", "folds": [2]},
              "split.labelled_fraction": 0.5}
    with pytest.raises(_Stop):
        _trial(config)
    assert seen == {"catalog": str(lapse_catalog / "views" / "k3-lf0.5-vf0.2-s0"), "fold": 2}
