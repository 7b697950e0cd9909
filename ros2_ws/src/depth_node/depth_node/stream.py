"""The frame stream: everything between messages in and messages out, shared by the live node (`node.py`, rclpy)
and the bag tool (`bag.py`, rosbags). No ROS import.

Per camera frame: check the latest CameraInfo, decode the image, follow the stream (a size change is noted; image
stamps going back by more than RESTART_S mean a new stream, e.g. a bag loop or a camera restart, and reset the LiDAR
scale prior), scale the CameraInfo to the image, pair the LiDAR scan nearest in stamp (scans are parsed once, at
arrival), run the DepthPipeline, and say which outputs (topics.OUTPUTS) the frame produces. What happens is counted
in `Counters` and reported as `Event`s; each shell decides how to show them (the node throttles them on its log, the
bag tool prints each kind once and counts them in its summary). With `temporal_filter` > 0, metric depth is smoothed
along the camera motion that the odometry gives (`temporal_filter.TemporalFilter`, fed by `on_transforms` from /tf
and /tf_static, or by `on_odometry` from nav_msgs/Odometry).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from depth_node.codec import (
    camera_info_to_P,
    pointcloud2_to_xyz,
    pose_to_matrix,
    ros2_camera_info,
    scale_camera_info,
    stamp_ns,
    transform_to_matrix,
    validate_camera_info,
)
from depth_node.geometry import backproject
from depth_node.image_codec import image_msg_to_rgb
from depth_node.params import transform_matrix
from depth_node.pipeline import DepthPipeline, FrameResult
from depth_node.temporal_filter import OdometryBuffer, TemporalFilter
from depth_node.topics import OUTPUTS

STAGE_WINDOW = 100  # diagnostics report the median of each stage over the last frames
RESTART_S = 1.0  # image stamps going back by more than this: a new stream (bag loop, camera restart)
SCAN_BUFFER = 5  # LiDAR scans kept for pairing

# (camera frame id, the scan's header) -> (4, 4) LiDAR -> camera transform, or None to use lidar_to_camera.
TransformLookup = Callable[[str, Any], "np.ndarray | None"]


class Event(NamedTuple):
    """Something worth telling the user about a frame or a scan.

    Attributes:
        kind: what it is about ("image", "camera_info", "lidar pairing", ...): the node throttles per kind.
        text: what happened, worded the same each time it happens (the bag tool counts by it).
        detail: the numbers of this occurrence, or "".
        level: "warning" or "info".
    """

    kind: str
    text: str
    detail: str = ""
    level: str = "warning"

    @property
    def line(self) -> str:
        return f"{self.text} ({self.detail})" if self.detail else self.text


@dataclass
class Counters:
    """What became of the frames (and scans) received; the node publishes them in `diagnostics`."""

    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0  # replaced in the node's keep-latest slot before the worker took them
    bad_input: int = 0  # malformed image or camera_info, malformed or empty LiDAR scan: skipped
    failed: int = 0  # frames whose processing raised (a bug or a broken model): skipped
    no_camera_info: int = 0
    idle: int = 0  # frames not processed because nobody subscribed (the node's lazy mode)


class StampBuffer:
    """The last few stamped items (e.g. LiDAR scans), looked up by nearest stamp: pairing without waiting.

    Thread-safe for one writer and one reader (deque appends and snapshots are atomic in CPython).
    """

    def __init__(self, size: int = SCAN_BUFFER):
        self._items: deque[tuple[int, object]] = deque(maxlen=size)

    def add(self, stamp: int, item: object) -> None:
        self._items.append((int(stamp), item))

    def nearest(self, stamp: int, max_dt: float) -> tuple[object | None, float]:
        """(item nearest to `stamp` (ns) within max_dt seconds or None, |dt| seconds of the nearest, inf if empty)."""
        best, best_dt = None, float("inf")
        for item_stamp, item in list(self._items):
            dt = abs(item_stamp - int(stamp)) * 1e-9
            if dt < best_dt:
                best, best_dt = item, dt
        return (best if best_dt <= max_dt else None), best_dt


@dataclass
class Frame:
    """One processed camera frame, ready to be turned into messages.

    Attributes:
        stamp: the image's header stamp, integer nanoseconds (every output carries it).
        frame_id: the image's frame.
        camera_info: the CameraInfo scaled to the image (what `depth/camera_info` publishes).
        result: the pipeline's outputs.
        received, started: clock seconds at arrival and when processing began.
        stages: stage -> milliseconds so far (decode and the pipeline's).
    """

    stamp: int
    frame_id: str
    camera_info: Any
    result: FrameResult
    received: float
    started: float
    stages: dict[str, float] = field(default_factory=dict)

    def outputs(self) -> dict[str, Any]:
        """Output topic -> payload, in topics.OUTPUTS order: (H, W) float32 images, the CameraInfo, the PackedCloud.

        Depth goes on `depth` when metric, else on `depth/relative`; outputs the frame has none of are left out.
        """
        result = self.result
        payloads = {
            "depth" if result.metric else "depth/relative": result.depth,
            "depth/mono": result.mono,
            "depth/confidence": result.confidence,
            "depth/camera_info": self.camera_info,
            "points": result.cloud,
        }
        return {topic: payloads[topic] for topic in OUTPUTS if payloads.get(topic) is not None}


class FrameStream:
    """The per-frame state of one camera stream: latest CameraInfo, recent scans, the last frame, counters, timings.

    Args:
        pipeline: runs the model and derives depth, cloud and alignment from arrays.
        params: checked node parameters (`params.resolve`): use_lidar, lidar_max_dt, max_image_pixels.
        report: called with each Event.
        transform_for: LiDAR -> camera transform of a scan (TF); None: the `lidar_to_camera` parameter.
        scan_buffer: scans kept for pairing.
        clock: seconds, for the timings (time.perf_counter).
    """

    def __init__(
        self,
        pipeline: DepthPipeline,
        params: dict,
        report: Callable[[Event], None],
        transform_for: TransformLookup | None = None,
        scan_buffer: int = SCAN_BUFFER,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.pipeline = pipeline
        self.use_lidar = bool(params["use_lidar"])
        self.configure(params)
        self.counters = Counters()
        self.stages: deque[dict[str, float]] = deque(maxlen=STAGE_WINDOW)
        self.camera_info = None
        self.scans = StampBuffer(scan_buffer)
        self.last_result: FrameResult | None = None
        self._report = report
        self._transform_for = transform_for
        self._clock = clock
        self._last_frame: tuple[int, tuple[int, int]] | None = None  # (stamp ns, (H, W)) of the last decoded image
        weight = params["temporal_filter"]
        self.odometry_source = "/tf" if params["odometry"] == "tf" else "odom"
        # Odometry on a topic often comes without /tf_static (no tf2_msgs): then the camera_to_base mount stands in.
        mount = transform_matrix(params["camera_to_base"], "camera_to_base") if params["odometry"] == "odom" else None
        self.odometry = OdometryBuffer(params["odom_frame"], mount=mount)
        self.temporal = TemporalFilter(weight, params["temporal_tolerance"]) if weight else None

    def configure(self, params: dict) -> None:
        """Take the run-time parameters read here (lidar_max_dt, max_image_pixels) from checked values."""
        self.lidar_max_dt, self.max_image_pixels = float(params["lidar_max_dt"]), int(params["max_image_pixels"])

    def on_camera_info(self, msg: Any) -> None:
        """Keep the latest; it is checked per frame, so a bad one skips frames instead of leaving a stale one in use."""
        self.camera_info = ros2_camera_info(msg)

    def on_scan(self, msg: Any) -> None:
        """Parse a scan once, on arrival. A malformed or empty one is counted, reported and kept as "no points", so
        the images of its time fall back on the scale prior instead of pairing with an older scan."""
        try:
            points, kind, problem = pointcloud2_to_xyz(msg), "empty scan", ""
        except ValueError as error:
            points, kind, problem = np.empty((0, 3), np.float32), "malformed scan", str(error)
        if not problem and not len(points):
            problem = f"no finite points ({msg.width}x{msg.height} cloud)"
        if problem:
            self.counters.bad_input += 1
            self._report(Event(kind, f"LiDAR scan skipped: {problem}"))
        self.scans.add(stamp_ns(msg.header), (points, msg.header))

    def on_transforms(self, msg: Any, static: bool) -> None:
        """A tf2_msgs/TFMessage from /tf (static False) or /tf_static, kept for the temporal filter's poses."""
        for item in msg.transforms:
            pose = transform_to_matrix(item.transform)
            self.odometry.add(str(item.header.frame_id), str(item.child_frame_id), stamp_ns(item.header), pose, static)

    def on_odometry(self, msg: Any) -> None:
        """A nav_msgs/Odometry: the pose of child_frame_id (base_link) in header.frame_id (odom) at its stamp."""
        pose = pose_to_matrix(msg.pose.pose)
        self.odometry.add(str(msg.header.frame_id), str(msg.child_frame_id), stamp_ns(msg.header), pose)

    def process(
        self, msg: Any, received: float | None = None, want_points: bool = True, want_confidence: bool = True
    ) -> Frame | None:
        """One Image or CompressedImage through the pipeline; None (counted and reported) when it must be skipped.

        Args:
            msg: the image message (rclpy or rosbags).
            received: clock seconds at arrival (default: now), for the `wait` and `total` timings.
            want_points, want_confidence: build the cloud / the confidence map (False when nobody listens).
        """
        start = self._clock()
        decoded = self._decode(msg)
        if decoded is None:
            return None
        rgb, info = decoded
        projection = camera_info_to_P(info)
        decode_ms = (self._clock() - start) * 1e3
        points, transform = self._paired_scan(msg.header) if self.use_lidar else (None, None)
        result = self.pipeline.process(rgb, projection, points, transform, want_points, want_confidence)
        if self.temporal is not None and result.metric:
            self._smooth(result, projection, msg.header)
        stages = dict(result.timings_ms, decode=decode_ms)
        received = start if received is None else received
        return Frame(stamp_ns(msg.header), str(msg.header.frame_id), info, result, received, start, stages)

    def finish(self, frame: Frame, **stages_ms: float) -> dict[str, float]:
        """Account a frame whose outputs went out: its stage timings with the shell's own (ms, e.g. messages,
        publish), plus wait (before processing), overhead (all but inference) and total (from arrival)."""
        done = self._clock()
        stages = frame.stages | stages_ms
        stages["wait"] = (frame.started - frame.received) * 1e3  # in the node's keep-latest slot
        stages["overhead"] = (done - frame.started) * 1e3 - stages["inference"]
        stages["total"] = (done - frame.received) * 1e3
        self.stages.append(stages)
        self.last_result = frame.result
        self.counters.frames_out += 1
        alignment = frame.result.alignment
        if alignment is not None and not alignment.ok:
            where = "depth/relative" if not frame.result.metric else "depth (the model's own metric scale)"
            text = f"LiDAR alignment failed ({alignment.reason}): publishing the unaligned output on {where}"
            self._report(Event("alignment", text))
        return stages

    def _decode(self, msg: Any) -> tuple[np.ndarray, Any] | None:
        """(RGB image, CameraInfo scaled to it), or None with an Event when the frame must be skipped."""
        info = self.camera_info
        if info is None:
            self.counters.no_camera_info += 1
            self._report(Event("camera_info", "no camera_info received yet: frame skipped"))
            return None
        try:
            validate_camera_info(info)
        except ValueError as error:
            return self._skip(error, kind="camera_info")
        try:
            rgb = image_msg_to_rgb(msg, self.max_image_pixels)
        except ValueError as error:
            return self._skip(error, kind="image")
        self._follow(msg.header, rgb.shape[:2])
        if (int(info.width), int(info.height)) != (rgb.shape[1], rgb.shape[0]):
            info = scale_camera_info(info, rgb.shape[1], rgb.shape[0])
        return rgb, info

    def _smooth(self, result: FrameResult, projection: np.ndarray, header: Any) -> None:
        """Temporal filter on the frame's metric depth (and its cloud, rebuilt from the filtered depth)."""
        start = self._clock()
        pose = self.odometry.camera_pose(str(header.frame_id), stamp_ns(header))
        if pose is None:
            where = f"{header.frame_id!r} in {self.odometry.odom_frame!r}"
            self._report(Event("odometry", f"no {self.odometry_source} pose of {where}: frame not temporally filtered"))
        result.depth = self.temporal(result.depth, projection, pose, stamp_ns(header))
        if result.cloud is not None:
            stride = self.pipeline.options.points_stride
            backproject(result.depth, projection, stride=stride, out=result.cloud.points)
        result.timings_ms["temporal"] = (self._clock() - start) * 1e3

    def _skip(self, error: ValueError, kind: str) -> None:
        """Count and report a frame skipped for bad input of this kind ("image" or "camera_info")."""
        self.counters.bad_input += 1
        self._report(Event(kind, f"frame skipped: {error}"))

    def _follow(self, header: Any, size: tuple[int, int]) -> None:
        """Note a change of image size; reset the LiDAR scale prior when stamps jump back (a bag loop, a restart)."""
        stamp = stamp_ns(header)
        last_stamp, last_size = self._last_frame or (stamp, size)
        self._last_frame = (stamp, size)
        if size != last_size:
            text = f"image size changed from {last_size[1]}x{last_size[0]} to {size[1]}x{size[0]}"
            self._report(Event("size", text, level="info"))
        back = (last_stamp - stamp) * 1e-9
        if back > RESTART_S and self.use_lidar:
            text = f"image stamps went back more than {RESTART_S:g} s (a new stream): LiDAR scale prior reset"
            self._report(Event("restart", text, f"by {back:.1f} s", level="info"))
            self.pipeline.prior.reset()

    def _paired_scan(self, header: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
        """LiDAR points (N, 3) nearest in stamp to the image within lidar_max_dt, and their transform (None: param)."""
        scan, dt = self.scans.nearest(stamp_ns(header), self.lidar_max_dt)
        if scan is None:
            text = f"no LiDAR scan within lidar_max_dt={self.lidar_max_dt} s of the image: frame not aligned"
            self._report(Event("lidar pairing", text, f"nearest {dt:.3f} s"))
            return None, None
        points, scan_header = scan
        transform = None if self._transform_for is None else self._transform_for(str(header.frame_id), scan_header)
        return points, transform
