"""Connecting to Ray: a local cluster by default, an existing one with an address."""

from __future__ import annotations

import logging
import math
import os

from ipb_ray.config import ResourcesConfig

__all__ = ["LOCAL_TRAIN_ENV", "init_ray", "local_train_env", "loopback_only", "worker_soft_limit"]

log = logging.getLogger(__name__)


def worker_soft_limit(cpus: int, data_cpus: float) -> int:
    """How many idle worker processes a node keeps alive: enough for every data task that
    can run at once, and the training workers beside them. Ray's default (one per CPU)
    kills the extra workers that fractional-CPU data tasks start, so each epoch pays for
    new processes and their torch/OpenCV imports
    (9 s instead of 1.8 s per epoch of 320 patches on 2 CPUs with data_cpus 0.25; see
    BENCHMARKS.md). On a cluster started with `ray start`, set the same through the
    environment: ``RAY_num_workers_soft_limit=N ray start ...``."""
    # plus one per CPU for the Ray Train workers and actors that share the node
    return max(cpus, math.ceil(cpus / min(max(data_cpus, 0.01), 1.0))) + cpus


#: The raylet's warning when more Python workers start than 4 x its startup concurrency
#: (the CPU count). On a 2-CPU node a Ray Train v2 run alone holds about seven actors
#: (controller, worker group synchroniser, placement-group cleaner, dataset manager, split
#: coordinator, our stream states) besides the Train worker and the planned pool of
#: fractional-CPU data tasks (:func:`worker_soft_limit`), so it fires several times in
#: every run, and says nothing a user can act on. The flag behind it
#: (``--maximum_startup_concurrency``) is computed by Ray from the CPU count and is not
#: configurable, so the driver drops that one message.
_STARTUP_WARNING = "PYTHON worker processes have been started on node"


def _quiet_worker_startup_warning() -> None:
    """Drop the raylet's worker-start-up warning from the driver's output (and nothing else)."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:  # pragma: no cover - a Ray without the private module
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_ipb_filtered", False):
        return

    def filtered(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", []) if _STARTUP_WARNING not in ln]
            if not lines:
                return None
            data = {**data, "lines": lines}
        return original(data, *args, **kwargs)

    filtered._ipb_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = filtered


#: Ray Train settings for a cluster this process starts on its own machine (set unless the
#: user set them): there is no node to drain, so no preemption watcher (one more actor
#: process per run), and the controller polls its workers every 0.5 s instead of 2 s
#: (a finished run otherwise waits up to two polls before ``fit()`` returns).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def local_train_env(environ: dict | None = None) -> dict[str, str]:
    """Set :data:`LOCAL_TRAIN_ENV` in ``environ`` (``os.environ``) where not already set;
    returns what was set. Ray Train propagates these from the driver to its controller."""
    environ = os.environ if environ is None else environ
    added = {k: v for k, v in LOCAL_TRAIN_ENV.items() if k not in environ}
    environ.update(added)
    return added


def loopback_only() -> None:
    """Make the cluster this process starts for itself a 127.0.0.1 node. Ray gives a new
    local cluster the machine's network address as its node address, and its GCS, raylet,
    object manager and workers listen there, reachable from the network; with the loopback
    address as the node's (what Ray itself does on macOS and Windows, and what ``ray start
    --node-ip-address=127.0.0.1`` sets) they listen on 127.0.0.1 only. Ray reads the switch
    from one module constant (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``), which a cluster of
    several machines never goes through: they join by address. A process that joins such
    a cluster must be a 127.0.0.1 node too (``init_ray`` does this for a 127.0.0.1
    address; for Ray's own CLI, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray status``)."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _is_loopback(address: str) -> bool:
    """``127.0.0.1:6379``, ``localhost:6379``, ``[::1]:6379`` (not ``auto``, ``ray://``)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address and "://" not in address else ""
    return host in ("127.0.0.1", "localhost", "::1")


def init_ray(resources: ResourcesConfig | None = None, address: str | None = None) -> None:
    """Start or join Ray once per process.

    ``address`` (or ``resources.address``, or ``RAY_ADDRESS``, which Ray sets for a
    submitted job's driver) joins an existing cluster (``"auto"``, ``HOST:6379`` or
    ``ray://...``); without any, a local cluster starts here.
    """
    import ray

    if ray.is_initialized():
        return
    resources = resources or ResourcesConfig()
    address = address or resources.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"log_to_driver": False, "configure_logging": False}
    if address:
        if _is_loopback(address):  # a cluster on this machine's 127.0.0.1: join it as a 127.0.0.1 node
            loopback_only()
        ray.init(address=address, **kwargs)
    else:
        if resources.object_store_mb:
            kwargs["object_store_memory"] = resources.object_store_mb * 1024 * 1024
        kwargs["_system_config"] = {"num_workers_soft_limit": worker_soft_limit(os.cpu_count() or 1,
                                                                                resources.data_cpus)}
        local_train_env()
        loopback_only()
        # "local": a cluster of our own even when `ray start` runs on this machine (plain
        # ray.init() would join that one); join it with --address auto instead
        ray.init(address="local", dashboard_host="127.0.0.1", **kwargs)
    log.info("Ray: %s", ray.cluster_resources())
    _quiet_worker_startup_warning()
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines
    # its "progress bars disabled" notice reports our own choice: the CLI draws its bars
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
