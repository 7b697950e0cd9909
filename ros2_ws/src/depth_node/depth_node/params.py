"""The node's parameters, declared once: name -> ParamSpec(default, description, choices). ROS-free.

The live node declares exactly these (rclpy), `depth_node_bag` reads the same keys from a params file, and
README.md ("Parameters" table) lists them; tests/test_package.py keeps the three in step.
Values are checked here, so a typo in a YAML file or on `-p` is one clear start-up error naming the key.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from depth_node.image_codec import MAX_IMAGE_PIXELS

IDENTITY_4X4 = [float(row == col) for row in range(4) for col in range(4)]
# The camera's optical frame (z forward, x right, y down; REP 103) at the base's origin, looking along its x axis:
# the camera mount assumed when neither /tf_static nor `camera_to_base` says otherwise.
OPTICAL_IN_BASE_4X4 = [0.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
# Seconds: faster than 10 Hz a diagnostics timer costs CPU for nothing (1e-6 s burnt 46 % of a core idle).
DIAGNOSTICS_PERIOD_S = (0.1, 3600.0)


class ParamSpec(NamedTuple):
    """default (its type is the parameter's type), one-line description, allowed values for strings, and whether
    the running node applies a new value (`ros2 param set`); the others are read-only once the node is up."""

    default: Any
    description: str
    choices: tuple[str, ...] = ()
    runtime: bool = False


PARAMETERS: dict[str, ParamSpec] = {
    "model": ParamSpec("", "path to the exported model (.onnx, or a TensorRT .engine); required"),
    "backend": ParamSpec(
        "auto",
        "auto (TensorRT > ORT-CUDA > ORT-CPU) or one backend",
        ("auto", "tensorrt", "onnxruntime", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"),
    ),
    "device": ParamSpec(0, "CUDA device index for GPU backends"),
    "threads": ParamSpec(0, "CPU inference threads (0: ONNX Runtime default, all cores)"),
    "resize": ParamSpec(
        "stretch", "fit the image to a fixed model input: stretch, or letterbox (keep aspect)", ("stretch", "letterbox")
    ),
    "image_transport": ParamSpec(
        "raw", "raw (subscribe `image`) or compressed (`image/compressed`)", ("raw", "compressed")
    ),
    "max_image_pixels": ParamSpec(
        MAX_IMAGE_PIXELS, "larger images (as a JPEG/PNG header declares them) are skipped", runtime=True
    ),
    "publish_points": ParamSpec(True, "publish the organised point cloud on `points`", runtime=True),
    "points_stride": ParamSpec(1, "keep every n-th row and column in `points`", runtime=True),
    "colorize_points": ParamSpec(False, "add PCL-packed `rgb` to `points`", runtime=True),
    "min_depth": ParamSpec(0.0, "metres; nearer is published as -Inf (0: the model's minimum)", runtime=True),
    "max_depth": ParamSpec(0.0, "metres; farther is published as +Inf (0: the model's maximum)", runtime=True),
    "use_lidar": ParamSpec(False, "subscribe `lidar` (PointCloud2) and align the depth to it (metric scale)"),
    "lidar_to_camera": ParamSpec(
        IDENTITY_4X4, "4x4 row-major transform taking LiDAR points into the camera frame", runtime=True
    ),
    "use_tf": ParamSpec(False, "take the LiDAR->camera transform from TF instead of `lidar_to_camera` (tf2_ros)"),
    "lidar_max_dt": ParamSpec(0.05, "seconds; a cloud pairs with the image nearest in stamp within this", runtime=True),
    "lidar_min_points": ParamSpec(
        20, "fewer LiDAR points in the image than this: no alignment for the frame", runtime=True
    ),
    "alignment_method": ParamSpec(
        "huber", "robust scale/shift fit: huber (IRLS) or ransac", ("huber", "ransac"), runtime=True
    ),
    "alignment_momentum": ParamSpec(0.9, "temporal smoothing of scale/shift in [0, 1) (0: per frame)", runtime=True),
    "temporal_filter": ParamSpec(
        0.0, "weight in [0, 1) of the previous depth, moved by the odometry, blended into each frame (0: off; try 0.7)"
    ),
    "temporal_tolerance": ParamSpec(0.2, "largest |ln previous - ln new| depth still blended (moving objects are not)"),
    "odometry": ParamSpec(
        "tf",
        "the temporal filter's odometry: /tf (needs tf2_msgs) or nav_msgs/Odometry on `odom`",
        ("tf", "odom"),
    ),
    "odom_frame": ParamSpec("odom", "fixed frame of the odometry the temporal filter follows"),
    "camera_to_base": ParamSpec(
        OPTICAL_IN_BASE_4X4,
        "odometry odom: 4x4 row-major pose of the camera optical frame in the odometry's child frame where "
        "/tf_static gives none ([optical]: at its origin, looking along its x)",
    ),
    "completion_model": ParamSpec("", "exported completion network run on LiDAR-aligned frames (empty: aligned only)"),
    "lazy": ParamSpec(True, "no inference while nobody subscribes to an output", runtime=True),
    "sub_reliability": ParamSpec("best_effort", "input QoS reliability", ("best_effort", "reliable")),
    "sub_depth": ParamSpec(1, "input QoS queue depth (keep last)"),
    "pub_reliability": ParamSpec("reliable", "output QoS reliability", ("reliable", "best_effort")),
    "pub_depth": ParamSpec(2, "output QoS queue depth (keep last)"),
    "diagnostics_period": ParamSpec(1.0, "seconds between `diagnostics` messages, 0.1 to 3600", runtime=True),
}


def usage() -> str:
    """`depth_node --help`: how to start the node and every parameter with its type, default and meaning."""
    lines = [
        "usage: depth_node --ros-args -p model:=MODEL.onnx [-p NAME:=VALUE ...] [--params-file FILE] [-r FROM:=TO ...]",
        "",
        "Publishes depth (32FC1 metres), its camera_info, confidence and the point cloud from camera frames, with an",
        "exported depthkd model (`distill export`). Move every topic together with a namespace: -r __ns:=/camera.",
        "Temporal filter on nav_msgs/Odometry (no tf2_msgs needed): -p temporal_filter:=0.7 -p odometry:=odom",
        "-r odom:=/odometry/filtered; the camera mount comes from /tf_static when heard, else from camera_to_base.",
        "",
        "parameters (* = applied at run time by `ros2 param set`; the others are read-only once the node is up):",
    ]
    width = max(map(len, PARAMETERS))
    for name, spec in PARAMETERS.items():
        kind = type(spec.default).__name__ if not isinstance(spec.default, list) else "double[]"
        named = {repr(IDENTITY_4X4): "[identity]", repr(OPTICAL_IN_BASE_4X4): "[optical]"}
        default = named.get(repr(spec.default), repr(spec.default))
        choices = f" ({' | '.join(spec.choices)})" if spec.choices else ""
        lines.append(
            f"  {'*' if spec.runtime else ' '} {name:<{width}}  {kind:<8} {default:<12} {spec.description}{choices}"
        )
    return "\n".join(lines)


def defaults() -> dict[str, Any]:
    """Every parameter at its default."""
    return {name: spec.default for name, spec in PARAMETERS.items()}


def check_names(names: list[str], source: str) -> None:
    """Raise ValueError for names that are not parameters, suggesting the closest one."""
    for name in names:
        if name not in PARAMETERS:
            close = difflib.get_close_matches(name, PARAMETERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"{source}: unknown depth_node parameter '{name}'{hint}")


def resolve(values: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with `values`, each converted to its parameter's type and checked.

    Raises:
        ValueError: unknown name, wrong type, a string outside its choices, or an out-of-range number,
            naming the parameter.
    """
    check_names(list(values), "parameters")
    params = defaults() | dict(values)
    for name, spec in PARAMETERS.items():
        params[name] = _convert(name, params[name], spec)
    _check_ranges(params)
    return params


def _convert(name: str, value: Any, spec: ParamSpec) -> Any:
    default = spec.default
    problem = f"parameter '{name}' must be"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{problem} true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ValueError(f"{problem} an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{problem} a finite number, got {value!r}")
        return float(value)
    if isinstance(default, list):
        items = list(value) if hasattr(value, "__iter__") and not isinstance(value, str | bytes) else None
        if items is None or not all(_is_number(v) for v in items):  # rclpy gives arrays as array.array
            raise ValueError(f"{problem} a list of numbers, got {value!r}")
        return [float(v) for v in items]
    if not isinstance(value, str) or (spec.choices and value not in spec.choices):
        expected = f"one of {', '.join(spec.choices)}" if spec.choices else "a string"
        raise ValueError(f"{problem} {expected}, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_ranges(params: dict[str, Any]) -> None:
    positive = ("points_stride", "sub_depth", "pub_depth", "lidar_min_points", "max_image_pixels")
    for name in positive:
        if params[name] < 1:
            raise ValueError(f"parameter '{name}' must be >= 1, got {params[name]}")
    for name in ("min_depth", "max_depth", "lidar_max_dt", "device", "threads"):
        if params[name] < 0:
            raise ValueError(f"parameter '{name}' must be >= 0, got {params[name]}")
    if params["max_depth"] and params["min_depth"] >= params["max_depth"]:
        raise ValueError(f"parameter 'min_depth' ({params['min_depth']}) must be < 'max_depth' ({params['max_depth']})")
    if not 0.0 <= params["temporal_filter"] < 1.0:
        raise ValueError(f"parameter 'temporal_filter' must be in [0, 1), got {params['temporal_filter']}")
    if params["temporal_tolerance"] <= 0:
        raise ValueError(f"parameter 'temporal_tolerance' must be > 0, got {params['temporal_tolerance']}")
    if not 0.0 <= params["alignment_momentum"] < 1.0:
        raise ValueError(f"parameter 'alignment_momentum' must be in [0, 1), got {params['alignment_momentum']}")
    if not DIAGNOSTICS_PERIOD_S[0] <= params["diagnostics_period"] <= DIAGNOSTICS_PERIOD_S[1]:
        low, high = DIAGNOSTICS_PERIOD_S
        raise ValueError(
            f"parameter 'diagnostics_period' must be in [{low}, {high}] s, got {params['diagnostics_period']}"
        )
    for name in ("lidar_to_camera", "camera_to_base"):
        transform_matrix(params[name], name)


def transform_matrix(values: list[float], name: str) -> np.ndarray:
    """A transform parameter (16 numbers, row-major) as a (4, 4) float64 rigid transform; ValueError for a
    singular, scaled or mirroring one (an all-zero matrix would put every LiDAR point at the camera centre)."""
    if len(values) != 16:
        raise ValueError(f"parameter '{name}' must have 16 values (4x4 row-major), got {len(values)}")
    matrix = np.asarray(values, dtype=np.float64).reshape(4, 4)
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"parameter '{name}': the last row must be 0 0 0 1, got {matrix[3].tolist()}")
    rotation = matrix[:3, :3]
    if not (np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-3) and abs(np.linalg.det(rotation) - 1.0) < 1e-3):
        determinant = np.linalg.det(rotation)
        raise ValueError(
            f"parameter '{name}' must be a rigid transform (its 3x3 rotation orthonormal with determinant 1), "
            f"got a rotation part with determinant {determinant:.3g}"
        )
    return matrix


def load_params_file(path: Path) -> dict[str, Any]:
    """The `ros__parameters` of a ROS 2 params file (the section of node `depth_node`, or the only one), unchecked.

    Raises:
        ValueError: unreadable YAML, or no `<node>: ros__parameters:` section.
    """
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read params file {path}: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected '<node>: ros__parameters:' at the top level")
    sections = {
        node: section["ros__parameters"]
        for node, section in document.items()
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict)
    }
    for node in ("depth_node", "/depth_node", "/**"):
        if node in sections:
            return sections[node]
    if len(sections) == 1:
        return next(iter(sections.values()))
    raise ValueError(f"{path}: no 'depth_node: ros__parameters:' section (found {sorted(sections) or 'none'})")
