"""Camera geometry in numpy, vectorised: rigid transforms and sparse depth from a point cloud (z-buffered).

Conventions: camera optical frame (x right, y down, z forward), pixel (u, v) = column, row with integer
coordinates at pixel centres, P the 3x4 rectified projection matrix as in CameraInfo.P / KITTI P_rect_0x.
"""

from __future__ import annotations

import numpy as np


def transform_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform. points: (N, 3) -> (N, 3) float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ transform[:3, :3].T + transform[:3, 3]


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
    depth = depth[inside]
    # Sort by pixel, then by depth: the first entry of each pixel is the nearest point (the z-buffer).
    order = np.lexsort((depth, flat))
    flat, depth = flat[order], depth[order]
    first = np.ones(len(flat), dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    image = np.zeros(height * width, dtype=np.float32)
    image[flat[first]] = depth[first]
    return image.reshape(height, width)
