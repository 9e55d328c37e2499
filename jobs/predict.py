"""Ray job entrypoint of `ipb predict`: `python -m jobs.predict [arguments of ipb predict]`."""

import sys

from jobs._run import run

if __name__ == "__main__":
    sys.exit(run("predict"))
