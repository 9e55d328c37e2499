"""Shared test fixtures and markers.

- ``realdata``: tests that read ../shared/data; skipped with a reason where it is absent.
- ``gpu``: skipped unless torch sees a CUDA device (Lightning's RunIf idea).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# Fail fast instead of hanging when a Ray Train worker group cannot start.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Tests that start their own multi-node cluster go first: `ray start --head` waits only
    # 30 s for its raylet to register, which a 2-core machine already running the shared
    # cluster (and what earlier tests left starting or stopping) can miss.
    items.sort(key=lambda item: 0 if "cluster" in item.keywords else 1)
    skip_data = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    has_data = SHARED_DATA.is_dir()
    has_gpu = None
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) or "cluster" in item.keywords:
            item.add_marker(pytest.mark.ray)  # uses a Ray cluster, whether its file says so or not
        if "realdata" in item.keywords and not has_data:
            item.add_marker(skip_data)
        if "gpu" in item.keywords:
            has_gpu = _cuda_available() if has_gpu is None else has_gpu
            if not has_gpu:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster shared by every Ray test of the session (small object store)."""
    ray = pytest.importorskip("ray")
    from ipb_ray.config import ResourcesConfig
    from ipb_ray.distributed.ray_setup import init_ray

    init_ray(ResourcesConfig(object_store_mb=300, data_cpus=0.25))  # as the demo preset
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory, ray_local) -> str:
    """The session's one small annotated catalog, read-only: 8 frames of four colonies
    (three classes and a multi-label colony each; ``tests/worlds.py``), 2 folds at 30 %
    labelled, built once through the real Ray preprocessing and shared by the stream and
    labelling tests."""
    from worlds import small_catalog_at

    return small_catalog_at(tmp_path_factory.mktemp("tiny-world"), n_frames=8, seed=5)


def _free_cpus(ray) -> tuple[float, float]:
    return float(ray.available_resources().get("CPU", 0.0)), float(ray.cluster_resources().get("CPU", 0.0))


@pytest.fixture(autouse=True)
def _ray_resources_returned(request):
    """After each test on the shared cluster: every CPU it reserved comes back. A Train run
    stopped from outside (ASHA, a failing test) can leave its workers' placement group
    reserved; the next Train run on a 2-CPU node then waits for CPUs until its start
    timeout, again for each retry, and a later test hangs for many minutes for a leak
    made elsewhere. Such a group is removed here and the test that left it is named in
    the session's summary (``-ra`` shows the warning)."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    import time
    import warnings

    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + 20.0  # placement groups are released asynchronously
    free, total = _free_cpus(ray)
    while free + 1e-6 < total and time.monotonic() < deadline:
        time.sleep(0.5)
        free, total = _free_cpus(ray)
    if free + 1e-6 >= total:
        return
    import ray.util
    from ray.util.placement_group import PlacementGroup

    removed = []
    for pg_id, info in ray.util.placement_group_table().items():
        if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            try:
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                removed.append(pg_id[:8])
            except Exception:  # noqa: BLE001 - gone meanwhile
                pass
    time.sleep(1.0)
    after, total = _free_cpus(ray)
    if after + 1e-6 < total:
        removed.append("still held by: " + cpu_holders(ray))
    warnings.warn(f"{request.node.nodeid} left {total - free:.2f} of {total:.0f} CPUs reserved; "
                  f"removed placement groups {removed or 'none'}; {after:.2f} CPUs free after", stacklevel=1)


def cpu_holders(ray) -> str:
    """The alive actors and placement groups of the shared cluster that hold CPUs, in words."""
    from ray.util.state import list_actors, list_placement_groups

    parts = []
    try:
        for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=200):
            cpu = (a.required_resources or {}).get("CPU", 0)
            if cpu:
                parts.append(f"actor {a.class_name} ({cpu:g} CPU)")
        for g in list_placement_groups(filters=[("state", "=", "CREATED")], detail=True, limit=200):
            cpus = sum(b.get("CPU", 0) for b in (g.bundles or []))
            parts.append(f"placement group {g.placement_group_id[:8]} ({cpus:g} CPU)")
    except Exception as exc:  # noqa: BLE001 - the state API is a diagnosis aid only
        parts.append(f"(state API: {exc})")
    return ", ".join(parts) or "nothing the state API shows"


def wait_for_free_cpus(ray, timeout_s: float = 60.0) -> None:
    """Before a test that needs the whole shared cluster (a Tune search on 2 CPUs): wait
    until every CPU is free, else fail now naming what holds them (a Tune trial that
    cannot get a CPU waits forever, so the test would only end at its timeout)."""
    import time

    deadline = time.monotonic() + timeout_s
    free, total = _free_cpus(ray)
    while free + 1e-6 < total and time.monotonic() < deadline:
        time.sleep(0.5)
        free, total = _free_cpus(ray)
    assert free + 1e-6 >= total, f"{total - free:.2f} of {total:.0f} CPUs still held: {cpu_holders(ray)}"
