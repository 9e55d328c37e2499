"""A trained fold network as a model others can run: the selected weights of a run's
checkpoint (:func:`load_best_model`) behind one input that gives class probabilities
(:func:`probability_model`). MLflow logs it (:mod:`ipb_ray.tracking.runs`), the Model
Registry serves it (:mod:`ipb_ray.tracking.registry`), ``ipb export`` writes it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ipb_ray.config import ExperimentConfig

__all__ = ["load_best_model", "model_input_side", "probability_model"]


def model_input_side(cfg: ExperimentConfig) -> int:
    return cfg.data.global_patch if cfg.data.multi_scale else cfg.data.patch_size


def probability_model(net: Any, multi_scale: bool, local_patch: int) -> Any:
    """``net`` behind one input: a float32 batch (N, 1, S, S) -> softmax probabilities."""
    import torch

    class ProbabilityModel(torch.nn.Module):
        """A trained ipb_ray network taking one (N, 1, S, S) float32 batch in [0, 1] and
        returning class probabilities (N, C); a multi-scale network's second input is the
        batch's exact centre of side ``local_patch``."""

        def __init__(self, net: Any, multi_scale: bool, local_patch: int) -> None:
            super().__init__()
            self.net = net
            self.multi_scale = bool(multi_scale)
            self.local_patch = int(local_patch)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            if self.multi_scale:
                h, w = x.shape[-2], x.shape[-1]
                y0, x0 = (h - self.local_patch) // 2, (w - self.local_patch) // 2
                centre = x[..., y0:y0 + self.local_patch, x0:x0 + self.local_patch]
                logits, _ = self.net(x, centre)
            else:
                logits, _ = self.net(x)
            return torch.softmax(logits.float(), dim=-1)

    return ProbabilityModel(net, multi_scale, local_patch).eval()


def load_best_model(checkpoint: str | None, cfg: ExperimentConfig, num_classes: int) -> tuple[Any, str]:
    """(network with the selected weights, "") or (None, why not)."""
    from ipb_ray.nn.checkpoint import CHECKPOINT_FILE, load_state
    from ipb_ray.nn.models import build_model

    if not checkpoint:
        return None, "the fold has no checkpoint"
    path = Path(checkpoint) / CHECKPOINT_FILE
    if not path.is_file():
        return None, f"{path} does not exist"
    state = load_state(path)
    best = state.get("best_model") if isinstance(state, Mapping) else None
    if best is None:
        return None, f"{path} holds no 'best_model' weights"
    net = build_model(cfg, num_classes)
    try:
        net.load_state_dict(best)
    except RuntimeError as exc:
        raise ValueError(f"the best_model weights in {path} do not fit the configured network "
                         f"(model.backbone={cfg.model.backbone}, data.multi_scale={cfg.data.multi_scale}, "
                         f"{num_classes} classes): {exc}") from None
    return net.eval(), ""
