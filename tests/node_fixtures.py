"""Shared parts of the depth-node tests: real models, message builders and a probe node for real rclpy graphs.

Models: `ramp_model` writes a real ONNX graph whose depth is known in closed form (depth = scale * red01 + offset,
red01 the de-normalised red channel in [0, 1]), so pixel values, REP 117 states and LiDAR alignment can be checked
exactly; `exported_student` exports a random-init EfficientNet-B0 student with `distill export` once per session,
`exported_int8_student` a tiny MobileNetV2 one and its static INT8 version.
Graph: `Probe` publishes camera frames / clouds with reliable QoS and records every output by header stamp;
`spin_until` re-publishes until a condition holds, with a deadline (discovery takes a variable time).
"""

from __future__ import annotations

import ast
import functools
import struct
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from depth_node.codec import ROS_TYPES, make_pointcloud2
from depth_node.image_codec import image_to_numpy, numpy_to_image_fields
from depth_node.metadata import METADATA_KEY, ModelMetadata
from depth_node.topics import KITTI_CAMERA, OUTPUTS

PACKAGE = Path(__file__).resolve().parents[1] / "ros2_ws" / "src" / "depth_node"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STUDENT_SIZE = (64, 192)


def ramp_model(path: Path, size=(48, 64), kind="metric", scale=1.0, offset=1.0, depth_range=(0.5, 3.0)) -> Path:
    """A real ONNX model with depth = scale * red01 + offset (no bins), `kind` as its output_kind."""

    def const(name: str, value, dtype=TensorProto.FLOAT) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [1], [value]))

    nodes = [
        const("start", 0, TensorProto.INT64),
        const("end", 1, TensorProto.INT64),
        const("axis", 1, TensorProto.INT64),
        helper.make_node("Slice", ["image", "start", "end", "axis"], ["red_n"]),
        const("std", STD[0]),
        const("mean", MEAN[0]),
        helper.make_node("Mul", ["red_n", "std"], ["red_s"]),
        helper.make_node("Add", ["red_s", "mean"], ["red01"]),
        const("scale", float(scale)),
        const("offset", float(offset)),
        helper.make_node("Mul", ["red01", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["depth"]),
    ]
    dims = [1, 3, *size]
    graph = helper.make_graph(
        nodes,
        "ramp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, *size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(
        input_size=size,
        mean=MEAN,
        std=STD,
        min_depth=depth_range[0],
        max_depth=depth_range[1],
        output_kind=kind,
        arch="ramp",
    )
    model.metadata_props.add(key=METADATA_KEY, value=meta.to_json())
    onnx.save(model, str(path))
    return path


def exported_student(tmp_path_factory) -> Path:
    """A random-init EfficientNet-B0 student exported to ONNX at STUDENT_SIZE, once per test session."""
    out = tmp_path_factory.getbasetemp() / "exported_student"
    path = out / f"efficientnet_b0_{STUDENT_SIZE[0]}x{STUDENT_SIZE[1]}.onnx"
    if not path.is_file():
        import torch

        from distill.models import build_student
        from distill.verbs.export import export_onnx

        torch.manual_seed(0)
        out.mkdir(parents=True, exist_ok=True)
        model = build_student("efficientnet_b0", bins=16).eval()
        path, _ = export_onnx(model, out, STUDENT_SIZE, dynamic=False, opset=17, config={"test": "node"})
    return path


def exported_int8_student(tmp_path_factory) -> tuple[Path, Path]:
    """(FP32, INT8) ONNX files of a tiny random-init MobileNetV2 student (decoder 16, 16 bins) at STUDENT_SIZE, the
    INT8 one made by `distill.verbs.quantize.quantize_int8` from smooth images; once per test session."""
    out = tmp_path_factory.getbasetemp() / "exported_int8_student"
    fp32 = out / f"mobilenetv2_100_{STUDENT_SIZE[0]}x{STUDENT_SIZE[1]}.onnx"
    int8 = fp32.with_name(f"{fp32.stem}_int8.onnx")
    if not int8.is_file():
        import torch

        from distill.models import build_student
        from distill.verbs.export import export_onnx
        from distill.verbs.parity import smooth_random_image
        from distill.verbs.quantize import quantize_int8

        torch.manual_seed(0)
        model = build_student("mobilenetv2_100", bins=16, decoder_width=16).eval()
        fp32, _ = export_onnx(model, out, STUDENT_SIZE, dynamic=False, opset=17, config={"test": "node int8"})
        quantize_int8(fp32, int8, [smooth_random_image((96, 288), seed) for seed in range(4)])
    return fp32, int8


# --- messages ----------------------------------------------------------------------------------------------------
def ramp_image(height: int, width: int, low: int = 0, high: int = 255) -> np.ndarray:
    """(H, W, 3) uint8 RGB whose red channel ramps from `low` (left) to `high` (right); green ramps downwards."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.rint(np.linspace(low, high, width))[None, :]
    image[..., 1] = np.rint(np.linspace(0, 255, height))[:, None]
    image[..., 2] = 90
    return image


def surface_scan(truth: np.ndarray, K, T_cam_lidar, stride: int = 3, outliers: float = 0.1, seed: int = 0):
    """(N, 3) float32 LiDAR-frame points on a surface of known depth, one per stride-th pixel; a fraction corrupted.

    Args:
        truth: (H, W) metres along the optical axis at each pixel of a camera with intrinsics K (3, 3).
        T_cam_lidar: (4, 4) LiDAR -> camera transform; the points are returned in the LiDAR frame.
        outliers: fraction of points pushed 30-80 % farther along their ray (see-through, mixed returns).
    """
    rows, cols = np.mgrid[0 : truth.shape[0] : stride, 0 : truth.shape[1] : stride]
    z = truth[rows, cols].ravel()
    camera = np.stack([(cols.ravel() - K[0, 2]) * z / K[0, 0], (rows.ravel() - K[1, 2]) * z / K[1, 1], z], axis=1)
    rng = np.random.default_rng(seed)
    corrupt = rng.random(len(camera)) < outliers
    camera[corrupt] *= rng.uniform(1.3, 1.8, (corrupt.sum(), 1))
    homogeneous = np.concatenate([camera, np.ones((len(camera), 1))], axis=1)
    return (homogeneous @ np.linalg.inv(T_cam_lidar).T)[:, :3].astype(np.float32)


def make_header(stamp_ns: int, frame_id: str):
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    return Header(stamp=Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000), frame_id=frame_id)


def image_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera_optical", encoding: str = "rgb8"):
    from sensor_msgs.msg import Image

    fields = numpy_to_image_fields(rgb, encoding)
    return Image(header=make_header(stamp_ns, frame_id), **fields)


def camera_info_msg(K: np.ndarray, width: int, height: int, stamp_ns: int, frame_id: str = "camera_optical"):
    from sensor_msgs.msg import CameraInfo

    K = np.asarray(K, dtype=np.float64)
    P = np.concatenate([K, np.zeros((3, 1))], axis=1)
    return CameraInfo(
        header=make_header(stamp_ns, frame_id),
        width=width,
        height=height,
        distortion_model="plumb_bob",
        d=[0.0] * 5,
        k=K.reshape(-1).tolist(),
        r=np.eye(3).reshape(-1).tolist(),
        p=P.reshape(-1).tolist(),
    )


def cloud_msg(points: np.ndarray, stamp_ns: int, frame_id: str = "lidar"):
    """Unorganised PointCloud2 (height 1) of (N, 3) float32 points."""
    points = np.asarray(points, np.float32).reshape(1, -1, 3)
    return make_pointcloud2(make_header(stamp_ns, frame_id), points)


def depth_array(msg) -> np.ndarray:
    """32FC1 Image -> (H, W) float32 copy."""
    return np.array(image_to_numpy(msg), dtype=np.float32)


def assert_cloud_is_backprojection(depth_msg, info_msg, points_msg, stride: int = 1) -> int:
    """Every finite point equals the back-projection of its depth pixel with the published P; NaN elsewhere.

    Returns the number of finite points.
    """
    depth = depth_array(depth_msg)[::stride, ::stride]
    P = np.asarray(info_msg.p, np.float64).reshape(3, 4)
    fx, fy, cx, cy = P[0, 0], P[1, 1], P[0, 2], P[1, 2]
    assert (points_msg.height, points_msg.width) == depth.shape
    xyz = _organised_xyz(points_msg)
    rows, cols = np.mgrid[0 : depth.shape[0], 0 : depth.shape[1]]
    u, v = cols * stride, rows * stride
    valid = np.isfinite(depth) & (depth > 0)
    assert np.isnan(xyz[~valid]).all(), "invalid depth pixels must give NaN points"
    z = depth[valid]
    np.testing.assert_allclose(xyz[valid][:, 2], z, rtol=1e-6)
    np.testing.assert_allclose(xyz[valid][:, 0], (u[valid] - cx) * z / fx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xyz[valid][:, 1], (v[valid] - cy) * z / fy, rtol=1e-5, atol=1e-5)
    return int(valid.sum())


def _organised_xyz(msg) -> np.ndarray:
    """(H, W, 3) float32 x, y, z of an organised cloud, NaN kept."""
    offsets = {f.name: f.offset for f in msg.fields}
    raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.row_step)
    raw = raw[:, : msg.width * msg.point_step].reshape(msg.height, msg.width, msg.point_step)
    return np.stack([raw[..., offsets[n] : offsets[n] + 4].copy().view("<f4")[..., 0] for n in "xyz"], axis=-1)


# --- decompression bombs ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A real, valid PNG of width x height black 8-bit grey pixels: zlib shrinks the rows ~1000x, so 12000x12000
    (144 MP, 432 MB once decoded to BGR) takes ~140 KB. With `rows`, only that many rows are stored (cut short)."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + width)  # filter type 0, then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def jpeg_bomb(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare width x height: libjpeg would allocate
    the whole declared image before finding the data too short."""
    import cv2

    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# --- graph ---------------------------------------------------------------------------------------------------------
class Probe:
    """A test node on its own executor thread: publishes inputs (reliable) and records outputs by stamp.

    Attributes:
        received: topic -> {stamp_ns: message} for every output topic subscribed.
        logs: (level, logger name, text) of every /rosout message (a node's logger name is "<namespace>.<name>").
    """

    def __init__(self, context, names: dict[str, str] | None = None, extra_nodes=(), namespace: str = ""):
        from rcl_interfaces.msg import Log
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2

        from depth_node.node import DiagnosticArray

        self.node = Node("probe", namespace=namespace, context=context)
        names = names or {}
        self.names = {topic: names.get(topic, topic) for topic in ("image", "camera_info", "lidar", *OUTPUTS)}
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_image = self.node.create_publisher(Image, self.names["image"], reliable)
        self.pub_info = self.node.create_publisher(CameraInfo, self.names["camera_info"], reliable)
        self.pub_lidar = self.node.create_publisher(PointCloud2, self.names["lidar"], reliable)
        self.received: dict[str, dict[int, object]] = defaultdict(dict)
        self.logs: list[tuple[int, str, str]] = []
        self.diagnostics: list = []
        self._lock = threading.Lock()
        for topic, kind in OUTPUTS.items():
            self.node.create_subscription(ROS_TYPES[kind], self.names[topic], self._recorder(topic), reliable)
        self.node.create_subscription(Log, "/rosout", lambda m: self.logs.append((m.level, m.name, m.msg)), reliable)
        self.node.create_subscription(DiagnosticArray, "diagnostics", self.diagnostics.append, reliable)
        self.executor = MultiThreadedExecutor(num_threads=3, context=context)
        for node in (self.node, *extra_nodes):
            self.executor.add_node(node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def _recorder(self, topic: str) -> Callable:
        def record(msg) -> None:
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            with self._lock:
                self.received[topic][stamp] = msg

        return record

    def get(self, topic: str, stamp_ns: int):
        with self._lock:
            return self.received[topic].get(stamp_ns)

    def publish_frame(self, rgb: np.ndarray, info, stamp_ns: int, frame_id: str = "camera_optical", **image_kwargs):
        """camera_info (re-stamped) then the image, both with stamp_ns."""
        info.header = make_header(stamp_ns, frame_id)
        self.pub_info.publish(info)
        self.pub_image.publish(image_msg(rgb, stamp_ns, frame_id, **image_kwargs))

    def warnings(self, text: str, logger: str | None = None) -> list[str]:
        """Warnings and worse containing `text`, from every node or from the one with this logger name."""
        return [m for level, name, m in list(self.logs) if level >= 30 and text in m and logger in (None, name)]

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()


def spin_until(
    condition: Callable[[], bool], action: Callable[[], None] | None = None, timeout: float = 30.0, period: float = 0.2
) -> None:
    """Run `action` every `period` s until `condition()` holds; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        if action is not None:
            action()
        end = time.monotonic() + period
        while time.monotonic() < end and not condition():
            time.sleep(0.01)


# --- the real KITTI frame --------------------------------------------------------------------------------------------
KITTI_BAG = Path("kitti_rosbag2_sample") / "kitti_0001_f5_mcap"


def kitti_messages(shared_data: Path) -> dict[str, object]:
    """topic -> the (only) message of the real KITTI rosbag2 sample, as rosbags messages."""
    from rosbags.highlevel import AnyReader

    with AnyReader([shared_data / KITTI_BAG]) as reader:
        return {c.topic: reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages()}


def kitti_frame(shared_data: Path):
    """(rgb (375, 1242, 3) uint8, rclpy CameraInfo) of the real KITTI frame."""
    from depth_node.image_codec import to_rgb

    messages = kitti_messages(shared_data)
    info = messages[f"{KITTI_CAMERA}/camera_info"]
    return np.array(to_rgb(messages[f"{KITTI_CAMERA}/image_raw"])), camera_info_msg(
        np.reshape(info.k, (3, 3)), int(info.width), int(info.height), 0, "camera_color_left"
    )


# --- the ament package ---------------------------------------------------------------------------------------------
def setup_keyword(name: str):
    """A literal keyword argument of the setup() call in setup.py."""
    tree = ast.parse((PACKAGE / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))
