"""`depth_node_bag IN_BAG OUT_BAG --model M`: the node's pipeline offline over a recorded bag.

Reads rosbag2 (sqlite3/mcap) or ROS 1 bags with `rosbags`, runs the same DepthPipeline as the live node on every
image, and writes a new mcap holding the original topics plus `/depth`, `/depth/camera_info` and `/points`
(Foxglove and `ros2 bag play` open it). No rclpy needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from depth_node import conversions
from depth_node.engine import open_engine
from depth_node.geometry import pack_pointcloud2_fields
from depth_node.metadata import ModelLoadError
from depth_node.params import PARAMETERS
from depth_node.pipeline import DepthPipeline, FrameResult, PipelineOptions

KITTI_CAMERA = "/kitti/camera_color_left"
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


@dataclass
class BagSummary:
    frames: int
    skipped: int
    mean_latency_ms: float
    output: Path


def load_params_file(path: Path | None) -> dict:
    """ros__parameters of the first node in a ROS 2 params file (the node's own YAML format), or {}."""
    if path is None:
        return {}
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read params file {path}: {error}") from None
    for section in document.values():
        if isinstance(section, dict) and "ros__parameters" in section:
            params = section["ros__parameters"]
            unknown = sorted(set(params) - set(PARAMETERS))
            if unknown:
                raise ValueError(f"{path}: unknown depth_node parameters {unknown}")
            return params
    raise ValueError(f"{path}: no '<node>: ros__parameters:' section")


class OutputBag:
    """An mcap writer that copies input connections and adds the depth outputs, serialised as ROS 2 CDR."""

    def __init__(self, path: Path, reader: AnyReader):
        if path.exists():
            raise ValueError(f"output bag {path} already exists (rosbag2 writers never overwrite)")
        self.typestore = get_typestore(Stores.ROS2_HUMBLE)
        self.types = self.typestore.types
        self.writer = Writer(path, version=8, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.copied = {}
        for connection in reader.connections:
            if connection.topic not in {c.topic for c in self.copied.values()}:
                self.copied[connection.id] = self.writer.add_connection(
                    connection.topic, connection.msgtype, typestore=reader.typestore
                )
        self.outputs = {
            topic: self.writer.add_connection(topic, msgtype, typestore=self.typestore)
            for topic, msgtype in (
                ("/depth", "sensor_msgs/msg/Image"),
                ("/depth/relative", "sensor_msgs/msg/Image"),
                ("/depth/confidence", "sensor_msgs/msg/Image"),
                ("/depth/camera_info", "sensor_msgs/msg/CameraInfo"),
                ("/points", "sensor_msgs/msg/PointCloud2"),
            )
        }

    def copy(self, connection, timestamp: int, rawdata: bytes, reader: AnyReader) -> None:
        target = next((c for cid, c in self.copied.items() if c.topic == connection.topic), None)
        if target is None:
            return
        if connection.msgtype and reader.is2:
            self.writer.write(target, timestamp, rawdata)
        else:  # ROS 1 bag: re-serialise as CDR
            message = reader.deserialize(rawdata, connection.msgtype)
            self.writer.write(target, timestamp, reader.typestore.serialize_cdr(message, connection.msgtype))

    def write(self, topic: str, timestamp: int, message, msgtype: str) -> None:
        self.writer.write(self.outputs[topic], timestamp, self.typestore.serialize_cdr(message, msgtype))

    def close(self) -> None:
        self.writer.close()


def _image_message(types, header, array: np.ndarray):
    fields = conversions.numpy_to_image_fields(array, "32FC1")
    fields["data"] = np.frombuffer(fields["data"], dtype=np.uint8)
    return types["sensor_msgs/msg/Image"](header=header, **fields)


def _cloud_message(types, header, result: FrameResult):
    fields, point_step, payload = pack_pointcloud2_fields(result.points, result.colors)
    height, width = result.points.shape[:2]
    point_field = types["sensor_msgs/msg/PointField"]
    return types["sensor_msgs/msg/PointCloud2"](
        header=header,
        height=height,
        width=width,
        fields=[point_field(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in fields],
        is_bigendian=False,
        point_step=point_step,
        row_step=point_step * width,
        data=np.frombuffer(payload, dtype=np.uint8),
        is_dense=False,
    )


def _camera_info_for(info, header, width: int, height: int):
    """The CameraInfo of the published depth: same as the input's, scaled if the image size differs."""
    if (info.width, info.height) != (width, height):
        info = conversions.scale_camera_info(info, width, height)
    info = conversions.copy_camera_info(info)
    info.header = header
    return info


def process_bag(
    in_bag: Path,
    out_bag: Path,
    pipeline: DepthPipeline,
    image_topic: str,
    camera_info_topic: str,
) -> BagSummary:
    """Run `pipeline` over every image of `image_topic` and write the outputs next to the copied input topics."""
    with AnyReader([in_bag]) as reader:
        topics = {c.topic: c for c in reader.connections}
        for topic in (image_topic, camera_info_topic):
            if topic not in topics:
                raise ValueError(f"{in_bag}: no topic {topic!r}; the bag has: {', '.join(sorted(topics))}")
        if topics[image_topic].msgtype not in IMAGE_TYPES:
            raise ValueError(f"{image_topic} is {topics[image_topic].msgtype}, expected one of {IMAGE_TYPES}")
        out = OutputBag(out_bag, reader)
        info, frames, skipped, latencies = None, 0, 0, []
        total = sum(c.msgcount for c in reader.connections if c.topic == image_topic)
        try:
            with tqdm(total=total, desc="depth_node_bag", unit="frame") as progress:
                for connection, timestamp, rawdata in reader.messages():
                    out.copy(connection, timestamp, rawdata, reader)
                    if connection.topic == camera_info_topic:
                        info = reader.deserialize(rawdata, connection.msgtype)
                    elif connection.topic == image_topic:
                        progress.update()
                        if info is None:
                            skipped += 1
                            continue
                        start = time.perf_counter()
                        message = reader.deserialize(rawdata, connection.msgtype)
                        if connection.msgtype.endswith("CompressedImage"):
                            rgb = conversions.compressed_to_numpy(message)
                        else:
                            rgb = conversions.to_rgb(message)
                        frame_info = _camera_info_for(info, message.header, rgb.shape[1], rgb.shape[0])
                        result = pipeline.process(rgb, conversions.camera_info_to_P(frame_info))
                        _write_outputs(out, timestamp, message.header, frame_info, result)
                        latencies.append((time.perf_counter() - start) * 1e3)
                        frames += 1
        except BaseException:
            out.close()
            raise
        out.close()
    mean = float(np.mean(latencies)) if latencies else float("nan")
    return BagSummary(frames=frames, skipped=skipped, mean_latency_ms=mean, output=out_bag)


def _write_outputs(out: OutputBag, timestamp: int, header, info, result: FrameResult) -> None:
    types = out.types
    depth_topic = "/depth" if result.metric else "/depth/relative"
    out.write(depth_topic, timestamp, _image_message(types, header, result.depth), "sensor_msgs/msg/Image")
    out.write("/depth/camera_info", timestamp, info, "sensor_msgs/msg/CameraInfo")
    if result.points is not None:
        out.write("/points", timestamp, _cloud_message(types, header, result), "sensor_msgs/msg/PointCloud2")
    if result.confidence is not None:
        confidence = _image_message(types, header, result.confidence)
        out.write("/depth/confidence", timestamp, confidence, "sensor_msgs/msg/Image")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depth_node_bag", description=__doc__.splitlines()[0])
    parser.add_argument("in_bag", type=Path, help="input rosbag2 folder/file or ROS 1 .bag")
    parser.add_argument("out_bag", type=Path, help="output mcap bag folder (must not exist)")
    parser.add_argument("--model", type=Path, help="exported model; overrides `model` in the params file")
    parser.add_argument("--params-file", type=Path, default=None, help="node params YAML, e.g. config/kitti.yaml")
    parser.add_argument("--backend", default=None, help="auto | onnxruntime | tensorrt")
    parser.add_argument("--image-topic", default=f"{KITTI_CAMERA}/image_raw")
    parser.add_argument("--camera-info-topic", default=f"{KITTI_CAMERA}/camera_info")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = {name: default for name, (default, _) in PARAMETERS.items()}
        params.update(load_params_file(args.params_file))
        model = args.model or params["model"]
        if not model:
            raise ValueError("no model: pass --model or set `model` in the params file")
        if not args.in_bag.exists():
            raise ValueError(f"input bag {args.in_bag} does not exist")
        backend = args.backend or params["backend"]
        engine = open_engine(str(model), backend=backend, device=int(params["device"]), threads=params["threads"])
        options = PipelineOptions.from_params(params)
        summary = process_bag(
            args.in_bag, args.out_bag, DepthPipeline(engine, options), args.image_topic, args.camera_info_topic
        )
    except (ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"depth_node_bag: error: {error}", file=sys.stderr)
        return 2
    print(
        f"depth_node_bag: {summary.frames} frames -> {summary.output} "
        f"(mean {summary.mean_latency_ms:.1f} ms/frame, {summary.skipped} skipped before the first camera_info)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
