"""The training engine: one fold's run (stages, steps, selection on V, resume, history, the
test) over small typed ports (:mod:`ipb_ray.engine.ports`), with no Ray in it. Ray Train
runs it on DDP workers (:mod:`ipb_ray.distributed.training`); :mod:`ipb_ray.engine.inprocess`
runs it in this process.
"""

__all__: list[str] = []
