"""Pure torch: the backbone registry and models, the Meta Pseudo Labels losses and step, and
the optimisation pieces (optimisers, schedules, BatchNorm handling). No Ray.
"""

__all__: list[str] = []
