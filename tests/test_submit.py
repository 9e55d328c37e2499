"""The pure rules behind `ipb submit` and the cluster path checks (milliseconds, no Ray).

The integration (a real two-node cluster, real jobs) is in test_jobs.py.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest

from ipb_ray.cluster.paths import Placement, invisible_paths, job_submission_id, job_workdir, path_problems, \
    tracking_is_local
from ipb_ray.config import load_config
from ipb_ray.cluster.submit import COMMANDS, address_warning, dashboard_address, entrypoint, project_root, \
    requires_token, runtime_env

TWO_NODES = {"n1": "10.0.0.1", "n2": "10.0.0.2"}


def _cfg(*overrides):
    return load_config(preset="demo", overrides=list(overrides))


def _shared(*extra):
    return _cfg("data.catalog=/mnt/ipb/catalog", "tracking.storage_path=s3://bucket/ipb",
                "tracking.tracking_uri=http://10.0.0.5:5000", *extra)


# --------------------------------------------------------------------------- path rules

def test_a_local_run_may_use_relative_paths_and_sqlite():
    assert path_problems(_cfg(), Placement({"n1": "127.0.0.1"})) == []


def test_a_multi_node_run_refuses_sqlite_tracking_and_relative_paths():
    problems = path_problems(_cfg(), Placement(TWO_NODES))
    text = "\n".join(problems)
    assert "tracking.tracking_uri=sqlite:///mlflow.db is a local MLflow store" in text
    assert "2 nodes" in text and "cluster/mlflow/" in text
    assert "tracking.storage_path=demo/ray_results is a relative path on a 2-node cluster" in text
    assert "data.catalog=demo/catalog is a relative path" in text
    assert len(problems) == 3


def test_a_multi_node_run_with_shared_paths_and_a_server_passes_the_rules():
    assert path_problems(_shared(), Placement(TWO_NODES)) == []


def test_a_catalog_uri_on_a_cluster_asks_for_a_mount():
    problems = path_problems(_shared("data.catalog=s3://bucket/catalog"), Placement(TWO_NODES))
    assert len(problems) == 1 and "mount the bucket on every node" in problems[0]


def test_a_job_refuses_paths_inside_its_temporary_working_directory(tmp_path, monkeypatch):
    workdir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    where = Placement({"n1": "127.0.0.1"}, str(workdir))
    problems = path_problems(_cfg("data.catalog=/data/catalog"), where, {"--out": "report"})
    text = "\n".join(problems)
    assert "tracking.storage_path=demo/ray_results lies inside the Ray job's temporary working directory" in text
    assert "--out=report lies inside" in text
    assert "tracking.tracking_uri=sqlite:///mlflow.db is a file inside" in text
    assert "data.catalog" not in text  # absolute, outside the working dir
    assert len(problems) == 3
    # absolute paths elsewhere, a URI and a server: nothing to refuse
    ok = _cfg("data.catalog=/data/catalog", f"tracking.storage_path={tmp_path / 'runs'}",
              f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert path_problems(ok, where, {"--out": str(tmp_path / "report")}) == []


def test_commands_that_do_not_train_skip_the_catalog_and_storage_rules():
    problems = path_problems(_cfg("tracking.tracking_uri=http://h:5000"), Placement(TWO_NODES), catalog=False,
                             storage=False)
    assert problems == []


@pytest.mark.parametrize("uri,local", [("sqlite:///mlflow.db", True), ("file:///tmp/mlruns", True),
                                       ("mlruns", True), ("http://10.0.0.5:5000", False),
                                       ("https://mlflow.example.org", False), ("databricks", False),
                                       ("postgresql://u@db/mlflow", False)])
def test_which_tracking_uris_are_local(uri, local):
    assert tracking_is_local(uri) is local


def test_invisible_paths_names_the_nodes_that_miss_the_marker(tmp_path):
    seen = []

    def probe(marker, nodes):  # node n2 has its own disk
        seen.append(marker)
        assert (tmp_path / "runs").is_dir() and os.path.exists(marker)
        return ["n2"]

    problems = invisible_paths({"tracking.storage_path": str(tmp_path / "runs"), "x": "s3://b/k"},
                               Placement(TWO_NODES), probe)
    assert len(problems) == 1 and "nodes 10.0.0.2 do not see it" in problems[0]
    assert len(seen) == 1 and not os.path.exists(seen[0])  # the marker is cleaned up
    assert invisible_paths({"p": str(tmp_path)}, Placement(TWO_NODES), lambda m, n: []) == []


def test_job_identity_comes_from_rays_job_config_variable(tmp_path):
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"},
                                                      "metadata": {"job_submission_id": "raysubmit_x"}})}
    assert job_workdir(env, cwd=str(tmp_path)) == str(tmp_path)
    assert job_submission_id(env) == "raysubmit_x"
    assert job_workdir({}) is None and job_submission_id({}) is None
    assert job_workdir({"RAY_JOB_CONFIG_JSON_ENV_VAR": "{not json"}) is None
    no_dir = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})}
    assert job_workdir(no_dir) is None


# --------------------------------------------------------------------------- submit

def test_entrypoint_runs_the_jobs_module_and_quotes_arguments():
    cmd = entrypoint(["cv", "--config", "my exp.yaml", "method.mpl.threshold=0.7"])
    assert shlex.split(cmd) == ["python", "-m", "jobs.cv", "--config", "my exp.yaml", "method.mpl.threshold=0.7"]
    for command in COMMANDS:  # every submittable command has its module
        assert (project_root() / "jobs" / f"{command}.py").is_file()


@pytest.mark.parametrize("argv,message", [([], "put the ipb command after --"),
                                          (["demo"], "`demo` cannot be submitted as a Ray job; one of: preprocess")])
def test_entrypoint_refuses_what_has_no_job(argv, message):
    with pytest.raises(ValueError, match=message):
        entrypoint(argv)


def test_runtime_env_uploads_the_project_without_environments_or_results(tmp_path):
    env = runtime_env()
    assert env["working_dir"] == str(project_root())
    assert {".*", "*.pem", "/catalog", "demo", "ray_results", "*.db"} <= set(env["excludes"])
    packed = runtime_env(package=tmp_path / "w.zip")  # what `ipb submit` sends: its own zip, no excludes
    assert packed["working_dir"] == str(tmp_path / "w.zip") and "excludes" not in packed
    assert "pip" not in env and "env_vars" not in env
    with_deps = runtime_env(with_deps=True)
    assert any(r.startswith("ray[") for r in with_deps["pip"]) and not any("pytest" in r for r in with_deps["pip"])
    with pytest.raises(ValueError, match="is not the ipb-ray project"):
        runtime_env(tmp_path)


@pytest.mark.parametrize("given,env,want", [
    (None, {}, "http://127.0.0.1:8265"),
    ("10.0.0.1:8265", {}, "http://10.0.0.1:8265"),
    (None, {"RAY_ADDRESS": "http://10.0.0.2:8265"}, "http://10.0.0.2:8265"),
    (None, {"RAY_ADDRESS": "10.0.0.2:6379"}, "http://127.0.0.1:8265"),  # a GCS address is not the job API
    (None, {"RAY_API_SERVER_ADDRESS": "http://h:8265", "RAY_ADDRESS": "http://x:1"}, "http://h:8265"),
])
def test_dashboard_address(given, env, want):
    assert dashboard_address(given, env) == want


@pytest.mark.parametrize("given,message", [("10.0.0.1:6379", "is the GCS port"),
                                           ("ray://10.0.0.1:10001", "give the dashboard's job API")])
def test_dashboard_address_refuses_other_ray_addresses(given, message):
    with pytest.raises(ValueError, match=message):
        dashboard_address(given, {})


def test_address_warning_only_beyond_loopback_and_private_networks():
    for quiet in ("http://127.0.0.1:8265", "http://10.1.2.3:8265", "http://192.168.0.9:8265", "http://[::1]:8265"):
        assert address_warning(quiet) is None, quiet
    warning = address_warning("http://8.8.8.8:8265")
    assert warning and "can run code on the cluster" in warning and "--dashboard-host 127.0.0.1" in warning


@pytest.mark.parametrize("status,want", [(200, False), (401, True), (403, True), (500, None)])
def test_requires_token_asks_the_job_api_without_one(status, want):
    """A throwaway HTTP server on 127.0.0.1 answers /api/jobs/ like a dashboard would."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert requires_token(f"http://127.0.0.1:{server.server_port}") is want
    finally:
        server.shutdown()
    assert seen == [("/api/jobs/", None)]  # asked without a token


def test_requires_token_is_unknown_when_nothing_answers():
    assert requires_token("http://127.0.0.1:1", timeout_s=1) is None


def test_job_entrypoints_are_installed_with_the_project(tmp_path):
    """A RayJob or a launcher node runs `python -m jobs.cv` outside the project directory:
    the installed package must hold jobs/ (pyproject's package list)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import jobs.cv, jobs._run; print(jobs._run.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "jobs" in done.stdout


def test_token_sources_follow_rays_order(tmp_path):
    from ipb_ray.cluster.submit import token_available

    assert not token_available({}, home=tmp_path)
    assert token_available({"RAY_AUTH_TOKEN": "x"}, home=tmp_path)
    assert token_available({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}, home=tmp_path)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x")
    assert token_available({}, home=tmp_path)


def test_local_cluster_ports_avoid_the_ephemeral_and_ray_worker_ranges():
    import random
    import socket

    from ipb_ray.cluster.local import PORT_RANGE, free_ports

    ports = free_ports(12, random.Random(0))
    assert len(set(ports)) == 12 and all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)
    assert free_ports(12, random.Random(0)) == ports  # seeded: reproducible
    with socket.socket() as s:  # a port in use is never offered
        s.bind(("127.0.0.1", ports[0]))
        again = free_ports(12, random.Random(0))
    assert ports[0] not in again


def test_the_probe_never_creates_a_missing_catalog(tmp_path):
    missing = tmp_path / "no-such-catalog"
    assert invisible_paths({"data.catalog": str(missing)}, Placement(TWO_NODES), lambda m, n: ["n2"]) == []
    assert not missing.exists()
