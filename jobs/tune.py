"""Ray job entrypoint of `ipb tune`: `python -m jobs.tune [arguments of ipb tune]`."""

import sys

from jobs._run import run

if __name__ == "__main__":
    sys.exit(run("tune"))
