"""Which topics of a robot's bags `distill fit` uses: the camera, its CameraInfo and a LiDAR, found by type.

Chosen from the bag's metadata alone (no message read): image topics are sensor_msgs/Image or CompressedImage (a
raw Image preferred over its `/compressed` twin, depth images such as `/depth` skipped), the CameraInfo is the
camera's sibling `<namespace>/camera_info` (or the bag's only CameraInfo topic), the LiDAR the PointCloud2 topic
(a name with velo/lidar/points preferred). Every miss is one line naming the topics the bag does have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.data.rosbag import EXPECTED_TYPES, bag_topics
from distill.errors import UserError

# The message types the bag dataset reads: topic detection accepts exactly what the reader can read.
IMAGE_TYPES = EXPECTED_TYPES["image"]
(CAMERA_INFO_TYPE,) = EXPECTED_TYPES["camera_info"]
(CLOUD_TYPE,) = EXPECTED_TYPES["lidar"]
NOT_CAMERAS = ("depth", "disparity")  # image topics that carry depth, not colour (e.g. a depth_node's /depth)
LIDAR_WORDS = ("velo", "lidar", "points")
NO_LIDAR = "none"  # --lidar-topic none: go without the LiDAR


@dataclass(frozen=True)
class BagTopics:
    """The topics one fit reads (lidar None: no LiDAR)."""

    image: str
    camera_info: str
    lidar: str | None


def check_bags_exist(bags: Sequence[Path]) -> None:
    """A missing bag is one line naming what its folder holds."""
    if not bags:
        raise UserError("name at least one rosbag (a rosbag2 folder, .mcap, .db3 or ROS 1 .bag)")
    for bag in bags:
        if not bag.exists():
            raise UserError(f"no rosbag {bag}; {folder_listing(bag.parent)}")


def folder_listing(folder: Path, limit: int = 8) -> str:
    """ "FOLDER holds: a, b, ..." (the first `limit` names), or that the folder is missing or empty."""
    if not folder.is_dir():
        return f"{folder} does not exist either"
    names = sorted(path.name + ("/" if path.is_dir() else "") for path in folder.iterdir())
    if not names:
        return f"{folder} is empty"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{folder} holds: {', '.join(names[:limit])}{more}"


def find_topics(bag: Path, image_topic: str | None = None, lidar_topic: str | None = None) -> BagTopics:
    """The camera, CameraInfo and LiDAR topics of a bag; the given ones checked, the others found by type.

    Args:
        bag: the first bag of the fit (the others are checked when they are read).
        image_topic: the camera topic; None: the only colour camera there (with a CameraInfo sibling first).
        lidar_topic: the PointCloud2 topic, "none" for no LiDAR; None: the bag's LiDAR if it has one.
    """
    topics = bag_topics(bag)
    images = [name for name, (kind, count) in topics.items() if kind in IMAGE_TYPES and count]
    image = image_topic or _pick_camera(bag, topics, images)
    if image not in images:
        raise UserError(f"no image topic {image} in {bag}; image topics: {_names(images)}")
    camera_info = _camera_info(bag, topics, image)
    return BagTopics(image, camera_info, _lidar(bag, topics, lidar_topic))


def _names(topics: Sequence[str]) -> str:
    return ", ".join(topics) if topics else "none"


def _of_type(topics: dict[str, tuple[str, int]], kind: str) -> list[str]:
    return [name for name, (found, count) in topics.items() if found == kind and count]


def _pick_camera(bag: Path, topics: dict[str, tuple[str, int]], images: list[str]) -> str:
    cameras = [name for name in images if not any(word in name.lower() for word in NOT_CAMERAS)]
    cameras = [name for name in cameras if not (name.endswith("/compressed") and name.rsplit("/", 1)[0] in cameras)]
    if not cameras:
        listing = ", ".join(f"{name} ({kind})" for name, (kind, _) in topics.items())
        raise UserError(f"no camera image topic (sensor_msgs/Image or CompressedImage) in {bag}; its topics: {listing}")
    infos = set(_of_type(topics, CAMERA_INFO_TYPE))
    with_info = [name for name in cameras if _sibling_info(name) in infos]
    chosen = (with_info or cameras)[0]
    if len(cameras) > 1:
        print(f"camera: {chosen} (of {_names(cameras)}; --image-topic picks another)")
    return chosen


def _sibling_info(image_topic: str) -> str:
    """/ns/image_raw -> /ns/camera_info; /ns/image_raw/compressed -> /ns/camera_info."""
    namespace = image_topic.removesuffix("/compressed").rsplit("/", 1)[0]
    return f"{namespace}/camera_info"


def _camera_info(bag: Path, topics: dict[str, tuple[str, int]], image: str) -> str:
    infos = _of_type(topics, CAMERA_INFO_TYPE)
    sibling = _sibling_info(image)
    if sibling in infos:
        return sibling
    if len(infos) == 1:
        return infos[0]
    raise UserError(
        f"no camera_info topic {sibling} for {image} in {bag}; CameraInfo topics: {_names(infos)} "
        "(data.camera_info_topic=... names one)"
    )


def _lidar(bag: Path, topics: dict[str, tuple[str, int]], wanted: str | None) -> str | None:
    clouds = _of_type(topics, CLOUD_TYPE)
    if wanted is not None:
        if wanted.lower() == NO_LIDAR:
            return None
        if wanted not in clouds:
            raise UserError(f"no LiDAR topic {wanted} in {bag}; PointCloud2 topics: {_names(clouds)}")
        return wanted
    if not clouds:
        return None
    named = [name for name in clouds if any(word in name.lower() for word in LIDAR_WORDS)]
    chosen = (named or clouds)[0]
    if len(clouds) > 1:
        print(f"LiDAR: {chosen} (of {_names(clouds)}; --lidar-topic picks another or none)")
    return chosen
