"""Cluster files validate against what Ray ships: the launcher YAML against the JSON schema
inside the Ray wheel (offline)."""

from __future__ import annotations

import json
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


def test_schema_check_catches_a_broken_launcher_yaml():
    import jsonschema

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    del config["provider"]
    with pytest.raises(jsonschema.ValidationError, match="provider"):
        jsonschema.validate(config, _ray_schema())


def test_storage_uris_pass_through_and_local_paths_become_absolute(tmp_path, monkeypatch):
    from ipb_ray.training import storage_uri

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

    from ipb_ray.training import HISTORY_FILE, checkpoint_locations, read_history

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
