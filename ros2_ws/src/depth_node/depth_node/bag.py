"""`depth_node_bag IN_BAG OUT_BAG --model M [--params-file config/kitti.yaml] [-p NAME:=VALUE ...]`

The live node's pipeline, offline over a recorded bag: rosbag2 (sqlite3 or mcap) or ROS 1, read with `rosbags`.
Writes a new mcap (rosbag2) holding every original topic (ROS 1 messages converted as `rosbags-convert` does) plus
`/depth` (or `/depth/relative`), `/depth/camera_info`, `/points`, `/depth/confidence` and, with LiDAR,
`/depth/mono`, stamped like the images. Foxglove and `ros2 bag play` open it. No rclpy needed.

Parameters are the node's (depth_node.params), from the same params file; with use_lidar each image is paired with
the scan nearest in stamp within lidar_max_dt, exactly as the node does (use_tf takes the extrinsic from the bag's
/tf_static).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from rosbags.convert.converter import create_connections_converters
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from depth_node import conversions, params
from depth_node.geometry import lookup_transform, pointcloud2_to_xyz, transform_to_matrix
from depth_node.memory import reuse_large_buffers
from depth_node.metadata import ModelLoadError
from depth_node.pipeline import DepthPipeline, FrameResult, StampBuffer, build_pipeline

KITTI_CAMERA = "/kitti/camera_color_left"
KITTI_LIDAR = "/kitti/velo/pointcloud"
IMAGE = "sensor_msgs/msg/Image"
OUTPUTS = {
    "/depth": IMAGE,
    "/depth/relative": IMAGE,
    "/depth/mono": IMAGE,
    "/depth/confidence": IMAGE,
    "/depth/camera_info": "sensor_msgs/msg/CameraInfo",
    "/points": "sensor_msgs/msg/PointCloud2",
}
HOLD_SLACK_S = 0.1  # how much later than its stamp window a scan may be logged (recording latency)


@dataclass
class BagSummary:
    """What a run did: frames processed, warnings (reason -> count), aligned to LiDAR, per-topic messages written."""

    frames: int = 0
    warnings: Counter = field(default_factory=Counter)
    aligned: int = 0
    written: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)


class OutputBag:
    """An mcap bag with the input's connections copied (converted from ROS 1 if needed) and the depth outputs added."""

    def __init__(self, path: Path, reader: AnyReader):
        if path.exists():
            raise ValueError(f"output bag {path} already exists (rosbag2 writers never overwrite)")
        # ROS 2 types for every topic: a ROS 2 bag's own definitions over Humble's (copies stay byte-identical and each
        # type has one definition in the output); ROS 1 messages are converted to them as rosbags-convert does.
        self.typestore = get_typestore(Stores.ROS2_HUMBLE)
        if reader.is2:
            self.typestore.register(reader.typestore.fielddefs)
        self.writer = Writer(path, version=8, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        copied = [c for c in reader.connections if c.topic not in OUTPUTS]  # outputs of an earlier run are replaced
        self._connections, self._converters = create_connections_converters(copied, self.typestore, reader, self.writer)
        self._outputs: dict[str, object] = {}

    def copy(self, connection, timestamp: int, rawdata: bytes) -> None:
        target = self._connections.get((connection.id, connection.owner))
        if target is not None:
            self.writer.write(target, timestamp, self._converters[connection.msgtype](rawdata))

    def write(self, topic: str, timestamp: int, message) -> None:
        if topic not in self._outputs:
            self._outputs[topic] = self.writer.add_connection(topic, OUTPUTS[topic], typestore=self.typestore)
        self.writer.write(self._outputs[topic], timestamp, self.typestore.serialize_cdr(message, OUTPUTS[topic]))

    def __enter__(self) -> OutputBag:
        return self

    def __exit__(self, *exc_info) -> None:
        self.writer.close()


class BagRun:
    """The per-message state of one run: latest camera_info, recent scans, /tf_static, images not yet processed."""

    def __init__(self, pipeline: DepthPipeline, out: OutputBag, values: dict):
        self.pipeline, self.out, self.params = pipeline, out, values
        self.types = out.typestore.types
        self.info = None
        self.clouds = StampBuffer(size=10)
        self.tf_edges: dict[tuple[str, str], np.ndarray] = {}
        self.pending: deque = deque()
        self.hold_ns = int((values["lidar_max_dt"] + HOLD_SLACK_S) * 1e9) if values["use_lidar"] else 0
        self.summary = BagSummary()

    def handle(self, role: str, message, timestamp: int) -> None:
        if role == "camera_info":
            self.info = conversions.ros2_camera_info(message)
        elif role == "lidar":
            self.clouds.add(stamp_ns(message.header), message)
        elif role == "tf":
            for transform in message.transforms:
                self.tf_edges[(transform.header.frame_id, transform.child_frame_id)] = transform_to_matrix(
                    transform.transform
                )
        else:
            self.pending.append((timestamp, message))

    def flush(self, now: int | None) -> None:
        """Process held images once a message logged later than their scan-pairing window arrives (all when None).

        Holding an image until then also pairs it with a camera_info logged at the same time but after it.
        """
        while self.pending and (now is None or now - self.pending[0][0] > self.hold_ns):
            self._process(*self.pending.popleft())

    def _process(self, timestamp: int, message) -> None:
        start, info = time.perf_counter(), self.info
        if info is None:
            self._warn("image skipped: no camera_info before it")
            return
        try:
            conversions.validate_camera_info(info)
            rgb = conversions.image_msg_to_rgb(message)
        except ValueError as error:
            self._warn(f"image skipped: {error}")
            return
        if (int(info.width), int(info.height)) != (rgb.shape[1], rgb.shape[0]):
            info = conversions.scale_camera_info(info, rgb.shape[1], rgb.shape[0])
        points, transform = self._paired_cloud(message.header) if self.params["use_lidar"] else (None, None)
        result = self.pipeline.process(rgb, conversions.camera_info_to_P(info), points, transform)
        self._write(timestamp, self._header(message.header), info, result)
        self.summary.latencies_ms.append((time.perf_counter() - start) * 1e3)
        self.summary.frames += 1
        self.summary.aligned += bool(result.alignment is not None and result.alignment.ok)

    def _paired_cloud(self, header) -> tuple[np.ndarray | None, np.ndarray | None]:
        cloud, _ = self.clouds.nearest(stamp_ns(header), self.params["lidar_max_dt"])
        if cloud is None:
            self._warn(f"no LiDAR scan within lidar_max_dt = {self.params['lidar_max_dt']} s: frame not aligned")
            return None, None
        try:
            points = pointcloud2_to_xyz(cloud)
        except ValueError as error:
            self._warn(f"LiDAR scan unusable: {error}")
            return None, None
        if not self.params["use_tf"]:
            return points, None
        transform = lookup_transform(self.tf_edges, header.frame_id, cloud.header.frame_id)
        if transform is None:
            self._warn(f"/tf_static has no {cloud.header.frame_id} -> {header.frame_id}: used lidar_to_camera")
        return points, transform

    def _write(self, timestamp: int, header, info, result: FrameResult) -> None:
        images = {
            "/depth" if result.metric else "/depth/relative": result.depth,
            "/depth/mono": result.mono,
            "/depth/confidence": result.confidence,
        }
        for topic, image in images.items():
            if image is not None:
                self._emit(topic, timestamp, self._image(header, image))
        self._emit("/depth/camera_info", timestamp, self._camera_info(header, info))
        if result.cloud is not None:
            self._emit("/points", timestamp, self._cloud(header, result))

    def _emit(self, topic: str, timestamp: int, message) -> None:
        self.out.write(topic, timestamp, message)
        self.summary.written[topic] += 1

    def _warn(self, reason: str) -> None:
        """Print a warning the first time it happens; the summary counts them all."""
        if reason not in self.summary.warnings:
            tqdm.write(f"depth_node_bag: warning: {reason}")
        self.summary.warnings[reason] += 1

    # --- ROS 2 messages for the outputs ----------------------------------------------------------------------------
    def _header(self, header):
        stamp = self.types["builtin_interfaces/msg/Time"](sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec))
        return self.types["std_msgs/msg/Header"](stamp=stamp, frame_id=str(header.frame_id))

    def _image(self, header, image: np.ndarray):
        fields = conversions.numpy_to_image_fields(image, "32FC1")
        fields["data"] = np.frombuffer(fields["data"], dtype=np.uint8)
        return self.types[IMAGE](header=header, **fields)

    def _camera_info(self, header, info):
        roi = self.types["sensor_msgs/msg/RegionOfInterest"](
            x_offset=int(info.roi.x_offset),
            y_offset=int(info.roi.y_offset),
            height=int(info.roi.height),
            width=int(info.roi.width),
            do_rectify=bool(info.roi.do_rectify),
        )
        arrays = {name: np.asarray(getattr(info, name), dtype=np.float64) for name in ("d", "k", "r", "p")}
        return self.types["sensor_msgs/msg/CameraInfo"](
            header=header,
            height=int(info.height),
            width=int(info.width),
            distortion_model=str(info.distortion_model),
            binning_x=int(info.binning_x),
            binning_y=int(info.binning_y),
            roi=roi,
            **arrays,
        )

    def _cloud(self, header, result: FrameResult):
        cloud = result.cloud
        height, width = cloud.points.shape[:2]
        point_field = self.types["sensor_msgs/msg/PointField"]
        return self.types["sensor_msgs/msg/PointCloud2"](
            header=header,
            height=height,
            width=width,
            is_bigendian=False,
            point_step=cloud.point_step,
            row_step=cloud.point_step * width,
            data=np.frombuffer(cloud.payload, dtype=np.uint8),
            is_dense=False,
            fields=[
                point_field(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in cloud.fields
            ],
        )


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def process_bag(in_bag: Path, out_bag: Path, pipeline: DepthPipeline, topics: dict[str, str], values: dict):
    """Run the pipeline over every image of topics["image"]; write the outputs next to the copied input topics.

    Args:
        topics: role -> topic for "image", "camera_info", and "lidar" when use_lidar.
        values: checked node parameters (depth_node.params.resolve).
    """
    try:
        with AnyReader([in_bag]) as reader:
            roles = _roles(reader, topics, in_bag)
            with OutputBag(out_bag, reader) as out:
                run = BagRun(pipeline, out, values)
                _run_over(reader, roles, run, sum(c.msgcount for c in reader.connections if c.topic == topics["image"]))
    except AnyReaderError as error:
        raise ValueError(f"cannot read bag {in_bag}: {error}") from None
    return run.summary


def _run_over(reader: AnyReader, roles: dict[str, str], run: BagRun, total: int) -> None:
    with tqdm(total=total, desc="depth_node_bag", unit="frame") as progress:
        for connection, timestamp, rawdata in reader.messages():
            run.out.copy(connection, timestamp, rawdata)
            run.flush(timestamp)
            role = roles.get(connection.topic)
            if role is not None:
                run.handle(role, reader.deserialize(rawdata, connection.msgtype), timestamp)
                progress.update(role == "image")
        run.flush(None)


def _roles(reader: AnyReader, topics: dict[str, str], in_bag: Path) -> dict[str, str]:
    """topic -> role ("image", "camera_info", "lidar", "tf"), checking the bag has what the run needs."""
    available = {c.topic: c.msgtype for c in reader.connections}
    for role, topic in topics.items():
        if topic not in available:
            raise ValueError(f"{in_bag}: no {role} topic {topic!r}; the bag has: {', '.join(sorted(available))}")
    image_type = available[topics["image"]]
    if image_type not in (IMAGE, "sensor_msgs/msg/CompressedImage"):
        raise ValueError(f"{topics['image']} is {image_type}, not an Image or CompressedImage")
    return {topic: role for role, topic in topics.items()} | ({"/tf_static": "tf"} if "/tf_static" in available else {})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depth_node_bag", description=__doc__.splitlines()[0])
    parser.add_argument("in_bag", type=Path, help="input rosbag2 folder (sqlite3/mcap) or ROS 1 .bag")
    parser.add_argument("out_bag", type=Path, help="output mcap bag folder (must not exist)")
    parser.add_argument("--model", type=Path, help="exported model; overrides `model` in the params file")
    parser.add_argument("--params-file", type=Path, help="node params YAML, e.g. config/kitti.yaml")
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="NAME:=VALUE",
        help="override one node parameter, as with --ros-args -p (repeatable)",
    )
    parser.add_argument("--image-topic", help=f"default {KITTI_CAMERA}/image_raw (or .../compressed)")
    parser.add_argument("--camera-info-topic", default=f"{KITTI_CAMERA}/camera_info")
    parser.add_argument("--lidar-topic", default=KITTI_LIDAR, help="PointCloud2 topic, read when use_lidar is true")
    return parser


def parse_overrides(items: list[str]) -> dict:
    """["name:=value", ...] -> {name: YAML-typed value}, as ROS parses `-p`."""
    values = {}
    for item in items:
        name, sep, text = item.partition(":=")
        if not sep or not name:
            raise ValueError(f"-p expects NAME:=VALUE, got {item!r}")
        values[name] = yaml.safe_load(text)
    return values


def run(args: argparse.Namespace) -> BagSummary:
    given = params.load_params_file(args.params_file) if args.params_file else {}
    given |= parse_overrides(args.param) | ({"model": str(args.model)} if args.model else {})
    values = params.resolve(given)
    if not values["model"]:
        raise ValueError("no model: pass --model or set `model` in the params file")
    if not args.in_bag.exists():
        raise ValueError(f"input bag {args.in_bag} does not exist")
    if args.out_bag.exists():
        raise ValueError(f"output bag {args.out_bag} already exists (rosbag2 writers never overwrite)")
    compressed = values["image_transport"] == "compressed"
    topics = {
        "image": args.image_topic or f"{KITTI_CAMERA}/image_raw" + ("/compressed" if compressed else ""),
        "camera_info": args.camera_info_topic,
    } | ({"lidar": args.lidar_topic} if values["use_lidar"] else {})
    return process_bag(args.in_bag, args.out_bag, build_pipeline(values), topics, values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_large_buffers()
    try:
        summary = run(args)
    except (ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"depth_node_bag: error: {error}", file=sys.stderr)
        return 2
    mean = float(np.mean(summary.latencies_ms)) if summary.latencies_ms else float("nan")
    written = ", ".join(f"{topic} ({count})" for topic, count in sorted(summary.written.items()))
    print(f"depth_node_bag: {summary.frames} frames -> {args.out_bag} (mean {mean:.1f} ms/frame)")
    print(f"  wrote {written or 'nothing'} next to the original topics")
    if summary.aligned:
        print(f"  {summary.aligned}/{summary.frames} frames aligned to LiDAR")
    for reason, count in summary.warnings.items():
        print(f"  {count} x {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
