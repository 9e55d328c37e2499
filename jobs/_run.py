"""What every job entrypoint does: say what runs where, run the ``ipb`` command, say how
it ended, and exit with its status (0 only on success), so Ray marks the job FAILED
whenever the command failed."""

from __future__ import annotations

import os
import shlex
import socket
import sys
import time
import traceback
from typing import Sequence


def run(command: str, argv: Sequence[str] | None = None) -> int:
    """Run ``ipb <command> <argv>`` and return its exit status (printing a header and a footer)."""
    from ipb_ray.cli import main
    from ipb_ray.cluster.paths import job_submission_id

    args = list(sys.argv[1:] if argv is None else argv)
    job = job_submission_id() or "(not a submitted job)"
    print(f"[ipb job] {command} {shlex.join(args)}\n[ipb job] submission {job} on {socket.gethostname()}, "
          f"Ray {os.environ.get('RAY_ADDRESS', 'local')}, working dir {os.getcwd()}", flush=True)
    t0 = time.monotonic()
    try:
        main([command, *args], prog_name=f"python -m jobs.{command}")
        code = 0
    except SystemExit as exc:  # click ends every command with SystemExit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:  # a bug or an infrastructure failure: the traceback is the message
        traceback.print_exc()
        code = 1
    print(f"[ipb job] {command} {'finished' if code == 0 else 'FAILED'} (exit {code}) after "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return code
