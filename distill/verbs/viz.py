"""`distill viz`: colourised depth/error PNGs, PLY clouds, previews and panels of a model on images, a dataset or
a recorded bag (drawn by `distill.drawing`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from depth_node.geometry import backproject
from distill.drawing import (
    KITTI_HFOV_DEG,
    colorize_depth,
    colorize_error,
    densify_for_display,
    display_range,
    grid_footprint,
    intrinsics_from_fov,
    labelled,
    mosaic,
    render_cloud,
    valid_depth,
    write_ply,
    write_png,
)
from distill.errors import UserError
from distill.verbs.calibration import BAG_SUFFIXES, IMAGE_SUFFIXES

if TYPE_CHECKING:
    from distill.inference import Predictor


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


def image_frames(paths: list[Path], predictor: Predictor, hfov_deg: float) -> Iterator[VizFrame]:
    from distill.data.samples import read_rgb

    for path in paths:
        rgb = read_rgb(path)
        projection = intrinsics_from_fov(*rgb.shape[:2], hfov_deg)
        yield VizFrame(path.stem, rgb, predictor.predict(rgb), projection)


def dataset_frames(source: Path, predictor: Predictor) -> Iterator[VizFrame]:
    """Test-split frames of a dataset with their ground truth and intrinsics."""
    from distill.data import build_dataset
    from distill.verbs.evaluate import data_config

    config = data_config(source)
    dataset = build_dataset(config.data, config.data.test_split, augment=False)
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
    vmin, vmax = display_range(frame.gt if frame.gt is not None and valid_depth(frame.gt).any() else frame.depth)
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


def run_viz(
    source: Path | str,
    *,
    model: Path | str | None = None,
    out: Path | str = Path("runs/viz"),
    max_frames: int = 10,
    colormap: str = "turbo",
    depth_topic: str = "/depth",
    image_topic: str = "/kitti/camera_color_left/image_raw",
    hfov: float = KITTI_HFOV_DEG,
    points_stride: int = 2,
) -> list[Path]:
    """The `distill viz` verb: pictures and clouds of `source`. Returns the files written.

    Args:
        source: an image file or folder, a dataset (config YAML or KITTI-layout folder) or a recorded bag.
        model: exported .onnx/.engine or checkpoint/run folder drawing the depth (not for bags, which carry theirs).
        out: output folder.
        max_frames: frames to draw (0: all).
        colormap: OpenCV colour map name of `distill.drawing.COLORMAPS`.
        depth_topic: bags: the 32FC1 depth topic, with <topic>/camera_info.
        image_topic: bags: the image colouring the cloud.
        hfov: plain images: horizontal field of view, degrees.
        points_stride: keep every n-th row/column in the cloud.
    """
    source, out = Path(source), Path(out)
    kind = source_kind(source)
    limit = None if max_frames == 0 else max_frames
    if max_frames < 0 or points_stride < 1:
        raise UserError("viz: --max-frames must be >= 0 and --points-stride >= 1")
    if kind == "bag":
        if model is not None:
            raise UserError("viz: a bag is drawn from its depth topic; run `depth_node_bag IN OUT --model M` first")
        frames: Iterator[VizFrame] | list[VizFrame] = bag_frames(source, depth_topic, image_topic, limit)
    else:
        if model is None:
            raise UserError(f"viz: --model is needed to draw depth for {source} (an .onnx or a checkpoint folder)")
        from distill.inference import open_predictor

        predictor = open_predictor(model)
        if kind == "dataset":
            frames = dataset_frames(source, predictor)
        else:
            paths = [source]
            if kind == "images":
                paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            frames = image_frames(paths, predictor, hfov)
    written: list[Path] = []
    count = 0
    for frame in frames:
        if limit is not None and count >= limit:
            break
        written += draw_frame(frame, out, colormap, points_stride)
        count += 1
    print(f"viz: {count} frame(s) from {source} -> {out} (depth/error PNGs, PLY clouds, previews, panels)")
    return written
