"""Running on a cluster: shared-storage path checks, Ray job submission and a throwaway
local multi-node cluster for rehearsals.
"""

__all__: list[str] = []
