"""``ray start`` for a node that lives on 127.0.0.1 only (what ``ipb local-cluster`` runs).

Ray's ``ray start --node-ip-address=127.0.0.1`` does not make a loopback node: Ray turns a
loopback address into the machine's network address (so that other machines could reach
the node), and the GCS, raylet, object manager and agents then listen on every interface.
A rehearsal cluster on a laptop needs no other machine, so here the node's address stays
127.0.0.1 and every Ray process it starts listens there only. Ray has no public switch for
this; its one function that answers "this node's address" is pointed at 127.0.0.1 before
Ray's own ``ray start`` runs, in this process only (a real cluster's nodes never use this
module). The processes that node starts (raylet, agents, workers, a job's driver) find
their own address the same way, so they are told through the environment: Ray's switch
for single-machine clusters, which makes a process name itself 127.0.0.1. This process
keeps the switch as it was when Ray was imported, since ``ray start --address`` refuses to
add a node with the switch off.

    python -m ipb_ray.cluster.loopback_node start --head --port=... (any `ray start` arguments)
"""

from __future__ import annotations

import os
import sys

__all__ = ["LOOPBACK_IP", "main"]

LOOPBACK_IP = "127.0.0.1"


def main(argv: list[str] | None = None) -> None:
    from ray._private import services
    from ray.scripts.scripts import main as ray_main

    from ray._private import ray_constants

    services.get_node_ip_address = lambda address=None: LOOPBACK_IP  # noqa: ARG005 - Ray's signature
    # read once at Ray's import above: this process still adds nodes, its children stay local
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    sys.argv = ["ray", *(sys.argv[1:] if argv is None else argv)]
    ray_main()


if __name__ == "__main__":
    main()
