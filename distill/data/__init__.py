"""Datasets in the formats our users have (KITTI raw, NYU, rosbags) and the synthetic KITTI-like world.

Every dataset returns samples as dicts:
    image: (3, H, W) float32 RGB in [0, 1]
    depth: (1, H, W) float32 metres, 0 = invalid (no label)
    valid: (1, H, W) bool, depth > 0 and finite
    K:     (3, 3) float32 pinhole intrinsics of the returned image, pixels
    meta:  dict of str -> str/int/float (at least "name": a unique frame id)
Unlabeled samples (rosbags) have depth all 0 and valid all False; with a LiDAR they add
    sparse_depth: (1, H, W) float32 metres of the projected scan, 0 = no point.

This module holds the helpers every loader shares (file readers that fail with a `UserError`, the sample builder)
and `build_dataset`, the one entry point the training and evaluation code use.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from distill.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

log = logging.getLogger(__name__)

KINDS = ("kitti", "nyu", "bag")
DEFAULT_DEPTH_RANGE = {"kitti": (1e-3, 80.0), "nyu": (1e-3, 10.0), "bag": (1e-3, 80.0)}


def read_rgb(path: Path) -> np.ndarray:
    """Read a colour image file (PNG, JPEG). Returns (H, W, 3) uint8 RGB; grey images are replicated to 3 channels."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot read image {path}: file missing, unreadable or corrupt")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_depth_png(path: Path, metres_per_unit: float) -> np.ndarray:
    """Read a 16-bit depth PNG (KITTI: 1/256 m per unit, NYU: 1/1000 m). Returns (H, W) float32 metres, 0 = invalid."""
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise UserError(f"cannot read depth PNG {path}: file missing, unreadable or corrupt")
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise UserError(f"depth PNG {path} must be 16-bit single-channel, got {raw.dtype} with shape {raw.shape}")
    return raw.astype(np.float32) * np.float32(metres_per_unit)


def make_sample(
    image: np.ndarray,
    depth: np.ndarray | None,
    K: np.ndarray,
    meta: dict[str, Any],
    depth_range: tuple[float, float],
    sparse_depth: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build the sample dict of the contract above from numpy arrays.

    Args:
        image: (H, W, 3) uint8 RGB.
        depth: (H, W) float32 metres, 0 or non-finite = invalid; None for unlabeled frames.
        K: (3, 3) intrinsics in pixels.
        meta: frame metadata, must hold "name".
        depth_range: (min, max) metres; depth (and sparse depth) outside the open interval becomes invalid.
        sparse_depth: optional (H, W) float32 metres of a projected LiDAR scan, 0 = no point.
    """
    import torch

    height, width = image.shape[:2]
    sample = {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
        "depth": _depth_tensor(depth, depth_range, height, width),
        "K": torch.as_tensor(np.asarray(K, dtype=np.float32)).clone(),
        "meta": dict(meta),
    }
    sample["valid"] = sample["depth"] > 0
    if sparse_depth is not None:
        sample["sparse_depth"] = _depth_tensor(sparse_depth, depth_range, height, width)
    return sample


def _depth_tensor(depth: np.ndarray | None, depth_range: tuple[float, float], height: int, width: int) -> torch.Tensor:
    """(H, W) metres -> (1, H, W) float32 tensor with everything outside depth_range (or non-finite) set to 0."""
    import torch

    if depth is None:
        return torch.zeros(1, height, width)
    depth = np.asarray(depth, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(depth) & (depth > depth_range[0]) & (depth < depth_range[1])
    return torch.from_numpy(np.where(keep, depth, np.float32(0.0))[None].astype(np.float32))


def _depth_range(cfg: Mapping[str, Any], kind: str) -> tuple[float, float]:
    """(min_depth, max_depth) metres from cfg, None or absent meaning the kind's default."""
    bounds = []
    for key, default in zip(("min_depth", "max_depth"), DEFAULT_DEPTH_RANGE[kind]):
        value = cfg.get(key)
        try:
            bounds.append(default if value is None else float(value))
        except (TypeError, ValueError):
            raise UserError(f"data.{key} must be a number of metres, got {value!r}") from None
    if not 0 <= bounds[0] < bounds[1]:
        raise UserError(f"data.min_depth ({bounds[0]}) must be >= 0 and below data.max_depth ({bounds[1]})")
    return bounds[0], bounds[1]


def build_dataset(cfg: Mapping[str, Any], split: str, augment: bool) -> Dataset:
    """Build the dataset a config describes.

    Keys of `cfg` (all but `kind` and its source optional):
        kind: "kitti" | "nyu" | "bag".
        root: dataset folder (kitti, nyu). KITTI defaults below it: raw data in `root/kitti_raw`, annotated depth in
            `root/data_depth_annotated`, split files `root/splits/{train,val,test}.txt` (Eigen format); without a
            split file every image_02 frame under the raw folder is used (a warning says so).
        raw_root, gt_root, split_dir: KITTI overrides of those three folders.
        gt: KITTI ground truth, "annotated" (default; official `proj_depth/groundtruth` PNGs, frames without one are
            skipped) or "velodyne" (the raw scan projected with the calib files).
        kb_crop: KITTI only, crop 352x1216 bottom-centred (KB/BTS convention); default False.
        lidar_beams: KITTI only, add `sparse_depth` from the Velodyne scan thinned to this many rings (64, 32, 16, or
            a list to draw from per sample; see `distill.data.kitti.keep_beams`); default None = no sparse depth.
        bags: list of rosbag paths (rosbag2 folders or .mcap/.db3, ROS 1 .bag) for kind "bag"; `split` is ignored.
        image_topic, camera_info_topic, lidar_topic: bag topics (defaults: the kitti2bag ones); lidar_topic None =
            no LiDAR (default "/kitti/velo/pointcloud"). lidar_extrinsic: optional 4x4 T_camera_lidar that takes
            precedence over /tf_static.
        size: [H, W] to resize every sample to (intrinsics scaled, depth nearest), or None (default) = native.
        crop: [H, W] random crop applied after resizing when augmenting, or None (default).
        min_depth, max_depth: metres, depth outside the open interval is invalid (defaults: 1e-3 and 80 for kitti and
            bag, 1e-3 and 10 for nyu).

    Args:
        cfg: the data section of a config.
        split: "train", "val" or "test" (picks the split file / NYU sub-folder).
        augment: add random horizontal flip, colour jitter and the optional random crop.
    """
    from distill.data.transforms import training_transform

    kind = cfg.get("kind")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"data.kind must be one of {', '.join(KINDS)}, got {kind!r}{hint}")
    depth_range = _depth_range(cfg, kind)
    transform = training_transform(cfg.get("size"), cfg.get("crop"), augment=augment)
    if kind == "bag":
        from distill.data.rosbag import DEFAULT_TOPICS, BagDataset

        if not cfg.get("bags"):
            raise UserError("data.bags must list at least one rosbag path for kind 'bag'")
        topics = {key: cfg.get(key, default) for key, default in DEFAULT_TOPICS.items()}  # lidar_topic None = none
        return BagDataset(
            cfg["bags"], **topics, lidar_extrinsic=cfg.get("lidar_extrinsic"), depth_range=depth_range,
            transform=transform,
        )  # fmt: skip
    if not cfg.get("root"):
        raise UserError(f"data.root is required for kind {kind!r}")
    root = Path(cfg["root"])
    if kind == "nyu":
        from distill.data.nyu import NyuDataset

        return NyuDataset(root, split=split, depth_range=depth_range, transform=transform)
    from distill.data.kitti import KittiDataset

    raw_root = Path(cfg.get("raw_root") or root / "kitti_raw")
    split_file = Path(cfg.get("split_dir") or root / "splits") / f"{split}.txt"
    if not cfg.get("split_dir") and not split_file.is_file():
        log.warning("KITTI: no split file %s, using every image_02 frame under %s for %r", split_file, raw_root, split)
        split_file = None
    return KittiDataset(
        raw_root=raw_root,
        split_file=split_file,
        gt=cfg.get("gt") or "annotated",
        gt_root=Path(cfg.get("gt_root") or root / "data_depth_annotated"),
        kb_crop=bool(cfg.get("kb_crop", False)),
        depth_range=depth_range,
        transform=transform,
        lidar_beams=cfg.get("lidar_beams"),
    )
