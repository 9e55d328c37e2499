"""Ray job entrypoint of `ipb cv`: `python -m jobs.cv [arguments of ipb cv]`."""

import sys

from jobs._run import run

if __name__ == "__main__":
    sys.exit(run("cv"))
