"""`data.kind: bag`: camera frames of rosbags, unlabeled, with the projected LiDAR (distill/data/rosbag.py).

A bag has one split unless `holdout_every` is set: then every n-th frame is held out for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from distill.data.registry import DataConfig, Transform, register_dataset
from distill.errors import UserError

if TYPE_CHECKING:
    from torch.utils.data import Dataset


class BagConfig(DataConfig):
    """The bags' keys (topic defaults: the kitti2bag ones); `root` and the split names are not used.

    Attributes:
        bags: rosbag2 folders or .mcap/.db3 files, or ROS 1 .bag files.
        image_topic, camera_info_topic: camera topics (Image or CompressedImage, CameraInfo).
        lidar_topic: PointCloud2 topic projected into `sparse_depth`; None: no LiDAR.
        lidar_extrinsic: 4x4 T_camera_lidar taking precedence over the bags' /tf_static; None: /tf_static.
        holdout_every: n: frames n-1, 2n-1, ... (in bag order, over all bags) are held out; `train_split` serves
            the others and every other split the held-out ones. None: every split is every frame.
    """

    kind: Literal["bag"]
    bags: list[Path] = Field(default_factory=list)
    image_topic: str = "/kitti/camera_color_left/image_raw"
    camera_info_topic: str = "/kitti/camera_color_left/camera_info"
    lidar_topic: str | None = "/kitti/velo/pointcloud"
    lidar_extrinsic: list[list[float]] | None = None
    holdout_every: Annotated[int, Field(ge=2)] | None = None


@register_dataset(BagConfig, depth_range=(1e-3, 80.0), eval_crop="garg")
def build_bag(data: BagConfig, split: str, transform: Transform | None) -> Dataset:
    """Every frame of `data.bags`, or with `holdout_every` the training or the held-out frames of `split`."""
    from torch.utils.data import Subset

    from distill.data.rosbag import BagDataset

    if not data.bags:
        raise UserError("data.bags must list at least one rosbag path for kind 'bag'")
    frames = BagDataset(
        data.bags, image_topic=data.image_topic, camera_info_topic=data.camera_info_topic,
        lidar_topic=data.lidar_topic, lidar_extrinsic=data.lidar_extrinsic,
        depth_range=(data.min_depth, data.max_depth), transform=transform,
    )  # fmt: skip
    every = data.holdout_every
    if every is None:
        return frames
    held_out = split != data.train_split
    chosen = [number for number in range(len(frames)) if (number % every == every - 1) == held_out]
    if not chosen:
        raise UserError(
            f"data.holdout_every={every}: the bags have {len(frames)} frames, too few to hold out every {every}th"
        )
    return Subset(frames, chosen)
