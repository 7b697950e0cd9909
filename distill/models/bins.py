"""AdaBins-style heads (Bhat et al. 2021, as used by DisDepth §3.1): adaptive bins and per-pixel bin probabilities.

Our widths head is a pooled-feature MLP instead of AdaBins' mini-ViT (methods §1, ours), so it exports to ONNX
with plain ops (ReduceMean, Gemm, CumSum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_WIDTH = 0.1  # added to the ReLU'd widths before normalising, as in AdaBins, so no bin collapses to zero


def bin_centers(widths: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """Bin centres from positive bin widths.

    Args:
        widths: (B, K) positive, any scale; normalised here to sum to 1.
        min_depth, max_depth: metres, the range the bins tile.

    Returns:
        (B, K) metres, strictly increasing, the midpoints of the edges min_depth + cumsum(widths) * range.
    """
    widths = widths / widths.sum(dim=1, keepdim=True) * (max_depth - min_depth)
    upper = min_depth + torch.cumsum(widths, dim=1)
    return upper - 0.5 * widths


def channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of (B, K, h, w) logits.

    In an ONNX export it is written out as exp(x - max) / sum (the same arithmetic as torch.softmax): ONNX Runtime's
    Softmax over a non-last axis transposes internally and took 25 ms of the 103 ms a MobileNetV2 student (64 bins
    at stride 4) spent in its kernels at 352x1216 on 2 CPU threads (23 of 86 ms after INT8); these element-wise ops
    and reductions take ~5 ms (ONNX Runtime's per-node profile, as benchmarks/latency.py records it).
    """
    if torch.onnx.is_in_onnx_export():
        shifted = torch.exp(logits - logits.amax(dim=1, keepdim=True))
        return shifted / shifted.sum(dim=1, keepdim=True)
    return torch.softmax(logits, dim=1)


def expected_depth(probs: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Depth as the expectation of the bin centres: (B, K, h, w) probabilities, (B, K) metres -> (B, 1, h, w) metres."""
    return (probs * centers[:, :, None, None]).sum(dim=1, keepdim=True)


class BinsHead(nn.Module):
    """The two heads on the decoder's output: bin widths (global) and bin probabilities (per pixel).

    Args:
        in_channels: channels of the decoder's output.
        bins: K, number of bins.
        min_depth, max_depth: metres, the range the bins tile.
        hidden: width of the widths MLP (AdaBins: 256).
    """

    def __init__(self, in_channels: int, bins: int, min_depth: float, max_depth: float, hidden: int = 256) -> None:
        super().__init__()
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth} and {max_depth}")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.widths = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.LeakyReLU(),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(),
            nn.Linear(hidden, bins),
        )
        self.logits = nn.Conv2d(in_channels, bins, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) decoder features -> (probs (B, K, h, w) softmax over K, centers (B, K) metres)."""
        widths = F.relu(self.widths(x.mean(dim=(2, 3)))) + MIN_WIDTH
        centers = bin_centers(widths, self.min_depth, self.max_depth)
        probs = channel_softmax(self.logits(x))
        return probs, centers
