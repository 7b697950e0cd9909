"""Unlabeled camera frames from robot logs: rosbag2 (sqlite3, mcap) and ROS 1 .bag, read with `rosbags`.

Each image (sensor_msgs/Image or CompressedImage) is paired with the latest CameraInfo at or before its header stamp
and, optionally, with the LiDAR scan (PointCloud2) nearest in stamp within a tolerance, projected into the image as
sparse depth. The LiDAR -> camera extrinsic is `lidar_extrinsic` when given, else looked up in /tf_static (ROS
convention: a transform with header.frame_id = parent, child_frame_id = child maps child coordinates into the parent).
Every bag is indexed once (stamps and message positions); messages are read and decoded in __getitem__.

Damaged bags are never read silently: one that cannot be opened (e.g. an MCAP cut short, without its footer) is a
UserError naming the file with a repair hint; one that breaks part-way (a corrupt chunk, a malformed SQLite page, a
message that does not decode) is used up to the damage, with a warning counting the messages skipped.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag1 import ReaderError as Ros1ReaderError
from rosbags.rosbag2 import ReaderError as Ros2ReaderError
from torch.utils.data import Dataset
from tqdm import tqdm

from depth_node.codec import (
    camera_info_to_P,
    pointcloud2_to_xyz,
    ros2_camera_info,
    transform_to_matrix,
    validate_camera_info,
)
from depth_node.geometry import lidar_to_depth, lookup_transform
from depth_node.image_codec import image_msg_to_rgb
from distill.data.samples import make_sample
from distill.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TOPICS = {
    "image_topic": "/kitti/camera_color_left/image_raw",
    "camera_info_topic": "/kitti/camera_color_left/camera_info",
    "lidar_topic": "/kitti/velo/pointcloud",
}
TF_STATIC = "/tf_static"
EXPECTED_TYPES = {
    "image": ("sensor_msgs/Image", "sensor_msgs/CompressedImage"),
    "camera_info": ("sensor_msgs/CameraInfo",),
    "lidar": ("sensor_msgs/PointCloud2",),
}
READER_ERRORS = (AnyReaderError, Ros1ReaderError, Ros2ReaderError)
REPAIR_HINTS = {
    ".mcap": "`mcap recover` rebuilds a damaged MCAP or one cut short (killed recorder, full disk: no footer)",
    ".db3": "`sqlite3 BAG.db3 .recover` salvages what SQLite can still read",
}


def _frame(frame_id: str) -> str:
    return frame_id.lstrip("/")  # ROS 1 frame ids may carry a leading slash


def _stamp(header: Any, log_time: int) -> int:
    """Header stamp in ns; the log time when the publisher left it at zero."""
    stamp = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
    return stamp or log_time


def _reason(error: Exception) -> str:
    """One line saying why rosbags failed; the exception type too when it is not one of rosbags' own."""
    text = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, READER_ERRORS) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _repair_hint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(path.glob("*")) if path.is_dir() else []
    hints = {REPAIR_HINTS[file.suffix] for file in files if file.suffix in REPAIR_HINTS}
    return "".join(f"; {hint}" for hint in sorted(hints))


class _UntilDamage:
    """reader.messages(...) that stops at the first record it cannot read instead of raising.

    Attributes:
        count: messages yielded so far.
        damage: why reading stopped early, or None.
    """

    def __init__(self, messages: Iterator[tuple[Any, int, bytes]]) -> None:
        self.messages, self.count, self.damage = messages, 0, None

    def __iter__(self) -> Iterator[tuple[Any, int, bytes]]:
        while True:
            try:
                item = next(self.messages)
            except StopIteration:
                return
            except Exception as error:  # rosbags' parsers raise many types on damaged bytes (struct, apsw, Unicode)
                self.damage = error
                return
            self.count += 1
            yield item


@dataclass
class _BagIndex:
    """What one pass over a bag learns. Message positions are (log time ns, ordinal among equal log times)."""

    path: Path
    images: list[tuple[int, tuple[int, int]]] = field(default_factory=list)  # (stamp, position)
    infos: list[tuple[int, np.ndarray, int, int]] = field(default_factory=list)  # (stamp, P, height, width)
    clouds: list[tuple[int, tuple[int, int]]] = field(default_factory=list)
    tf_edges: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    camera_frame: str = ""
    lidar_frame: str = ""
    bad_infos: int = 0


def _open(path: Path) -> AnyReader:
    """An opened AnyReader; a .mcap/.db3 file inside a rosbag2 folder opens that folder."""
    if path.suffix in (".mcap", ".db3") and (path.parent / "metadata.yaml").is_file():
        path = path.parent
    try:
        reader = AnyReader([path])
        reader.open()
    except FileNotFoundError as error:
        raise UserError(f"cannot open rosbag {path}: {error}") from None
    except Exception as error:  # as in _UntilDamage: a damaged file makes rosbags raise more than its own errors
        raise UserError(f"cannot open rosbag {path}: {_reason(error)}{_repair_hint(path)}") from None
    return reader


def bag_topics(path: Path) -> dict[str, tuple[str, int]]:
    """Every topic of a bag from its metadata (no message is read): topic -> (type as "pkg/Type", message count)."""
    reader = _open(Path(path))
    try:
        topics = sorted(reader.topics.items())
        return {name: (info.msgtype.replace("/msg/", "/"), info.msgcount) for name, info in topics}
    finally:
        reader.close()


def camera_size(path: Path, camera_info_topic: str) -> tuple[int, int] | None:
    """(height, width) pixels of the first valid CameraInfo on a topic of a bag (None: none there)."""
    reader = _open(Path(path))
    try:
        connections = [c for c in reader.connections if c.topic == camera_info_topic and "CameraInfo" in c.msgtype]
        for connection, _, raw in _UntilDamage(reader.messages(connections) if connections else iter(())):
            msg = ros2_camera_info(reader.deserialize(raw, connection.msgtype))
            try:
                validate_camera_info(msg)
            except ValueError:
                continue
            return int(msg.height), int(msg.width)
        return None
    finally:
        reader.close()


class BagDataset(Dataset):
    """Camera frames of one or more bags, unlabeled, with optional projected LiDAR (`sparse_depth`).

    meta: name "<bag>/<stamp ns>", bag (path), stamp_ns, lidar_dt (seconds between image and scan; -1 = no scan).
    """

    def __init__(
        self,
        bags: Sequence[Path | str],
        image_topic: str = DEFAULT_TOPICS["image_topic"],
        camera_info_topic: str = DEFAULT_TOPICS["camera_info_topic"],
        lidar_topic: str | None = DEFAULT_TOPICS["lidar_topic"],
        lidar_extrinsic: Sequence[Sequence[float]] | None = None,
        lidar_tolerance: float = 0.05,
        depth_range: tuple[float, float] = (1e-3, 80.0),
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        self.topics = {"image": image_topic, "camera_info": camera_info_topic, "lidar": lidar_topic}
        self.lidar_tolerance_ns = int(lidar_tolerance * 1e9)
        self.depth_range, self.transform = depth_range, transform
        self.extrinsic = None if lidar_extrinsic is None else _as_extrinsic(lidar_extrinsic)
        self.bags = [self._index(Path(path)) for path in bags]
        self.samples = self._pair()
        self._readers: dict[int, AnyReader] = {}
        self._reader_pid = os.getpid()

    def _index(self, path: Path) -> _BagIndex:
        """Read the bag once: image/cloud stamps and positions, all camera infos and static transforms."""
        index = _BagIndex(path)
        reader = _open(path)
        try:
            roles = self._connections(reader, path)
            roles[TF_STATIC] = [c for c in reader.connections if c.topic == TF_STATIC]
            by_id = {c.id: role for role, connections in roles.items() for c in connections}
            ordinals: Counter = Counter()
            wanted = [c for connections in roles.values() for c in connections]
            expected = sum(c.msgcount for c in wanted)
            messages, undecodable = _UntilDamage(reader.messages(wanted)), 0
            for connection, log_time, raw in tqdm(messages, total=expected, desc=f"indexing {path.name}"):
                role = by_id[connection.id]
                ordinals[role, log_time] += 1
                position = (log_time, ordinals[role, log_time] - 1)
                try:
                    msg = reader.deserialize(raw, connection.msgtype)
                except Exception:  # damaged bytes: rosbags' decoders raise struct/Unicode/Overflow errors too
                    undecodable += 1
                    continue
                self._index_message(index, role, msg, log_time, position)
        finally:
            reader.close()
        self._report_damage(index, expected, messages, undecodable)
        index.images.sort()
        index.infos.sort(key=lambda info: info[0])
        index.clouds.sort()
        return index

    def _report_damage(self, index: _BagIndex, expected: int, messages: _UntilDamage, undecodable: int) -> None:
        """Warn with the count of messages skipped in a damaged bag; a UserError when no image could be read."""
        missing = max(expected - messages.count, 0)
        if messages.damage is None and not missing and not undecodable:
            return
        causes = []
        if messages.damage is not None:
            causes.append(f"reading stopped after {messages.count} messages ({_reason(messages.damage)})")
        elif missing:
            causes.append(f"only {messages.count} of the {expected} messages its metadata lists are there")
        if undecodable:
            causes.append(f"{undecodable} messages do not decode")
        damage = f"rosbag {index.path} is damaged: {'; '.join(causes)}"
        if not index.images:
            raise UserError(f"{damage}; no image on {self.topics['image']!r} is readable{_repair_hint(index.path)}")
        log.warning("%s. Skipped %d of %d messages on the used topics", damage, missing + undecodable, expected)

    def _connections(self, reader: AnyReader, path: Path) -> dict[str, list]:
        """Connections of each configured topic; a clear error when one is absent or of the wrong type."""
        roles = {}
        for role, topic in self.topics.items():
            if topic is None:
                continue
            connections = [c for c in reader.connections if c.topic == topic]
            if not connections:
                listing = ", ".join(f"{name} ({info.msgtype})" for name, info in sorted(reader.topics.items()))
                hint = " (set lidar_topic to null to go without LiDAR)" if role == "lidar" else ""
                raise UserError(f"rosbag {path} has no topic {topic!r} ({role}){hint}; its topics: {listing}")
            msgtype = connections[0].msgtype.replace("/msg/", "/")
            if msgtype not in EXPECTED_TYPES[role]:
                expected = " or ".join(EXPECTED_TYPES[role])
                raise UserError(f"topic {topic!r} in rosbag {path} is {msgtype}, expected {expected}")
            roles[role] = connections
        return roles

    def _index_message(self, index: _BagIndex, role: str, msg: Any, log_time: int, position: tuple) -> None:
        if role == TF_STATIC:
            for item in msg.transforms:
                edge = (_frame(item.header.frame_id), _frame(item.child_frame_id))
                index.tf_edges[edge] = transform_to_matrix(item.transform)
        elif role == "camera_info":
            msg = ros2_camera_info(msg)
            try:
                validate_camera_info(msg)
            except ValueError:
                index.bad_infos += 1
                return
            index.infos.append((_stamp(msg.header, log_time), camera_info_to_P(msg), int(msg.height), int(msg.width)))
        else:
            stamps = index.images if role == "image" else index.clouds
            stamps.append((_stamp(msg.header, log_time), position))
            attribute = "camera_frame" if role == "image" else "lidar_frame"
            setattr(index, attribute, getattr(index, attribute) or _frame(msg.header.frame_id))

    def _pair(self) -> list[tuple[int, int, int, int | None]]:
        """(bag, image, camera info, cloud or None) per usable image; one warning per kind of dropped pairing."""
        samples, no_info, no_cloud = [], 0, 0
        for bag_number, index in enumerate(self.bags):
            if self.topics["lidar"] is not None and self.extrinsic is None and index.clouds:
                self._require_tf(index)
            info_stamps = [info[0] for info in index.infos]
            cloud_stamps = [cloud[0] for cloud in index.clouds]
            for image_number, (stamp, _) in enumerate(index.images):
                info = bisect.bisect_right(info_stamps, stamp) - 1
                if info < 0:
                    no_info += 1
                    continue
                cloud = self._nearest(cloud_stamps, stamp) if self.topics["lidar"] else None
                no_cloud += self.topics["lidar"] is not None and cloud is None
                samples.append((bag_number, image_number, info, cloud))
        if skipped_infos := sum(index.bad_infos for index in self.bags):
            log.warning("rosbag: ignored %d invalid CameraInfo messages (zero size or bad focal length)", skipped_infos)
        if no_info:
            log.warning("rosbag: skipped %d images with no valid CameraInfo at or before their stamp", no_info)
        if no_cloud:
            log.warning("rosbag: %d images have no LiDAR scan within %.3f s", no_cloud, self.lidar_tolerance_ns / 1e9)
        if not samples:
            raise UserError(
                f"no usable images on {self.topics['image']!r} in {', '.join(str(b.path) for b in self.bags)}"
            )
        return samples

    def _require_tf(self, index: _BagIndex) -> None:
        if lookup_transform(index.tf_edges, index.camera_frame, index.lidar_frame) is None:
            raise UserError(
                f"rosbag {index.path}: /tf_static has no transform chain from {index.lidar_frame!r} to "
                f"{index.camera_frame!r}; give lidar_extrinsic (4x4 T_camera_lidar) or lidar_topic: null"
            )

    def _nearest(self, stamps: list[int], stamp: int) -> int | None:
        after = bisect.bisect_left(stamps, stamp)
        candidates = [i for i in (after - 1, after) if 0 <= i < len(stamps)]
        best = min(candidates, key=lambda i: abs(stamps[i] - stamp), default=None)
        return best if best is not None and abs(stamps[best] - stamp) <= self.lidar_tolerance_ns else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        # Open readers hold file handles: DataLoader workers reopen their own.
        return dict(self.__dict__, _readers={})

    def _read(self, bag_number: int, role: str, position: tuple[int, int]) -> Any:
        """Deserialised message of a role's topic at an indexed position."""
        if self._reader_pid != os.getpid():
            self._readers, self._reader_pid = {}, os.getpid()
        if bag_number not in self._readers:
            self._readers[bag_number] = _open(self.bags[bag_number].path)
        reader = self._readers[bag_number]
        connections = [c for c in reader.connections if c.topic == self.topics[role]]
        log_time, ordinal = position
        messages = _UntilDamage(reader.messages(connections, start=log_time, stop=log_time + 1))
        found = next(itertools.islice(messages, ordinal, None), None)
        if found is not None:
            connection, _, raw = found
            try:
                return reader.deserialize(raw, connection.msgtype)
            except Exception as error:  # it decoded while indexing: the file changed since
                messages.damage = error
        path = self.bags[bag_number].path
        if messages.damage is None:
            raise UserError(f"rosbag {path} changed since it was indexed ({role} at {log_time})")
        raise UserError(f"rosbag {path}: cannot read its {role} message at {log_time} ns ({_reason(messages.damage)})")

    def __getitem__(self, number: int) -> dict[str, Any]:
        bag_number, image_number, info_number, cloud_number = self.samples[number]
        index = self.bags[bag_number]
        stamp, position = index.images[image_number]
        image = self._decode_image(self._read(bag_number, "image", position), index.path, stamp)
        _, projection, height, width = index.infos[info_number]
        if image.shape[:2] != (height, width):
            raise UserError(
                f"rosbag {index.path}: image at {stamp} ns is {image.shape[1]}x{image.shape[0]} but its CameraInfo "
                f"says {width}x{height}"
            )
        meta = {"name": f"{index.path.name}/{stamp}", "bag": str(index.path), "stamp_ns": stamp, "lidar_dt": -1.0}
        sparse = None
        if self.topics["lidar"] is not None:
            sparse = np.zeros((height, width), np.float32)
            if cloud_number is not None:
                cloud_stamp, cloud_position = index.clouds[cloud_number]
                sparse = self._project(
                    self._read(bag_number, "lidar", cloud_position), index, projection, (height, width)
                )
                meta["lidar_dt"] = abs(cloud_stamp - stamp) / 1e9
        sample = make_sample(image, None, projection[:, :3], meta, self.depth_range, sparse_depth=sparse)
        return self.transform(sample) if self.transform else sample

    def _decode_image(self, msg: Any, path: Path, stamp: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of an Image or CompressedImage."""
        try:
            return image_msg_to_rgb(msg)
        except ValueError as error:
            raise UserError(f"rosbag {path}: image on {self.topics['image']!r} at {stamp} ns: {error}") from None

    def _project(self, msg: Any, index: _BagIndex, projection: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Sparse depth (H, W) metres of a cloud in the camera."""
        try:
            points = pointcloud2_to_xyz(msg)
        except ValueError as error:
            raise UserError(f"rosbag {index.path}: cloud on {self.topics['lidar']!r}: {error}") from None
        extrinsic = self.extrinsic
        if extrinsic is None:
            extrinsic = lookup_transform(index.tf_edges, index.camera_frame, index.lidar_frame)
        return lidar_to_depth(points, extrinsic, projection, *size)


def _as_extrinsic(values: Sequence[Sequence[float]]) -> np.ndarray:
    """Validate a user-given 4x4 T_camera_lidar."""
    try:
        matrix = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        matrix = np.empty(0)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise UserError(f"lidar_extrinsic must be a finite 4x4 matrix (T_camera_lidar), got {values!r}")
    return matrix
