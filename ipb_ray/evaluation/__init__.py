"""Evaluation: classification metrics named as in the paper and cross-validation
statistics (paired tests). Pure numpy/scipy.
"""

__all__: list[str] = []
