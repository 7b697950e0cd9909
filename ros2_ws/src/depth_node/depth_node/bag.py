"""`depth_node_bag IN_BAG OUT_BAG --model M [--params-file config/kitti.yaml] [-p NAME:=VALUE ...]`

The live node's pipeline, offline over a recorded bag: rosbag2 (sqlite3 or mcap) or ROS 1, read with `rosbags`.
Writes a new mcap (rosbag2) holding every original topic (ROS 1 messages converted as `rosbags-convert` does) plus
the node's outputs (topics.OUTPUTS) under absolute names (`/depth`, `/points`, ...), stamped like the images.
Foxglove and `ros2 bag play` open it. No rclpy needed.

Parameters are the node's (depth_node.params), from the same params file. Each frame goes through the node's own
stream.FrameStream (CameraInfo checks, scan pairing within lidar_max_dt, the reset on a stream restart); use_tf
takes the extrinsic from the bag's /tf_static.

Damaged input: a message that does not decode is skipped (neither processed nor copied) and counted in the summary.
Ctrl-C (SIGINT) stops after the current message and leaves a valid bag named `<OUT_BAG>.partial` (exit code 130);
an output that cannot be written (under a file, a read-only folder, a full disk) is one error line (exit code 2)
and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
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

from depth_node import params
from depth_node.codec import make_header, output_message, transform_to_matrix
from depth_node.geometry import lookup_transform
from depth_node.image_codec import shown
from depth_node.memory import reuse_large_buffers
from depth_node.metadata import ModelLoadError, error_summary
from depth_node.pipeline import DepthPipeline, build_pipeline
from depth_node.stream import Event, FrameStream
from depth_node.topics import COMPRESSED_IMAGE, IMAGE, KITTI_INPUTS, ODOMETRY, OUTPUTS

HOLD_SLACK_S = 0.1  # how much later than its stamp window a scan may be logged (recording latency)
OUTPUT_TYPES = {"/" + name: kind for name, kind in OUTPUTS.items()}  # the outputs, under absolute names


@dataclass
class BagSummary:
    """What a run did: frames processed, events (text -> count), aligned to LiDAR, per-topic messages written, and
    whether it was interrupted."""

    frames: int = 0
    events: Counter = field(default_factory=Counter)
    aligned: int = 0
    written: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    partial: Path | None = None  # interrupted: where the partial bag is (None: complete, or nothing was written)


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
        self.path = path
        self.writer = Writer(path, version=8, storage_plugin=StoragePlugin.MCAP)
        try:
            self.writer.open()
        except OSError as error:  # under a file, in a read-only folder, ...
            raise ValueError(f"cannot write output bag {path}: {error.strerror or error}") from None
        copied = [c for c in reader.connections if c.topic not in OUTPUT_TYPES]  # an earlier run's outputs: replaced
        try:
            self._connections, self._converters = create_connections_converters(
                copied, self.typestore, reader, self.writer
            )
        except BaseException as error:
            self.discard()
            if isinstance(error, OSError):
                raise ValueError(f"cannot write output bag {path}: {error.strerror or error}") from None
            raise
        self._outputs: dict[str, object] = {}

    def converted(self, connection, rawdata: bytes) -> tuple[object, bytes] | None:
        """(output connection, the message as written) of an input message to copy, or None when it is not copied;
        raises whatever the conversion of an undecodable message raises, before anything is written."""
        target = self._connections.get((connection.id, connection.owner))
        return None if target is None else (target, self._converters[connection.msgtype](rawdata))

    def write(self, topic: str, timestamp: int, message) -> None:
        if topic not in self._outputs:
            self._outputs[topic] = self.writer.add_connection(topic, OUTPUT_TYPES[topic], typestore=self.typestore)
        self.writer.write(self._outputs[topic], timestamp, self.typestore.serialize_cdr(message, OUTPUT_TYPES[topic]))

    def close(self) -> None:
        """Finish the bag: its index and metadata.yaml are written here."""
        self.writer.close()

    def discard(self) -> None:
        """Remove the bag after a failure (a full disk, an error), so that nothing half-written blocks a rerun."""
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001, S110 - the failure is already being reported; the folder goes anyway
            pass
        shutil.rmtree(self.path, ignore_errors=True)


class BagRun:
    """The per-message state of one run: the frame stream, /tf_static, images not yet processed."""

    def __init__(self, pipeline: DepthPipeline, out: OutputBag, values: dict):
        self.out, self.types = out, out.typestore.types
        self.tf_edges: dict[tuple[str, str], np.ndarray] = {}
        lookup = self._tf_static if values["use_tf"] else None
        self.stream = FrameStream(pipeline, values, self._report, transform_for=lookup, scan_buffer=10)
        self.pending: deque = deque()
        self.hold_ns = int((values["lidar_max_dt"] + HOLD_SLACK_S) * 1e9) if values["use_lidar"] else 0
        self.summary = BagSummary()

    def handle(self, role: str, message, timestamp: int) -> None:
        if role == "camera_info":
            self.stream.on_camera_info(message)
        elif role == "lidar":
            self.stream.on_scan(message)
        elif role == "tf":
            for transform in message.transforms:
                self.tf_edges[(transform.header.frame_id, transform.child_frame_id)] = transform_to_matrix(
                    transform.transform
                )
            self.stream.on_transforms(message, static=True)
        elif role == "odometry":
            self.stream.on_transforms(message, static=False)
        elif role == "odom":
            self.stream.on_odometry(message)
        else:
            self.pending.append((timestamp, message))

    def flush(self, now: int | None) -> None:
        """Process held images once a message logged later than their scan-pairing window arrives (all when None).

        Holding an image until then also pairs it with a camera_info logged at the same time but after it.
        """
        while self.pending and (now is None or now - self.pending[0][0] > self.hold_ns):
            self._process(*self.pending.popleft())

    def _process(self, timestamp: int, message) -> None:
        frame = self.stream.process(message)
        if frame is None:
            return
        start = time.perf_counter()
        header = make_header(self.types, frame.stamp, frame.frame_id)
        for topic, payload in frame.outputs().items():
            self.out.write("/" + topic, timestamp, output_message(topic, header, payload, self.types))
            self.summary.written["/" + topic] += 1
        stages = self.stream.finish(frame, write=(time.perf_counter() - start) * 1e3)
        self.summary.latencies_ms.append(stages["total"])
        self.summary.frames += 1
        self.summary.aligned += bool(frame.result.alignment is not None and frame.result.alignment.ok)

    def skip_undecodable(self, topic: str, error: Exception) -> None:
        self._report(Event("bag", f"undecodable message on {topic} skipped (not copied)", shown(error_summary(error))))

    def _tf_static(self, camera_frame: str, scan_header) -> np.ndarray | None:
        transform = lookup_transform(self.tf_edges, camera_frame, scan_header.frame_id)
        if transform is None:
            text = f"/tf_static has no {shown(scan_header.frame_id)} -> {shown(camera_frame)}: used lidar_to_camera"
            self._report(Event("tf", text))
        return transform

    def _report(self, event: Event) -> None:
        """Print an event the first time it happens; the summary counts them all."""
        if event.text not in self.summary.events:
            prefix = "warning: " if event.level == "warning" else ""
            tqdm.write(f"depth_node_bag: {prefix}{event.line}")
        self.summary.events[event.text] += 1


def process_bag(
    in_bag: Path,
    out_bag: Path,
    pipeline: DepthPipeline,
    topics: dict[str, str],
    values: dict,
    stop: threading.Event | None = None,
) -> BagSummary:
    """Run the pipeline over every image of topics["image"]; write the outputs next to the copied input topics.

    Either the output bag is complete, or (after `stop` was set, e.g. by SIGINT) a valid partial bag is left at
    `<out_bag>.partial` (see BagSummary.partial), or nothing is left: a failure removes what was written.

    Args:
        topics: role -> topic for "image", "camera_info", and "lidar" when use_lidar.
        values: checked node parameters (depth_node.params.resolve).
        stop: set to end the run after the current message.

    Raises:
        ValueError: the input cannot be read or the output cannot be written (one line naming the bag).
    """
    stop = threading.Event() if stop is None else stop
    try:
        with AnyReader([in_bag]) as reader:
            roles = _roles(reader, topics, in_bag)
            out = OutputBag(out_bag, reader)
            run = BagRun(pipeline, out, values)
            try:
                _run_over(
                    reader, roles, run, sum(c.msgcount for c in reader.connections if c.topic == topics["image"]), stop
                )
                out.close()
            except BaseException as error:
                out.discard()
                if isinstance(error, OSError):  # a full disk, a file size limit, a vanished folder
                    raise ValueError(f"cannot write output bag {out_bag}: {error.strerror or error}") from None
                raise
    except AnyReaderError as error:
        raise ValueError(f"cannot read bag {in_bag}: {error}") from None
    if stop.is_set():
        run.summary.partial = _keep_partial(out_bag) if run.summary.frames else _remove(out_bag)
    return run.summary


def _run_over(reader: AnyReader, roles: dict[str, str], run: BagRun, total: int, stop: threading.Event) -> None:
    with tqdm(total=total, desc="depth_node_bag", unit="frame") as progress:
        for connection, timestamp, rawdata in reader.messages():
            if stop.is_set():
                return
            try:  # decode first: an undecodable message is neither processed nor copied
                message = reader.deserialize(rawdata, connection.msgtype)
                copy = run.out.converted(connection, rawdata)
            except Exception as error:  # noqa: BLE001 - rosbags raises assorted types for damaged CDR
                run.skip_undecodable(connection.topic, error)
                continue
            if copy is not None:
                run.out.writer.write(copy[0], timestamp, copy[1])
            run.flush(timestamp)
            role = roles.get(connection.topic)
            if role is not None:
                run.handle(role, message, timestamp)
                progress.update(role == "image")
        run.flush(None)


def _keep_partial(out_bag: Path) -> Path:
    """Move an interrupted run's (valid, closed) bag to `<out_bag>.partial`, replacing an earlier partial bag."""
    partial = out_bag.with_name(out_bag.name + ".partial")
    if (partial / "metadata.yaml").is_file():
        shutil.rmtree(partial)
    if partial.exists():  # not a bag of ours: leave both alone, the partial bag keeps its name
        return out_bag
    out_bag.rename(partial)
    return partial


def _remove(out_bag: Path) -> None:
    shutil.rmtree(out_bag, ignore_errors=True)


def _roles(reader: AnyReader, topics: dict[str, str], in_bag: Path) -> dict[str, str]:
    """topic -> role ("image", "camera_info", "lidar", "odom", "tf", "odometry"), checking the bag has what the run
    needs."""
    available = {c.topic: c.msgtype for c in reader.connections}
    for role, topic in topics.items():
        if topic not in available:
            raise ValueError(f"{in_bag}: no {role} topic {topic!r}; the bag has: {', '.join(sorted(available))}")
    image_type = available[topics["image"]]
    if image_type not in (IMAGE, COMPRESSED_IMAGE):
        raise ValueError(f"{topics['image']} is {image_type}, not an Image or CompressedImage")
    if "odom" in topics and available[topics["odom"]] != ODOMETRY:
        raise ValueError(f"{topics['odom']} is {available[topics['odom']]}, not a {ODOMETRY}")
    tf = {"/tf_static": "tf"} | ({} if "odom" in topics else {"/tf": "odometry"})  # odometry from one source only
    return {topic: role for role, topic in topics.items()} | {t: role for t, role in tf.items() if t in available}


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
    parser.add_argument("--image-topic", help=f"default {KITTI_INPUTS['image']} (or .../compressed)")
    parser.add_argument("--camera-info-topic", default=KITTI_INPUTS["camera_info"])
    parser.add_argument("--lidar-topic", default=KITTI_INPUTS["lidar"], help="PointCloud2 topic, read with use_lidar")
    parser.add_argument("--odom-topic", default="/odom", help="nav_msgs/Odometry topic, read with odometry:=odom")
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


def run(args: argparse.Namespace, stop: threading.Event | None = None) -> BagSummary:
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
        "image": args.image_topic or KITTI_INPUTS["image/compressed" if compressed else "image"],
        "camera_info": args.camera_info_topic,
    } | ({"lidar": args.lidar_topic} if values["use_lidar"] else {})
    if values["temporal_filter"] and values["odometry"] == "odom":
        topics["odom"] = args.odom_topic  # else the filter follows the bag's /tf
    return process_bag(args.in_bag, args.out_bag, build_pipeline(values), topics, values, stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_large_buffers()
    stop = threading.Event()  # SIGINT (Ctrl-C): finish the current message, close the bag, keep it as partial
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if on_main_thread else None
    try:
        summary = run(args, stop)
    except (ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"depth_node_bag: error: {error}", file=sys.stderr)
        return 2
    finally:
        if on_main_thread:
            signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        where = f"a partial bag of {summary.frames} frames in {summary.partial}" if summary.partial else "nothing"
        print(f"depth_node_bag: interrupted: {where} left", file=sys.stderr)
        return 130
    mean = float(np.mean(summary.latencies_ms)) if summary.latencies_ms else float("nan")
    written = ", ".join(f"{topic} ({count})" for topic, count in sorted(summary.written.items()))
    print(f"depth_node_bag: {summary.frames} frames -> {args.out_bag} (mean {mean:.1f} ms/frame)")
    print(f"  wrote {written or 'nothing'} next to the original topics")
    if summary.aligned:
        print(f"  {summary.aligned}/{summary.frames} frames aligned to LiDAR")
    for reason, count in summary.events.items():
        print(f"  {count} x {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
