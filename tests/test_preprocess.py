"""`ipb preprocess` on a real local Ray cluster: catalog, rejects, folds, restart after a kill."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from ipb_ray.data import catalog
from ipb_ray.config import load_config
from ipb_ray.data.folds import check_folds, read_folds
from ipb_ray.distributed.preprocess import build_catalog
from worlds import CLASSES, make_frames  # tests/worlds.py: the tiny frame world

pytestmark = pytest.mark.ray


def _cfg(root, *extra):
    return load_config(preset="demo", overrides=[
        f"data.frames={root / 'frames'}", f"data.annotations={root / 'ann.csv'}",
        f"data.catalog={root / 'catalog'}", "split.folds=3", "split.labelled_fraction=0.3", *extra])


def test_build_catalog_from_frames_and_table(ray_local, tmp_path):
    root = make_frames(tmp_path)
    # one annotation row pointing at a missing frame, one at an unknown class
    with (root / "ann.csv").open("a", newline="") as fh:
        csv.writer(fh).writerows([["frames/gone.png", 1, 1, 50, 50, "Dense", 0],
                                  ["frames/f00.png", 35, 35, 126, 126, "Ghost", 0]])
    seen = []
    summary = build_catalog(_cfg(root, "data.class_names=[Debris, Dense, Spread]"),
                            progress=lambda d, t: seen.append((d, t)))
    assert summary.importer == "frames" and summary.shards == 6 and summary.shards_skipped == 0
    assert seen[-1] == (6, 6)
    assert summary.colonies == 24 and summary.counts["multi_label"] == 6
    assert sum(summary.counts[c] for c in CLASSES) == 18
    assert summary.rejects == 2
    table = catalog.read_catalog(root / "catalog")
    assert table.num_rows == 24 and set(table.column("frame_index").to_pylist()) == set(range(6))
    reasons = catalog.read_rejects(root / "catalog").column("reason").to_pylist()
    assert any("frame file not found" in r for r in reasons)
    assert any("unknown class 'Ghost'" in r for r in reasons)
    # the same catalog through Ray Data
    ds = ray_local.data.read_parquet(str(root / "catalog" / "parts"))
    assert ds.count() == 24
    # folds beside the catalog, valid
    plan = read_folds(root / "catalog")
    check_folds(plan)
    assert plan.k == 3 and len(summary.folds) == 3
    # a rerun redoes nothing
    again = build_catalog(_cfg(root, "data.class_names=[Debris, Dense, Spread]"))
    assert again.shards_skipped == 6 and again.colonies == 24


@pytest.mark.realdata
@pytest.mark.slow
def test_bccd_voc_import(ray_local, shared_data, tmp_path):
    cfg = load_config(preset="demo", overrides=[f"data.frames={shared_data / 'bccd'}",
                                                f"data.catalog={tmp_path / 'bccd'}", "split.folds=5"])
    summary = build_catalog(cfg)
    assert summary.importer == "voc"
    assert summary.counts["RBC"] > 3000 and summary.counts["WBC"] > 300
    assert summary.counts["Platelets"] > 300 and summary.counts["multi_label"] > 200
    table = catalog.read_catalog(tmp_path / "bccd", columns=["image", "mask", "width", "height"])
    first = table.slice(0, 1).to_pylist()[0]
    assert catalog.decode_png(first["image"]).shape == (first["height"], first["width"])


def test_killed_preprocess_resumes_without_redoing_frames(tmp_path, ray_local):
    """A real crash: kill `ipb preprocess` mid-run, rerun, compare with a clean build."""
    root = make_frames(tmp_path, n_frames=16, seed=3)
    args = [sys.executable, "-m", "ipb_ray.cli", "preprocess", "--preset", "demo",
            "--frames", str(root / "frames"), "--annotations", str(root / "ann.csv"),
            "--out", str(root / "catalog"), "split.folds=3", "split.labelled_fraction=0.3",
            "resources.object_store_mb=100"]
    env = dict(os.environ, RAY_ADDRESS="")  # its own local cluster, not the test session's
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    parts = root / "catalog" / "parts"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("*.parquet")))
    assert 3 <= done_before < 17, "the kill came too late to test a resume"
    with pytest.raises(catalog.IncompleteCatalogError):
        catalog.read_catalog(root / "catalog")
    # the rerun and the clean build join the session's cluster (no Ray start-up of their own)
    joined = [*args, "--address", ray_local.get_runtime_context().gcs_address]
    out = subprocess.run(joined, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "already done" in out.stdout
    resumed = catalog.read_catalog(root / "catalog").sort_by("colony_id")
    fresh_args = [a if a != str(root / "catalog") else str(root / "fresh") for a in joined]
    assert subprocess.run(fresh_args, env=env, capture_output=True, timeout=300).returncode == 0
    fresh = catalog.read_catalog(root / "fresh").sort_by("colony_id")
    assert resumed.num_rows == fresh.num_rows == 64
    assert resumed.column("colony_id").equals(fresh.column("colony_id"))
    assert resumed.column("labels").equals(fresh.column("labels"))
    assert pq.read_table(root / "catalog" / "folds.parquet").equals(pq.read_table(root / "fresh" / "folds.parquet"))


def test_preprocess_joins_an_existing_cluster_by_address(ray_local, tmp_path):
    """`--address` attaches to a running cluster (here the test session's) instead of starting one."""
    from ray.util.state import list_jobs

    root = make_frames(tmp_path, n_frames=2, seed=5)
    address = ray_local.get_runtime_context().gcs_address
    # the address named: without one, the state API looks for "the latest cluster started on
    # this machine" (/tmp/ray/ray_current_cluster), which may be another (or a dead) one
    jobs_before = len(list_jobs(address=address))
    out = subprocess.run(
        [sys.executable, "-m", "ipb_ray.cli", "preprocess", "--preset", "demo", "--frames",
         str(root / "frames"), "--annotations", str(root / "ann.csv"), "--out", str(root / "catalog"),
         "--address", address, "split.folds=2", "split.labelled_fraction=0.3"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "shards: 2" in out.stdout
    # its driver ran on this cluster: the cluster's job table grew by one
    assert len(list_jobs(address=address)) == jobs_before + 1
    assert catalog.read_manifest(root / "catalog")["colonies"] == 8
