"""Datasets in the formats our users have (KITTI raw, NYU, rosbags) and the synthetic KITTI-like world.

Every dataset returns the samples `distill.data.samples` describes. `build_dataset` is the one entry point the
training and evaluation code use; each dataset kind registers itself from its file in `distill.data.kinds` (its
`data:` keys, default depth range, evaluation crop and builder; see `distill.data.registry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill.data.kinds import bag, kitti, nyu  # noqa: F401  (each registers its kind)
from distill.data.registry import DATASETS, DataConfig

if TYPE_CHECKING:
    from torch.utils.data import Dataset


def build_dataset(data: DataConfig, split: str, augment: bool) -> Dataset:
    """The dataset of one split that a validated `data:` section describes (its kind's builder).

    `data.size` resizes every sample (intrinsics scaled, depth nearest); when augmenting, `data.crop` random-crops
    after resizing, then a random horizontal flip and colour jitter follow.

    Args:
        data: the data section of a config (`Config.data`, or `distill.config.load_data_config`).
        split: "train", "val" or "test" (picks the split file / NYU sub-folder; bags have one split).
        augment: add random horizontal flip, colour jitter and the optional random crop.
    """
    from distill.data.transforms import training_transform

    transform = training_transform(data.size, data.crop, augment=augment)
    return DATASETS.get(data.kind).build(data, split, transform)
