"""Ray grids of the two sensors: the rectified camera 2 (one ray per pixel centre) and a 64-beam HDL-64E-like LiDAR.

A grid holds its rays in scene coordinates (origin (3,), dirs (3, rows, cols) float32) and answers `cells(lo, hi)`:
the rectangles of rays that boxes (lo, hi) can reach, so the caster only tests those.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from distill.data.synth_calib import Rig

NEAR = 0.05  # metres: camera near plane used to clip boxes that reach behind the camera
CAMERA_RANGE = 300.0  # metres of depth drawn; ground truth keeps < 256 m (uint16 / 256)
LIDAR_RANGE = 120.0  # metres
LIDAR_ELEVATIONS = np.radians(np.linspace(2.0, -24.8, 64))  # beam elevations, top to bottom
LIDAR_COLUMNS = 2160  # azimuth steps per turn: 1/6 degree
# Corner k of a box takes hi on axis i where bit i of k is set.
_CORNER_BITS = np.array([[(k >> axis) & 1 for axis in range(3)] for k in range(8)], bool)


def rotation_z(angle: float) -> np.ndarray:
    """(3, 3) rotation by `angle` radians about z."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(N, 8, 3) corners of axis-aligned boxes lo, hi (N, 3)."""
    return np.where(_CORNER_BITS[None], hi[:, None], lo[:, None])


@dataclass
class CameraGrid:
    """Rays through the pixel centres of rectified camera 2; the ray parameter t is the depth z (metres).

    A, b: scene -> camera affine map (X_cam = A @ X + b); K: (3, 3) intrinsics.
    """

    origin: np.ndarray
    dirs: np.ndarray
    A: np.ndarray
    b: np.ndarray
    K: np.ndarray
    t_max: float = CAMERA_RANGE

    def cells(self, lo: np.ndarray, hi: np.ndarray) -> Iterator[tuple[int, int, int, int, int]]:
        """(box index, row0, row1, col0, col1) of the pixels whose rays may hit each box (N, 3); far boxes skipped."""
        return self.cells_of_hulls(box_corners(lo, hi))

    def cells_of_hulls(self, points: np.ndarray) -> Iterator[tuple[int, int, int, int, int]]:
        """Like `cells` for the convex hulls of point sets (N, K, 3) in scene coordinates."""
        points = points @ self.A.T + self.b
        pairs = np.array([(i, j) for i in range(points.shape[1]) for j in range(i + 1, points.shape[1])])
        start, end = points[:, pairs[:, 0]], points[:, pairs[:, 1]]
        crossing = (start[..., 2] < NEAR) != (end[..., 2] < NEAR)
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = np.where(crossing, (NEAR - start[..., 2]) / (end[..., 2] - start[..., 2]), 0.0)
        # A hull cut at the near plane projects inside the hull of its points in front and of the segments' crossings.
        front = points[..., 2] >= NEAR
        points = np.concatenate([points, start + weight[..., None] * (end - start)], axis=1)
        valid = np.concatenate([front, crossing], axis=1)
        depth = np.maximum(points[..., 2], NEAR)
        u = self.K[0, 0] * points[..., 0] / depth + self.K[0, 2]
        v = self.K[1, 1] * points[..., 1] / depth + self.K[1, 2]
        height, width = self.dirs.shape[1:]
        spans = [_span(np.where(valid, coord, np.inf).min(1), np.where(valid, coord, -np.inf).max(1), size)
                 for coord, size in ((v, height), (u, width))]  # fmt: skip
        near_enough = np.where(valid, points[..., 2], np.inf).min(1) <= self.t_max
        (r0, r1), (c0, c1) = spans
        for index in np.flatnonzero(near_enough & (r1 > r0) & (c1 > c0)):
            yield index, r0[index], r1[index], c0[index], c1[index]


def _span(low: np.ndarray, high: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel range [start, stop) covering coordinates low..high with a one-pixel margin, clipped."""
    start = np.clip(np.floor(low) - 1, 0, size)
    stop = np.clip(np.ceil(high) + 2, 0, size)
    return start.astype(int), stop.astype(int)


def camera_rays(rig: Rig) -> np.ndarray:
    """(3, H, W) float32 ray directions through the pixel centres in camera coordinates, z = 1."""
    K = rig.K
    u, v = np.meshgrid(np.arange(rig.width), np.arange(rig.height))
    return np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones(u.shape)]).astype(np.float32)


def camera_grid(rig: Rig, rays: np.ndarray, velo_position: np.ndarray, yaw: float) -> CameraGrid:
    """Camera rays (`camera_rays(rig)`) for the Velodyne at `velo_position` (3,) in scene coordinates, heading `yaw`."""
    A, b = rig.cam2_from_velo()
    # X_velo = Rz(yaw)^T (X - p), so X_cam = A Rz^T X + (b - A Rz^T p).
    A = A @ rotation_z(yaw).T
    b = b - A @ velo_position
    inverse = np.linalg.inv(A).astype(np.float32)
    dirs = (inverse @ rays.reshape(3, -1)).reshape(rays.shape)
    return CameraGrid(np.linalg.solve(A, -b), dirs, A, b, rig.K)


@dataclass
class LidarGrid:
    """Beams of a spinning 64-beam LiDAR at `origin`, heading `yaw`; t is the range (unit directions).

    dirs: (3, 64, LIDAR_COLUMNS) in scene coordinates; velo_dirs: the same in the Velodyne frame.
    """

    origin: np.ndarray
    dirs: np.ndarray
    velo_dirs: np.ndarray
    yaw: float
    t_max: float = LIDAR_RANGE

    def cells(self, lo: np.ndarray, hi: np.ndarray) -> Iterator[tuple[int, int, int, int, int]]:
        """(box index, row0, row1, col0, col1) of the beams that may hit each box (N, 3); a wrap gives two."""
        lo, hi = lo - self.origin, hi - self.origin
        gap = np.maximum(np.maximum(lo, -hi), 0.0)
        r_min = np.hypot(gap[:, 0], gap[:, 1])
        r_max = np.hypot(np.maximum(-lo[:, 0], hi[:, 0]), np.maximum(-lo[:, 1], hi[:, 1]))
        top = np.arctan2(hi[:, 2], np.where(hi[:, 2] > 0, r_min, r_max)) + 1e-4
        bottom = np.arctan2(lo[:, 2], np.where(lo[:, 2] < 0, r_min, r_max)) - 1e-4
        rows0 = np.searchsorted(-LIDAR_ELEVATIONS, -top, side="left")
        rows1 = np.searchsorted(-LIDAR_ELEVATIONS, -bottom, side="right")
        first, last = _azimuth_span(lo, hi, self.yaw)
        reachable = (np.hypot(r_min, gap[:, 2]) <= self.t_max) & (rows1 > rows0)
        for index in np.flatnonzero(reachable):
            r0, r1 = rows0[index], rows1[index]
            if r_min[index] == 0.0 or last[index] - first[index] >= LIDAR_COLUMNS:
                yield index, r0, r1, 0, LIDAR_COLUMNS
                continue
            c0 = first[index] % LIDAR_COLUMNS
            c1 = c0 + last[index] - first[index]
            yield index, r0, r1, c0, min(c1, LIDAR_COLUMNS)
            if c1 > LIDAR_COLUMNS:
                yield index, r0, r1, 0, c1 - LIDAR_COLUMNS


def _azimuth_span(lo: np.ndarray, hi: np.ndarray, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """Column range [first, last) (unwrapped integers) seen by boxes lo, hi (N, 3) relative to the sensor.

    A footprint that excludes the sensor spans less than 180 degrees around its centre's azimuth, and its extreme
    azimuths are at corners.
    """
    corners = box_corners(lo, hi)[:, :4, :2]
    centre = np.arctan2(lo[:, 1] + hi[:, 1], lo[:, 0] + hi[:, 0])
    offsets = np.arctan2(corners[..., 1], corners[..., 0]) - centre[:, None]
    offsets = (offsets + np.pi) % (2 * np.pi) - np.pi
    step = 2 * np.pi / LIDAR_COLUMNS
    first = np.floor((centre + offsets.min(1) - yaw) / step).astype(int) - 1
    last = np.ceil((centre + offsets.max(1) - yaw) / step).astype(int) + 2
    return first, last


def lidar_grid(velo_position: np.ndarray, yaw: float) -> LidarGrid:
    """LiDAR beams for the Velodyne at `velo_position` (3,) in scene coordinates, heading `yaw` radians."""
    azimuth = np.arange(LIDAR_COLUMNS) * (2 * np.pi / LIDAR_COLUMNS)
    elevation = LIDAR_ELEVATIONS[:, None]
    velo = np.stack(np.broadcast_arrays(np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                        np.sin(elevation)))  # fmt: skip
    dirs = np.einsum("ij,jrc->irc", rotation_z(yaw), velo)
    return LidarGrid(np.asarray(velo_position, np.float64), dirs.astype(np.float32), velo.astype(np.float32), yaw)
