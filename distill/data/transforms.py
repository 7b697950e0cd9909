"""Training transforms on the sample dict that keep image, depth maps and intrinsics consistent.

Geometric transforms move `image`, every depth map (`depth`, `sparse_depth`) and `K` together and recompute
`valid = depth > 0`; colour jitter touches the image only. Pixel convention as in depth_node.geometry: integer
coordinates at pixel centres, so a flip maps cx to W - 1 - cx and a resize maps c to (c + 0.5) * s - 0.5.
Random transforms draw from the `generator` they are given (deterministic) or from torch's global RNG, which the
DataLoader seeds differently in every worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from distill.errors import UserError

Sample = dict[str, Any]
DEPTH_KEYS = ("depth", "sparse_depth")


def scale_intrinsics(K: torch.Tensor, scale_x: float, scale_y: float) -> torch.Tensor:
    """Intrinsics of the same camera after resizing the image by (scale_x, scale_y). K: (3, 3) pixels."""
    K = K.clone()
    K[0, 0] *= scale_x
    K[1, 1] *= scale_y
    K[0, 2] = (K[0, 2] + 0.5) * scale_x - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * scale_y - 0.5
    return K


def _with_maps(sample: Sample, image: torch.Tensor, maps: dict[str, torch.Tensor], K: torch.Tensor) -> Sample:
    """Copy of sample with new image, depth maps and K; valid recomputed from depth."""
    out = dict(sample, image=image, K=K, meta=dict(sample["meta"]), **maps)
    out["valid"] = out["depth"] > 0
    return out


def _depth_maps(sample: Sample) -> dict[str, torch.Tensor]:
    return {key: sample[key] for key in DEPTH_KEYS if key in sample}


def crop(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop a (height, width) window whose top-left pixel is (top, left); the principal point moves with it."""
    full_height, full_width = sample["image"].shape[-2:]
    if top < 0 or left < 0 or top + height > full_height or left + width > full_width:
        raise UserError(
            f"crop {height}x{width} at (top={top}, left={left}) does not fit image {full_height}x{full_width} "
            f"({sample['meta'].get('name', '?')})"
        )
    window = (slice(None), slice(top, top + height), slice(left, left + width))
    K = sample["K"].clone()
    K[0, 2] -= left
    K[1, 2] -= top
    maps = {key: value[window] for key, value in _depth_maps(sample).items()}
    return _with_maps(sample, sample["image"][window], maps, K)


def hflip(sample: Sample) -> Sample:
    """Mirror left-right; cx -> W - 1 - cx."""
    width = sample["image"].shape[-1]
    K = sample["K"].clone()
    K[0, 2] = width - 1 - K[0, 2]
    maps = {key: value.flip(-1) for key, value in _depth_maps(sample).items()}
    return _with_maps(sample, sample["image"].flip(-1), maps, K)


def resize(sample: Sample, size: Sequence[int]) -> Sample:
    """Resize to size = (H, W): image bilinear (antialiased), depth maps nearest (valid and invalid never mix)."""
    height, width = int(size[0]), int(size[1])
    old_height, old_width = sample["image"].shape[-2:]
    if (height, width) == (old_height, old_width):
        return sample
    image = F.interpolate(sample["image"][None], (height, width), mode="bilinear", antialias=True, align_corners=False)
    maps = {
        key: F.interpolate(value[None], (height, width), mode="nearest-exact")[0]
        for key, value in _depth_maps(sample).items()
    }
    K = scale_intrinsics(sample["K"], width / old_width, height / old_height)
    return _with_maps(sample, image[0].clamp_(0.0, 1.0), maps, K)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _size_pair(size: Sequence[int], what: str) -> tuple[int, int]:
    """Validate a user-given [H, W]."""
    try:
        height, width = (int(value) for value in size)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be [H, W], got {size!r}") from None
    if height <= 0 or width <= 0:
        raise UserError(f"{what} must be positive, got {size!r}")
    return height, width


class Resize:
    """Resize every sample to size = (H, W)."""

    def __init__(self, size: Sequence[int]):
        self.size = _size_pair(size, "size")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        return resize(sample, self.size)


class RandomCrop:
    """Crop a random (H, W) window."""

    def __init__(self, size: Sequence[int]):
        self.size = _size_pair(size, "crop")

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        full_height, full_width = sample["image"].shape[-2:]
        height, width = self.size
        if height > full_height or width > full_width:
            raise UserError(f"random crop {height}x{width} is larger than the image {full_height}x{full_width}")
        top = int(torch.randint(full_height - height + 1, (), generator=generator))
        left = int(torch.randint(full_width - width + 1, (), generator=generator))
        return crop(sample, top, left, height, width)


class RandomHorizontalFlip:
    """Mirror with probability p; records the decision in meta["hflip"] so cached teacher maps can follow it."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        flipped = torch.rand((), generator=generator).item() < self.p
        out = hflip(sample) if flipped else dict(sample)
        out["meta"] = dict(out["meta"], hflip=flipped)
        return out


class ColorJitter:
    """Random brightness, contrast, saturation (factors in [1 - x, 1 + x]), hue shift in [-hue, hue]; image only."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.0):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        import torchvision.transforms.functional as TF  # slow to import; only augmentation needs it

        image = sample["image"]
        image = TF.adjust_brightness(image, _uniform(1 - self.brightness, 1 + self.brightness, generator))
        image = TF.adjust_contrast(image, _uniform(1 - self.contrast, 1 + self.contrast, generator))
        image = TF.adjust_saturation(image, _uniform(1 - self.saturation, 1 + self.saturation, generator))
        if self.hue > 0:
            image = TF.adjust_hue(image, _uniform(-self.hue, self.hue, generator))
        return dict(sample, image=image.clamp(0.0, 1.0))


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Callable[..., Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample


def training_transform(size: Sequence[int] | None, crop_size: Sequence[int] | None, augment: bool) -> Compose | None:
    """The standard pipeline: resize to `size` (if given), then when augmenting: random crop to `crop_size` (if given),
    horizontal flip, colour jitter.

    Returns None when there is nothing to do.
    """
    transforms: list[Callable[..., Sample]] = []
    if size is not None:
        transforms.append(Resize(size))
    if augment:
        if crop_size is not None:
            transforms.append(RandomCrop(crop_size))
        transforms += [RandomHorizontalFlip(), ColorJitter()]
    return Compose(transforms) if transforms else None
