"""Label-free geometric KD for unlabeled robot logs (Gao et al., "Robust lightweight depth estimation model via
data-free distillation"). The student learns from the teacher only; no depth label is read.

    channel-wise:  tau^2 * KL(softmax_HW(n_t / tau) || softmax_HW(n_s / tau))     (Shu et al. 2021, one channel)
    geometric:     MSE(P_s, P_t) + MSE(phi(P_s), phi(P_t))

n = depth / median(depth) per image over the teacher's valid pixels (ours: scale-free, so a metric and an aligned
relative teacher weigh alike). P are the 3D points of N pixels sampled once per image and shared by teacher and
student, back-projected with the frame's intrinsics (`batch["K"]`, from the bag's CameraInfo) by the pinhole model
of `depth_node.geometry.backproject`: X = (u - cx) Z / fx, Y = (v - cy) Z / fy, Z = d, (u, v) = (column, row).
Both clouds are divided by the teacher's median depth (ours: the loss is in scene units, as the paper's normalised
numbers, instead of square metres). phi is PointNet's global feature (shared MLP 3 -> 64 -> 128 -> 1024 with ReLU,
max-pool over points; no T-nets): frozen, randomly initialised from a fixed seed by default (ours; a trainable phi
would collapse to a constant), or loaded from `pointnet_weights`. Relative teachers are first least-squares aligned
to the student's detached prediction per image.

Trains straight from rosbag2 / ROS 1 bags: `distill train config/labelfree_bag.yaml data.bags='[a.mcap, b]'`.

With `lidar_weight` > 0 (ours), a bag's projected LiDAR (`batch["sparse_depth"]`, data.lidar_topic) also supervises
the student as sparse labels: lidar_weight * SILog(student, LiDAR) on the pixels a point hits.

Config (`kd.labelfree`): tau, channel_weight, geometric_weight, points (N), pointnet_weights (path|null),
pointnet_seed (int), lidar_weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from distill.config import Config, Section
from distill.errors import UserError
from distill.kd.method import Batch, Method
from distill.kd.registry import kd_section, register_method
from distill.kd.teacher import DistillMethod
from distill.losses import silog_loss
from distill.models.base import DepthModel, DepthOutput

MASKED_LOGIT = -1e9  # logit of pixels outside the mask: zero probability, finite log


class LabelFreeSettings(Section):
    """`kd.labelfree`: label-free channel-wise + geometric KD (Gao et al., "Robust Lightweight Depth Estimation Model
    via Data-Free Distillation")."""

    tau: Annotated[float, Field(gt=0)] = 1.0
    channel_weight: Annotated[float, Field(ge=0)] = 1.0
    geometric_weight: Annotated[float, Field(ge=0)] = 1.0
    points: Annotated[int, Field(ge=1)] = 4096
    pointnet_weights: Path | None = None
    pointnet_seed: int = 0
    lidar_weight: Annotated[float, Field(ge=0)] = 0.0


def median_normalise(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) depth divided per image by its median over `valid` (images without a valid pixel unchanged)."""
    medians = torch.stack([d[v].median() if v.any() else d.new_ones(()) for d, v in zip(depth, valid)])
    return depth / medians.clamp_min(torch.finfo(depth.dtype).tiny).view(-1, 1, 1, 1)


def channel_wise_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL over the H*W positions of softmax(map / tau), teacher || student, averaged over images.

    Args:
        student, teacher: (B, C, H, W) maps (normalised depth: C = 1).
        valid: (B, 1, H, W) bool positions that take part (others get probability 0).
        tau: temperature.

    Returns:
        Scalar, nats * tau^2 (0 for identical maps; images without a valid position are skipped).
    """
    mask = valid.expand_as(student).flatten(2)
    log_s = torch.log_softmax(torch.where(mask, student.flatten(2) / tau, MASKED_LOGIT), dim=-1)
    log_t = torch.log_softmax(torch.where(mask, teacher.flatten(2) / tau, MASKED_LOGIT), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (B, C)
    keep = mask.any(dim=-1)
    return tau**2 * kl[keep].mean() if keep.any() else student.sum() * 0.0


def backproject_pixels(depth: torch.Tensor, K: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """3D points of chosen pixels, pinhole model as `depth_node.geometry.backproject` (torch, differentiable).

    Args:
        depth: (B, 1, H, W) metres along the optical axis.
        K: (B, 3, 3) intrinsics of the depth map, pixels.
        index: (B, N) long, flat pixel indices row * W + column.

    Returns:
        (B, N, 3) metres in the camera optical frame (x right, y down, z forward).
    """
    width = depth.shape[-1]
    z = depth.flatten(1).gather(1, index)
    u, v = (index % width).to(depth.dtype), (index // width).to(depth.dtype)
    fx, fy, cx, cy = (K[:, i, j, None].to(depth.dtype) for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    return torch.stack(((u - cx) * z / fx, (v - cy) * z / fy, z), dim=-1)


def sample_pixels(valid: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, count) flat indices of valid pixels per image, uniformly without replacement (with it when fewer are valid).

    Args:
        valid: (B, 1, H, W) bool; every image needs at least one valid pixel.
        count: N.
        generator: RNG on valid's device (None: torch's global RNG).
    """
    weights = valid.flatten(1).float()
    return torch.stack([
        torch.multinomial(w, count, replacement=bool(w.sum() < count), generator=generator) for w in weights
    ])  # fmt: skip


class PointNetFeatures(nn.Module):
    """PointNet's global feature (Qi et al. 2017) without T-nets: shared MLP 3 -> 64 -> 128 -> 1024, ReLU, max-pool."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 1024)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((3, *widths[:-1]), widths):
            layers += [nn.Linear(c_in, c_out), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) points -> (B, 1024) features (max over points, so duplicated points change nothing)."""
        return self.mlp(points).amax(dim=1)


def geometric_loss(
    student: torch.Tensor, teacher: torch.Tensor, K: torch.Tensor, index: torch.Tensor, phi: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE(P_s, P_t), MSE(phi(P_s), phi(P_t))) over the pixels `index`, clouds divided by the teacher's median depth.

    Args:
        student, teacher: (B, 1, H, W) depth, metres (or the same relative units).
        K: (B, 3, 3) intrinsics, pixels.
        index: (B, N) flat pixel indices valid in the teacher (from `sample_pixels`).
        phi: point feature extractor, (B, N, 3) -> (B, F).
    """
    p_t = backproject_pixels(teacher, K, index)
    p_s = backproject_pixels(student, K, index)
    scale = p_t[..., 2].median(dim=1).values.clamp_min(torch.finfo(p_t.dtype).tiny).view(-1, 1, 1)
    p_t, p_s = p_t / scale, p_s / scale
    return torch.mean((p_s - p_t) ** 2), torch.mean((phi(p_s) - phi(p_t)) ** 2)


def build_pointnet(weights: Path | None, seed: int) -> PointNetFeatures:
    """The frozen phi: random init drawn from `seed` (same for every run and resume), or loaded from `weights`."""
    from distill.models.weights import load_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        phi = PointNetFeatures()
    if weights is not None:
        load_weights(phi, weights)
    return phi.requires_grad_(False).eval()


class LabelFreeMethod(DistillMethod):
    """Channel-wise + geometric distillation from the teacher's depth; ground truth is never read."""

    def __init__(self, student: DepthModel, teacher: DepthModel, config: Config, phi: nn.Module) -> None:
        super().__init__(student, teacher, config)
        self.cfg = kd_section(config, "labelfree")
        self.phi = phi

    def loss(self, batch: Batch, out: DepthOutput, step: int) -> dict[str, torch.Tensor]:
        cfg, student = self.cfg, out.depth.float()
        lidar = {"lidar": cfg.lidar_weight * self.lidar_loss(batch, student)} if cfg.lidar_weight > 0 else {}
        teacher, valid = self.teacher_depth(batch, student.detach())
        has_pixels = valid.flatten(1).any(dim=1)  # frames where the teacher gives nothing teach nothing
        if not has_pixels.any():
            return {"channel": student.sum() * 0.0, "geometric": student.sum() * 0.0, **lidar}
        student, teacher, valid = student[has_pixels], teacher[has_pixels], valid[has_pixels]
        channel = channel_wise_loss(median_normalise(student, valid), median_normalise(teacher, valid), valid, cfg.tau)
        index = sample_pixels(valid, cfg.points)
        with torch.autocast(student.device.type, enabled=False):  # phi's features compared in float32 under AMP
            points, features = geometric_loss(student, teacher, batch["K"][has_pixels], index, self.phi)
        return {
            "channel": cfg.channel_weight * channel,
            "geometric": cfg.geometric_weight * (points + features),
            **lidar,
        }

    def lidar_loss(self, batch: Batch, student: torch.Tensor) -> torch.Tensor:
        """SILog (train.silog_alpha, train.silog_lambda) of the (B, 1, H, W) student depth on the projected LiDAR
        points; 0 when no frame of the batch has one."""
        sparse = batch["sparse_depth"]
        return silog_loss(student, sparse, sparse > 0, self.alpha, self.lam)


@register_method("labelfree", settings=LabelFreeSettings)
def build_labelfree(student: DepthModel, teacher: DepthModel, config: Config, settings: Section) -> Method:
    """`kd.method: labelfree`: phi (the PointNet) is built after the teacher, from its weights file or seed."""
    has_lidar = getattr(config.data, "lidar_topic", None) or getattr(config.data, "lidar_beams", None)
    if settings.lidar_weight > 0 and not has_lidar:
        raise UserError(
            f"kd.labelfree.lidar_weight={settings.lidar_weight} needs LiDAR points: set data.lidar_topic (bags) "
            "or data.lidar_beams (kitti)"
        )
    return LabelFreeMethod(student, teacher, config, build_pointnet(settings.pointnet_weights, settings.pointnet_seed))
