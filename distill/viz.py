"""Pictures of depth: colourised depth and error maps, point clouds as PLY files and rendered previews; `distill viz`.

Conventions: depth maps are (H, W) float32 metres, invalid = 0 or non-finite (NaN, ±Inf of REP 117), drawn black;
pictures are (H, W, 3) uint8 RGB (write them with `write_png`); points are (N, 3) float32 metres in a camera
optical frame (x right, y down, z forward). Only OpenCV and numpy draw: no matplotlib or open3d needed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from depth_node.geometry import backproject, project_points
from distill.errors import UserError

COLORMAPS = {
    "turbo": cv2.COLORMAP_TURBO,
    "magma": cv2.COLORMAP_MAGMA,
    "inferno": cv2.COLORMAP_INFERNO,
    "plasma": cv2.COLORMAP_PLASMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
BAG_SUFFIXES = (".mcap", ".db3", ".bag")
KITTI_HFOV_DEG = 81.4  # KITTI camera 2: 2 * atan(621 / 721.5)


def _valid(depth: np.ndarray) -> np.ndarray:
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
    valid = _valid(depth)
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
    valid = _valid(gt) & _valid(pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        error = np.abs(pred - gt) / gt
    return _apply_colormap(error / max_error, valid, colormap)


def display_range(*depths: np.ndarray, low: float = 2.0, high: float = 98.0) -> tuple[float, float]:
    """(vmin, vmax) metres for a shared colour scale: percentiles of the valid values of all maps together."""
    values = np.concatenate([np.asarray(d, np.float32)[_valid(np.asarray(d))] for d in depths] + [np.empty(0)])
    if values.size == 0:
        return 1.0, 80.0
    vmin, vmax = np.percentile(values, [low, high])
    return float(vmin), float(max(vmax, vmin * 1.5))


def densify_for_display(depth: np.ndarray, radius: int = 2) -> np.ndarray:
    """Sparse depth (e.g. projected LiDAR) with each point grown to a (2r+1)² square so it shows in a picture.

    Where grown points overlap the farther one wins (cv2.dilate takes the maximum); only for display.
    """
    depth = np.where(_valid(depth), np.asarray(depth, np.float32), np.float32(0))
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


# --- models ----------------------------------------------------------------------------------------------------------


@dataclass
class DepthPredictor:
    """A model behind one call: predict((H, W, 3) uint8 RGB) -> (H, W) float32 depth (metres if metric)."""

    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    output_kind: str


def load_predictor(model: Path | str) -> DepthPredictor:
    """An exported model (.onnx / TensorRT engine, run by depth_node.engine) or a checkpoint/run folder (PyTorch)."""
    path = Path(model)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if path.is_file() and path.suffix.lower() in (".onnx", ".engine", ".plan", ".trt"):
        from depth_node.engine import ModelLoadError, open_engine

        try:
            engine = open_engine(path)
        except ModelLoadError as error:
            raise UserError(str(error)) from None
        return DepthPredictor(path.name, lambda rgb: engine.infer(rgb).depth, engine.metadata.output_kind)
    import torch

    from distill.checkpoint import load_model_from_checkpoint
    from distill.evaluate import predict_depth

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network, config = load_model_from_checkpoint(path, device)
    size = (config.get("data") or {}).get("size")

    def predict(rgb: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255).to(device)
        return predict_depth(network, image, tuple(size) if size else None)[0, 0].cpu().numpy()

    return DepthPredictor(path.name, predict, network.output_kind)


# --- `distill viz` ---------------------------------------------------------------------------------------------------


@dataclass
class VizFrame:
    """One frame to draw: rgb (H, W, 3) uint8 or None, depth (H, W) metres, P (3, 4), optional gt (H, W) metres."""

    name: str
    rgb: np.ndarray | None
    depth: np.ndarray
    projection: np.ndarray
    gt: np.ndarray | None = None


def source_kind(source: Path) -> str:
    """What SOURCE is: "image", "images" (a folder of pictures), "bag" or "dataset" (config YAML, KITTI folder)."""
    if not source.exists():
        raise UserError(f"viz: {source} does not exist")
    if source.is_file():
        suffix = source.suffix.lower()
        kinds = {**dict.fromkeys(IMAGE_SUFFIXES, "image"), **dict.fromkeys(BAG_SUFFIXES, "bag"),
                 ".yaml": "dataset", ".yml": "dataset"}  # fmt: skip
        if suffix not in kinds:
            raise UserError(f"viz: {source} is not an image, a rosbag or a config YAML")
        return kinds[suffix]
    if (source / "metadata.yaml").is_file():
        return "bag"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in source.iterdir()):
        return "images"
    return "dataset"


def image_frames(paths: list[Path], predictor: DepthPredictor, hfov_deg: float) -> Iterator[VizFrame]:
    from distill.data import read_rgb

    for path in paths:
        rgb = read_rgb(path)
        projection = intrinsics_from_fov(*rgb.shape[:2], hfov_deg)
        yield VizFrame(path.stem, rgb, predictor.predict(rgb), projection)


def dataset_frames(source: Path, predictor: DepthPredictor) -> Iterator[VizFrame]:
    """Test-split frames of a dataset with their ground truth and intrinsics."""
    from distill.config import data_dict
    from distill.data import build_dataset
    from distill.evaluate import data_config

    config = data_config(source)
    dataset = build_dataset(data_dict(config), config.data.test_split, augment=False)
    for index in range(len(dataset)):
        sample = dataset[index]
        rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        projection = np.concatenate([sample["K"].numpy().astype(np.float64), np.zeros((3, 1))], axis=1)
        name = str(sample["meta"]["name"]).replace("/", "_")
        yield VizFrame(name, rgb, predictor.predict(rgb), projection, sample["depth"][0].numpy())


def bag_frames(source: Path, depth_topic: str, image_topic: str, limit: int | None) -> list[VizFrame]:
    """Frames of a bag's depth topic (32FC1, e.g. depth_node_bag output) with `<depth_topic>/camera_info`;
    coloured by `image_topic` where a message has the same stamp."""
    from rosbags.highlevel import AnyReader

    from depth_node.codec import camera_info_to_P
    from depth_node.image_codec import image_to_numpy, to_rgb

    info_topic = f"{depth_topic}/camera_info"
    with AnyReader([source]) as reader:
        topics = {c.topic: c for c in reader.connections}
        for needed in (depth_topic, info_topic):
            if needed not in topics:
                raise UserError(
                    f"viz: {source} has no {needed} (topics: {', '.join(sorted(topics))}); make one with "
                    f"`depth_node_bag IN OUT --model M`, or give --model with images or a dataset"
                )
        wanted = [topics[t] for t in (depth_topic, info_topic, image_topic) if t in topics]
        depths, infos, images = {}, {}, {}
        for connection, _, raw in reader.messages(connections=wanted):
            message = reader.deserialize(raw, connection.msgtype)
            stamp = (message.header.stamp.sec, message.header.stamp.nanosec)
            if connection.topic == depth_topic and (limit is None or len(depths) < limit):
                depths[stamp] = np.array(image_to_numpy(message), np.float32)
            elif connection.topic == info_topic:
                infos[stamp] = camera_info_to_P(message)
            elif connection.topic == image_topic:
                images[stamp] = np.array(to_rgb(message))
    frames = []
    for stamp, depth in depths.items():
        if stamp not in infos:
            continue
        rgb = images.get(stamp)
        rgb = rgb if rgb is not None and rgb.shape[:2] == depth.shape else None
        frames.append(VizFrame(f"{stamp[0]}_{stamp[1]:09d}", rgb, depth, infos[stamp]))
    if not frames:
        raise UserError(f"viz: {source}: no {depth_topic} message has a {info_topic} with the same stamp")
    return frames


def draw_frame(frame: VizFrame, out: Path, colormap: str, stride: int) -> list[Path]:
    """Write <name>_depth.png, _gt.png/_error.png (with ground truth), _points.ply, _points.png and _panel.png."""
    vmin, vmax = display_range(frame.gt if frame.gt is not None and _valid(frame.gt).any() else frame.depth)
    depth_png = colorize_depth(frame.depth, vmin, vmax, colormap)
    written = [write_png(out / f"{frame.name}_depth.png", depth_png)]
    panel = [labelled(frame.rgb, "image")] if frame.rgb is not None else []
    panel.append(labelled(depth_png, f"depth ({vmin:.1f}-{vmax:.1f} m, log)"))
    if frame.gt is not None:
        gt_png = colorize_depth(densify_for_display(frame.gt, 1), vmin, vmax, colormap)
        error_png = colorize_error(frame.depth, frame.gt)
        written += [write_png(out / f"{frame.name}_gt.png", gt_png), write_png(out / f"{frame.name}_error.png",
                                                                              error_png)]  # fmt: skip
        panel += [labelled(gt_png, "ground truth"), labelled(error_png, "abs. rel. error (0-0.3)")]
    grid = backproject(frame.depth, frame.projection, stride=stride)
    points, footprint = grid.reshape(-1, 3), grid_footprint(grid).reshape(-1)
    colors = None if frame.rgb is None else frame.rgb[::stride, ::stride].reshape(-1, 3)
    keep = np.isfinite(points).all(axis=1)
    written.append(write_ply(out / f"{frame.name}_points.ply", points[keep], None if colors is None else colors[keep]))
    written.append(write_png(out / f"{frame.name}_points.png", render_cloud(points, colors, footprint=footprint)))
    written.append(write_png(out / f"{frame.name}_panel.png", mosaic([[tile] for tile in panel])))
    return written


def run_viz(args: argparse.Namespace) -> list[Path]:
    """The `distill viz` verb: pictures and clouds of SOURCE (see cli.py for the arguments). Returns the files."""
    source, out = Path(args.source), Path(args.out)
    kind = source_kind(source)
    limit = None if args.max_frames == 0 else args.max_frames
    if args.max_frames < 0 or args.points_stride < 1:
        raise UserError("viz: --max-frames must be >= 0 and --points-stride >= 1")
    if kind == "bag":
        if args.model is not None:
            raise UserError("viz: a bag is drawn from its depth topic; run `depth_node_bag IN OUT --model M` first")
        frames: Iterator[VizFrame] | list[VizFrame] = bag_frames(source, args.depth_topic, args.image_topic, limit)
    else:
        if args.model is None:
            raise UserError(f"viz: --model is needed to draw depth for {source} (an .onnx or a checkpoint folder)")
        predictor = load_predictor(args.model)
        if kind == "dataset":
            frames = dataset_frames(source, predictor)
        else:
            paths = [source]
            if kind == "images":
                paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            frames = image_frames(paths, predictor, args.hfov)
    written: list[Path] = []
    count = 0
    for frame in frames:
        if limit is not None and count >= limit:
            break
        written += draw_frame(frame, out, args.colormap, args.points_stride)
        count += 1
    print(f"viz: {count} frame(s) from {source} -> {out} (depth/error PNGs, PLY clouds, previews, panels)")
    return written
