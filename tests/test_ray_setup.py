"""Local cluster settings made by init_ray."""

from __future__ import annotations

import time

import pytest

from ipb_ray.distributed.ray_setup import worker_soft_limit


def test_worker_soft_limit_covers_every_concurrent_data_task():
    assert worker_soft_limit(2, 0.25) == 8 + 2  # 8 data tasks at once, plus one per CPU
    assert worker_soft_limit(2, 1.0) == 2 + 2
    assert worker_soft_limit(64, 2.0) == 64 + 64  # tasks of 2 CPUs still count one per CPU
    assert worker_soft_limit(3, 0.5) == 6 + 3


@pytest.mark.ray
def test_fractional_cpu_task_workers_stay_warm_between_rounds(ray_local):
    """Four 0.25-CPU tasks at once need four worker processes; Ray's default keeps only one
    idle worker per CPU and kills the rest after a second, so a second round (the next
    epoch) would start new processes. The local cluster keeps them."""
    ray = ray_local
    cpus = int(ray.cluster_resources()["CPU"])

    @ray.remote(num_cpus=0.25)
    def pid_after(seconds: float) -> int:
        import os

        time.sleep(seconds)
        return os.getpid()

    tasks = 4 * cpus
    first = set(ray.get([pid_after.remote(1.0) for _ in range(tasks)]))
    # other tests' actors may hold some CPU, but more workers than CPUs must have run at once
    assert len(first) > cpus, f"only {len(first)} workers for {tasks} concurrent 0.25-CPU tasks"
    time.sleep(3.0)  # past Ray's idle-worker killing threshold (1 s)
    gone = {pid for pid in first if not _alive(pid)}
    assert not gone, f"{len(gone)} of {len(first)} idle data workers were killed between rounds"


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_only_the_worker_startup_warning_is_dropped(capsys):
    import ray._private.worker as ray_worker

    from ipb_ray.distributed.ray_setup import _quiet_worker_startup_warning

    _quiet_worker_startup_warning()
    _quiet_worker_startup_warning()  # idempotent: wraps once
    assert ray_worker.print_to_stdstream._ipb_filtered
    noisy = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 1.2.3.4, "
             "which is 4x the maximum expected startup concurrency (2).")
    ray_worker.print_to_stdstream({"lines": [noisy], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["a real raylet error", noisy], "pid": "raylet", "is_err": False},
                                  ignore_prefix=False)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "a real raylet error" in text and "PYTHON worker processes" not in text


def test_local_train_env_fills_only_what_the_user_left_unset():
    from ipb_ray.distributed.ray_setup import LOCAL_TRAIN_ENV, local_train_env

    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "5"}
    added = local_train_env(env)
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"  # the user's value stands
    assert added == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert set(env) == set(LOCAL_TRAIN_ENV)


@pytest.mark.ray
def test_state_actors_are_reset_and_reused_between_runs(ray_local):
    import ray

    from ipb_ray.distributed.streams import current_state, lease_states, release_states

    first = lease_states(2)
    (name, handle), _ = first
    ray.get(handle.set.remote(3, {"c1": 2}))
    ray.get(handle.publish.remote(7, [ray.put({"w": 1})]))
    assert current_state(name)[:2] == (3, {"c1": 2})
    release_states(first)
    second = lease_states(3)
    assert {n for n, _ in first} <= {n for n, _ in second}  # no new actor for the two released ones
    assert current_state(name)[:2] == (0, None)  # reset, and no stale cached copy is served
    assert ray.get(handle.teacher.remote()) == (-1, [])
    release_states(second)


def ray_session_pids(ray) -> set[int]:
    """Every process of this process's own Ray cluster: what the node started (GCS, raylet,
    dashboard, log monitor...) and all their children (agents, workers)."""
    import psutil

    node = ray._private.worker._global_node
    pids: set[int] = set()
    for infos in node.all_processes.values():
        for info in infos:
            try:
                proc = psutil.Process(info.process.pid)
            except psutil.NoSuchProcess:
                continue
            pids.add(proc.pid)
            pids.update(c.pid for c in proc.children(recursive=True))
    return pids


@pytest.mark.ray
def test_the_local_cluster_listens_on_loopback_only(ray_local):
    """What `ss -ltnp` shows for the cluster init_ray starts: every listening socket of every
    Ray process (GCS, raylet, object manager, dashboard, agents, metrics, workers) is on
    127.0.0.1, none on all interfaces or the machine's network address."""
    import psutil

    @ray_local.remote
    def touch() -> int:  # a worker process too
        return 1

    assert ray_local.get(touch.remote()) == 1
    pids = ray_session_pids(ray_local)
    assert len(pids) >= 3
    listening = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "found no listening socket of the Ray session"
    exposed = [(pid, psutil.Process(pid).name(), ip, port) for pid, ip, port in listening
               if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1:")
