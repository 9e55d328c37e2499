"""MLflow: the tracking layout and its names (:mod:`ipb_ray.tracking.runs`), the report
rendered from the store, and the figures (matplotlib, headless).
"""

__all__: list[str] = []
