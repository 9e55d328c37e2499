"""Data in: the synthetic world, importers of users' tables and folders, colony segmentation,
the colony catalog (Parquet) and the cross-validation folds. Plain functions: nothing here
imports Ray, MLflow or Optuna.
"""

__all__: list[str] = []
