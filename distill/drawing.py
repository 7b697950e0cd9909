"""Pictures of depth: colourised depth and error maps, mosaics with captions, point clouds as PLY files and rendered
previews. Used by `distill viz` and the demo report.

Conventions: depth maps are (H, W) float32 metres, invalid = 0 or non-finite (NaN, ±Inf of REP 117), drawn black;
pictures are (H, W, 3) uint8 RGB (write them with `write_png`); points are (N, 3) float32 metres in a camera
optical frame (x right, y down, z forward). Only OpenCV and numpy draw: no matplotlib or open3d needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from depth_node.geometry import project_points
from distill.errors import UserError

COLORMAPS = {
    "turbo": cv2.COLORMAP_TURBO,
    "magma": cv2.COLORMAP_MAGMA,
    "inferno": cv2.COLORMAP_INFERNO,
    "plasma": cv2.COLORMAP_PLASMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
}
KITTI_HFOV_DEG = 81.4  # KITTI camera 2: 2 * atan(621 / 721.5)


def valid_depth(depth: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.isfinite(depth) & (depth > 0)


def _apply_colormap(values: np.ndarray, valid: np.ndarray, colormap: str) -> np.ndarray:
    """values (H, W) in [0, 1] -> (H, W, 3) uint8 RGB through an OpenCV colormap; black where not valid."""
    if colormap not in COLORMAPS:
        raise UserError(f"unknown colormap {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    codes = np.round(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255).astype(np.uint8)
    rgb = cv2.applyColorMap(codes, COLORMAPS[colormap])[..., ::-1]
    return np.where(valid[..., None], rgb, np.uint8(0))


def colorize_depth(depth: np.ndarray, vmin: float, vmax: float, colormap: str = "turbo") -> np.ndarray:
    """Depth as colours on a log scale, near = the colormap's high end (red for turbo), invalid black.

    Args:
        depth: (H, W) metres; 0 / non-finite invalid.
        vmin, vmax: metres mapped to the two ends of the colormap (values beyond are clipped).
        colormap: one of COLORMAPS.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    depth = np.asarray(depth, np.float32)
    valid = valid_depth(depth)
    low, high = math.log(max(vmin, 1e-6)), math.log(max(vmax, vmin * 1.001, 1e-6))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = (high - np.log(np.where(valid, depth, 1.0))) / (high - low)
    return _apply_colormap(values, valid, colormap)


def colorize_error(pred: np.ndarray, gt: np.ndarray, max_error: float = 0.3, colormap: str = "viridis") -> np.ndarray:
    """Per-pixel absolute relative error |pred - gt| / gt as colours; 0 → low end, >= max_error → high end.

    Pixels without ground truth (gt 0 / non-finite) or without a prediction are black.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    pred, gt = np.asarray(pred, np.float32), np.asarray(gt, np.float32)
    valid = valid_depth(gt) & valid_depth(pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        error = np.abs(pred - gt) / gt
    return _apply_colormap(error / max_error, valid, colormap)


def display_range(*depths: np.ndarray, low: float = 2.0, high: float = 98.0) -> tuple[float, float]:
    """(vmin, vmax) metres for a shared colour scale: percentiles of the valid values of all maps together."""
    values = np.concatenate([np.asarray(d, np.float32)[valid_depth(np.asarray(d))] for d in depths] + [np.empty(0)])
    if values.size == 0:
        return 1.0, 80.0
    vmin, vmax = np.percentile(values, [low, high])
    return float(vmin), float(max(vmax, vmin * 1.5))


def densify_for_display(depth: np.ndarray, radius: int = 2) -> np.ndarray:
    """Sparse depth (e.g. projected LiDAR) with each point grown to a (2r+1)² square so it shows in a picture.

    Where grown points overlap the farther one wins (cv2.dilate takes the maximum); only for display.
    """
    depth = np.where(valid_depth(depth), np.asarray(depth, np.float32), np.float32(0))
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return np.where(depth > 0, depth, cv2.dilate(depth, kernel))


def labelled(image: np.ndarray, text: str, height: int = 18) -> np.ndarray:
    """image (H, W, 3) uint8 with a black title bar of `height` pixels above it holding `text` in white."""
    bar = np.zeros((height, image.shape[1], 3), np.uint8)
    scale = height / 36
    cv2.putText(bar, text, (4, height - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def mosaic(rows: Sequence[Sequence[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Tile (H, W, 3) uint8 pictures row by row with `gap` black pixels between them; rows are left-aligned."""
    lines = []
    for row in rows:
        height = max(tile.shape[0] for tile in row)
        padded = [np.pad(tile, ((0, height - tile.shape[0]), (0, gap), (0, 0))) for tile in row]
        lines.append(np.concatenate(padded, axis=1)[:, :-gap] if gap else np.concatenate(padded, axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, gap), (0, width - line.shape[1]), (0, 0))) for line in lines]
    return np.concatenate(lines, axis=0)[:-gap] if gap else np.concatenate(lines, axis=0)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB picture as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise UserError(f"cannot write {path}")
    return path


def write_ply(path: Path, points: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """Binary little-endian PLY of (N, 3) points (float32 x, y, z) and optional (N, 3) uint8 RGB colours."""
    points = np.asarray(points, np.float32).reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertices = np.empty(len(points), dtype=fields)
    for axis, name in enumerate("xyz"):
        vertices[name] = points[:, axis]
    properties = [f"property float {name}" for name in "xyz"]
    if colors is not None:
        colors = np.asarray(colors, np.uint8).reshape(-1, 3)
        for channel, name in enumerate(("red", "green", "blue")):
            vertices[name] = colors[:, channel]
        properties += [f"property uchar {name}" for name in ("red", "green", "blue")]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}", *properties, "end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        file.write(("\n".join(header) + "\n").encode("ascii"))
        file.write(vertices.tobytes())
    return path


def orbit_projection(centre: np.ndarray, distance: float, yaw_deg: float, pitch_deg: float, size: tuple[int, int],
                     fov_deg: float) -> np.ndarray:  # fmt: skip
    """(3, 4) P of a virtual camera `distance` metres from `centre`, turned `yaw_deg` to the side and raised by
    `pitch_deg` (both 0: right behind it, looking along +z), looking at the centre; image (H, W) = size."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    direction = np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), -math.cos(yaw) * math.cos(pitch)])
    eye = np.asarray(centre, np.float64) + distance * direction
    forward = -direction
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    rotation = np.stack([right, np.cross(forward, right), forward])  # rows: the view's x (right), y (down), z
    height, width = size
    focal = (width / 2) / math.tan(math.radians(fov_deg) / 2)
    K = np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]])
    return K @ np.concatenate([rotation, (-rotation @ eye)[:, None]], axis=1)


def render_cloud(
    points: np.ndarray,
    colors: np.ndarray | None = None,
    size: tuple[int, int] = (360, 640),
    yaw_deg: float = -25.0,
    pitch_deg: float = 20.0,
    fov_deg: float = 60.0,
    footprint: np.ndarray | float | None = None,
) -> np.ndarray:
    """Perspective preview of a point cloud from a virtual camera orbiting its centre (z-buffered square splats).

    Args:
        points: (N, 3) metres in a camera optical frame; non-finite rows are skipped.
        colors: (N, 3) uint8 RGB per point, or None to colour by depth (turbo, near red).
        size: (H, W) of the picture.
        yaw_deg, pitch_deg: view direction around the cloud's median point (degrees to the side, above).
        fov_deg: horizontal field of view of the virtual camera.
        footprint: (N,) or one value, metres: the size of the surface patch each point stands for (see
            `grid_footprint`); each point is drawn as a square that wide as the virtual camera sees it (1 to 8
            pixels), so surfaces come out closed. None: one square size for all, the mean projected point spacing.

    Returns:
        (H, W, 3) uint8 RGB on a dark grey background.
    """
    points = np.asarray(points, np.float32).reshape(-1, 3)
    keep = np.isfinite(points).all(axis=1)
    points = points[keep]
    picture = np.full((*size, 3), 24, np.uint8)
    if len(points) == 0:
        return picture
    if colors is None:
        colors = colorize_depth(points[:, 2:3], *display_range(points[:, 2]))[:, 0]
    else:
        colors = np.asarray(colors, np.uint8).reshape(-1, 3)[keep]
    centre = np.median(points, axis=0)
    extent = float(np.percentile(np.linalg.norm(points - centre, axis=1), 90))
    distance = max(extent, 1e-3) / math.tan(math.radians(fov_deg) / 2) * 0.9
    projection = orbit_projection(centre, distance, yaw_deg, pitch_deg, size, fov_deg)
    u, v, z = project_points(points, projection)
    front = z > 1e-3
    u, v, z, colors = u[front], v[front], z[front], colors[front]
    if footprint is None:
        (u_low, u_high), (v_low, v_high) = np.percentile(u, [5, 95]), np.percentile(v, [5, 95])
        sides = np.full(len(u), math.sqrt(max((u_high - u_low) * (v_high - v_low), 1.0) * 0.9 / len(u)) * 1.25)
    else:
        focal = size[1] / 2 / math.tan(math.radians(fov_deg) / 2)
        sides = focal * np.broadcast_to(np.asarray(footprint, np.float64), keep.shape)[keep][front] / z
    _splat(picture, u, v, z, colors, np.clip(np.ceil(np.nan_to_num(sides, nan=1.0)), 1, 8).astype(np.int64))
    return picture


def grid_footprint(points: np.ndarray) -> np.ndarray:
    """Per point of an organised (H, W, 3) cloud, the distance in metres to the farther of its right and lower
    neighbours: the patch of surface it stands for (NaN where unknown). Use as `render_cloud(footprint=...)`."""
    points = np.asarray(points, np.float32)
    footprint = np.full(points.shape[:2], np.nan, np.float32)
    footprint[:, :-1] = np.linalg.norm(np.diff(points, axis=1), axis=2)
    footprint[:-1] = np.fmax(footprint[:-1], np.linalg.norm(np.diff(points, axis=0), axis=2))
    return footprint


def _splat(picture: np.ndarray, u, v, z, colors, sides: np.ndarray) -> None:
    """Draw each point (u, v) as a sides-pixel square centred on it, nearest z winning per pixel, into picture."""
    height, width = picture.shape[:2]
    flat, depth, color = [], [], []
    for side in np.unique(sides):
        chosen = sides == side
        left, top = np.floor(u[chosen] - (side - 1) / 2).astype(np.int64), np.floor(v[chosen] - (side - 1) / 2)
        for du in range(side):
            for dv in range(side):
                columns, rows = left + du, top.astype(np.int64) + dv
                inside = (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
                flat.append(rows[inside] * width + columns[inside])
                depth.append(z[chosen][inside])
                color.append(colors[chosen][inside])
    flat, depth, color = np.concatenate(flat), np.concatenate(depth), np.concatenate(color)
    order = np.lexsort((depth, flat))  # per pixel, nearest first: the z-buffer
    flat, color = flat[order], color[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    picture.reshape(-1, 3)[flat[first]] = color[first]


def intrinsics_from_fov(height: int, width: int, hfov_deg: float) -> np.ndarray:
    """(3, 4) P = [K | 0] of a pinhole camera with square pixels, centred principal point and this horizontal FOV."""
    focal = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
    return np.array([[focal, 0, (width - 1) / 2, 0], [0, focal, (height - 1) / 2, 0], [0, 0, 1, 0]])
