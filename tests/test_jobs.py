"""`ipb submit` against a real two-node Ray cluster on this machine.

The test starts its own head (`ray start --head --dashboard-host 127.0.0.1`) and a second
worker node process, plus an MLflow tracking server with a SQLite database behind it.
Through the real CLI it submits `preprocess` and `cv` jobs, follows them to SUCCEEDED and
reads the MLflow runs back from the server; then a job with bad input, which must end
FAILED with our message; then a job it stops. Only the processes it started are stopped
(never `ray stop`, which would take the session's shared cluster with it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait(what: str, check, timeout: float, procs) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {p.returncode} ({p.args[:3]})")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def _node_args(ports: list[int], temp_dir: str) -> list[str]:
    agent, grpc, metrics, renv, manager = ports
    # each node its own temp dir, as on separate machines (they would otherwise share the
    # job's unpacked working_dir, and one node re-unpacking it pulls it from under the other)
    return ["--block", f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0", "--node-ip-address=127.0.0.1",
            "--object-store-memory=150000000", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={renv}", f"--node-manager-port={manager}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(job API URL, MLflow URL, work dir) of a 2-node Ray cluster and an MLflow server."""
    work = tmp_path_factory.mktemp("jobs")
    gcs, dash, client_port, mlflow_port, *rest = _free_ports(15)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    logs = [open(work / f"{name}.log", "w") for name in ("head", "worker", "mlflow")]
    procs = []
    temps = [tempfile.mkdtemp(prefix=f"ipb{n}", dir="/tmp") for n in ("h", "w")]  # short: socket paths

    def start(args, log):
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
                                      start_new_session=True))

    url, mlflow_url = f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlflow_port}"
    try:
        start([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dash}", f"--ray-client-server-port={client_port}", *_node_args(rest[:5], temps[0])],
              logs[0])
        start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
               "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1",
               "--port", str(mlflow_port), "--workers", "1"], logs[2])
        from ray.job_submission import JobSubmissionClient

        _wait("Ray head", lambda: JobSubmissionClient(url).list_jobs() is not None, 120, procs)
        start([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", *_node_args(rest[5:10], temps[1])], logs[1])
        from ray.util.state import list_nodes

        _wait("second node", lambda: len([n for n in list_nodes(address=url) if n.state == "ALIVE"]) == 2,
              120, procs)
        _wait("MLflow server", lambda: urllib.request.urlopen(f"{mlflow_url}/health", timeout=5).status == 200,
              120, procs)
        yield url, mlflow_url, work
    except Exception:
        for log in logs:
            log.flush()
            print(f"--- {log.name}\n{Path(log.name).read_text()[-3000:]}")
        raise
    finally:
        for p in procs:  # each started in its own session: the group holds raylet, GCS, workers
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever of the group is still there (agents, workers)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in logs:
            log.close()
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def _ipb(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(BIN / "ipb"), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=PROJECT)


def _submission_id(out: str) -> str:
    match = re.search(r"submitted job (\S+) to", out)
    assert match, out
    return match.group(1)


def test_submit_preprocess_and_cv_to_a_two_node_cluster_then_a_failing_and_a_stopped_job(cluster):
    from mlflow import MlflowClient
    from test_preprocess import make_frames

    url, mlflow_url, work = cluster
    data = make_frames(work / "data", n_frames=6, seed=3)
    shared = work / "shared"  # "shared storage": both nodes run on this machine and see it
    common = ["--preset", "demo", f"data.catalog={shared / 'catalog'}", f"tracking.storage_path={shared / 'runs'}",
              f"tracking.tracking_uri={mlflow_url}", "tracking.experiment=jobs-test", "split.folds=2",
              "split.labelled_fraction=0.4", "method.name=supervised", "method.epochs=1",
              "model.backbone=patch_stats", "model.feature_dim=8", "data.global_patch=48", "data.local_patch=24",
              "method.batch_size=4", "name=jobs"]

    pre = _ipb("submit", "--address", url, "--", "preprocess", *common, f"data.frames={data / 'frames'}",
               f"data.annotations={data / 'ann.csv'}")
    assert pre.returncode == 0, pre.stdout + pre.stderr
    assert "SUCCEEDED" in pre.stdout and (shared / "catalog" / "catalog.json").exists()

    cv = _ipb("submit", "--address", url, "--", "cv", *common, "--no-model")
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
