"""Two-stage depth completion training (`run.task: completion`): the completion network learns to turn the frozen
mono model's LiDAR-aligned depth, the image and the sparse LiDAR into dense metric depth, supervised by dense
ground truth.

- Stage 1 is the model `model:` describes (a trained mono student or teacher, its weights in `model.weights`,
  loaded strictly, so `model:` repeats that run's settings), frozen and kept in eval mode: what the node runs first.
- Stage 2, per training image: its prediction is robustly aligned to the sample's sparse LiDAR (scale and shift; in
  inverse-depth space for relative-disparity models) by `depth_node.completion.align_depth`, the code the node runs.
- Stage 3, the network this method trains and checkpoints (so `distill export` exports it), is
  `distill.models.completion.CompletionNet` with `completion.widths`, over the model's depth range.
Loss: l1_weight·|d − gt| + l2_weight·(d − gt)² + log_l1_weight·|ln d − ln gt| averaged over valid ground-truth
pixels (metres). The log term weighs relative error, which is what AbsRel and δ1 count: the metric terms alone let
near-range depth edges stay tens of percent off at a few decimetres' cost.

The samples need `sparse_depth`: set `data.lidar_beams` (64, 32, 16, or a list to draw from per sample). Validation
during training is not supported (the image-only validator cannot feed the network): set `data.val_split: null`;
`benchmarks/completion.py` evaluates the two stages.

Config (`completion:`): widths, output_stride, lidar_gate, l1_weight, l2_weight, log_l1_weight, align_method,
align_min_points.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from depth_node.alignment import align_depth, apply_alignment
from depth_node.completion import sanitize_aligned
from distill.config import CompletionSettings, Config
from distill.errors import UserError
from distill.kd.method import Batch, Method
from distill.models.base import DepthModel, DepthOutput
from distill.models.completion import CompletionNet


def masked_l1_l2(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |pred − gt| (metres) and mean (pred − gt)² (m²) over the valid pixels; both 0 (with gradient) if none.

    Args:
        pred, gt: (B, 1, H, W) metres.
        valid: (B, 1, H, W) bool.
    """
    if not valid.any():
        zero = pred.sum() * 0.0
        return zero, zero
    error = pred[valid] - gt[valid]
    return error.abs().mean(), error.square().mean()


def masked_log_l1(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean |ln pred − ln gt| over the valid pixels (pred and gt positive there); 0 (with gradient) if none.

    Args:
        pred, gt: (B, 1, H, W) metres.
        valid: (B, 1, H, W) bool.
    """
    if not valid.any():
        return pred.sum() * 0.0
    return (torch.log(pred[valid]) - torch.log(gt[valid])).abs().mean()


def align_to_lidar(
    pred: np.ndarray,
    sparse: np.ndarray,
    output_kind: str,
    depth_range: tuple[float, float],
    method: str = "huber",
    min_points: int = 20,
) -> np.ndarray:
    """Stage 2 on one image: the prediction aligned to the LiDAR, as the completion network's `aligned` input.

    Args:
        pred: (H, W) stage-1 output (metres, relative depth or relative disparity, per `output_kind`).
        sparse: (H, W) float32 LiDAR depth, metres, 0 = no point.
        output_kind: the stage-1 model's output kind; "relative_disparity" is aligned in inverse space.
        depth_range: (min, max) metres of the result.
        method, min_points: of `align_depth` (completion.align_method, align_min_points).

    Returns:
        (H, W) float32 metres, finite, in depth_range; the unaligned prediction when the fit failed.
    """
    space = "inverse" if output_kind == "relative_disparity" else "depth"
    fit = align_depth(pred, sparse, space=space, method=method, min_points=min_points)
    aligned = apply_alignment(pred, fit) if fit.ok else np.asarray(pred, np.float32)
    return sanitize_aligned(aligned, *depth_range)


class CompletionMethod(Method):
    """Trains `student`, the completion network, on the frozen `mono` model's aligned depth (module docstring)."""

    def __init__(self, network: CompletionNet, mono: DepthModel, cfg: CompletionSettings) -> None:
        super().__init__(network)
        self.mono, self.cfg = mono, cfg

    def train(self, mode: bool = True) -> CompletionMethod:
        super().train(mode)
        self.mono.eval()  # frozen: its BatchNorm statistics never change
        return self

    @torch.no_grad()
    def aligned_depth(self, batch: Batch) -> torch.Tensor:
        """(B, 1, H, W) metres: stage 1 then stage 2 on every image of the batch."""
        from distill.inference import predict_depth

        pred = predict_depth(self.mono, batch["image"]).float().cpu().numpy()
        sparse = batch["sparse_depth"].float().cpu().numpy()
        kind, depth_range = self.mono.output_kind, (self.student.min_depth, self.student.max_depth)
        method, points = self.cfg.align_method, self.cfg.align_min_points
        aligned = [align_to_lidar(p[0], s[0], kind, depth_range, method, points)[None] for p, s in zip(pred, sparse)]
        return torch.from_numpy(np.stack(aligned)).to(batch["image"].device)

    def forward(self, batch: Batch, step: int) -> tuple[DepthOutput, dict[str, torch.Tensor]]:
        if "sparse_depth" not in batch:
            raise UserError("run.task=completion needs sparse LiDAR depth in the samples: set data.lidar_beams")
        sparse = batch["sparse_depth"]
        mask = (sparse > 0).to(sparse.dtype)
        image = self.student.normalize(batch["image"])
        out = self.student(image, self.aligned_depth(batch), sparse, mask)
        return out, self.loss(batch, out, step)

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        depth, gt, valid = out.depth.float(), batch["depth"], batch["valid"]
        l1, l2 = masked_l1_l2(depth, gt, valid)
        losses = {"l1": self.cfg.l1_weight * l1, "l2": self.cfg.l2_weight * l2}
        if self.cfg.log_l1_weight:
            losses["log_l1"] = self.cfg.log_l1_weight * masked_log_l1(depth, gt, valid)
        return losses


def build_completion_method(config: Config, student: DepthModel, device: torch.device) -> Method:
    """Completion training (`run.task: completion`); `student` is stage 1, the model `model:` describes."""
    cfg = config.completion
    if config.data.val_split is not None:
        raise UserError(
            f"data.val_split={config.data.val_split!r}: run.task=completion cannot validate during training (the "
            "validator feeds images only); set data.val_split=null and evaluate with benchmarks/completion.py"
        )
    if not getattr(config.data, "lidar_beams", None):  # a key of kind kitti only
        raise UserError("run.task=completion needs sparse LiDAR depth: set data.lidar_beams (64, 32, 16 or a list)")
    if config.model.weights is None:
        tqdm.write("run.task=completion: model.weights is null, so stage 1 is a random-init model")
    mono = student.eval().requires_grad_(False)
    network = CompletionNet(
        cfg.widths, cfg.output_stride, config.model.min_depth, config.model.max_depth, lidar_gate=cfg.lidar_gate
    )
    return CompletionMethod(network.to(device), mono, cfg)
