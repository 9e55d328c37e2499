"""Names of a training checkpoint's files (the layout of their content: docs/methods.md).

The training loop (:mod:`ipb_ray.distributed.training`) writes them; MLflow packaging
(:mod:`ipb_ray.tracking.runs`) and the CLI read them. Kept here so neither side imports
the other.
"""

#: the state torch.save-d by rank 0 in every checkpoint directory
CHECKPOINT_FILE = "state.pt"
#: the run's per-epoch history so far, beside it
HISTORY_FILE = "history.json"
