"""ROS 2 depth node: camera frames in; the outputs of topics.OUTPUTS (`depth` 32FC1 metres, `depth/camera_info`,
`points`, ...) and `diagnostics` out. Topic and parameter tables: README.md.

A thin rclpy adapter: messages in -> stream.FrameStream (CameraInfo checks, scan pairing, restart detection, the
DepthPipeline) -> messages out (codec). Inference runs on a worker thread on the newest frame only: a frame arriving
while the worker is busy replaces the waiting one, which is counted as dropped, so latency stays bounded when the
model is slower than the camera.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
import warnings

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy._rclpy_pybind11 import RCLError
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions, install_signal_handlers
from rclpy.time import Time
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from depth_node import diagnostics, params
from depth_node.codec import ROS_TYPES, make_header, output_message, transform_to_matrix
from depth_node.engine import ModelLoadError
from depth_node.frame_slot import FrameSlot
from depth_node.image_codec import shown
from depth_node.log_throttle import Throttle
from depth_node.memory import reuse_large_buffers
from depth_node.pipeline import FrameResult, PipelineOptions, build_pipeline
from depth_node.stream import Event, FrameStream
from depth_node.topics import DIAGNOSTICS, OUTPUTS


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
        try:
            self._start()
        except BaseException:
            # Tear the half-built node down here, before raising: left to the garbage collector, it went while Fast
            # DDS discovery threads still ran (a hang in ~500 failing starts, once a SIGSEGV).
            self.destroy_node()
            raise

    def _start(self) -> None:
        """Parameters, model, frame stream, topics and worker: what __init__ builds once the rcl node exists."""
        self.params = self._declare_parameters()
        p = self.params
        if not p["model"]:
            raise ModelLoadError("parameter 'model' is empty: pass -p model:=/path/to/model.onnx")
        self.pipeline = build_pipeline(p)
        engine = self.pipeline.engine
        self._throttle = Throttle()
        self._tf_buffer = _tf_buffer(self) if p["use_lidar"] and p["use_tf"] else None
        lookup = self._lookup_transform if self._tf_buffer is not None else None
        self.stream = FrameStream(self.pipeline, p, self._log, transform_for=lookup)
        self.counters = self.stream.counters
        self._create_topics(engine.metadata.output_kind)
        if p["temporal_filter"]:
            self._subscribe_odometry()
        self._worker = threading.Thread(target=self._work, name="depth_inference", daemon=True)
        self._worker.start()
        topic = self.resolve_topic_name("image/compressed" if p["image_transport"] == "compressed" else "image")
        for reason in engine.fallbacks:  # why a better backend did not start (e.g. TensorRT on a CPU-only box)
            self.get_logger().info(f"backend skipped: {reason}")
        self.get_logger().info(f"loaded {p['model']} ({engine.backend_name}); waiting for '{topic}'")
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

    def _declare_parameters(self) -> dict:
        """Declare every parameter once (typed loosely: `-p min_depth:=1` is fine) and check the values."""
        overrides = getattr(self, "_parameter_overrides", {})  # rclpy has no public view of the given values
        unknown = [name for name in overrides if name not in params.PARAMETERS and not self.has_parameter(name)]
        params.check_names(sorted(unknown), "depth_node")  # a typo is an error, not a silently ignored value
        for name, spec in params.PARAMETERS.items():
            # read-only unless the running node applies a new value: `ros2 param set` is refused, never ignored
            descriptor = ParameterDescriptor(
                description=spec.description, dynamic_typing=True, read_only=not spec.runtime
            )
            self.declare_parameter(name, spec.default, descriptor)
        return params.resolve({name: self.get_parameter(name).value for name in params.PARAMETERS})

    def _check_parameters(self, changed: list[Parameter]) -> SetParametersResult:
        """Refuse a set of run-time parameters that would not resolve, with the reason (checked as at start-up)."""
        ours = {p.name: p.value for p in changed if p.name in params.PARAMETERS}
        try:
            params.resolve(self.params | ours)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, changed: list[Parameter]) -> None:
        """Apply accepted run-time parameters from the next frame on."""
        ours = {p.name: p.value for p in changed if p.name in params.PARAMETERS}
        if not ours:
            return
        self.params = params.resolve(self.params | ours)
        self.pipeline.configure(PipelineOptions.from_params(self.params))
        self.stream.configure(self.params)
        if "diagnostics_period" in ours:
            self.destroy_timer(self._diagnostics_timer)
            self._diagnostics_timer = self.create_timer(self.params["diagnostics_period"], self._publish_diagnostics)
        self.get_logger().info("parameters set: " + ", ".join(f"{name}={self.params[name]}" for name in ours))

    def _create_topics(self, output_kind: str) -> None:
        p = self.params
        sub_qos = make_qos(p["sub_reliability"], p["sub_depth"])
        pub_qos = make_qos(p["pub_reliability"], p["pub_depth"])
        if p["image_transport"] == "compressed":
            self.create_subscription(CompressedImage, "image/compressed", self._on_image, sub_qos)
        else:
            self.create_subscription(Image, "image", self._on_image, sub_qos)
        self.create_subscription(CameraInfo, "camera_info", self.stream.on_camera_info, sub_qos)
        if p["use_lidar"]:
            self.create_subscription(PointCloud2, "lidar", self.stream.on_scan, sub_qos)
        elif output_kind != "metric":
            self.get_logger().warning(
                f"model output is {output_kind}, not metric, and use_lidar is off: "
                "publishing it on 'depth/relative', not 'depth'"
            )
        self.output_publishers = {
            topic: self.create_publisher(ROS_TYPES[kind], topic, pub_qos) for topic, kind in OUTPUTS.items()
        }
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, DIAGNOSTICS, 10)
        self._diagnostics_timer = self.create_timer(p["diagnostics_period"], self._publish_diagnostics)

    def _subscribe_odometry(self) -> None:
        """The temporal filter's odometry straight into the frame stream's buffer (tf2_msgs / nav_msgs, no tf2_ros):
        /tf and /tf_static, or nav_msgs/Odometry on `odom` plus /tf_static when tf2_msgs is there to hear it."""
        try:
            from tf2_msgs.msg import TFMessage
        except ImportError:
            TFMessage = None
        if self.params["odometry"] == "tf":
            if TFMessage is None:
                raise ValueError(
                    "temporal_filter needs tf2_msgs (ros-tf2-msgs) to hear /tf: it is not importable "
                    "(odometry:=odom takes nav_msgs/Odometry on 'odom' instead)"
                )
            self.create_subscription(
                TFMessage, "/tf", lambda m: self.stream.on_transforms(m, False), QoSProfile(depth=100)
            )
        else:
            try:
                from nav_msgs.msg import Odometry
            except ImportError:
                raise ValueError("odometry:=odom needs nav_msgs (ros-nav-msgs): it is not importable") from None
            # best effort hears reliable and best-effort publishers alike; odometry messages are small, rarely lost
            odom_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)
            self.create_subscription(Odometry, "odom", self.stream.on_odometry, odom_qos)
            mount = "/tf_static, else camera_to_base" if TFMessage is not None else "camera_to_base (no tf2_msgs)"
            self.get_logger().info(f"temporal filter: odometry from '{self.resolve_topic_name('odom')}', camera "
                                   f"mount from {mount}")  # fmt: skip
        if TFMessage is not None:
            static_qos = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.create_subscription(TFMessage, "/tf_static", lambda m: self.stream.on_transforms(m, True), static_qos)

    # --- callbacks: cheap, never block on inference -------------------------------------------------------------
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
            return self._process(msg, received)
        except Exception as error:  # noqa: BLE001 - a bad frame must never kill the worker
            if self._slot.closed or not rclpy.ok(context=self.context):
                return None  # shutting down: the publishers are gone, nothing went wrong with the frame
            self.counters.failed += 1
            self._log(Event("processing", f"frame skipped: {type(error).__name__}: {error}"))
            return None

    def _listened(self, *topics: str) -> bool:
        return not self.params["lazy"] or any(self.output_publishers[t].get_subscription_count() > 0 for t in topics)

    def _process(self, msg: Image | CompressedImage, received: float | None) -> FrameResult | None:
        if not self._listened(*OUTPUTS):
            self.counters.idle += 1
            return None
        frame = self.stream.process(msg, received, self._listened("points"), self._listened("depth/confidence"))
        if frame is None:
            return None
        start = time.perf_counter()
        header = make_header(ROS_TYPES, frame.stamp, frame.frame_id)
        messages = [
            (self.output_publishers[topic], output_message(topic, header, payload, ROS_TYPES))
            for topic, payload in frame.outputs().items()
            if self._listened(topic)
        ]
        built = time.perf_counter()
        for publisher, message in messages:
            publisher.publish(message)
        published = time.perf_counter()
        self.stream.finish(frame, messages=(built - start) * 1e3, publish=(published - built) * 1e3)
        return frame.result

    def _lookup_transform(self, camera_frame: str, cloud_header):
        """TF camera <- LiDAR at the scan's stamp (UNTESTED here: tf2_ros is not on PyPI)."""
        import tf2_ros

        try:
            stamp = Time.from_msg(cloud_header.stamp)
            stamped = self._tf_buffer.lookup_transform(camera_frame, cloud_header.frame_id, stamp)
        except tf2_ros.TransformException as error:
            frames = f"{shown(cloud_header.frame_id)} -> {shown(camera_frame)}"
            self._log(Event("tf", f"no TF {frames}: {shown(error, 200)}; using lidar_to_camera"))
            return None
        return transform_to_matrix(stamped.transform)

    def _log(self, event: Event) -> None:
        """Log, throttled per kind (image, camera_info, lidar, ...): a flood of bad input logs a few lines."""
        message = self._throttle(event.kind, event.line)
        if message is None:
            return
        if event.level == "info":  # one call site per severity: rclpy refuses a site whose severity changes
            self.get_logger().info(message)
        else:
            self.get_logger().warning(message)

    def _publish_diagnostics(self) -> None:
        stream = self.stream
        array = DiagnosticArray(status=[diagnostics.pipeline_status(vars(stream.counters), list(stream.stages))])
        if stream.last_result is not None and stream.last_result.alignment is not None:
            array.status.append(diagnostics.alignment_status(stream.last_result.alignment))
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diagnostics.publish(array)

    def destroy_node(self) -> None:
        self._slot.close()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
        super().destroy_node()


def _tf_buffer(node: Node):
    """A tf2_ros buffer fed by a listener, for use_tf (UNTESTED here: tf2_ros is not installable from PyPI)."""
    try:
        import tf2_ros
    except ImportError:
        raise ValueError("use_tf needs tf2_ros, which is not importable here: set lidar_to_camera instead") from None
    buffer = tf2_ros.Buffer()
    node._tf_listener = tf2_ros.TransformListener(buffer, node)
    return buffer


def rcl_error_summary(error: Exception) -> str:
    """rcl's message without its "failed to initialize rcl" prefix and C source locations, e.g. "Couldn't parse
    params file: '--params-file p.yaml'. Error: Error opening YAML file"."""
    text = re.sub(r"^(failed to initialize rcl|Failed to parse ROS arguments): ", "", str(error))
    text = re.sub(r", at [^,]+\.c:\d+", "", text)
    return text.replace(". Error: error not set", "").strip()


def main(args: list[str] | None = None) -> int:
    """`depth_node --ros-args ...` (args default to sys.argv, so --ros-args reaches rclpy).

    Returns the exit code: 1 when the arguments (a malformed `--ros-args` rule, a missing or broken params file), the
    model or a parameter are unusable (one line on stderr), 0 after SIGINT or SIGTERM, also when one arrives during
    start-up.

    Start-up runs under handlers of ours that only note the signal, so the context stays valid until the node is
    built: with rclpy's handlers a signal shut the context down from another thread while the node was still logging
    its start-up lines, and rcl printed "Failed to publish log message to rosout" for each. rclpy's handlers (which
    wake the executor) take over once the node is up; a signal noted before then ends the process without spinning.
    """
    # A half-built node torn down on the way out warns about its rosout publisher; that is the requested exit, not
    # a fault, so it must not look like one on stderr.
    warnings.filterwarnings("ignore", message="Failed to fini rosout publisher", category=RuntimeWarning)
    reuse_large_buffers()  # before rclpy.init: the DDS receive buffers are the first megabyte allocations
    try:
        # rcl parses --ros-args (and reads the params files) here first, without logging a line of its own
        own_args = remove_ros_args(sys.argv if args is None else args)[1:]
        if {"-h", "--help"} & set(own_args):
            print(params.usage())
            return 0
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except RCLError as error:
        print(f"depth_node: error: invalid --ros-args: {rcl_error_summary(error)}", file=sys.stderr)
        return 1
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
