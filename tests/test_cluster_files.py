"""Cluster files validate against what Ray ships: the launcher YAML against the JSON schema
inside the Ray wheel (offline), and it starts Ray with token authentication on every node."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _ray_schema() -> dict:
    ray = pytest.importorskip("ray")
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_launcher_yaml_passes_rays_schema_and_keeps_the_dashboard_private():
    import jsonschema

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, _ray_schema())
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert "GPU" not in config["available_node_types"]["head"]["resources"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def _ray_token_path_in_home() -> str:
    """Where Ray looks for the token file when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH
    is set, relative to the home directory (``~/.ray/auth_token`` in Ray 2.52 and later)."""
    pytest.importorskip("ray")
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    return _get_default_token_path().relative_to(Path.home()).as_posix()


def _start_env(command: str) -> dict[str, str]:
    """The VAR=value words in front of `ray start` in one start command."""
    words = shlex.split(command)
    at = next((i for i in range(len(words) - 1) if words[i:i + 2] == ["ray", "start"]), None)
    assert at is not None, f"no `ray start` in {command!r}"
    return dict(w.split("=", 1) for w in words[:at] if re.fullmatch(r"[A-Za-z_]\w*=.*", w))


def token_auth_problems(config: dict) -> list[str]:
    """Where the launcher YAML does not start Ray with token authentication: both start
    commands with RAY_AUTH_MODE=token (and no token on the command line), and Ray's token
    file copied from a path on the laptop to where Ray reads it on the nodes."""
    bad = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if "ray start" in c]
        if not starts:
            bad.append(f"{key}: no `ray start`")
        for command in starts:
            env = _start_env(command)
            if env.get("RAY_AUTH_MODE") != "token":
                bad.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
            if "RAY_AUTH_TOKEN" in env:
                bad.append(f"{key}: the token itself on the command line; copy the file instead")
    remote = f"/home/{config['auth']['ssh_user']}/{_ray_token_path_in_home()}"
    source = config.get("file_mounts", {}).get(remote)
    if source is None:
        bad.append(f"file_mounts: nothing mounted at {remote}, where Ray reads the token")
    elif not (source.startswith(("~/", "/", "./")) and Path(source).name == Path(remote).name):
        bad.append(f"file_mounts: {remote} must come from a path to a token file (e.g. ~/.ray/auth_token), "
                   "never the token itself")
    return bad


def test_launcher_yaml_starts_every_node_with_token_auth():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert token_auth_problems(config) == []
    remote = f"/home/{config['auth']['ssh_user']}/.ray/auth_token"
    # the source is the file `ray get-auth-token --generate` writes on the laptop (ray up
    # expands ~), so `ipb submit` there and Ray on the nodes use the same token
    source = config["file_mounts"][remote]
    assert Path(os.path.expanduser(source)) == Path.home() / _ray_token_path_in_home()
    # the soft limit and the loopback dashboard stay as they were
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert [_start_env(c)["RAY_num_workers_soft_limit"] for c in starts] == ["40"], key
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def _head_without_auth_mode(config):
    config["head_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "")
                                         for c in config["head_start_ray_commands"]]


def _worker_auth_disabled(config):
    config["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")
                                           for c in config["worker_start_ray_commands"]]


def _literal_token_mount(config):
    config["file_mounts"]["/home/ubuntu/.ray/auth_token"] = "0123456789abcdef" * 4  # a token's shape


def _no_token_mount(config):
    del config["file_mounts"]["/home/ubuntu/.ray/auth_token"]


def _token_mounted_elsewhere(config):
    config["file_mounts"]["/root/.ray/auth_token"] = config["file_mounts"].pop("/home/ubuntu/.ray/auth_token")


def _token_on_the_command_line(config):
    config["worker_start_ray_commands"] = [c.replace("ray start", "RAY_AUTH_TOKEN=abc ray start")
                                           for c in config["worker_start_ray_commands"]]


@pytest.mark.parametrize("breakage,expected", [
    (_head_without_auth_mode, "head_start_ray_commands: `ray start` without RAY_AUTH_MODE=token"),
    (_worker_auth_disabled, "worker_start_ray_commands: `ray start` without RAY_AUTH_MODE=token"),
    (_literal_token_mount, "file_mounts: /home/ubuntu/.ray/auth_token must come from a path"),
    (_no_token_mount, "file_mounts: nothing mounted at /home/ubuntu/.ray/auth_token"),
    (_token_mounted_elsewhere, "file_mounts: nothing mounted at /home/ubuntu/.ray/auth_token"),
    (_token_on_the_command_line, "worker_start_ray_commands: the token itself on the command line"),
], ids=["head-no-mode", "worker-disabled", "literal-token", "no-mount", "wrong-home", "token-in-command"])
def test_token_auth_check_catches_broken_launcher_yamls(breakage, expected):
    config = copy.deepcopy(yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text()))
    breakage(config)
    found = token_auth_problems(config)
    assert any(p.startswith(expected) for p in found), found


def test_schema_check_catches_a_broken_launcher_yaml():
    import jsonschema

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    del config["provider"]
    with pytest.raises(jsonschema.ValidationError, match="provider"):
        jsonschema.validate(config, _ray_schema())


def test_storage_uris_pass_through_and_local_paths_become_absolute(tmp_path, monkeypatch):
    from ipb_ray.engine.fold import storage_uri

    monkeypatch.chdir(tmp_path)
    assert storage_uri("s3://bucket/ipb") == "s3://bucket/ipb"
    assert storage_uri("gs://bucket/ipb") == "gs://bucket/ipb"
    assert storage_uri("ray_results") == str(tmp_path / "ray_results")


def test_a_checkpoint_on_remote_storage_is_copied_here_and_named_by_its_uri(tmp_path):
    """A Ray Train checkpoint on a non-local pyarrow filesystem (a stand-in for s3://):
    its URI goes to MLflow, and the history, curves and model are read from a local copy."""
    import pyarrow.fs as pafs

    pytest.importorskip("ray")
    from ray.train import Checkpoint

    from ipb_ray.distributed.training import checkpoint_locations
    from ipb_ray.engine.store import read_history
    from ipb_ray.nn.checkpoint import HISTORY_FILE

    (tmp_path / "bucket" / "run" / "ckpt").mkdir(parents=True)
    (tmp_path / "bucket" / "run" / "ckpt" / HISTORY_FILE).write_text('[{"epoch": 0, "train_loss": 1.5}]')
    remote = Checkpoint("run/ckpt", filesystem=pafs.SubTreeFileSystem(str(tmp_path / "bucket"),
                                                                      pafs.LocalFileSystem()))
    where, local = checkpoint_locations(remote)
    assert where == "subtree://run/ckpt" and local != where
    assert read_history(local) == [{"epoch": 0, "train_loss": 1.5}]
    on_disk = Checkpoint(str(tmp_path / "bucket" / "run" / "ckpt"))
    assert checkpoint_locations(on_disk) == (on_disk.path, on_disk.path)
    assert checkpoint_locations(None) == (None, None)
