"""Temporal filtering of metric depth with odometry: the previous output, moved by the camera's motion, is blended
with the new frame, so static surfaces stop flickering. ROS-free numpy; the node feeds it /tf and /tf_static, or
nav_msgs/Odometry (and /tf_static when it can hear it).

Per frame t with camera pose T_odom_cam(t): the previous filtered depth is carried into frame t (`carry_previous`,
relative pose inv(T_odom_cam(t)) @ T_odom_cam(t-1)); where it agrees with the new depth, |ln carried - ln new| <
`tolerance`, the output is the weighted geometric mean exp((1 - w) ln new + w ln carried), elsewhere (disocclusions,
moving objects, sky, invalid pixels) the new depth as is.
That is an exponential moving average along the motion: on static surfaces frame-to-frame noise shrinks, and the
tolerance keeps it from dragging moving objects or newly seen surfaces. Without a pose, or after a jump in stamps
or image size, the filter restarts from the new frame.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

import numpy as np

from depth_node.geometry import backproject, lookup_transform, project_points, transform_points

MAX_GAP_NS = 500_000_000  # frames further apart than this (or going back in time) restart the filter


class OdometryBuffer:
    """Recent odometry (stamped) and static transforms, enough to look up the camera pose in the odometry frame.

    Args:
        odom_frame: the fixed frame the odometry is expressed in (REP 105: odom).
        keep: stamped transforms kept per (parent, child) edge.
        mount: (4, 4) camera pose in the odometry's child frame, used when the static transforms give no chain from
            that frame to the camera's; None: such a camera has no pose.
    """

    def __init__(self, odom_frame: str = "odom", keep: int = 200, mount: np.ndarray | None = None) -> None:
        self.odom_frame, self.keep, self.mount = odom_frame, keep, mount
        self.static: dict[tuple[str, str], np.ndarray] = {}
        self.dynamic: dict[tuple[str, str], tuple[list[int], list[np.ndarray]]] = {}
        self._lock = threading.Lock()  # the node adds from the executor thread and looks up from its worker

    def add(self, parent: str, child: str, stamp_ns: int, pose: np.ndarray, static: bool = False) -> None:
        """One transform: the (4, 4) pose of `child` in `parent` (it maps child coordinates into the parent)."""
        edge, pose = (parent.lstrip("/"), child.lstrip("/")), np.asarray(pose, np.float64)
        with self._lock:
            if static:
                self.static[edge] = pose
                return
            stamps, poses = self.dynamic.setdefault(edge, ([], []))
            at = bisect.bisect_right(stamps, stamp_ns)
            stamps.insert(at, int(stamp_ns))
            poses.insert(at, pose)
            del stamps[: -self.keep], poses[: -self.keep]

    def camera_pose(self, camera_frame: str, stamp_ns: int, max_dt_ns: int = 50_000_000) -> np.ndarray | None:
        """(4, 4) T_odom_camera at `stamp_ns`: the odometry edge odom -> base nearest in stamp (within `max_dt_ns`)
        composed with the static chain base -> camera (else `mount`); None when either is missing."""
        with self._lock:
            static = dict(self.static)
            edges = [(child, list(stamps), list(poses)) for (parent, child), (stamps, poses) in self.dynamic.items()
                     if parent == self.odom_frame and stamps]  # fmt: skip
        for child, stamps, poses in edges:
            mount = lookup_transform(static, child, camera_frame.lstrip("/"))
            mount = self.mount if mount is None else mount
            if mount is None:
                continue
            at = bisect.bisect_left(stamps, stamp_ns)
            nearest = min((i for i in (at - 1, at) if 0 <= i < len(stamps)), key=lambda i: abs(stamps[i] - stamp_ns))
            if abs(stamps[nearest] - stamp_ns) <= max_dt_ns:
                return poses[nearest] @ mount
        return None


@dataclass
class TemporalFilter:
    """Odometry-warped exponential smoothing of metric depth (see the module docstring).

    Attributes:
        weight: w in [0, 1): share of the warped previous output (0: off).
        tolerance: largest |ln carried - ln new| still blended (0.2: about 20 %).
    """

    weight: float = 0.7
    tolerance: float = 0.2
    _previous: tuple[int, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def reset(self) -> None:
        self._previous = None

    def __call__(self, depth: np.ndarray, projection: np.ndarray, pose: np.ndarray | None, stamp_ns: int) -> np.ndarray:
        """The filtered depth of one frame.

        Args:
            depth: (H, W) metres; NaN / +-Inf (REP 117) and <= 0 pass through unchanged and are never blended.
            projection: (3, 4) P of the depth image.
            pose: (4, 4) T_odom_camera of this frame, or None (no odometry: the frame passes unchanged).
            stamp_ns: the frame's stamp.

        Returns:
            (H, W) float32 metres.
        """
        depth = np.asarray(depth, np.float32)
        previous, self._previous = self._previous, None
        if pose is None:
            return depth
        out = depth
        if previous is not None and previous[2].shape == depth.shape and 0 < stamp_ns - previous[0] <= MAX_GAP_NS:
            out = self._blend(depth, projection, np.linalg.inv(pose) @ previous[1], previous[2])
        self._previous = (stamp_ns, np.asarray(pose, np.float64), out)
        return out

    def _blend(self, depth: np.ndarray, projection, T_cur_prev: np.ndarray, previous: np.ndarray) -> np.ndarray:
        carried = carry_previous(previous, depth, projection, T_cur_prev)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_new, log_carried = np.log(depth), np.log(carried)
            close = (carried > 0) & (depth > 0) & np.isfinite(depth) & (np.abs(log_carried - log_new) < self.tolerance)
        blended = depth.copy()
        blended[close] = np.exp((1 - self.weight) * log_new[close] + self.weight * log_carried[close])
        return blended


def carry_previous(
    previous: np.ndarray, depth: np.ndarray, projection: np.ndarray, T_cur_prev: np.ndarray
) -> np.ndarray:
    """The previous frame's depth brought into the current view, one value per current pixel (a backward warp).

    Each pixel's point (from the new `depth`) is moved into the previous view to find where that surface was seen
    (nearest pixel); the previous depth there is back-projected and moved into the current view, and its z is the
    carried depth. Unlike splatting the previous frame forward, this leaves no holes where the view zooms in.

    Args:
        previous, depth: (H, W) metres of the previous and the current frame; NaN, +-Inf and <= 0 are invalid.
        projection: (3, 4) P of both (Tx = Ty = 0).
        T_cur_prev: (4, 4) taking previous-camera points into the current camera.

    Returns:
        (H, W) float64 metres, 0 where the point leaves the previous view or meets no valid previous depth.
    """
    height, width = depth.shape
    fx, fy, cx, cy = projection[0, 0], projection[1, 1], projection[0, 2], projection[1, 2]
    points = backproject(depth, projection).reshape(-1, 3)
    u, v, z = project_points(transform_points(np.linalg.inv(T_cur_prev), points), projection)
    with np.errstate(invalid="ignore"):
        columns, rows = np.rint(u), np.rint(v)
        inside = (z > 1e-6) & (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
    columns, rows = columns[inside], rows[inside]
    seen = np.asarray(previous, np.float64).ravel()[rows.astype(np.int64) * width + columns.astype(np.int64)]
    valid = np.isfinite(seen) & (seen > 0)
    seen_points = (
        np.stack([(columns - cx) / fx, (rows - cy) / fy, np.ones_like(seen)], axis=1)[valid] * seen[valid, None]
    )
    carried = np.zeros(height * width)
    carried[np.flatnonzero(inside)[valid]] = transform_points(T_cur_prev, seen_points)[:, 2]
    return carried.reshape(height, width)
