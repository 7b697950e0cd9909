"""`data.kind: bag`: camera frames of rosbags, unlabeled, with the projected LiDAR (distill/data/rosbag.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from distill.data.registry import DataConfig, Transform, register_dataset
from distill.errors import UserError

if TYPE_CHECKING:
    from distill.data.rosbag import BagDataset


class BagConfig(DataConfig):
    """The bags' keys (topic defaults: the kitti2bag ones); `root` and the split names are not used.

    Attributes:
        bags: rosbag2 folders or .mcap/.db3 files, or ROS 1 .bag files.
        image_topic, camera_info_topic: camera topics (Image or CompressedImage, CameraInfo).
        lidar_topic: PointCloud2 topic projected into `sparse_depth`; None: no LiDAR.
        lidar_extrinsic: 4x4 T_camera_lidar taking precedence over the bags' /tf_static; None: /tf_static.
    """

    kind: Literal["bag"]
    bags: list[Path] = Field(default_factory=list)
    image_topic: str = "/kitti/camera_color_left/image_raw"
    camera_info_topic: str = "/kitti/camera_color_left/camera_info"
    lidar_topic: str | None = "/kitti/velo/pointcloud"
    lidar_extrinsic: list[list[float]] | None = None


@register_dataset(BagConfig, depth_range=(1e-3, 80.0), eval_crop="garg")
def build_bag(data: BagConfig, split: str, transform: Transform | None) -> BagDataset:
    """Every frame of `data.bags`: a bag has one split, so `split` is ignored."""
    from distill.data.rosbag import BagDataset

    if not data.bags:
        raise UserError("data.bags must list at least one rosbag path for kind 'bag'")
    return BagDataset(
        data.bags, image_topic=data.image_topic, camera_info_topic=data.camera_info_topic,
        lidar_topic=data.lidar_topic, lidar_extrinsic=data.lidar_extrinsic,
        depth_range=(data.min_depth, data.max_depth), transform=transform,
    )  # fmt: skip
