"""DisDepth's loss attention module and attentive KD loss (DisDepth §3.4, eq. 1), as pure torch maths.

The LAM is a cross-attention from a feature's spatial mean (query) to its pixels (keys); a softmax over the H·W
pixels gives the importances A. With an unbounded query the logits grow without limit and the softmax goes one-hot
at the deep levels (all weight on one pixel within 20-100 steps). Bounded query (ours, `kd.disdepth.lam_temperature`
τ): the query is clipped to the unit ball (q / max(1, |q|), so a zero query keeps the uniform start and its
gradient), the keys are L2-normalised, and the logits q·k / τ lie in [−1/τ, 1/τ]. Two pixels' importances then
differ by at most e^(2/τ), which bounds the effective support exp(H(A)) / (H·W) from below whatever the features:
at τ = 0.5 (ratio ≤ e⁴ ≈ 55) it is ≥ 0.18 (the worst case puts ~7 % of the pixels at the top logit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LAM(nn.Module):
    """Loss attention module: cross-attention from the feature's spatial mean (query) to its pixels (keys).

    Args:
        channels: C of the input feature.
        dim: width of the query/key projections.
        temperature: τ of the bounded logits (see the module docstring); None: the unbounded scaled dot product
            q·k / sqrt(dim) (collapses to one pixel; kept to measure the collapse).
    """

    def __init__(self, channels: int, dim: int, temperature: float | None = 0.5) -> None:
        super().__init__()
        self.query = nn.Linear(channels, dim)
        self.key = nn.Conv2d(channels, dim, kernel_size=1)
        self.temperature = temperature
        nn.init.zeros_(self.query.weight)  # uniform scores at the start: the LAM begins as the identity
        nn.init.zeros_(self.query.bias)

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H·W) float32 attention logits."""
        query = self.query(feature.mean(dim=(2, 3))).float()  # (B, d)
        keys = self.key(feature).flatten(2).float()  # (B, d, H·W)
        if self.temperature is None:
            return torch.einsum("bd,bdn->bn", query, keys) / math.sqrt(query.shape[1])
        query = query / query.norm(dim=1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bd,bdn->bn", query, F.normalize(keys, dim=1)) / self.temperature

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> ((H·W·A) ⊙ feature, A (B, 1, H, W) importances summing to 1 over the H·W pixels)."""
        batch, _, height, width = feature.shape
        scores = torch.softmax(self.logits(feature), dim=1).to(feature.dtype).view(batch, 1, height, width)
        return feature * (scores * height * width), scores


def effective_support(scores: torch.Tensor) -> torch.Tensor:
    """exp(H(A)) / (H·W) per image: 1 for uniform importances, 1 / (H·W) for one-hot ones.

    Args:
        scores: (B, 1, H, W) importances summing to 1 over the pixels of each image.

    Returns:
        (B,) float32 in (0, 1].
    """
    p = scores.detach().float().flatten(1)
    entropy = -torch.xlogy(p, p).sum(dim=1)
    return (entropy.exp() / p.shape[1]).clamp(max=1.0)  # exp(H) ≤ H·W; float rounding can overshoot it


def rms_normalize(feature: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, C, H, W) feature divided by its root mean square over (C, H, W), per image."""
    return feature / (feature.float().square().mean(dim=(1, 2, 3), keepdim=True) + eps).sqrt().to(feature.dtype)


def kd_weights(scores: torch.Tensor) -> torch.Tensor:
    """Pixel weights of the attentive KD from LAM scores: A / sqrt(mean_p A²), so that mean_p(w²) = 1 per image.

    Args:
        scores: (B, 1, H, W) importances A, non-negative, not all zero per image (a softmax over the pixels).

    Returns:
        (B, 1, H, W) weights; all ones for uniform scores.
    """
    return scores / scores.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()


def attentive_kd_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """L_kd = Σ_l mean((w_l ⊙ (F_s^l − F_t^l))²) over the B·C·H·W elements of each level (DisDepth eq. 1).

    Args:
        student: per level (B, C_l, H_l, W_l) student features.
        teacher: per level targets of the same shapes; treated as constants (detached here).
        weights: per level (B, 1, H_l, W_l) pixel weights (detached here), or None for weight 1 (plain MSE).

    Returns:
        Scalar float32 loss; 0 when every weight is 0.
    """
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t, w in zip(student, teacher, weights, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} differ")
        diff = s.float() - t.detach().float()
        if w is not None:
            diff = diff * w.detach().float()
        total = total + diff.square().mean()
    return total
