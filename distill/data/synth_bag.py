"""A drive as a rosbag2 with the kitti2bag topics, written with `rosbags` (typestore ROS 2 Humble, bag version 8).

Conventions follow the real KITTI sample bag (shared/data/kitti_rosbag2_sample/SOURCE.txt): camera_color_left is the
rectified camera-2 optical frame; its offset from rectified camera 0 (the last column of P_rect_02) is folded into the
static transform velo_link -> camera_color_left, so CameraInfo.P = [K | 0] and pixel = K @ T_cam_velo @ X_velo.

The vehicle's motion is on /tf (REP 105): odom -> base_link per frame, stamped like the frame, odom being base_link's
pose at the first frame; base_link lies on the road under the Velodyne (static base_link -> velo_link on /tf_static).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from distill.data.synth_calib import Rig

IMAGE_TOPIC = "/kitti/camera_color_left/image_raw"
CAMERA_INFO_TOPIC = "/kitti/camera_color_left/camera_info"
CLOUD_TOPIC = "/kitti/velo/pointcloud"
TF_STATIC_TOPIC, TF_TOPIC = "/tf_static", "/tf"
CAMERA_FRAME, VELO_FRAME = "camera_color_left", "velo_link"
ODOM_FRAME, BASE_FRAME = "odom", "base_link"
_FOREVER = QosTime(sec=2147483647, nsec=4294967295)


def _qos(depth: int, durability: QosDurability) -> Qos:
    return Qos(QosHistory.KEEP_LAST, depth, QosReliability.RELIABLE, durability, _FOREVER, _FOREVER,
               QosLiveliness.AUTOMATIC, _FOREVER, False)  # fmt: skip


def quaternion(rotation: np.ndarray) -> np.ndarray:
    """(x, y, z, w) unit quaternion of a (3, 3) rotation matrix, w >= 0."""
    m = np.asarray(rotation, np.float64)
    w = np.sqrt(max(0.0, 1.0 + m[0, 0] + m[1, 1] + m[2, 2])) / 2
    x = np.sqrt(max(0.0, 1.0 + m[0, 0] - m[1, 1] - m[2, 2])) / 2
    y = np.sqrt(max(0.0, 1.0 - m[0, 0] + m[1, 1] - m[2, 2])) / 2
    z = np.sqrt(max(0.0, 1.0 - m[0, 0] - m[1, 1] + m[2, 2])) / 2
    # Signs from the off-diagonal terms, relative to the largest component (numerically safest).
    q = np.array([x, y, z, w])
    largest = int(np.argmax(q))
    pairs = {(0, 1): m[1, 0] + m[0, 1], (0, 2): m[0, 2] + m[2, 0], (1, 2): m[2, 1] + m[1, 2],
             (0, 3): m[2, 1] - m[1, 2], (1, 3): m[0, 2] - m[2, 0], (2, 3): m[1, 0] - m[0, 1]}  # fmt: skip
    for other in range(4):
        if other != largest:
            q[other] = np.copysign(q[other], pairs[tuple(sorted((largest, other)))])
    return q if q[3] >= 0 else -q


class DriveBag:
    """Writes one drive's frames to a new rosbag2 folder `path` ("mcap" or "sqlite3" storage). Use as a context."""

    def __init__(self, path: Path, storage: str, rig: Rig):
        self.typestore = get_typestore(Stores.ROS2_HUMBLE)
        self.types = self.typestore.types
        plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
        self.writer = Writer(path, version=8, storage_plugin=plugin)
        self.rig = rig
        self.connections: dict[str, object] = {}

    def __enter__(self) -> DriveBag:
        self.writer.open()
        volatile = _qos(10, QosDurability.VOLATILE)
        for topic, msgtype, qos in (
            (TF_STATIC_TOPIC, "tf2_msgs/msg/TFMessage", _qos(1, QosDurability.TRANSIENT_LOCAL)),
            (TF_TOPIC, "tf2_msgs/msg/TFMessage", _qos(100, QosDurability.VOLATILE)),
            (CLOUD_TOPIC, "sensor_msgs/msg/PointCloud2", volatile),
            (CAMERA_INFO_TOPIC, "sensor_msgs/msg/CameraInfo", volatile),
            (IMAGE_TOPIC, "sensor_msgs/msg/Image", volatile),
        ):
            self.connections[topic] = self.writer.add_connection(
                topic, msgtype, typestore=self.typestore, offered_qos_profiles=[qos]
            )
        return self

    def __exit__(self, *exc_info) -> None:
        self.writer.close()

    def _write(self, topic: str, stamp_ns: int, message) -> None:
        connection = self.connections[topic]
        self.writer.write(connection, stamp_ns, self.typestore.serialize_cdr(message, connection.msgtype))

    def _header(self, stamp_ns: int, frame_id: str):
        stamp = self.types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
        return self.types["std_msgs/msg/Header"](stamp=stamp, frame_id=frame_id)

    def _transform(self, stamp_ns: int, parent: str, child: str, rotation: np.ndarray, translation: np.ndarray):
        """A TransformStamped: the pose (rotation (3, 3), translation (3,) metres) of `child` in `parent`."""
        t = self.types
        qx, qy, qz, qw = quaternion(rotation)
        transform = t["geometry_msgs/msg/Transform"](
            translation=t["geometry_msgs/msg/Vector3"](*(float(value) for value in translation)),
            rotation=t["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw),
        )
        return t["geometry_msgs/msg/TransformStamped"](
            header=self._header(stamp_ns, parent), child_frame_id=child, transform=transform
        )

    def write_static_transform(self, stamp_ns: int) -> None:
        """velo_link -> camera_color_left (the pose of the rectified camera 2 in the Velodyne frame), then
        base_link -> velo_link (the Velodyne `velo_height` metres above base_link)."""
        camera = self._transform(stamp_ns, VELO_FRAME, CAMERA_FRAME, *self.rig.camera_pose_in_velo())
        velo = self._transform(stamp_ns, BASE_FRAME, VELO_FRAME, np.eye(3), np.array([0.0, 0.0, self.rig.velo_height]))
        self._write(TF_STATIC_TOPIC, stamp_ns, self.types["tf2_msgs/msg/TFMessage"](transforms=[camera, velo]))

    def write_odometry(self, stamp_ns: int, pose: np.ndarray) -> None:
        """odom -> base_link at `stamp_ns`: the (4, 4) rigid pose of base_link in odom (metres)."""
        stamped = self._transform(stamp_ns, ODOM_FRAME, BASE_FRAME, pose[:3, :3], pose[:3, 3])
        self._write(TF_TOPIC, stamp_ns, self.types["tf2_msgs/msg/TFMessage"](transforms=[stamped]))

    def write_frame(self, stamp_ns: int, image: np.ndarray, points: np.ndarray) -> None:
        """One frame: image (H, W, 3) uint8 RGB, its CameraInfo, and the scan (N, 4) float32 x, y, z, intensity."""
        t = self.types
        height, width = image.shape[:2]
        K = self.rig.K
        P = np.concatenate([K, np.zeros((3, 1))], axis=1)
        roi = t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        info = t["sensor_msgs/msg/CameraInfo"](
            header=self._header(stamp_ns, CAMERA_FRAME), height=height, width=width, distortion_model="plumb_bob",
            d=np.zeros(5), k=K.ravel(), r=np.eye(3).ravel(), p=P.ravel(), binning_x=0, binning_y=0, roi=roi,
        )  # fmt: skip
        self._write(CAMERA_INFO_TOPIC, stamp_ns, info)
        message = t["sensor_msgs/msg/Image"](
            header=self._header(stamp_ns, CAMERA_FRAME), height=height, width=width, encoding="rgb8",
            is_bigendian=0, step=3 * width, data=np.ascontiguousarray(image).reshape(-1),
        )  # fmt: skip
        self._write(IMAGE_TOPIC, stamp_ns, message)
        fields = [t["sensor_msgs/msg/PointField"](name=name, offset=4 * index, datatype=7, count=1)
                  for index, name in enumerate(("x", "y", "z", "intensity"))]  # fmt: skip
        cloud = t["sensor_msgs/msg/PointCloud2"](
            header=self._header(stamp_ns, VELO_FRAME), height=1, width=len(points), fields=fields,
            is_bigendian=False, point_step=16, row_step=16 * len(points),
            data=np.ascontiguousarray(points, dtype=np.float32).view(np.uint8).reshape(-1), is_dense=True,
        )  # fmt: skip
        self._write(CLOUD_TOPIC, stamp_ns, cloud)
