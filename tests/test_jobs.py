"""`ipb submit` against a real two-node Ray cluster on this machine.

The test starts its own head (`ray start --head --dashboard-host 127.0.0.1`) and a second
worker node process, plus an MLflow tracking server with a SQLite database behind it
(:class:`ipb_ray.cluster.local.LocalCluster`, what `ipb local-cluster` runs).
Through the real CLI it submits `preprocess` and `cv` jobs, follows them to SUCCEEDED and
reads the MLflow runs back from the server; then a job with bad input, which must end
FAILED with our message; then a job it stops. Only the processes it started are stopped
(never `ray stop`, which would take the session's shared cluster with it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cluster]

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-node Ray cluster and an MLflow server (:class:`LocalCluster`: address, mlflow_uri, work)."""
    from ipb_ray.cluster.local import LocalCluster

    c = LocalCluster(tmp_path_factory.mktemp("jobs"), workers=1, cpus=2)
    try:
        c.start()
    except Exception:
        print(c.tail_logs())
        raise
    try:
        yield c
    finally:
        c.stop()


def _ipb(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", **(env or {}))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(BIN / "ipb"), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=PROJECT)


def _submission_id(out: str) -> str:
    match = re.search(r"submitted job (\S+) to", out)
    assert match, out
    return match.group(1)


def test_submit_preprocess_and_cv_to_a_two_node_cluster_then_a_failing_and_a_stopped_job(cluster):
    from mlflow import MlflowClient
    from worlds import make_frames

    from ipb_ray.cluster.submit import requires_token

    url, mlflow_url, work = cluster.address, cluster.mlflow_uri, cluster.work
    # token authentication is on: a request without the token is refused, a wrong token
    # gets a message that says where the right one comes from
    assert requires_token(url) is True
    wrong = _ipb("jobs", "list", "--address", url, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 2 and "refused this client's token" in wrong.stderr, wrong.stdout + wrong.stderr
    assert "not-the-token" not in wrong.stdout + wrong.stderr
    data = make_frames(work / "data", n_frames=6, seed=3)
    shared = work / "shared"  # "shared storage": both nodes run on this machine and see it
    common = ["--preset", "demo", f"data.catalog={shared / 'catalog'}", f"tracking.storage_path={shared / 'runs'}",
              f"tracking.tracking_uri={mlflow_url}", "tracking.experiment=jobs-test", "split.folds=2",
              "split.labelled_fraction=0.4", "method.name=supervised", "method.epochs=1", "method.steps_per_epoch=4",
              "model.backbone=patch_stats", "model.feature_dim=8", "data.global_patch=48", "data.local_patch=24",
              "method.batch_size=4", "name=jobs"]

    pre = _ipb("submit", "--address", url, "--", "preprocess", *common, f"data.frames={data / 'frames'}",
               f"data.annotations={data / 'ann.csv'}")
    assert pre.returncode == 0, pre.stdout + pre.stderr
    assert "SUCCEEDED" in pre.stdout and (shared / "catalog" / "catalog.json").exists()

    # the folds train in Ray Train's local mode inside the job's driver: what is tested here is
    # the job path (submission, shared storage, the MLflow server); Train workers are tested
    # in test_training / test_ipb / test_cv, and their start-up would double this test's time
    cv = _ipb("submit", "--address", url, "--", "cv", *common, "--no-model", "resources.num_workers=0")
    out = cv.stdout + cv.stderr
    assert cv.returncode == 0, out
    job = _submission_id(out)
    assert "fold 0 finished" in out and "fold 1 finished" in out  # the job's log, streamed
    assert "shared storage visible from all 2 nodes" in out  # the probe ran on both nodes
    assert re.search(rf"job {re.escape(job)}: SUCCEEDED", out)
    status = _ipb("jobs", "status", job, "--address", url)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "python -m jobs.cv" in status.stdout

    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name("jobs-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_name for p in parents] == ["jobs-supervised"]
    assert sorted(c.data.tags["ipb.fold"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" and "test_macro_tpr" in c.data.metrics for c in children)
    # artifacts went through the server to its artifact store
    assert list((work / "artifacts").rglob("confusion_matrix.png"))
    assert list((shared / "runs").iterdir())  # checkpoints in the shared storage path

    # bad input: the demo preset's relative storage path and SQLite file would vanish with the
    # job's temporary working directory: refused, and the job ends FAILED with why
    bad = _ipb("submit", "--address", url, "--", "cv", "--preset", "demo", f"data.catalog={shared / 'catalog'}")
    out = bad.stdout + bad.stderr
    assert bad.returncode == 1, out
    job = _submission_id(out)
    assert f"job {job}: FAILED" in out
    assert "tracking.storage_path=" in out and "temporary working directory" in out
    status = _ipb("jobs", "status", job, "--address", url)
    assert status.returncode == 1 and "FAILED" in status.stdout and "temporary working directory" in status.stdout
    logs = _ipb("jobs", "logs", job, "--address", url)
    assert "[ipb job] cv FAILED (exit 2)" in logs.stdout

    # a job stopped while it runs
    started = _ipb("submit", "--address", url, "--no-wait", "--", "cv", *common, "name=stopped", "--no-model")
    job = _submission_id(started.stdout)
    stop = _ipb("jobs", "stop", job, "--address", url)
    assert stop.returncode == 0 and f"job {job}: STOPPED" in stop.stdout
    listing = _ipb("jobs", "list", "--address", url)
    assert job in listing.stdout and "STOPPED" in listing.stdout
    unknown = _ipb("jobs", "status", "raysubmit_nope", "--address", url)
    assert unknown.returncode == 2 and "no job raysubmit_nope at" in unknown.stderr


PROBE = '''"""Stands in for jobs.report in a planted project: lists the job's working directory."""
import os

for folder, _, names in os.walk("."):
    for name in names:
        print("UPLOADED", os.path.relpath(os.path.join(folder, name)))
'''


def test_a_planted_secret_or_data_file_never_reaches_the_job(cluster, tmp_path):
    """`ipb submit` packs the project itself: what it prints is what the job's working
    directory holds, and dotfiles, keys, credentials and data are not among them."""
    url = cluster.address
    proj = tmp_path / "proj"
    planted = {".env": "AWS_SECRET_ACCESS_KEY=s3cr3t-7f3a\n", ".aws/credentials": "[default]\n",
               "id_rsa.pem": "-----BEGIN-----\n", "catalog/parts/a.parquet": "x", "predictions/p.parquet": "x"}
    for rel, text in {"jobs/__init__.py": "", "jobs/report.py": PROBE, "notes.md": "kept\n", **planted}.items():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text(text)
    run = _ipb("submit", "--address", url, "--working-dir", str(proj), "--", "report", "x")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "uploading 3 files" in out and ".env" in out  # the summary names what it left out
    uploaded = {line.split(" ", 1)[1].strip() for line in out.splitlines() if line.startswith("UPLOADED ")}
    assert uploaded == {"jobs/__init__.py", "jobs/report.py", "notes.md"}, out
    assert "s3cr3t-7f3a" not in out


def test_the_local_cluster_listens_on_127_0_0_1_only(cluster):
    """`ss -ltnp` for every process of `ipb local-cluster`'s nodes and MLflow server: Ray's
    GCS, raylets, object managers, agents, metrics export, workers and MLflow all listen on
    the loopback interface only."""
    listening = cluster.listening()
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    assert len(listening) >= 8
    assert cluster.exposed() == [], cluster.exposed()
