"""Where results may go when a run is not confined to one machine.

Two situations lose work silently unless they are refused up front:

- **A submitted Ray job** runs in a temporary copy of the project (the job's
  ``working_dir``). A relative path (``ray_results``, ``sqlite:///mlflow.db``, ``--out
  report``) lands inside that copy, which Ray deletes when it needs the space.
- **A multi-node cluster** runs training workers and data tasks on other machines. A
  checkpoint directory or catalog on the head's own disk is missing there, and an MLflow
  SQLite file on one node is not a tracking server.

:func:`path_problems` is the rule book as a plain function (milliseconds to test);
:func:`check_cluster_paths` feeds it the live cluster and probes every node for the
local paths that must be shared (a marker file written here must be visible there).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ipb_ray.config import ExperimentConfig

__all__ = [
    "DOCS", "JOB_ENV", "LOCAL_TRACKING", "Placement", "check_cluster_paths", "check_output_dir",
    "current_placement", "invisible_paths", "is_uri", "job_submission_id", "job_workdir", "path_problems",
    "tracking_is_local",
]

log = logging.getLogger(__name__)

# The variable Ray's job supervisor sets for a job's driver (its runtime environment).
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# MLflow stores that live in one process's file system.
LOCAL_TRACKING = ("sqlite:", "file:")
DOCS = "cluster/README.md"


@dataclass(frozen=True)
class Placement:
    """Where this driver runs: the alive nodes (id -> address) and, inside a Ray job
    with a working_dir, that temporary directory."""

    nodes: Mapping[str, str] = field(default_factory=dict)
    job_workdir: str | None = None

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1


def is_uri(path: str) -> bool:
    """True for ``s3://``, ``gs://``, ``http://`` and the like (not for plain paths)."""
    return "://" in str(path) and not str(path).startswith("file://")


def tracking_is_local(uri: str) -> bool:
    """True when the MLflow URI is a file or SQLite database on this machine (not a
    tracking server, a database server or Databricks)."""
    text = str(uri)
    if text.startswith(LOCAL_TRACKING):
        return True
    return "://" not in text and not text.startswith("databricks")


def _sqlite_path(uri: str) -> str:
    return str(uri).split(":///", 1)[1] if ":///" in str(uri) else str(uri).removeprefix("file:")


def _inside(path: str, directory: str) -> bool:
    """True when ``path`` (relative ones taken from the current directory) lies in ``directory``."""
    full, base = os.path.abspath(path), os.path.abspath(directory)
    return full == base or full.startswith(base.rstrip(os.sep) + os.sep)


def _job_config(environ: Mapping[str, str] | None = None) -> dict:
    raw = (os.environ if environ is None else environ).get(JOB_ENV)
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def job_submission_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The submission id when this process is a submitted Ray job's driver."""
    return (_job_config(environ).get("metadata") or {}).get("job_submission_id")


def job_workdir(environ: Mapping[str, str] | None = None, cwd: str | None = None) -> str | None:
    """The job's temporary working directory, when this process is a Ray job's driver
    started with a ``working_dir`` (None otherwise)."""
    runtime_env = _job_config(environ).get("runtime_env") or {}
    return (cwd or os.getcwd()) if runtime_env.get("working_dir") else None


def _named_paths(cfg: ExperimentConfig, outputs: Mapping[str, str] | None, *, catalog: bool,
                 storage: bool) -> dict[str, str]:
    """The directories a command uses, by the option or config key that names them."""
    named = dict(outputs or {})
    if storage:
        named["tracking.storage_path"] = cfg.tracking.storage_path
    if catalog:
        named["data.catalog"] = cfg.data.catalog
    return named


def path_problems(cfg: ExperimentConfig, where: Placement, outputs: Mapping[str, str] | None = None,
                  *, catalog: bool = True, storage: bool = True) -> list[str]:
    """The reasons ``cfg`` would lose or miss data at ``where`` (empty when none).

    ``outputs``: extra directories the command writes, by the option that named them
    (``{"--out": "report"}``). ``catalog``/``storage``: whether the command reads the
    catalog / writes Ray Train checkpoints (``ipb report`` does neither).
    """
    problems: list[str] = []
    named = _named_paths(cfg, outputs, catalog=catalog, storage=storage)
    uri = cfg.tracking.tracking_uri
    if where.job_workdir:
        for key, value in named.items():
            if not is_uri(value) and _inside(value, where.job_workdir):
                problems.append(
                    f"{key}={value} lies inside the Ray job's temporary working directory ({where.job_workdir}), "
                    "which Ray deletes after the job. Give an absolute path on storage every node mounts, or a "
                    "URI such as s3://bucket/ipb")
        if tracking_is_local(uri) and _inside(_sqlite_path(uri), where.job_workdir):
            problems.append(
                f"tracking.tracking_uri={uri} is a file inside the Ray job's temporary working directory "
                f"({where.job_workdir}): the runs would be deleted with it. Point it at an MLflow server "
                f"(tracking.tracking_uri=http://HOST:5000; see {DOCS})")
    if where.multi_node:
        if tracking_is_local(uri):
            problems.append(
                f"tracking.tracking_uri={uri} is a local MLflow store, but this cluster has {len(where.nodes)} "
                f"nodes: run an MLflow tracking server with a database (cluster/mlflow/) and pass "
                "tracking.tracking_uri=http://HOST:5000")
        if catalog and is_uri(cfg.data.catalog):
            problems.append(
                f"data.catalog={cfg.data.catalog}: the catalog is read as files; mount the bucket on every node "
                "(e.g. mountpoint-s3 or gcsfuse) and give the mount's path")
        for key, value in named.items():
            if not is_uri(value) and not os.path.isabs(value) and not where.job_workdir:
                problems.append(
                    f"{key}={value} is a relative path on a {len(where.nodes)}-node cluster: give an absolute "
                    "path on storage every node mounts (NFS), or a URI such as s3://bucket/ipb")
    return problems


def invisible_paths(paths: Mapping[str, str], where: Placement,
                    probe: Callable[[str, Sequence[str]], list[str]]) -> list[str]:
    """Problems for absolute local ``paths`` (option -> directory) that some node cannot
    see. ``probe(marker, node_ids)`` returns the ids of the nodes where ``marker`` is
    missing; the marker is created here and removed afterwards."""
    problems: list[str] = []
    token = uuid.uuid4().hex[:12]
    for key, value in paths.items():
        if is_uri(value) or not os.path.isabs(value):
            continue
        directory = Path(value)
        if key == "data.catalog" and not directory.exists():
            continue  # an input: its reader says what is missing; no directory made at a typo
        try:
            directory.mkdir(parents=True, exist_ok=True)
            marker = directory / f".ipb-shared-{token}"
            marker.write_text("written by the ipb driver to check that every node sees this directory\n")
        except OSError as exc:
            problems.append(f"{key}={value} cannot be written from the driver's node: {exc}")
            continue
        try:
            missing = probe(str(marker), list(where.nodes))
        finally:
            marker.unlink(missing_ok=True)
        if missing:
            hosts = ", ".join(sorted(where.nodes[n] for n in missing))
            problems.append(
                f"{key}={value} is not shared: nodes {hosts} do not see it (it is on the driver's local disk). "
                "Use a directory every node mounts (NFS, EFS, Filestore) or a URI such as s3://bucket/ipb "
                "for tracking.storage_path")
    return problems


def _ray_probe(marker: str, node_ids: Sequence[str]) -> list[str]:
    """Ids of the nodes where ``marker`` does not exist (one zero-CPU task pinned per node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def exists(path: str) -> bool:
        return os.path.exists(path)

    refs = [exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(marker)
            for n in node_ids]
    return [n for n, seen in zip(node_ids, ray.get(refs, timeout=120)) if not seen]


def current_placement() -> Placement:
    """The alive nodes of the connected Ray cluster and the job's working directory."""
    import ray

    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    return Placement(nodes, job_workdir())


def check_cluster_paths(cfg: ExperimentConfig, outputs: Mapping[str, str] | None = None, *,
                        catalog: bool = True, storage: bool = True, connected: bool = True) -> None:
    """Refuse (``ValueError`` listing every problem) paths that would lose results on
    this cluster or in this Ray job; see the module docstring. ``connected=False`` skips
    the node lookup (for commands that never start Ray: only the job rules apply)."""
    where = current_placement() if connected else Placement({}, job_workdir())
    problems = path_problems(cfg, where, outputs, catalog=catalog, storage=storage)
    if not problems and where.multi_node:
        shared = _named_paths(cfg, outputs, catalog=catalog, storage=storage)
        problems = invisible_paths(shared, where, _ray_probe)
        if not problems:
            log.info("shared storage visible from all %d nodes: %s", len(where.nodes), shared)
    if problems:
        raise ValueError("this run would lose or miss data:\n  - " + "\n  - ".join(problems))


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a folder this process can write into, created if missing; ValueError
    naming ``flag`` and the problem (a file in the way, a folder that cannot be created
    or written) before any work starts, instead of a traceback at the end."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".ipb-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except NotADirectoryError:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        raise ValueError(f"{flag} {out} cannot be a folder: {blocker or 'a part of its path'} is a file") from None
    except OSError as exc:
        raise ValueError(f"{flag} {out} is not writable here ({exc.strerror or exc}); choose a folder you can "
                         "write to") from None
    return out
