"""Ray job entrypoint of `ipb preprocess`: `python -m jobs.preprocess [arguments of ipb preprocess]`."""

import sys

from jobs._run import run

if __name__ == "__main__":
    sys.exit(run("preprocess"))
