"""ipb-ray: Iterative Pseudo Balancing for microscopy colony classification, on Ray.

The library reads in the order a run flows: data (synthetic world, segmentation,
colony catalog) -> patches -> models -> algorithm -> training on Ray -> evaluation ->
tracking. Importing it never starts Ray; Ray, MLflow and Optuna load lazily.
"""

__version__ = "0.1.0"
