"""Ray job entrypoint of `ipb report`: `python -m jobs.report [arguments of ipb report]`."""

import sys

from jobs._run import run

if __name__ == "__main__":
    sys.exit(run("report"))
