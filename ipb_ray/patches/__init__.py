"""Patches: mask-constrained multi-scale geometry, the weak/strong augmentations and
class balancing by resampling. Pure numpy/OpenCV: the Ray Data streams that use them live
in :mod:`ipb_ray.distributed.streams`.
"""

__all__: list[str] = []
