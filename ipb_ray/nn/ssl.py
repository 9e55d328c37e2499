"""Pure losses and pseudo-label corrections of the semi- and self-supervised methods beyond
MPL (which lives in :mod:`ipb_ray.nn.mpl`): FixMatch's masked consistency loss, SimCLR's
NT-Xent, and the logit adjustment of pseudo-labels by an estimated class prior. Plain torch
functions on tensors, testable in milliseconds; the methods in :mod:`ipb_ray.methods` wire
them into steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["adjusted_logits", "fixmatch_loss", "nt_xent", "update_prior"]


def fixmatch_loss(strong_logits: torch.Tensor, hard: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FixMatch's unlabelled loss (Sohn et al., NeurIPS 2020, eq. 4): cross-entropy of the
    strong view's (B, C) logits against the weak view's (B,) hard pseudo-labels, kept where
    the (B,) 0/1 ``mask`` is 1 and averaged over **all** B patches (not only the kept ones),
    so the loss grows as more pseudo-labels pass the threshold."""
    per_patch = F.cross_entropy(strong_logits.float(), hard, reduction="none")
    return (per_patch * mask.to(per_patch.dtype)).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy (Chen et al., ICML 2020, eq. 1)
    of two (N, D) projections of the same N images under two augmentations.

    Each of the 2N projections is a query whose one positive is the other view of its
    image and whose 2N - 2 negatives are every other projection of the batch; cosine
    similarity divided by ``temperature``; the mean over all 2N queries. Needs N >= 2."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent needs two (N, D) projections of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError("nt_xent needs at least 2 images per batch (each needs a negative)")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))  # a projection is not its own positive or negative
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def update_prior(prior: torch.Tensor, probs: torch.Tensor, momentum: float) -> torch.Tensor:
    """The running estimate of the unlabelled class prior: ``momentum * prior + (1 -
    momentum) * mean(probs)`` over a (B, C) batch of softmax probabilities, renormalised."""
    est = momentum * prior + (1.0 - momentum) * probs.detach().float().mean(0).to(prior.device)
    return est / est.sum()


def adjusted_logits(logits: torch.Tensor, prior: torch.Tensor, tau: float) -> torch.Tensor:
    """Logits debiased against the estimated prior, ``logits - tau * log(prior)``: a class
    the model predicts more often than others (a head class) is marked down by its log
    share, so the argmax and confidence of a pseudo-label follow the evidence rather than
    the class mix (logit adjustment, Menon et al. ICLR 2021, applied to pseudo-labels as in
    DebiasPL, Wang et al. CVPR 2022). A uniform prior leaves the argmax unchanged."""
    return logits.float() - tau * prior.clamp_min(1e-6).log().to(logits.device)
