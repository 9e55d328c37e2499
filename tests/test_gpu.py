"""What only a GPU node can check: NCCL DDP with two GPU workers and the GPU labelling
actor pool. Marked ``gpu`` (skipped with a reason where torch sees no CUDA device; the
two-worker test also needs two devices). The bf16 step of every method is in
``tests/test_methods.py``. Run on a GPU node with ``make test PYTEST_ARGS="-m gpu"``."""

from __future__ import annotations

import numpy as np
import pytest

from ipb_ray.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


def _device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cfg(catalog_dir, tmp_path, *extra):
    return load_config(preset="demo", overrides=[
        f"data.catalog={catalog_dir}", f"tracking.storage_path={tmp_path / 'runs'}", "split.folds=2",
        "split.labelled_fraction=0.3", "data.global_patch=48", "data.local_patch=24", "model.backbone=cnn_small",
        "model.feature_dim=16", "method.batch_size=8", "method.unlabelled_batch_size=8", "method.teacher_epochs=1",
        "method.epochs=2", "method.steps_per_epoch=4", "method.finetune_epochs=0", "resources.use_gpu=true",
        *extra])


def test_ipb_on_two_gpu_workers_keeps_the_ranks_equal_over_nccl(tiny_catalog, tmp_path):
    if _device_count() < 2:
        pytest.skip(f"needs two CUDA devices for NCCL DDP; this node has {_device_count()}")
    from ipb_ray.distributed.training import train_fold

    cfg = _cfg(tiny_catalog, tmp_path, "name=gpu-ddp", "resources.num_workers=2", "resources.gpus_per_worker=1",
               "resources.cpus_per_worker=1")
    metrics = train_fold(cfg, 0, digest_dir=str(tmp_path))
    history = metrics["history"]
    assert [h["world_size"] for h in history] == [2] * len(history)
    assert all(np.isfinite(h["train_loss"]) for h in history)
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1] == metrics["param_digest"]  # the all-reduce kept both ranks' students equal
    assert metrics["test_report"]["n"] > 0


def test_gpu_labelling_actor_pool_labels_as_the_cpu_tasks_do(tiny_catalog):
    import ray

    from ipb_ray.data import catalog
    from ipb_ray.distributed.rebalance import labelling_dataset, run_labelling
    from ipb_ray.patches.core import StreamSpec
    from ipb_ray.distributed.streams import stream_state
    from ipb_ray.nn.models import create_model
    from ipb_ray.patches.geometry import PatchGeometry

    if ray.cluster_resources().get("GPU", 0) < 0.5:
        pytest.skip("the shared Ray cluster registered no GPU")
    names = tuple(catalog.read_manifest(tiny_catalog)["class_names"])
    spec = StreamSpec(PatchGeometry(size=48, scales=(48,)), names, seed=4, mode="label")
    kwargs = dict(name="cnn_small", num_classes=len(names), feature_dim=16, multi_scale=False, width=0.5)
    teacher = create_model(**kwargs).eval()
    state = stream_state("test-gpu-label-state")
    try:
        ids = catalog.read_catalog(tiny_catalog, columns=["colony_id"]).column("colony_id").to_pylist()
        ray.get(state.publish.remote(1, [ray.put(teacher.state_dict())]))
        ray.get(state.set.remote(0, {c: 1 for c in ids}))
        on_cpu = run_labelling(labelling_dataset(tiny_catalog, spec, "test-gpu-label-state", kwargs, batch_size=16,
                                                 cpus=0.25))
        on_gpu = run_labelling(labelling_dataset(tiny_catalog, spec, "test-gpu-label-state", kwargs, batch_size=16,
                                                 cpus=0.25, actors=2, gpus=0.25, use_actors=True))
    finally:
        ray.kill(state)
    assert on_gpu.colony_id.tolist() == on_cpu.colony_id.tolist() == sorted(ids)
    # the same windows and the same weights: labels agree up to float rounding on near-ties
    assert np.mean(on_gpu.pseudo == on_cpu.pseudo) >= 0.98
    assert np.allclose(on_gpu.confidence, on_cpu.confidence, atol=1e-3)
