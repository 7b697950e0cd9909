"""ROS 2 depth node: camera frames in, `depth` (32FC1 metres), `depth/camera_info`, `points`, `depth/confidence` out.

A thin adapter: messages -> arrays (conversions) -> DepthPipeline (engine + geometry) -> messages. Inference runs
on a worker thread on the newest frame only; frames that arrive while it is busy replace the pending one and are
counted as dropped, so latency stays bounded when the model is slower than the camera.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from depth_node import conversions
from depth_node.engine import ModelLoadError, open_engine
from depth_node.geometry import make_pointcloud2
from depth_node.params import PARAMETERS
from depth_node.pipeline import DepthPipeline, PipelineOptions


def make_qos(reliability: str, depth: int) -> QoSProfile:
    """Keep-last QoS from parameter strings; a typo is a start-up error, not a silent default."""
    policies = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
    if reliability not in policies:
        raise ValueError(f"QoS reliability must be one of {sorted(policies)}, got {reliability!r}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(1, int(depth)), reliability=policies[reliability])


@dataclass
class Counters:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    bad_input: int = 0
    no_camera_info: int = 0


class DepthNode(Node):
    """Publishes dense depth and clouds for the newest camera frame; see PARAMETERS for its settings."""

    def __init__(self) -> None:
        super().__init__("depth_node")
        for name, (default, description) in PARAMETERS.items():
            self.declare_parameter(name, default, _descriptor(description))
        p = {name: self.get_parameter(name).value for name in PARAMETERS}
        self.params = p
        if not p["model"]:
            raise ModelLoadError("parameter 'model' is empty: pass -p model:=/path/to/model.onnx")
        engine = open_engine(p["model"], backend=p["backend"], device=int(p["device"]), threads=int(p["threads"]))
        self.pipeline = DepthPipeline(engine, PipelineOptions.from_params(p))
        self.counters = Counters()
        self.stage_ms: dict[str, float] = {}
        self.camera_info: CameraInfo | None = None
        self._pending: tuple[object, float] | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()

        sub_qos = make_qos(p["sub_reliability"], p["sub_depth"])
        pub_qos = make_qos(p["pub_reliability"], p["pub_depth"])
        if p["image_transport"] == "compressed":
            self.create_subscription(CompressedImage, "image/compressed", self._on_image, sub_qos)
        elif p["image_transport"] == "raw":
            self.create_subscription(Image, "image", self._on_image, sub_qos)
        else:
            raise ValueError(f"image_transport must be raw or compressed, got {p['image_transport']!r}")
        self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, sub_qos)
        depth_topic = "depth" if self.pipeline.metric else "depth/relative"
        if not self.pipeline.metric:
            self.get_logger().warning(
                f"model output is {engine.metadata.output_kind}, not metric: publishing on '{depth_topic}'"
            )
        self.pub_depth = self.create_publisher(Image, depth_topic, pub_qos)
        self.pub_info = self.create_publisher(CameraInfo, "depth/camera_info", pub_qos)
        self.pub_points = self.create_publisher(PointCloud2, "points", pub_qos)
        self.pub_confidence = self.create_publisher(Image, "depth/confidence", pub_qos)
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "diagnostics", 10)
        self.create_timer(float(p["diagnostics_period"]), self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="depth_inference", daemon=True)
        self._worker.start()
        self.get_logger().info(f"loaded {p['model']} ({engine.backend_name}); waiting for '{self.resolve_topic()}'")

    def resolve_topic(self) -> str:
        name = "image/compressed" if self.params["image_transport"] == "compressed" else "image"
        return self.resolve_topic_name(name)

    # --- callbacks: cheap, never block on inference -------------------------------------------------------------
    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            conversions.validate_camera_info(msg)
        except ValueError as error:
            self._bad_input(f"camera_info rejected: {error}")
            return
        self.camera_info = msg

    def _on_image(self, msg: Image | CompressedImage) -> None:
        with self._cond:
            self.counters.frames_in += 1
            if self._pending is not None:
                self.counters.dropped += 1
            self._pending = (msg, time.perf_counter())
            self._cond.notify()

    # --- worker ------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stop.is_set(), timeout=0.5)
                if self._pending is None:
                    continue
                msg, received = self._pending
                self._pending = None
            try:
                self._process(msg, received)
            except Exception as error:  # noqa: BLE001 - a bad frame must never kill the worker
                self._bad_input(f"frame skipped: {type(error).__name__}: {error}")

    def _wanted(self) -> bool:
        if not self.params["lazy"]:
            return True
        pubs = (self.pub_depth, self.pub_info, self.pub_points, self.pub_confidence)
        return any(pub.get_subscription_count() > 0 for pub in pubs)

    def _process(self, msg: Image | CompressedImage, received: float) -> None:
        info = self.camera_info
        if info is None:
            self.counters.no_camera_info += 1
            self.get_logger().warning("no camera_info received yet: frame skipped", throttle_duration_sec=5.0)
            return
        if not self._wanted():
            return
        start = time.perf_counter()
        try:
            if isinstance(msg, CompressedImage):
                rgb = conversions.compressed_to_numpy(msg)
            else:
                rgb = conversions.to_rgb(msg)
        except ValueError as error:
            self._bad_input(f"image rejected: {error}")
            return
        if (info.width, info.height) != (rgb.shape[1], rgb.shape[0]):
            info = conversions.scale_camera_info(info, rgb.shape[1], rgb.shape[0])
        decode_ms = (time.perf_counter() - start) * 1e3
        result = self.pipeline.process(rgb, conversions.camera_info_to_P(info))
        start = time.perf_counter()
        self._publish(msg.header, info, result)
        stages = dict(result.timings_ms, decode=decode_ms, publish=(time.perf_counter() - start) * 1e3)
        stages["total"] = (time.perf_counter() - received) * 1e3
        self._record(stages)

    def _publish(self, header, info: CameraInfo, result) -> None:
        self.pub_depth.publish(conversions.depth_to_image_msg(result.depth, header))
        info_out = conversions.copy_camera_info(info)
        info_out.header = header
        self.pub_info.publish(info_out)
        if result.points is not None:
            self.pub_points.publish(make_pointcloud2(header, result.points, result.colors))
        if result.confidence is not None:
            self.pub_confidence.publish(conversions.depth_to_image_msg(result.confidence, header))

    def _record(self, stages: dict[str, float]) -> None:
        self.counters.frames_out += 1
        for name, value in stages.items():  # exponential moving average: recent latency, bounded memory
            self.stage_ms[name] = value if name not in self.stage_ms else 0.9 * self.stage_ms[name] + 0.1 * value

    def _bad_input(self, message: str) -> None:
        self.counters.bad_input += 1
        self.get_logger().warning(message, throttle_duration_sec=2.0)

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(level=DiagnosticStatus.OK, name="depth_node: pipeline", hardware_id="depth_node")
        status.message = f"{self.counters.frames_out} frames out"
        values = {f"{k}_ms": f"{v:.2f}" for k, v in self.stage_ms.items()}
        values.update({k: str(v) for k, v in vars(self.counters).items()})
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diagnostics.publish(array)

    def destroy_node(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._worker.join(timeout=2.0)
        super().destroy_node()


def _descriptor(description: str):
    from rcl_interfaces.msg import ParameterDescriptor

    return ParameterDescriptor(description=description)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    try:
        node = DepthNode()
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        print(f"depth_node: error: {error}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
