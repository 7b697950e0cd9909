"""ROS 2 depth node: camera frames in; `depth` (32FC1 metres), `depth/camera_info`, `points`, `depth/confidence`,
`depth/mono` (with LiDAR) and `diagnostics` out. Topic and parameter tables: README.md.

A thin adapter: messages -> arrays (conversions) -> DepthPipeline (engine, LiDAR alignment, geometry) -> messages.
Inference runs on a worker thread on the newest frame only: a frame arriving while the worker is busy replaces the
waiting one, which is counted as dropped, so latency stays bounded when the model is slower than the camera.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from collections import deque

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions, install_signal_handlers
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from depth_node import conversions, diagnostics, params
from depth_node.engine import ModelLoadError
from depth_node.flow import Counters, FrameSlot, Throttle
from depth_node.geometry import make_pointcloud2, pointcloud2_to_xyz, transform_to_matrix
from depth_node.memory import reuse_large_buffers
from depth_node.pipeline import FrameResult, StampBuffer, build_pipeline

STAGE_WINDOW = 100  # diagnostics report the median of each stage over the last frames
RESTART_S = 1.0  # image stamps going back by more than this: a new stream (bag loop, camera restart)


def make_qos(reliability: str, depth: int) -> QoSProfile:
    """Keep-last QoS from the (checked) reliability / depth parameters."""
    policy = ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=policy)


class DepthNode(Node):
    """Publishes dense depth and clouds for the newest camera frame; parameters in depth_node.params."""

    def __init__(self, **node_kwargs) -> None:
        self._slot = FrameSlot()  # before Node.__init__: rclpy may destroy a node whose start-up failed
        self._worker: threading.Thread | None = None
        super().__init__("depth_node", **node_kwargs)
        self.params = self._declare_parameters()
        p = self.params
        if not p["model"]:
            raise ModelLoadError("parameter 'model' is empty: pass -p model:=/path/to/model.onnx")
        self.pipeline = build_pipeline(p)
        engine = self.pipeline.engine
        self.counters = Counters()
        self.stages: deque[dict[str, float]] = deque(maxlen=STAGE_WINDOW)
        self.camera_info: CameraInfo | None = None
        self.clouds = StampBuffer()
        self.last_result: FrameResult | None = None
        self._throttle = Throttle()
        self._last_frame: tuple[int, tuple[int, int]] | None = None  # (stamp ns, (H, W)) of the last decoded image
        self._tf_buffer = _tf_buffer(self) if p["use_lidar"] and p["use_tf"] else None
        self._create_topics(engine.metadata.output_kind)
        self._worker = threading.Thread(target=self._work, name="depth_inference", daemon=True)
        self._worker.start()
        topic = self.resolve_topic_name("image/compressed" if p["image_transport"] == "compressed" else "image")
        for reason in engine.fallbacks:  # why a better backend did not start (e.g. TensorRT on a CPU-only box)
            self.get_logger().info(f"backend skipped: {reason}")
        self.get_logger().info(f"loaded {p['model']} ({engine.backend_name}); waiting for '{topic}'")

    def _declare_parameters(self) -> dict:
        """Declare every parameter once (typed loosely: `-p min_depth:=1` is fine) and check the values."""
        overrides = getattr(self, "_parameter_overrides", {})  # rclpy has no public view of the given values
        unknown = [name for name in overrides if name not in params.PARAMETERS and not self.has_parameter(name)]
        params.check_names(sorted(unknown), "depth_node")  # a typo is an error, not a silently ignored value
        for name, spec in params.PARAMETERS.items():
            self.declare_parameter(
                name, spec.default, ParameterDescriptor(description=spec.description, dynamic_typing=True)
            )
        return params.resolve({name: self.get_parameter(name).value for name in params.PARAMETERS})

    def _create_topics(self, output_kind: str) -> None:
        p = self.params
        sub_qos = make_qos(p["sub_reliability"], p["sub_depth"])
        pub_qos = make_qos(p["pub_reliability"], p["pub_depth"])
        if p["image_transport"] == "compressed":
            self.create_subscription(CompressedImage, "image/compressed", self._on_image, sub_qos)
        else:
            self.create_subscription(Image, "image", self._on_image, sub_qos)
        self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, sub_qos)
        if p["use_lidar"]:
            self.create_subscription(PointCloud2, "lidar", self._on_lidar, sub_qos)
        elif output_kind != "metric":
            self.get_logger().warning(
                f"model output is {output_kind}, not metric, and use_lidar is off: "
                "publishing it on 'depth/relative', not 'depth'"
            )
        names = ("depth", "depth/relative", "depth/mono", "depth/confidence")
        self.pub_images = {name: self.create_publisher(Image, name, pub_qos) for name in names}
        self.pub_info = self.create_publisher(CameraInfo, "depth/camera_info", pub_qos)
        self.pub_points = self.create_publisher(PointCloud2, "points", pub_qos)
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "diagnostics", 10)
        self.create_timer(p["diagnostics_period"], self._publish_diagnostics)

    # --- callbacks: cheap, never block on inference -------------------------------------------------------------
    def _on_camera_info(self, msg: CameraInfo) -> None:
        self.camera_info = msg  # checked per frame, so a bad one skips frames instead of leaving a stale one in use

    def _on_lidar(self, msg: PointCloud2) -> None:
        """Parse a scan once, on arrival. A malformed or empty one is counted, warned about and kept as "no points",
        so the images of its time fall back on the scale prior instead of pairing with an older scan."""
        try:
            points, kind, problem = pointcloud2_to_xyz(msg), "empty scan", ""
        except ValueError as error:
            points, kind, problem = np.empty((0, 3), np.float32), "malformed scan", str(error)
        if not problem and not len(points):
            problem = f"no finite points ({msg.width}x{msg.height} cloud)"
        if problem:
            self.counters.bad_input += 1
            self._log(kind, f"LiDAR scan skipped: {problem}")
        self.clouds.add(_stamp_ns(msg.header), (points, msg.header))

    def _on_image(self, msg: Image | CompressedImage) -> None:
        self.counters.frames_in += 1
        if self._slot.put((msg, time.perf_counter())):
            self.counters.dropped += 1

    # --- worker ------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while rclpy.ok(context=self.context) and not self._slot.closed:
            item = self._slot.take(timeout=0.5)
            if item is not None:
                self.handle_frame(*item)

    def handle_frame(self, msg: Image | CompressedImage, received: float | None = None) -> FrameResult | None:
        """Process one image now, on the calling thread (the worker's step; tests call it directly).

        Never raises: a frame that cannot be processed is counted, warned about (throttled) and skipped.

        Args:
            msg: the image message.
            received: time.perf_counter() at arrival (default: now), for the `wait` and `total` latencies.

        Returns:
            The frame's result once published, or None when it was skipped (bad input, no camera_info, lazy).
        """
        try:
            return self._process(msg, time.perf_counter() if received is None else received)
        except Exception as error:  # noqa: BLE001 - a bad frame must never kill the worker
            if self._slot.closed or not rclpy.ok(context=self.context):
                return None  # shutting down: the publishers are gone, nothing went wrong with the frame
            self.counters.failed += 1
            self._log("processing", f"frame skipped: {type(error).__name__}: {error}")
            return None

    def _listened(self, *publishers) -> bool:
        return not self.params["lazy"] or any(pub.get_subscription_count() > 0 for pub in publishers)

    def _process(self, msg: Image | CompressedImage, received: float) -> FrameResult | None:
        if not self._listened(self.pub_info, self.pub_points, *self.pub_images.values()):
            self.counters.idle += 1
            return None
        start = time.perf_counter()
        frame = self._decode(msg)
        if frame is None:
            return None
        rgb, info = frame
        projection = conversions.camera_info_to_P(info)
        decoded = time.perf_counter()
        points, transform = self._paired_cloud(msg.header) if self.params["use_lidar"] else (None, None)
        want_points = self._listened(self.pub_points)
        want_confidence = self._listened(self.pub_images["depth/confidence"])
        result = self.pipeline.process(rgb, projection, points, transform, want_points, want_confidence)
        stages = dict(result.timings_ms, **self._publish(msg.header, info, result), decode=(decoded - start) * 1e3)
        done = time.perf_counter()
        stages["wait"] = (start - received) * 1e3  # in the keep-latest slot while the previous frame ran
        stages["overhead"] = (done - start) * 1e3 - stages["inference"]  # everything but the network
        stages["total"] = (done - received) * 1e3
        self.stages.append(stages)
        self.last_result = result
        self.counters.frames_out += 1
        self._report_alignment(result)
        return result

    def _decode(self, msg: Image | CompressedImage) -> tuple[np.ndarray, CameraInfo] | None:
        """(RGB image, CameraInfo scaled to it), or None with a warning when the frame must be skipped."""
        info = self.camera_info
        if info is None:
            self.counters.no_camera_info += 1
            self._log("camera_info", "no camera_info received yet: frame skipped")
            return None
        try:
            conversions.validate_camera_info(info)
        except ValueError as error:
            return self._skip(error, kind="camera_info")
        try:
            rgb = conversions.image_msg_to_rgb(msg)
        except ValueError as error:
            return self._skip(error, kind="image")
        self._follow_stream(msg.header, rgb.shape[:2])
        if (info.width, info.height) != (rgb.shape[1], rgb.shape[0]):
            info = conversions.scale_camera_info(info, rgb.shape[1], rgb.shape[0])
        return rgb, info

    def _skip(self, error: ValueError, kind: str) -> None:
        """Count and warn about a frame skipped for bad input of this kind ("image" or "camera_info")."""
        self.counters.bad_input += 1
        self._log(kind, f"frame skipped: {error}")

    def _follow_stream(self, header, size: tuple[int, int]) -> None:
        """Note a change of image size; reset the LiDAR scale prior when stamps jump back (a bag loop, a restart)."""
        stamp = _stamp_ns(header)
        last_stamp, last_size = self._last_frame or (stamp, size)
        self._last_frame = (stamp, size)
        if size != last_size:
            self._log("size", f"image size changed from {last_size[1]}x{last_size[0]} to {size[1]}x{size[0]}", "info")
        back = (last_stamp - stamp) * 1e-9
        if back > RESTART_S and self.params["use_lidar"]:
            self._log("restart", f"image stamps went back {back:.1f} s (a new stream): LiDAR scale prior reset", "info")
            self.pipeline.prior.reset()

    def _paired_cloud(self, header) -> tuple[np.ndarray | None, np.ndarray | None]:
        """LiDAR points (N, 3) nearest in stamp to the image within lidar_max_dt, and their transform (None: param)."""
        cloud, dt = self.clouds.nearest(_stamp_ns(header), self.params["lidar_max_dt"])
        if cloud is None:
            limit = self.params["lidar_max_dt"]
            self._log(
                "lidar pairing",
                f"no LiDAR scan within lidar_max_dt={limit} s of the image (nearest {dt:.3f} s): frame not aligned",
            )
            return None, None
        points, cloud_header = cloud
        if self._tf_buffer is None:
            return points, None
        return points, self._lookup_transform(header.frame_id, cloud_header)

    def _lookup_transform(self, camera_frame: str, cloud_header) -> np.ndarray | None:
        """TF camera <- LiDAR at the scan's stamp (UNTESTED here: tf2_ros is not on PyPI)."""
        import tf2_ros

        try:
            stamp = Time.from_msg(cloud_header.stamp)
            stamped = self._tf_buffer.lookup_transform(camera_frame, cloud_header.frame_id, stamp)
        except tf2_ros.TransformException as error:
            self._log("tf", f"no TF {cloud_header.frame_id} -> {camera_frame}: {error}; using lidar_to_camera")
            return None
        return transform_to_matrix(stamped.transform)

    def _publish(self, header, info: CameraInfo, result: FrameResult) -> dict[str, float]:
        """Build then publish every output someone listens to; returns the ms of both steps (messages, publish)."""
        start = time.perf_counter()
        depth_topic = "depth" if result.metric else "depth/relative"
        images = {depth_topic: result.depth, "depth/mono": result.mono, "depth/confidence": result.confidence}
        messages = [
            (self.pub_images[topic], conversions.depth_to_image_msg(image, header))
            for topic, image in images.items()
            if image is not None and self._listened(self.pub_images[topic])
        ]
        info_out = conversions.copy_camera_info(info)
        info_out.header = header
        messages.append((self.pub_info, info_out))
        if result.cloud is not None:
            messages.append((self.pub_points, make_pointcloud2(header, result.cloud)))
        built = time.perf_counter()
        for publisher, message in messages:
            publisher.publish(message)
        return {"messages": (built - start) * 1e3, "publish": (time.perf_counter() - built) * 1e3}

    def _report_alignment(self, result: FrameResult) -> None:
        alignment = result.alignment
        if alignment is None or alignment.ok:
            return
        where = "depth/relative" if not result.metric else "depth (the model's own metric scale)"
        self._log(
            "alignment", f"LiDAR alignment failed ({alignment.reason}): publishing the unaligned output on {where}"
        )

    def _log(self, kind: str, message: str, level: str = "warning") -> None:
        """Log, throttled per kind (image, camera_info, lidar, ...): a flood of bad input logs a few lines."""
        message = self._throttle(kind, message)
        if message is None:
            return
        if level == "info":  # one call site per severity: rclpy refuses a site whose severity changes
            self.get_logger().info(message)
        else:
            self.get_logger().warning(message)

    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray(status=[diagnostics.pipeline_status(vars(self.counters), list(self.stages))])
        if self.last_result is not None and self.last_result.alignment is not None:
            array.status.append(diagnostics.alignment_status(self.last_result.alignment))
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diagnostics.publish(array)

    def destroy_node(self) -> None:
        self._slot.close()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
        super().destroy_node()


def _stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _tf_buffer(node: Node):
    """A tf2_ros buffer fed by a listener, for use_tf (UNTESTED here: tf2_ros is not installable from PyPI)."""
    try:
        import tf2_ros
    except ImportError:
        raise ValueError("use_tf needs tf2_ros, which is not importable here: set lidar_to_camera instead") from None
    buffer = tf2_ros.Buffer()
    node._tf_listener = tf2_ros.TransformListener(buffer, node)
    return buffer


def main(args: list[str] | None = None) -> int:
    """`depth_node --ros-args ...` (args default to sys.argv, so --ros-args reaches rclpy).

    Returns the exit code: 1 when the model or a parameter is unusable (one line on stderr), 0 after SIGINT or
    SIGTERM, also when one arrives during start-up.

    Start-up runs under handlers of ours that only note the signal, so the context stays valid until the node is
    built: with rclpy's handlers a signal shut the context down from another thread while the node was still logging
    its start-up lines, and rcl printed "Failed to publish log message to rosout" for each. rclpy's handlers (which
    wake the executor) take over once the node is up; a signal noted before then ends the process without spinning.
    """
    # A half-built node torn down on the way out warns about its rosout publisher; that is the requested exit, not
    # a fault, so it must not look like one on stderr.
    warnings.filterwarnings("ignore", message="Failed to fini rosout publisher", category=RuntimeWarning)
    reuse_large_buffers()  # before rclpy.init: the DDS receive buffers are the first megabyte allocations
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    executor, node, code = None, None, 0
    try:
        node = DepthNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        install_signal_handlers(SignalHandlerOptions.ALL)  # they call ours too, which only set `stop`
        if not stop.is_set():
            executor.spin()
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        if rclpy.ok():
            print(f"depth_node: error: {error}", file=sys.stderr)
            code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():  # a failure on a context a signal has shut down is part of the requested exit
            raise
    finally:
        if node is not None:
            node.destroy_node()
        if executor is not None:
            executor.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
