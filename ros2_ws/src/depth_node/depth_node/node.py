"""ROS 2 depth node: camera frames in; `depth` (32FC1 metres), `depth/camera_info`, `points`, `depth/confidence`,
`depth/mono` (with LiDAR) and `diagnostics` out. Topic and parameter tables: README.md.

A thin adapter: messages -> arrays (conversions) -> DepthPipeline (engine, LiDAR alignment, geometry) -> messages.
Inference runs on a worker thread on the newest frame only: a frame arriving while the worker is busy replaces the
waiting one, which is counted as dropped, so latency stays bounded when the model is slower than the camera.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from depth_node import conversions, params
from depth_node.engine import ModelLoadError, open_engine
from depth_node.geometry import make_pointcloud2, pointcloud2_to_xyz, transform_to_matrix
from depth_node.pipeline import DepthPipeline, FrameResult, PipelineOptions, StampBuffer

WARN_PERIOD_S = 2.0  # the same warning is logged at most once per period
STAGE_WINDOW = 100  # diagnostics report the median of each stage over the last frames


def make_qos(reliability: str, depth: int) -> QoSProfile:
    """Keep-last QoS from the (checked) reliability / depth parameters."""
    policy = ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=policy)


class FrameSlot:
    """Keep-latest hand-over from the subscription callback to the worker: one waiting frame at most."""

    def __init__(self):
        self._item = None
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item) -> bool:
        """Offer a frame; True when it replaced one the worker had not taken yet (a dropped frame)."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self, timeout: float):
        """The waiting frame, or None after `timeout` seconds or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout=timeout)
            item, self._item = self._item, None
            return item

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class Counters:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    bad_input: int = 0
    no_camera_info: int = 0
    idle: int = 0  # frames not processed because nobody subscribed (lazy)


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
        engine = open_engine(p["model"], p["backend"], p["device"], p["threads"] or None, p["resize"])
        self.pipeline = DepthPipeline(engine, PipelineOptions.from_params(p))
        self.counters = Counters()
        self.stages: deque[dict[str, float]] = deque(maxlen=STAGE_WINDOW)
        self.camera_info: CameraInfo | None = None
        self.clouds = StampBuffer()
        self.last_result: FrameResult | None = None
        self._warned: dict[str, float] = {}
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
        self.clouds.add(_stamp_ns(msg.header), msg)

    def _on_image(self, msg: Image | CompressedImage) -> None:
        self.counters.frames_in += 1
        if self._slot.put((msg, time.perf_counter())):
            self.counters.dropped += 1

    # --- worker ------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while rclpy.ok(context=self.context) and not self._slot.closed:
            item = self._slot.take(timeout=0.5)
            if item is None:
                continue
            try:
                self._process(*item)
            except Exception as error:  # noqa: BLE001 - a bad frame must never kill the worker
                self._warn(f"frame skipped: {type(error).__name__}: {error}")

    def _listened(self, *publishers) -> bool:
        return not self.params["lazy"] or any(pub.get_subscription_count() > 0 for pub in publishers)

    def _process(self, msg: Image | CompressedImage, received: float) -> None:
        if not self._listened(self.pub_info, self.pub_points, *self.pub_images.values()):
            self.counters.idle += 1
            return
        start = time.perf_counter()
        frame = self._decode(msg)
        if frame is None:
            return
        rgb, info = frame
        projection = conversions.camera_info_to_P(info)
        decoded = time.perf_counter()
        points, transform = self._paired_cloud(msg.header) if self.params["use_lidar"] else (None, None)
        want_points = self._listened(self.pub_points)
        result = self.pipeline.process(rgb, projection, points, transform, want_points=want_points)
        stages = dict(result.timings_ms, **self._publish(msg.header, info, result), decode=(decoded - start) * 1e3)
        done = time.perf_counter()
        stages["wait"] = (start - received) * 1e3  # in the keep-latest slot while the previous frame ran
        stages["overhead"] = (done - start) * 1e3 - stages["inference"]  # everything but the network
        stages["total"] = (done - received) * 1e3
        self.stages.append(stages)
        self.last_result = result
        self.counters.frames_out += 1
        self._report_alignment(result)

    def _decode(self, msg: Image | CompressedImage) -> tuple[np.ndarray, CameraInfo] | None:
        """(RGB image, CameraInfo scaled to it), or None with a warning when the frame must be skipped."""
        info = self.camera_info
        if info is None:
            self.counters.no_camera_info += 1
            self._warn("no camera_info received yet: frame skipped")
            return None
        try:
            conversions.validate_camera_info(info)
            rgb = conversions.compressed_to_numpy(msg) if isinstance(msg, CompressedImage) else conversions.to_rgb(msg)
        except ValueError as error:
            self.counters.bad_input += 1
            self._warn(f"frame skipped: {error}")
            return None
        if (info.width, info.height) != (rgb.shape[1], rgb.shape[0]):
            info = conversions.scale_camera_info(info, rgb.shape[1], rgb.shape[0])
        return rgb, info

    def _paired_cloud(self, header) -> tuple[np.ndarray | None, np.ndarray | None]:
        """LiDAR points (N, 3) nearest in stamp to the image within lidar_max_dt, and their transform (None: param)."""
        cloud, dt = self.clouds.nearest(_stamp_ns(header), self.params["lidar_max_dt"])
        if cloud is None:
            limit = self.params["lidar_max_dt"]
            self._warn(
                f"no LiDAR scan within lidar_max_dt={limit} s of the image (nearest {dt:.3f} s): frame not aligned",
                key="lidar pairing",
            )
            return None, None
        try:
            points = pointcloud2_to_xyz(cloud)
        except ValueError as error:
            self.counters.bad_input += 1
            self._warn(f"LiDAR scan skipped: {error}")
            return None, None
        if self._tf_buffer is None:
            return points, None
        return points, self._lookup_transform(header.frame_id, cloud.header)

    def _lookup_transform(self, camera_frame: str, cloud_header) -> np.ndarray | None:
        """TF camera <- LiDAR at the scan's stamp (UNTESTED here: tf2_ros is not on PyPI)."""
        import tf2_ros

        try:
            stamp = Time.from_msg(cloud_header.stamp)
            stamped = self._tf_buffer.lookup_transform(camera_frame, cloud_header.frame_id, stamp)
        except tf2_ros.TransformException as error:
            self._warn(f"no TF {cloud_header.frame_id} -> {camera_frame}: {error}; using lidar_to_camera")
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
        if result.points is not None:
            messages.append((self.pub_points, make_pointcloud2(header, result.points, result.colors)))
        built = time.perf_counter()
        for publisher, message in messages:
            publisher.publish(message)
        return {"messages": (built - start) * 1e3, "publish": (time.perf_counter() - built) * 1e3}

    def _report_alignment(self, result: FrameResult) -> None:
        alignment = result.alignment
        if alignment is None or alignment.ok:
            return
        where = "depth/relative" if not result.metric else "depth (the model's own metric scale)"
        self._warn(
            f"LiDAR alignment failed ({alignment.reason}): publishing the unaligned output on {where}", key="alignment"
        )

    def _warn(self, message: str, key: str | None = None) -> None:
        """Log a warning unless one with the same key (default: the same text) was logged in the last WARN_PERIOD_S."""
        key = message if key is None else key
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_PERIOD_S) < WARN_PERIOD_S:
            return
        if len(self._warned) > 256:  # texts carry numbers: keep the table bounded
            self._warned.clear()
        self._warned[key] = now
        self.get_logger().warning(message)

    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray(status=[self._pipeline_status()])
        if self.last_result is not None and self.last_result.alignment is not None:
            array.status.append(_alignment_status(self.last_result))
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diagnostics.publish(array)

    def _pipeline_status(self) -> DiagnosticStatus:
        """Frame counters and the median of each stage (ms) over the last STAGE_WINDOW frames."""
        status = DiagnosticStatus(level=DiagnosticStatus.OK, name="depth_node: pipeline", hardware_id="depth_node")
        counters = vars(self.counters)
        status.message = f"{counters['frames_out']} frames out, {counters['dropped']} dropped"
        if counters["no_camera_info"] and not counters["frames_out"]:
            status.level, status.message = DiagnosticStatus.WARN, "no camera_info received"
        stages = list(self.stages)
        names = sorted({name for frame in stages for name in frame})
        values = {f"{name}_ms_p50": np.median([f[name] for f in stages if name in f]) for name in names}
        values = {key: f"{value:.2f}" for key, value in values.items()} | {k: str(v) for k, v in counters.items()}
        status.values = [KeyValue(key=key, value=value) for key, value in values.items()]
        return status

    def destroy_node(self) -> None:
        self._slot.close()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
        super().destroy_node()


def _alignment_status(result: FrameResult) -> DiagnosticStatus:
    """The last frame's LiDAR alignment: scale, shift, residual (m), inliers / points."""
    alignment = result.alignment
    level = DiagnosticStatus.OK if alignment.ok else DiagnosticStatus.WARN
    status = DiagnosticStatus(level=level, name="depth_node: lidar alignment", hardware_id="depth_node")
    status.message = alignment.reason
    values = {
        "ok": alignment.ok,
        "from_prior": alignment.from_prior,
        "space": alignment.space,
        "scale": f"{alignment.scale:.6g}",
        "shift": f"{alignment.shift:.6g}",
        "residual_m": f"{alignment.residual:.4g}",
        "inliers": alignment.inliers,
        "points": alignment.points,
    }
    status.values = [KeyValue(key=key, value=str(value)) for key, value in values.items()]
    return status


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
    """`depth_node --ros-args ...` (args default to sys.argv, so --ros-args reaches rclpy)."""
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
    except Exception:
        if rclpy.ok():  # after SIGTERM the executor may fail on the shut-down context instead: a clean exit
            raise
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
