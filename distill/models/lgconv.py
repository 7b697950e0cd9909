"""Local-global convolution (DisDepth §3.2, methods §2): a 3x3 conv plus a parallel global branch.

Global branch on the conv's input x (stride matched with a strided 1x1 conv, so its grid equals the conv's output):
    h = ReLU(Conv1x1(x));  z = concat(h, GAP(h) broadcast)
    aggregate: M heads, a_m = softmax over the H·W positions of Conv1x1(z)_m;  t_m = Σ_p a_m(p) h(p)
    broadcast: π(p) = softmax over M of Conv1x1(z)(p);  b(p) = Σ_m π_m(p) t_m
    output = conv(x) + BN(Conv1x1(b)),  BN γ = 0.001, β = 0 at init, so a pretrained backbone starts unchanged.
Only conv, global pooling, softmax, matmul and reshape: ONNX/TensorRT friendly.

Which convs are wrapped (ours): every 3x3 `nn.Conv2d` whose output keeps the input grid up to its stride ("same"
padding, any dilation), including depthwise and grouped ones and the stem, because in EfficientNet, MobileNetV2
and GhostNet nearly every 3x3 conv is depthwise. The global branch itself is always dense (1x1 convs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

BN_GAMMA_INIT = 1e-3  # paper: small γ so the global branch barely perturbs the pretrained features at start
MIN_HIDDEN = 8


class LGConv(nn.Module):
    """A 3x3 conv (kept as `local`, its weights untouched) plus the global branch above.

    Args:
        local: the conv to wrap; its stride is matched by the branch.
        heads: M, number of aggregation heads (ours: 4).
        hidden: width of h; default max(8, out_channels * hidden_ratio).
        hidden_ratio: see `hidden`.
    """

    def __init__(self, local: nn.Conv2d, heads: int = 4, hidden: int | None = None, hidden_ratio: float = 0.25):
        super().__init__()
        hidden = hidden or max(MIN_HIDDEN, round(local.out_channels * hidden_ratio))
        self.local = local
        # No bias: the branch then scales with x, so at init it perturbs every layer by ~γ relative, however
        # small the activations of a (random-init, eval-mode) backbone are.
        self.reduce = nn.Conv2d(local.in_channels, hidden, kernel_size=1, stride=local.stride, bias=False)
        self.aggregate = nn.Conv2d(2 * hidden, heads, kernel_size=1)
        self.broadcast = nn.Conv2d(2 * hidden, heads, kernel_size=1)
        self.expand = nn.Conv2d(hidden, local.out_channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(local.out_channels)
        nn.init.constant_(self.norm.weight, BN_GAMMA_INIT)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W'), the local conv's output shape."""
        h = F.relu(self.reduce(x))  # (B, C, H', W')
        z = torch.cat([h, h.mean(dim=(2, 3), keepdim=True).expand_as(h)], dim=1)
        attention = torch.softmax(self.aggregate(z).flatten(2), dim=-1)  # (B, M, P) over positions
        tokens = torch.matmul(attention, h.flatten(2).transpose(1, 2))  # (B, M, C)
        mixing = torch.softmax(self.broadcast(z), dim=1).flatten(2)  # (B, M, P) over heads
        b = torch.matmul(tokens.transpose(1, 2), mixing).reshape(h.shape)  # (B, C, H', W')
        return self.local(x) + self.norm(self.expand(b))


def _keeps_grid(conv: nn.Conv2d) -> bool:
    """True when the 3x3 conv's output grid is its input grid subsampled by its stride ("same" padding)."""
    if isinstance(conv, Conv2dSame) or conv.padding == "same":
        return True
    return tuple(conv.padding) == tuple(conv.dilation)


def wrap_lgconv(module: nn.Module, heads: int = 4, hidden_ratio: float = 0.25) -> int:
    """Replace, in place, every eligible 3x3 conv under `module` by an `LGConv` around it.

    Convs already inside an LGConv are left alone, so wrapping twice changes nothing.

    Args:
        module: typically a student's timm encoder.
        heads, hidden_ratio: see `LGConv`.

    Returns:
        The number of convs wrapped.
    """
    targets = []
    for parent in module.modules():
        if isinstance(parent, LGConv):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3) and _keeps_grid(child):
                targets.append((parent, name, child))
    for parent, name, conv in targets:
        setattr(parent, name, LGConv(conv, heads=heads, hidden_ratio=hidden_ratio))
    return len(targets)
