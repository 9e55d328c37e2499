"""Applying a trained model to new plates: the pure half of ``ipb predict``.

:mod:`ipb_ray.prediction.tables` turns per-colony predictions into what a biologist reads
(time point and well of each frame, per-frame and per-well counts and areas per class, time
courses with ensemble uncertainty, the colonies worth labelling next);
:mod:`ipb_ray.prediction.pages` draws the figures and the HTML page. The Ray Data pipeline
that produces the predictions is :mod:`ipb_ray.distributed.predict`.
"""

__all__: list[str] = []
