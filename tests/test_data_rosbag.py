"""Bag loader on the real KITTI rosbag2 in ../shared/data and on small bags written here with rosbags."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from rosbags.highlevel import AnyReader
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Writer2
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from torch.utils.data import DataLoader

from depth_node.codec import pointcloud2_to_xyz
from distill.config import load_data_config
from distill.data import build_dataset
from distill.data.rosbag import (
    DEFAULT_TOPICS,
    BagDataset,
    bag_topics,
    camera_size,
    lookup_transform,
    transform_to_matrix,
)
from distill.data.samples import read_depth_png, read_rgb
from distill.errors import UserError

KITTI_FRAME = "2011_09_26/2011_09_26_drive_0001_sync"
T0 = 1_000_000_000_000_000_000
MS = 1_000_000
TF_MESSAGE = "tf2_msgs/msg/TFMessage"
WIDTH, HEIGHT = 12, 8
K = np.array([[10.0, 0, 5], [0, 10.0, 3], [0, 0, 1]])
CAMERA_POINTS = np.array([[0.0, 0.0, 2.0], [0.4, 0.4, 4.0]])  # land on pixels (5, 3) and (6, 4)
OPTICAL_IN_BASE = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # camera x right, y down, z forward
OPTICAL_QUATERNION = (-0.5, 0.5, -0.5, 0.5)  # x, y, z, w of OPTICAL_IN_BASE


@pytest.fixture(scope="module")
def kitti_bag(shared_data) -> Path:
    return shared_data / "kitti_rosbag2_sample" / "kitti_0001_f5_mcap"


def pose(rotation: np.ndarray, translation: list[float]) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, translation
    return matrix


BASE_FROM_VELO = pose(np.eye(3), [0.0, 0.0, 1.2])
BASE_FROM_CAMERA = pose(OPTICAL_IN_BASE, [0.3, 0.1, 1.0])
CAMERA_FROM_VELO = np.linalg.inv(BASE_FROM_CAMERA) @ BASE_FROM_VELO


class Messages:
    """Builds messages in the typestore of the bag being written (ROS 1 or ROS 2 field names)."""

    def __init__(self, ros1: bool):
        self.ros1 = ros1
        self.store = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
        if ros1:  # the ROS 1 store ships without tf2_msgs
            self.store.register(get_types_from_msg("geometry_msgs/TransformStamped[] transforms", TF_MESSAGE))
        self.types = self.store.types

    def header(self, stamp: int, frame: str):
        time = self.types["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9)
        extra = {"seq": 0} if self.ros1 else {}
        return self.types["std_msgs/msg/Header"](stamp=time, frame_id=frame, **extra)

    def image(self, stamp: int, rgb: np.ndarray, encoding: str, padding: int = 0):
        channels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "mono8": rgb[..., :1]}[encoding]
        rows = np.concatenate([channels.reshape(HEIGHT, -1), np.full((HEIGHT, padding), 77, np.uint8)], axis=1)
        return self.types["sensor_msgs/msg/Image"](
            header=self.header(stamp, "cam"), height=HEIGHT, width=WIDTH, encoding=encoding, is_bigendian=0,
            step=rows.shape[1], data=rows.reshape(-1),
        )  # fmt: skip

    def compressed(self, stamp: int, rgb: np.ndarray):
        data = np.frombuffer(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes(), np.uint8)
        return self.types["sensor_msgs/msg/CompressedImage"](header=self.header(stamp, "cam"), format="png", data=data)

    def camera_info(self, stamp: int):
        p = np.concatenate([K, np.zeros((3, 1))], axis=1).reshape(-1)
        matrices = {"D": np.zeros(5), "K": K.reshape(-1), "R": np.eye(3).reshape(-1), "P": p}
        roi = self.types["sensor_msgs/msg/RegionOfInterest"](
            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False
        )
        return self.types["sensor_msgs/msg/CameraInfo"](
            header=self.header(stamp, "cam"), height=HEIGHT, width=WIDTH, distortion_model="plumb_bob",
            binning_x=0, binning_y=0, roi=roi, **{(k if self.ros1 else k.lower()): v for k, v in matrices.items()},
        )  # fmt: skip

    def cloud(self, stamp: int, points_velo: np.ndarray):
        """Fields stored y, z, x with an intensity and padding between: readers must use the offsets."""
        layout = np.dtype(
            {"names": ["y", "z", "x", "i"], "formats": ["<f4"] * 4, "offsets": [0, 4, 12, 20], "itemsize": 28}
        )
        points = np.zeros(len(points_velo) + 1, layout)
        points["x"][:-1], points["y"][:-1], points["z"][:-1] = points_velo.T
        points["x"][-1] = np.nan  # a no-return point
        field = self.types["sensor_msgs/msg/PointField"]
        fields = [field(name=n, offset=o, datatype=7, count=1) for n, o in (("y", 0), ("z", 4), ("x", 12), ("i", 20))]
        return self.types["sensor_msgs/msg/PointCloud2"](
            header=self.header(stamp, "/velo"), height=1, width=len(points), fields=fields, is_bigendian=False,
            point_step=28, row_step=28 * len(points), data=points.view(np.uint8), is_dense=False,
        )  # fmt: skip

    def tf_static(self, stamp: int):
        t = self.types
        velo = t["geometry_msgs/msg/Transform"](
            translation=t["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=1.2),
            rotation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0),
        )
        x, y, z, w = OPTICAL_QUATERNION
        camera = t["geometry_msgs/msg/Transform"](
            translation=t["geometry_msgs/msg/Vector3"](x=0.3, y=0.1, z=1.0),
            rotation=t["geometry_msgs/msg/Quaternion"](x=x, y=y, z=z, w=w),
        )
        edges = [
            t["geometry_msgs/msg/TransformStamped"](
                header=self.header(stamp, "base"), child_frame_id=child, transform=tf
            )
            for child, tf in (("velo", velo), ("cam", camera))
        ]
        return t["tf2_msgs/msg/TFMessage"](transforms=edges)


def frame_rgb(number: int) -> np.ndarray:
    rgb = np.random.default_rng(number).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return rgb


def write_bag(path: Path, storage: str, image: str = "rgb8", tf: bool = True) -> Path:
    """Three images (the first before any CameraInfo), one cloud 10 ms after the second, one far from the third."""
    build = Messages(ros1=storage == "ros1")
    points_velo = (np.linalg.inv(CAMERA_FROM_VELO)[:3] @ np.c_[CAMERA_POINTS, np.ones(2)].T).T
    image_type = "sensor_msgs/msg/CompressedImage" if image == "compressed" else "sensor_msgs/msg/Image"
    topics = {"/cam/image": image_type, "/cam/info": "sensor_msgs/msg/CameraInfo",
              "/velo": "sensor_msgs/msg/PointCloud2", "/tf_static": "tf2_msgs/msg/TFMessage"}  # fmt: skip
    messages = [("/tf_static", T0, build.tf_static(T0))] if tf else []
    messages.append(("/cam/info", T0 + 10 * MS, build.camera_info(T0 + 10 * MS)))
    for number in range(3):
        stamp = T0 + number * 100 * MS
        msg = build.compressed(stamp, frame_rgb(number)) if image == "compressed" else None
        messages.append(("/cam/image", stamp, msg or build.image(stamp, frame_rgb(number), image, padding=5)))
    messages += [("/velo", T0 + t * MS, build.cloud(T0 + t * MS, points_velo)) for t in (110, 400)]
    if storage == "ros1":
        path = path.with_suffix(".bag")
        writer = Writer1(path)
        serialize = build.store.serialize_ros1
    else:
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        writer = Writer2(path, version=8, storage_plugin=plugin)
        serialize = build.store.serialize_cdr
    with writer:
        connections = {
            topic: writer.add_connection(topic, kind, typestore=build.store) for topic, kind in topics.items()
        }
        for topic, stamp, msg in sorted(messages, key=lambda item: item[1]):
            writer.write(connections[topic], stamp, serialize(msg, topics[topic]))
    return path


def small_dataset(path: Path, **kwargs) -> BagDataset:
    topics = {"image_topic": "/cam/image", "camera_info_topic": "/cam/info", "lidar_topic": "/velo"}
    return BagDataset([path], **{**topics, **kwargs})


def expected_sparse() -> np.ndarray:
    depth = np.zeros((HEIGHT, WIDTH), np.float32)
    depth[3, 5], depth[4, 6] = 2.0, 4.0
    return depth


def test_real_kitti_bag(kitti_bag, shared_data):
    dataset = build_dataset(load_data_config({"kind": "bag", "bags": [str(kitti_bag)]}), "train", augment=False)
    assert len(dataset) == 1
    sample = dataset[0]
    raw = shared_data / "kitti_raw_sample"
    png = read_rgb(raw / KITTI_FRAME / "image_02" / "data" / "0000000005.png")
    assert torch.equal(sample["image"], torch.from_numpy(png).permute(2, 0, 1).float() / 255)
    assert sample["K"][0, 0].item() == pytest.approx(721.5377) and sample["K"][0, 2].item() == pytest.approx(609.5593)
    assert not sample["valid"].any() and not sample["depth"].any()
    sparse = sample["sparse_depth"][0].numpy()
    official = read_depth_png(
        raw / "data_depth_velodyne/train/2011_09_26_drive_0001_sync/proj_depth/velodyne_raw/image_02/0000000005.png",
        1 / 256,
    )
    rows, cols = np.nonzero(sparse)
    assert abs(len(rows) - int((official > 0).sum())) < 400
    window = np.stack([official[np.clip(rows + dr, 0, 374), np.clip(cols + dc, 0, 1241)]
                       for dr in range(-2, 3) for dc in range(-2, 3)])  # fmt: skip
    assert ((window > 0) & (np.abs(window - sparse[rows, cols]) <= 0.3)).any(axis=0).mean() >= 0.90
    assert sample["meta"]["lidar_dt"] == pytest.approx(0.010458532)


def test_real_kitti_bag_cloud_and_compressed_image(kitti_bag):
    with AnyReader([kitti_bag]) as reader:
        connection = next(c for c in reader.connections if c.topic == "/kitti/velo/pointcloud")
        _, _, raw = next(reader.messages([connection]))
        points = pointcloud2_to_xyz(reader.deserialize(raw, connection.msgtype))
    assert points.shape == (121_948, 3) and points.dtype == np.float32
    plain = BagDataset([kitti_bag], lidar_topic=None)[0]
    compressed = BagDataset([kitti_bag], image_topic="/kitti/camera_color_left/image_raw/compressed", lidar_topic=None)
    assert torch.equal(compressed[0]["image"], plain["image"]) and "sparse_depth" not in plain


@pytest.mark.parametrize("storage", ["mcap", "sqlite3", "ros1"])
def test_written_bag_pairs_camera_info_lidar_and_tf(tmp_path, storage, caplog):
    path = write_bag(tmp_path / "bag", storage)
    with caplog.at_level(logging.WARNING, logger="distill.data.rosbag"):
        dataset = small_dataset(path)
    assert len(dataset) == 2  # the first image precedes every CameraInfo
    assert any("skipped 1 images with no valid CameraInfo" in record.getMessage() for record in caplog.records)
    first, second = dataset[0], dataset[1]
    assert torch.equal(first["image"], torch.from_numpy(frame_rgb(1)).permute(2, 0, 1).float() / 255)
    assert first["K"].numpy() == pytest.approx(K)
    assert np.allclose(first["sparse_depth"][0].numpy(), expected_sparse(), atol=1e-5)
    assert first["meta"]["lidar_dt"] == pytest.approx(0.01) and first["meta"]["stamp_ns"] == T0 + 100 * MS
    assert not second["sparse_depth"].any() and second["meta"]["lidar_dt"] == -1.0
    assert not first["valid"].any()


@pytest.mark.parametrize("image", ["bgr8", "mono8", "compressed"])
def test_image_encodings(tmp_path, image):
    sample = small_dataset(write_bag(tmp_path / "bag", "mcap", image=image), lidar_topic=None)[0]
    rgb = frame_rgb(1)
    expected = np.repeat(rgb[..., :1], 3, axis=2) if image == "mono8" else rgb
    assert torch.equal(sample["image"], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


def test_extrinsic_from_config_and_missing_tf(tmp_path):
    path = write_bag(tmp_path / "bag", "mcap", tf=False)
    with pytest.raises(UserError, match="no transform chain from 'velo' to 'cam'"):
        small_dataset(path)
    sample = small_dataset(path, lidar_extrinsic=CAMERA_FROM_VELO.tolist())[0]
    assert np.allclose(sample["sparse_depth"][0].numpy(), expected_sparse(), atol=1e-5)
    with pytest.raises(UserError, match="4x4"):
        small_dataset(path, lidar_extrinsic=[[1, 0], [0, 1]])


def test_dataloader_workers_reopen_the_bag(tmp_path):
    dataset = small_dataset(write_bag(tmp_path / "bag", "sqlite3"))
    dataset[0]  # opens a reader in this process; workers must not reuse it
    batches = list(DataLoader(dataset, batch_size=2, num_workers=1))
    assert batches[0]["sparse_depth"].shape == (2, 1, HEIGHT, WIDTH)
    assert batches[0]["meta"]["stamp_ns"].tolist() == [T0 + 100 * MS, T0 + 200 * MS]


def test_bad_bags_are_user_errors(tmp_path):
    path = write_bag(tmp_path / "bag", "mcap")
    with pytest.raises(UserError, match=r"no topic '/camera/image'.*/cam/info \(sensor_msgs/msg/CameraInfo\)"):
        small_dataset(path, image_topic="/camera/image")
    with pytest.raises(UserError, match="no topic '/lidar' .*set lidar_topic to null"):
        small_dataset(path, lidar_topic="/lidar")
    with pytest.raises(UserError, match="is sensor_msgs/CameraInfo, expected sensor_msgs/Image"):
        small_dataset(path, image_topic="/cam/info")
    with pytest.raises(UserError, match=f"cannot open rosbag {tmp_path / 'absent'}"):
        small_dataset(tmp_path / "absent")
    with pytest.raises(UserError, match="bags must list"):
        build_dataset(load_data_config({"kind": "bag", "bags": []}), "train", augment=False)


def test_truncated_image_message_is_a_user_error(tmp_path):
    build = Messages(ros1=False)
    msg = build.image(T0, frame_rgb(0), "rgb8")
    msg.data = msg.data[:-10]
    path = tmp_path / "bag"
    with Writer2(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        image = writer.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=build.store)
        info = writer.add_connection("/cam/info", "sensor_msgs/msg/CameraInfo", typestore=build.store)
        writer.write(info, T0, build.store.serialize_cdr(build.camera_info(T0), "sensor_msgs/msg/CameraInfo"))
        writer.write(image, T0, build.store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    with pytest.raises(UserError, match=f"rosbag {path}: image on '/cam/image'"):
        small_dataset(path, lidar_topic=None)[0]


def test_tf_helpers():
    rotation = SimpleNamespace(**dict(zip("xyzw", OPTICAL_QUATERNION)))
    matrix = transform_to_matrix(SimpleNamespace(translation=SimpleNamespace(x=1, y=2, z=3), rotation=rotation))
    assert np.allclose(matrix, pose(OPTICAL_IN_BASE, [1, 2, 3]))
    edges = {("base", "velo"): BASE_FROM_VELO, ("base", "cam"): BASE_FROM_CAMERA}
    assert np.allclose(lookup_transform(edges, "cam", "velo"), CAMERA_FROM_VELO)
    assert lookup_transform(edges, "cam", "radar") is None


def test_bag_kind_defaults_are_the_readers_topics():
    data = load_data_config({"kind": "bag", "bags": ["a.bag"]})
    assert {key: getattr(data, key) for key in DEFAULT_TOPICS} == DEFAULT_TOPICS


def test_holdout_every_splits_the_frames_and_metadata_helpers(tmp_path):
    path = write_bag(tmp_path / "log", "mcap")
    topics = {"image_topic": "/cam/image", "camera_info_topic": "/cam/info", "lidar_topic": "/velo"}
    data = load_data_config({"kind": "bag", "bags": [str(path)], "holdout_every": 2, **topics})
    train, held_out = (build_dataset(data, split, augment=False) for split in ("train", "test"))
    names = [[sample["meta"]["name"] for sample in split] for split in (train, held_out)]
    every = [sample["meta"]["name"] for sample in small_dataset(path)]  # the first image has no CameraInfo yet
    assert names == [every[0::2], every[1::2]] and len(every) == 2
    with pytest.raises(UserError, match="holdout_every=3: the bags have 2 frames"):
        build_dataset(load_data_config({**data.model_dump(), "holdout_every": 3}), "test", augment=False)
    assert bag_topics(path)["/cam/image"] == ("sensor_msgs/Image", 3)
    assert bag_topics(path)["/velo"] == ("sensor_msgs/PointCloud2", 2)
    assert camera_size(path, "/cam/info") == (HEIGHT, WIDTH) and camera_size(path, "/velo") is None
