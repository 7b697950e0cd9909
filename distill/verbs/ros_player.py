"""Play a rosbag2's camera into a live ROS 2 graph at camera rate and record what comes back to an mcap.

`make demo` runs the real depth node this way: `NodeProcess` starts it as a child process in its own ROS domain and
stops it with SIGINT like Ctrl-C would; `replay_and_record` reads the bag with rosbags, publishes each CameraInfo
and Image from an rclpy node as the bag's own CDR bytes (so stamps and frames are exactly the recorded ones), and
writes every output message it hears, serialised back to CDR with `rclpy.serialization.serialize_message`, into a
new mcap next to the inputs it sent (Foxglove and `ros2 bag play` open it; `distill viz` draws it).

The only module of `distill` that imports rclpy, and only inside its functions: the rest of distill is ROS-free.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

# What depth_node publishes (relative names resolved in the root namespace) and their types.
NODE_OUTPUTS = {
    "/depth": "sensor_msgs/msg/Image",
    "/depth/camera_info": "sensor_msgs/msg/CameraInfo",
    "/points": "sensor_msgs/msg/PointCloud2",
    "/depth/confidence": "sensor_msgs/msg/Image",
}
DIAGNOSTICS_TOPIC = "/diagnostics"


class NodeProcess:
    """A ROS 2 node's command run as a child process with its own ROS_DOMAIN_ID, output to a log file.

    Use as a context manager: leaving the block stops the node (SIGINT, then a kill if it hangs).
    """

    def __init__(self, command: list[str], domain_id: int, log: Path) -> None:
        self.command, self.domain_id, self.log = command, domain_id, Path(log)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> NodeProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ROS_DOMAIN_ID": str(self.domain_id), "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGINT, then wait up to `timeout` s; the exit code. A node ignoring SIGINT is killed (RuntimeError)."""
        if self.process is None:
            raise RuntimeError("the node was never started")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"{self.command[0]} did not stop within {timeout:.0f} s of SIGINT; killed") from None
        return self.process.returncode

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __exit__(self, *exc_info) -> None:
        if self.alive():
            try:
                self.stop()
            except RuntimeError:
                pass  # already killed; the exception in flight (if any) is the one to report


@dataclass
class ReplayResult:
    """What a replay sent and heard.

    Attributes:
        frames: camera frames in the bag, each published once at camera rate (the first also during discovery).
        received: output topic -> distinct stamps recorded.
        latencies_ms: per recorded depth frame, publish -> receive (DDS both ways + the node's whole pipeline).
        duration_s: wall time of the camera-rate replay (after discovery).
        diagnostics: key -> value of the node's last `diagnostics` status (per-stage ms, counters), if any.
        output: the mcap written.
    """

    frames: int
    received: dict[str, int]
    latencies_ms: list[float]
    duration_s: float
    diagnostics: dict[str, str] = field(default_factory=dict)
    output: Path = Path()


def camera_frames(reader: AnyReader, image_topic: str, info_topic: str) -> Iterator[tuple[int, list[tuple]]]:
    """(image stamp ns, [(connection, timestamp, cdr bytes) of the latest CameraInfo, then the Image]) in bag order."""
    topics = {c.topic: c for c in reader.connections}
    for topic in (image_topic, info_topic):
        if topic not in topics:
            raise ValueError(f"bag has no topic {topic!r}; it has: {', '.join(sorted(topics))}")
    latest_info = None
    for connection, timestamp, raw in reader.messages(connections=[topics[image_topic], topics[info_topic]]):
        if connection.topic == info_topic:
            latest_info = (connection, timestamp, raw)
        elif latest_info is not None:
            stamp = reader.deserialize(raw, connection.msgtype).header.stamp
            yield stamp.sec * 10**9 + stamp.nanosec, [latest_info, (connection, timestamp, raw)]


def _message_class(msgtype: str):
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def replay_and_record(
    bag: Path,
    out: Path,
    image_topic: str,
    camera_info_topic: str,
    domain_id: int,
    outputs: dict[str, str] = NODE_OUTPUTS,
    rate: float = 1.0,
    discovery_timeout: float = 60.0,
    drain_timeout: float = 10.0,
    alive: Callable[[], bool] = lambda: True,
) -> ReplayResult:
    """Publish a bag's camera at `rate` x real time into ROS domain `domain_id` and record `outputs` into `out`.

    Discovery is waited for by re-publishing the first frame (every 0.5 s) until every output topic has answered,
    never with a bare sleep; each output stamp is recorded once. After the last frame, waits up to `drain_timeout` s
    for its depth, then for the node's next diagnostics status.

    Args:
        bag: rosbag2 folder or file (mcap / sqlite3) with `image_topic` (sensor_msgs/Image) and `camera_info_topic`.
        out: new mcap bag folder (must not exist).
        outputs: topic -> msgtype to record, each of which the node must publish; the first is the depth topic.
        alive: polled while waiting; False (e.g. the node process died) aborts with RuntimeError.

    Raises:
        ValueError: a topic is missing from the bag, or the bag is not rosbag2.
        RuntimeError: nothing came back within `discovery_timeout`, or `alive()` turned False.
    """
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
    try:
        with AnyReader([Path(bag)]) as reader:
            if not reader.is2:
                raise ValueError(f"{bag}: only rosbag2 bags (mcap, sqlite3) can be replayed, not ROS 1 bags")
            session = _Session(context, reader, Path(out), image_topic, camera_info_topic, outputs)
            try:
                result = session.run(camera_frames(reader, image_topic, camera_info_topic), rate, discovery_timeout,
                                   drain_timeout, alive)  # fmt: skip
            finally:
                session.close()
        result.output = Path(out)
        return result
    finally:
        context.try_shutdown()


class _Session:
    """One rclpy node that publishes the bag's camera and records the answers (used by replay_and_record)."""

    def __init__(self, context, reader: AnyReader, out: Path, image_topic: str, info_topic: str, outputs: dict):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

        self.node = rclpy.create_node("depthkd_player", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.depth_topic = next(iter(outputs))
        self.writer = Writer(out, version=8, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        store = get_typestore(Stores.ROS2_HUMBLE)
        self.inputs = {}
        for connection in reader.connections:
            if connection.topic in (image_topic, info_topic):
                kind = _message_class(connection.msgtype)
                publisher = self.node.create_publisher(kind, connection.topic, qos_profile_sensor_data)
                copy = self.writer.add_connection(connection.topic, connection.msgtype, typestore=reader.typestore)
                self.inputs[connection.topic] = (publisher, copy)
        self.recorded = {topic: self.writer.add_connection(topic, msgtype, typestore=store)
                         for topic, msgtype in outputs.items()}  # fmt: skip
        self.seen: dict[str, set[int]] = {topic: set() for topic in outputs}
        self.sent_at: dict[int, float] = {}
        self.latencies_ms: list[float] = []
        self.diagnostics: dict[str, str] = {}
        self.diagnostics_heard = 0
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
        for topic, msgtype in outputs.items():
            self.node.create_subscription(_message_class(msgtype), topic, self._recorder(topic), reliable)
        self.node.create_subscription(_message_class("diagnostic_msgs/msg/DiagnosticArray"), DIAGNOSTICS_TOPIC,
                                      self._on_diagnostics, 10)  # fmt: skip

    def _recorder(self, topic: str) -> Callable:
        from rclpy.serialization import serialize_message

        def record(message) -> None:
            stamp = message.header.stamp.sec * 10**9 + message.header.stamp.nanosec
            if stamp in self.seen[topic]:
                return
            self.seen[topic].add(stamp)
            self.writer.write(self.recorded[topic], stamp, serialize_message(message))
            if topic == self.depth_topic and stamp in self.sent_at:
                self.latencies_ms.append((time.perf_counter() - self.sent_at[stamp]) * 1e3)

        return record

    def _all_heard(self) -> bool:
        return all(self.seen.values())

    def _on_diagnostics(self, message) -> None:
        self.diagnostics_heard += 1
        for status in message.status:
            self.diagnostics = {value.key: value.value for value in status.values}

    def _publish(self, stamp: int, messages: list[tuple], record: bool) -> None:
        for connection, timestamp, raw in messages:
            publisher, copy = self.inputs[connection.topic]
            publisher.publish(bytes(raw))
            if record:
                self.writer.write(copy, timestamp, bytes(raw))
        self.sent_at[stamp] = time.perf_counter()

    def _spin_until(self, deadline: float, done: Callable[[], bool], alive: Callable[[], bool]) -> bool:
        """Handle callbacks until `done()` or the deadline; RuntimeError if `alive()` turns False."""
        while not done():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            if not alive():
                raise RuntimeError("the depth node exited during the replay")
            self.executor.spin_once(timeout_sec=min(remaining, 0.05))
        return True

    def run(self, frames: Iterator, rate: float, discovery_timeout: float, drain_timeout: float, alive) -> ReplayResult:
        first = next(frames, None)
        if first is None:
            raise ValueError("the bag has no image with a CameraInfo before it")
        self._publish(*first, record=True)
        deadline = time.perf_counter() + discovery_timeout
        while not self._spin_until(min(deadline, time.perf_counter() + 0.5), self._all_heard, alive):
            if time.perf_counter() >= deadline:
                missing = [topic for topic, stamps in self.seen.items() if not stamps]
                raise RuntimeError(f"nothing came back on {', '.join(missing)} within {discovery_timeout:.0f} s")
            self._publish(*first, record=False)
        start, first_stamp, count, last = time.perf_counter(), first[0], 1, first[0]
        for stamp, messages in frames:
            due = start + (stamp - first_stamp) / 1e9 / rate
            self._spin_until(due, lambda: False, alive)
            self._publish(stamp, messages, record=True)
            count, last = count + 1, stamp
        duration = time.perf_counter() - start
        self._spin_until(time.perf_counter() + drain_timeout, lambda: last in self.seen[self.depth_topic], alive)
        heard = self.diagnostics_heard  # then the node's next status, which counts every frame of the replay
        self._spin_until(time.perf_counter() + drain_timeout, lambda: self.diagnostics_heard > heard, alive)
        received = {topic: len(stamps) for topic, stamps in self.seen.items()}
        return ReplayResult(count, received, self.latencies_ms, duration, dict(self.diagnostics))

    def close(self) -> None:
        self.writer.close()
        self.executor.shutdown()
        self.node.destroy_node()
