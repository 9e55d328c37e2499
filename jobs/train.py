"""Ray job entrypoint of `ipb train`: `python -m jobs.train [arguments of ipb train]`."""

import sys

from jobs._run import run

if __name__ == "__main__":
    sys.exit(run("train"))
