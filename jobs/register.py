"""Ray job entrypoint of `ipb register`: `python -m jobs.register [arguments of ipb register]`."""

import sys

from jobs._run import run

if __name__ == "__main__":
    sys.exit(run("register"))
