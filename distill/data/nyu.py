"""NYU Depth v2 in the two common folder exports: RGB JPEG/PNG + uint16 depth PNG in millimetres (0 = invalid).

Layouts:
    mmsegmentation: root/images[/<split>]/NAME.jpg + root/annotations[/<split>]/NAME.png
    BTS "sync":     root[/<split>]/<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png (any depth of scene folders)
The `<split>` level is used when that folder exists. No intrinsics ship with these exports: the standard NYU v2
colour intrinsics at 640x480 (Silberman et al. ECCV 2012 toolbox) are scaled to the actual image size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data.samples import make_sample, read_depth_png, read_rgb
from distill.data.transforms import scale_intrinsics
from distill.errors import UserError

NYU_SIZE = (480, 640)  # (H, W) the intrinsics below belong to
NYU_FX, NYU_FY, NYU_CX, NYU_CY = 518.86, 519.47, 325.58, 253.74
DEPTH_METRES_PER_UNIT = 1e-3
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def nyu_intrinsics(height: int, width: int) -> np.ndarray:
    """(3, 3) float32 NYU v2 colour intrinsics scaled from 640x480 to width x height."""
    K = torch.tensor([[NYU_FX, 0.0, NYU_CX], [0.0, NYU_FY, NYU_CY], [0.0, 0.0, 1.0]])
    return scale_intrinsics(K, width / NYU_SIZE[1], height / NYU_SIZE[0]).numpy()


def _split_level(folder: Path, split: str | None) -> Path:
    return folder / split if split and (folder / split).is_dir() else folder


def find_pairs(root: Path, split: str | None = None) -> list[tuple[Path, Path]]:
    """(image, depth PNG) pairs of an NYU export, sorted; an image without its depth PNG is an error."""
    root = Path(root)
    if (root / "images").is_dir():
        images_dir = _split_level(root / "images", split)
        annotations_dir = _split_level(root / "annotations", split)
        images = [path for path in sorted(images_dir.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        pairs = [(image, annotations_dir / f"{image.stem}.png") for image in images]
    else:
        images = sorted(_split_level(root, split).rglob("rgb_*.jpg"))
        pairs = [
            (image, image.with_name(image.name.replace("rgb_", "sync_depth_")).with_suffix(".png")) for image in images
        ]
    if missing := [depth for _, depth in pairs if not depth.is_file()]:
        raise UserError(f"{len(missing)} NYU image(s) have no depth PNG, first expected at {missing[0]}")
    if not pairs:
        raise UserError(
            f"no NYU frames under {root}: expected images/NAME.jpg + annotations/NAME.png (mmseg) or "
            "<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png (BTS)"
        )
    return pairs


class NyuDataset(Dataset):
    """NYU Depth v2 frames with metric depth. meta: name (image path relative to root, no suffix)."""

    def __init__(
        self,
        root: Path,
        split: str | None = None,
        depth_range: tuple[float, float] = (1e-3, 10.0),
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        if not Path(root).is_dir():
            raise UserError(f"NYU root {root} is not a folder")
        self.root, self.depth_range, self.transform = Path(root), depth_range, transform
        self.pairs = find_pairs(self.root, split)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, depth_path = self.pairs[index]
        image = read_rgb(image_path)
        depth = read_depth_png(depth_path, DEPTH_METRES_PER_UNIT)
        if depth.shape != image.shape[:2]:
            raise UserError(f"{depth_path} ({depth.shape[1]}x{depth.shape[0]}) does not match the size of {image_path}")
        name = str(image_path.relative_to(self.root).with_suffix(""))
        sample = make_sample(image, depth, nyu_intrinsics(*depth.shape), {"name": name}, self.depth_range)
        return self.transform(sample) if self.transform else sample
