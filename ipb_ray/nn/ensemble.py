"""The fold networks of one configuration as one model: what ``ipb register`` puts in the
MLflow Model Registry and ``ipb predict`` applies."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["FoldEnsemble"]


class FoldEnsemble(nn.Module):
    """K fold networks, each a window batch ``(N, 1, S, S)`` in [0, 1] -> class
    probabilities ``(N, C)``, averaged in probability space. :meth:`member_probs` keeps
    them apart, ``(K, N, C)``, for the ensemble's disagreement."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one fold network")
        self.nets = nn.ModuleList(members)

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x) for net in self.nets])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_probs(x).mean(0)
