"""Ray jobs: submit an ``ipb`` command to a cluster, follow it, ask about it, stop it.

``ipb submit --address http://HEAD:8265 -- cv --config X`` runs ``python -m jobs.cv
--config X`` on the cluster's head, with this project as the job's ``working_dir``.
The pure parts (entrypoint, runtime environment, address checks) are plain functions;
the client calls are thin wrappers over ``ray.job_submission.JobSubmissionClient``.

Security: whoever reaches Ray's job API can run code on the cluster; with Ray's token
authentication (``RAY_AUTH_MODE=token``), whoever also holds the token. So the API
belongs on 127.0.0.1 (an SSH tunnel or ``kubectl port-forward``) or a private network,
with token authentication on: :func:`address_warning` and :func:`requires_token` let
``ipb submit`` say when either is not the case. The client sends the token from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (Ray's own lookup).
No secrets travel with a job: nodes take credentials from their own environment or role,
and the upload (:func:`plan_upload`) leaves out dotfiles, keys, credential files, data and
results by default, honours .gitignore, and is packed here, so what ``ipb submit`` prints
is exactly what leaves the machine.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import shlex
import socket
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

__all__ = [
    "COMMANDS", "DATA", "DEFAULT_ADDRESS", "EXCLUDES", "MAX_UPLOAD_BYTES", "SECRETS", "TERMINAL",
    "TOKEN_OFF", "Upload", "address_warning", "auth_errors", "checked_upload", "client",
    "dashboard_address", "entrypoint", "follow", "job_info", "pack_upload", "plan_upload",
    "project_requirements", "project_root", "requires_token", "runtime_env", "send_token_if_available",
    "status_name", "submit", "token_available",
]

# `ipb` commands that have a Ray job entrypoint in jobs/ (python -m jobs.<command>)
COMMANDS = ("preprocess", "train", "cv", "tune", "report", "register", "predict")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the job unless ``--include`` names them (on top of the project's
# .gitignore files). A pattern without "/" matches a file or folder name at any depth, one
# with "/" a path from the project's root (shell wildcards).
#: environments, results and stores: rebuilt or written on the cluster, never needed there
EXCLUDES = ["venv", "env", "demo", "ray_results", "tune_results", "mlruns", "*.db", "*.sqlite", "__pycache__",
            "*.egg-info", "report", "local-cluster", "build", "dist"]
#: secrets: every dotfile and dot-folder (.env, .aws/, .ssh/, .git/, .netrc, ...), key and
#: certificate files, credential and token files
SECRETS = [".*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx", "*.ppk", "id_rsa*", "id_dsa*",
           "id_ecdsa*", "id_ed25519*", "credentials", "credentials.*", "*.credentials", "*_credentials*",
           "secrets.*", "*.secret", "*.secrets", "auth_token", "*.token", "service-account*.json"]
#: data and outputs: they belong on shared storage (cluster/README.md), not in a job's upload
DATA = ["/catalog", "/catalogs", "/predictions", "/data", "/datasets", "/shared", "/frames", "*.parquet", "*.tif",
        "*.tiff", "*.nd2", "*.czi", "*.lif", "*.zarr", "*.h5", "*.hdf5", "*.npy", "*.npz", "*.pt", "*.pth",
        "*.ckpt", "*.onnx", "*.zip", "*.tar", "*.tar.gz", "*.tgz"]
#: Ray refuses a working_dir above this (its package limit)
MAX_UPLOAD_BYTES = 500 * 2**20
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def project_root() -> Path:
    """The project directory (the one holding jobs/ and ipb_ray/)."""
    return Path(__file__).resolve().parents[2]


def entrypoint(argv: Sequence[str], python: str = "python") -> str:
    """The job's shell command for ``ipb <argv>``; only commands with a job entrypoint."""
    if not argv:
        raise ValueError("nothing to submit: put the ipb command after --, e.g. "
                         "`ipb submit --address http://127.0.0.1:8265 -- cv --config my.yaml`")
    command, *rest = argv
    if command not in COMMANDS:
        raise ValueError(f"`{command}` cannot be submitted as a Ray job; one of: {', '.join(COMMANDS)} "
                         "(e.g. `ipb submit -- cv --config my.yaml`)")
    return shlex.join([python, "-m", f"jobs.{command}", *rest])


def project_requirements(dist: str = "ipb-ray") -> list[str]:
    """The project's run-time requirements (no test extras), from the installed metadata."""
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        raise ValueError(f"--with-deps reads the requirements of the installed {dist} package, which is not "
                         "installed here; run `make install` (or pip install -e .) first") from None
    return [r for r in reqs if "extra ==" not in r]


@dataclass
class Upload:
    """What ``ipb submit`` sends as the job's working directory: the files (relative POSIX
    paths and sizes) and what was left out, by rule."""

    root: Path
    files: list[tuple[str, int]]
    left_out: dict[str, list[str]] = field(default_factory=dict)  # rule -> paths (a folder counts once)

    @property
    def size(self) -> int:
        return sum(n for _, n in self.files)

    def summary(self, limit: int = 8) -> str:
        lines = [f"uploading {len(self.files)} files, {self.size / 2**20:.1f} MiB, from {self.root} "
                 "as the job's working directory"]
        for rule, paths in self.left_out.items():
            shown = ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
            lines.append(f"  left out ({rule}): {shown}")
        if self.left_out:
            lines.append("  (--include PATTERN uploads what a rule left out; --dry-run lists every file)")
        return "\n".join(lines)


def _glob_rule(pattern: str, rel: str) -> bool:
    """A rule of :data:`EXCLUDES`/:data:`SECRETS`/:data:`DATA` or ``--include``: without
    "/" it matches any path component's name, with "/" the relative path (or a folder
    above it)."""
    pattern = pattern.strip().rstrip("/")
    if "/" in pattern:
        pattern = pattern.lstrip("/")
        parts = rel.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
    return any(fnmatch.fnmatchcase(part, pattern) for part in rel.split("/"))


def _gitignore_regex(pattern: str) -> tuple[re.Pattern[str], bool, bool] | None:
    """One .gitignore line as (regex over the path relative to the file's folder, negated,
    folders only), or None for a blank line or a comment (git's rules, without escapes)."""
    line = pattern.rstrip("\n").rstrip()
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    line = line[1:] if negate else line
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    anchored = "/" in line
    line = line.lstrip("/")
    out, i = [], 0
    while i < len(line):
        if line.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif line.startswith("/**", i) and i + 3 == len(line):
            out.append("/.*")
            i += 3
        elif line[i] == "*":
            out.append("[^/]*")
            i += 1
        elif line[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(line[i]))
            i += 1
    body = "".join(out)
    return re.compile(("" if anchored else "(?:.*/)?") + body + "$"), negate, dir_only


def plan_upload(root: str | Path, includes: Sequence[str] = ()) -> Upload:
    """The files ``ipb submit`` would upload from ``root``: everything but what a
    .gitignore (at any level), :data:`EXCLUDES`, :data:`SECRETS` or :data:`DATA` leaves
    out; ``includes`` (shell patterns, as the rules) take precedence over all of them."""
    root = Path(root).resolve()
    files: list[tuple[str, int]] = []
    left_out: dict[str, list[str]] = {}
    rules = [("secrets: dotfiles, keys, credentials", SECRETS), ("data and outputs", DATA),
             ("environments and results", EXCLUDES)]
    ignores: list[tuple[str, tuple[re.Pattern[str], bool, bool]]] = []  # (folder prefix, rule)

    def verdict(rel: str, is_dir: bool) -> str | None:
        if any(_glob_rule(p, rel) for p in includes):
            return None
        for name, patterns in rules:
            if any(_glob_rule(p, rel) for p in patterns):
                return name
        ignored = False
        for prefix, (rx, negate, dir_only) in ignores:
            if prefix and not rel.startswith(prefix):
                continue
            if dir_only and not is_dir:
                continue
            if rx.match(rel[len(prefix):]):
                ignored = not negate
        return ".gitignore" if ignored else None

    def may_include_below(rel: str) -> bool:  # an --include pattern that reaches inside the folder
        return any("/" in p.strip("/") and p.strip("/").startswith(rel + "/") for p in includes)

    inherited: dict[str, str | None] = {"": None}  # folder -> the rule that left it out, if any
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        base = "" if here == root else here.relative_to(root).as_posix() + "/"
        above = inherited.get(base.rstrip("/"))
        gi = here / ".gitignore"
        if gi.is_file() and above is None:
            for line in gi.read_text(errors="replace").splitlines():
                rule = _gitignore_regex(line)
                if rule is not None:
                    ignores.append((base, rule))
        for d in sorted(dirs):
            rel = base + d
            why = verdict(rel, True) or (above if not any(_glob_rule(p, rel) for p in includes) else None)
            if why and not may_include_below(rel):
                dirs.remove(d)
                left_out.setdefault(why, []).append(rel + "/")
            inherited[rel] = why
        dirs.sort()
        for name in sorted(names):
            rel = base + name
            path = here / name
            why = verdict(rel, False)
            if above and not any(_glob_rule(p, rel) for p in includes):
                why = above
            if why:
                left_out.setdefault(why, []).append(rel)
            elif path.is_file() and not path.is_symlink():
                files.append((rel, path.stat().st_size))
    return Upload(root, files, left_out)


def pack_upload(upload: Upload, zip_path: str | Path) -> Path:
    """Write exactly ``upload.files`` into ``zip_path`` (what Ray unpacks as the job's
    working directory)."""
    zip_path = Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, _ in upload.files:
            zf.write(upload.root / rel, rel)
    return zip_path


def runtime_env(working_dir: str | Path | None = None, *, with_deps: bool = False,
                package: str | Path | None = None) -> dict[str, Any]:
    """The job's runtime environment: ``package`` (the zip :func:`pack_upload` wrote) or
    the project folder as ``working_dir`` and, with ``with_deps``, the project's
    requirements installed by Ray's ``pip`` plugin on nodes that lack them."""
    root = Path(working_dir or project_root()).resolve()
    if not (root / "jobs").is_dir():
        raise ValueError(f"--working-dir {root} is not the ipb-ray project (it has no jobs/ folder)")
    env: dict[str, Any] = {"working_dir": str(package) if package else str(root)}
    if package is None:
        env["excludes"] = [*EXCLUDES, *SECRETS, *DATA]
    if with_deps:
        env["pip"] = project_requirements()
    return env


def dashboard_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """The job API's URL: ``--address``, else ``RAY_API_SERVER_ADDRESS``, else an
    ``http`` ``RAY_ADDRESS``, else the local default; ``HOST:PORT`` gains ``http://``."""
    environ = dict(os.environ) if environ is None else environ
    env_ray = environ.get("RAY_ADDRESS", "")
    chosen = address or environ.get("RAY_API_SERVER_ADDRESS") or (env_ray if env_ray.startswith("http") else "") \
        or DEFAULT_ADDRESS
    if "://" not in chosen:
        chosen = "http://" + chosen
    parsed = urlparse(chosen)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"--address {chosen}: give the dashboard's job API, e.g. http://127.0.0.1:8265 "
                         "(not the GCS address HOST:6379 or ray://)")
    if parsed.port == 6379:
        raise ValueError(f"--address {chosen} is the GCS port; jobs are submitted to the dashboard's port, "
                         "usually 8265 (http://HOST:8265)")
    return chosen


def address_warning(address: str) -> str | None:
    """A warning when the job API is reached over something other than loopback or a
    private network (whoever reaches it can run code on the cluster)."""
    host = urlparse(address).hostname or ""
    try:
        ips = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            ips = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)}
        except OSError:
            return None  # unresolvable: the client's own error will say so
    if all(ip.is_loopback or ip.is_private for ip in ips):
        return None
    return (f"{address} is reachable beyond this machine and its private network. Whoever reaches Ray's job "
            "API (and holds its token, with token authentication) can run code on the cluster. Bind the "
            "dashboard to 127.0.0.1 (--dashboard-host 127.0.0.1) and use an SSH tunnel (`ray dashboard "
            "cluster.yaml`) or `kubectl port-forward`; see cluster/README.md")


def requires_token(address: str, timeout_s: float = 5.0) -> bool | None:
    """Whether the job API refuses a request without a token (True), answers it (False:
    token authentication is off), or cannot be asked (None)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/jobs/", timeout=timeout_s):
            return False
    except urllib.error.HTTPError as exc:
        return True if exc.code in (401, 403) else None
    except (OSError, ValueError):
        return None


TOKEN_OFF = ("the Ray cluster at {address} does not require a token: anyone who reaches its job API can run "
             "code on it. Start every node with RAY_AUTH_MODE=token (and the token from `ray get-auth-token "
             "--generate`); cluster/README.md shows how")


@contextmanager
def auth_errors(address: str) -> Iterator[None]:
    """Ray's authentication failures as a ``ValueError`` that says where the token comes from."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise ValueError(f"the Ray cluster at {address} refused this client's token ({str(exc).splitlines()[0]}). "
                         "The client sends RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or "
                         "~/.ray/auth_token: give it the cluster's token (`ray get-auth-token` on the head)") from None


def token_available(environ: dict[str, str] | None = None, home: Path | None = None) -> bool:
    """Whether this client has a Ray token to send (Ray's own sources, in its order)."""
    environ = dict(os.environ) if environ is None else environ
    return bool(environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH")
                or ((home or Path.home()) / ".ray" / "auth_token").is_file())


def send_token_if_available() -> None:
    """Ray's clients attach the token only in token mode (``RAY_AUTH_MODE=token``); turn
    it on for this process when a token exists and the mode is not set. A cluster without
    token authentication ignores the header."""
    if "RAY_AUTH_MODE" in os.environ or not token_available():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config: refresh it so this process sees the mode
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass


def client(address: str):
    """A ``JobSubmissionClient`` with a message that says what to check when it fails."""
    from ray.job_submission import JobSubmissionClient

    send_token_if_available()
    try:
        with auth_errors(address):
            return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as exc:
        raise ValueError(f"no Ray job API at {address} ({exc}). Is the cluster up, and the dashboard port "
                         "forwarded (`ray dashboard cluster/aws-gpu.yaml`, `kubectl port-forward "
                         "-n ipb svc/ipb-ray-head-svc 8265:8265`)?") from None


def job_info(address: str, job_id: str, c: Any = None) -> Any:
    """The job's ``JobInfo``; a clear error for an id the cluster does not know.
    ``c``: a client already made for ``address`` (one is made otherwise)."""
    c = c or client(address)
    try:
        with auth_errors(address):
            return c.get_job_info(job_id)
    except RuntimeError as exc:
        raise ValueError(f"no job {job_id} at {address} ({str(exc).splitlines()[0][:200]}); "
                         f"`ipb jobs list --address {address}` lists the submitted jobs") from None


def checked_upload(working_dir: str | Path | None = None, includes: Sequence[str] = ()) -> Upload:
    """:func:`plan_upload` of the project (or ``working_dir``), refused when it is not the
    project or is larger than Ray takes."""
    root = Path(working_dir or project_root()).resolve()
    if not (root / "jobs").is_dir():
        raise ValueError(f"--working-dir {root} is not the ipb-ray project (it has no jobs/ folder)")
    upload = plan_upload(root, includes)
    if upload.size > MAX_UPLOAD_BYTES:
        big = sorted(upload.files, key=lambda f: -f[1])[:5]
        raise ValueError(f"the job's upload from {root} is {upload.size / 2**20:.0f} MiB, over Ray's "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB; largest: "
                         + ", ".join(f"{rel} ({n / 2**20:.1f} MiB)" for rel, n in big)
                         + ". Put data on shared storage or add the files to .gitignore")
    return upload


def submit(address: str, argv: Sequence[str], *, working_dir: str | Path | None = None,
           with_deps: bool = False, python: str = "python", submission_id: str | None = None,
           upload: Upload | None = None) -> str:
    """Submit ``ipb <argv>`` as a Ray job with ``upload`` (default: :func:`checked_upload`)
    as its working directory, packed here so that exactly the listed files leave this
    machine; returns the submission id."""
    command = entrypoint(argv, python)
    upload = upload or checked_upload(working_dir)
    with tempfile.TemporaryDirectory(prefix="ipb-submit-") as tmp:
        package = pack_upload(upload, Path(tmp) / "working_dir.zip")
        env = runtime_env(upload.root, with_deps=with_deps, package=package)
        return client(address).submit_job(entrypoint=command, runtime_env=env, submission_id=submission_id,
                                          metadata={"ipb_command": argv[0]})


def follow(address: str, job_id: str, write: Callable[[str], None], *, timeout_s: float | None = None,
           c: Any = None) -> Any:
    """Write the job's log as it arrives (Ray's log stream) until the job ends; returns
    its ``JobInfo``. ``timeout_s`` stops following (the job keeps running). ``c``: a
    client already made for ``address``."""
    import asyncio

    c = c or client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except (asyncio.TimeoutError, TimeoutError):
        raise TimeoutError(f"job {job_id} still {status_name(c.get_job_info(job_id))} after {timeout_s:.0f} s; "
                           f"it keeps running (ipb jobs status {job_id})") from None
    info = c.get_job_info(job_id)
    for _ in range(50):  # the log stream can close a moment before the status is final
        if status_name(info) in TERMINAL:
            break
        time.sleep(0.2)
        info = c.get_job_info(job_id)
    return info


def status_name(info: Any) -> str:
    return getattr(info.status, "value", str(info.status))
