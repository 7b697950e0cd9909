"""Camera geometry in numpy, vectorised: rigid transforms, a static TF tree, projection, sparse depth from a point
cloud (z-buffered), depth back-projection and forward warping of depth into another view.

Conventions: camera optical frame (x right, y down, z forward), pixel (u, v) = column, row with integer
coordinates at pixel centres, P the 3x4 rectified projection matrix as in CameraInfo.P / KITTI P_rect_0x.
Pure numpy: message parsing and building (PointCloud2, TF) is `codec.py`'s.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def transform_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform. points: (N, 3) -> (N, 3) float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ transform[:3, :3].T + transform[:3, 3]


def lookup_transform(edges: dict[tuple[str, str], np.ndarray], target: str, source: str) -> np.ndarray | None:
    """4x4 taking points from frame `source` into frame `target` through a static TF tree, or None if unconnected.

    Args:
        edges: (parent, child) -> 4x4 pose of child in parent (maps child coordinates into the parent frame).
    """
    neighbours: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for (parent, child), pose in edges.items():
        neighbours[child].append((parent, pose))
        neighbours[parent].append((child, np.linalg.inv(pose)))
    chains = {source: np.eye(4)}
    frontier = [source]
    while frontier:
        frame = frontier.pop()
        for other, step in neighbours[frame]:
            if other not in chains:
                chains[other] = step @ chains[frame]
                frontier.append(other)
    return chains.get(target)


def project_points(points_cam: np.ndarray, projection: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project camera-frame points with a 3x4 P.

    Args:
        points_cam: (N, 3) metres in the camera frame (of the reference camera P is expressed in).
        projection: (3, 4) projection matrix.

    Returns:
        u, v: (N,) float64 pixel coordinates (meaningless where depth <= 0); depth: (N,) the z after projection,
        i.e. metres along the optical axis of the camera P belongs to.
    """
    homogeneous = np.concatenate([np.asarray(points_cam, np.float64), np.ones((len(points_cam), 1))], axis=1)
    image = homogeneous @ np.asarray(projection, np.float64).T
    depth = image[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = image[:, 0] / depth
        v = image[:, 1] / depth
    return u, v, depth


def points_to_depth_image(
    points_cam: np.ndarray, projection: np.ndarray, height: int, width: int, min_depth: float = 1e-3
) -> np.ndarray:
    """Sparse depth image from points: round to the nearest pixel, keep the nearest point per pixel.

    Args:
        points_cam: (N, 3) metres in the camera frame; points behind the camera or nearer than min_depth dropped.
        projection: (3, 4) P of the target image.
        height, width: target image size in pixels.

    Returns:
        (height, width) float32 metres, 0 where no point landed.
    """
    u, v, depth = project_points(points_cam, projection)
    in_front = np.isfinite(u) & np.isfinite(v) & (depth > min_depth)
    columns = np.rint(u[in_front]).astype(np.int64, copy=False)
    rows = np.rint(v[in_front]).astype(np.int64, copy=False)
    depth = depth[in_front]
    inside = (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
    flat = rows[inside] * width + columns[inside]
    nearest = _nearest_per_pixel(flat, depth[inside])
    image = np.zeros(height * width, dtype=np.float32)
    image[flat[nearest]] = depth[inside][nearest]
    return image.reshape(height, width)


def _nearest_per_pixel(flat: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """The z-buffer: indices into (N,) `flat` pixel numbers / `depth` of the nearest entry of each pixel hit."""
    # Sort by pixel, then by depth: the first entry of each pixel is the nearest point.
    order = np.lexsort((depth, flat))
    first = np.ones(len(flat), dtype=bool)
    first[1:] = flat[order][1:] != flat[order][:-1]
    return order[first]


def forward_warp(depth: np.ndarray, projection: np.ndarray, T_dst_src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move a depth image into another view of the same camera: back-project, transform, project (z-buffered).

    Args:
        depth: (H, W) metres along the optical axis of the source view; NaN, +-Inf and <= 0 are invalid.
        projection: (3, 4) P of both views (Tx = Ty = 0).
        T_dst_src: (4, 4) taking source-camera points into the destination camera (affine maps work too).

    Returns:
        depth: (H, W) float64 metres of the moved points in the destination view, 0 where none landed (the nearest
            kept per pixel, pixels rounded to the nearest centre).
        source: (H, W) int64 flat index (row * W + column) of the source pixel each destination pixel came from, -1
            where none.
    """
    height, width = depth.shape
    points = backproject(depth, projection).reshape(-1, 3)
    valid = np.flatnonzero(np.isfinite(points[:, 2]))
    u, v, z = project_points(transform_points(T_dst_src, points[valid]), projection)
    with np.errstate(invalid="ignore"):
        columns, rows = np.rint(u), np.rint(v)
        keep = (z > 1e-6) & (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
    flat = rows[keep].astype(np.int64) * width + columns[keep].astype(np.int64)
    nearest = _nearest_per_pixel(flat, z[keep])
    moved, source = np.zeros(height * width), np.full(height * width, -1, dtype=np.int64)
    moved[flat[nearest]] = z[keep][nearest]
    source[flat[nearest]] = valid[keep][nearest]
    return moved.reshape(height, width), source.reshape(height, width)


def backproject(
    depth: np.ndarray, projection: np.ndarray, stride: int = 1, out: np.ndarray | None = None
) -> np.ndarray:
    """Organised 3D points from a depth image, as depth_image_proc's point_cloud_xyz computes them.

    x = (u - cx) * z / fx, y = (v - cy) * z / fy with fx, fy, cx, cy read from P (depth_image_proc uses
    image_geometry's P-based cx()/fx() and also ignores Tx, Ty and skew). Tx, Ty only place a stereo camera
    relative to the reference camera of the pair; the points here stay in the frame of the camera that saw the
    depth (the depth image's frame_id). For a monocular camera Tx = Ty = 0 and project_points(points, P) returns
    the pixels exactly.

    Args:
        depth: (H, W) metres along the optical axis; NaN, +-Inf (REP 117) and <= 0 are invalid.
        projection: (3, 4) P of the depth image.
        stride: keep rows and columns 0, stride, 2 * stride, ... (their true pixel coordinates are used).
        out: (ceil(H / stride), ceil(W / stride), 3) float32 array (may be strided, e.g. PackedCloud.points) to
            write into instead of a new one.

    Returns:
        (ceil(H / stride), ceil(W / stride), 3) float32 metres in the camera optical frame, NaN where invalid.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    projection = np.asarray(projection, dtype=np.float64)
    depth = np.asarray(depth, dtype=np.float32)[::stride, ::stride]
    fx, fy, cx, cy = projection[0, 0], projection[1, 1], projection[0, 2], projection[1, 2]
    columns = np.arange(0, depth.shape[1] * stride, stride)
    rows = np.arange(0, depth.shape[0] * stride, stride)
    with np.errstate(over="ignore", invalid="ignore"):  # absurd-but-finite intrinsics give inf, not warnings
        x_per_metre = ((columns - cx) / fx).astype(np.float32)
        y_per_metre = ((rows - cy) / fy).astype(np.float32)
        points = np.empty(depth.shape + (3,), dtype=np.float32) if out is None else out
        if points.shape != depth.shape + (3,) or points.dtype != np.float32:
            raise ValueError(f"out must be float32 {depth.shape + (3,)}, got {points.dtype} {points.shape}")
        z = points[..., 2]
        z[...] = depth
        z[~((depth > 0) & (depth < np.inf))] = np.nan  # NaN, +-Inf (REP 117) and <= 0: no point
        np.multiply(z, x_per_metre[None, :], out=points[..., 0])
        np.multiply(z, y_per_metre[:, None], out=points[..., 1])
    return points


def lidar_to_depth(
    points_lidar: np.ndarray, T_cam_lidar: np.ndarray, projection: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Sparse depth image from a LiDAR scan.

    Args:
        points_lidar: (N, 3) metres in the LiDAR frame.
        T_cam_lidar: (4, 4) transform taking LiDAR points into the frame P projects from.
        projection: (3, 4) P of the target image.
        height, width: target image size in pixels.

    Returns:
        (height, width) float32 metres, 0 where no point landed (nearest point per pixel).
    """
    return points_to_depth_image(transform_points(T_cam_lidar, points_lidar), projection, height, width)
