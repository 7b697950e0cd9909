"""The per-frame depth pipeline shared by the live node and the offline bag tool (no ROS, no torch).

RGB image + projection matrix in; depth with REP 117 states, optional confidence, optional organised cloud and
per-stage timings out. The node and `depth_node_bag` only convert messages around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from depth_node.engine import DepthEngine
from depth_node.geometry import backproject


@dataclass
class PipelineOptions:
    """Per-node processing options (ROS parameters of the same names).

    Attributes:
        min_depth, max_depth: metres; 0 takes the model's own range from its metadata.
        publish_points: build the organised cloud.
        points_stride: keep every n-th row and column in the cloud.
        colorize_points: add PCL-packed rgb to the cloud.
    """

    min_depth: float = 0.0
    max_depth: float = 0.0
    publish_points: bool = True
    points_stride: int = 1
    colorize_points: bool = False

    @classmethod
    def from_params(cls, params: dict) -> PipelineOptions:
        """From the node's parameter values (see depth_node.params.PARAMETERS)."""
        return cls(
            min_depth=float(params["min_depth"]),
            max_depth=float(params["max_depth"]),
            publish_points=bool(params["publish_points"]),
            points_stride=int(params["points_stride"]),
            colorize_points=bool(params["colorize_points"]),
        )


@dataclass
class FrameResult:
    """Outputs for one frame.

    Attributes:
        depth: (H, W) float32 metres at the input image resolution; NaN invalid, +Inf beyond max_depth,
            -Inf closer than min_depth (REP 117).
        confidence: (H, W) float32 in [0, 1], or None when the model has no bins.
        points: (H/stride, W/stride, 3) float32 metres in the camera optical frame, NaN where depth is not finite,
            or None when points are off.
        colors: (H/stride, W/stride, 3) uint8 RGB matching points, or None.
        metric: whether `depth` is metric (else it is relative and belongs on `depth/relative`).
        timings_ms: stage name -> milliseconds (preprocess, inference, postprocess, cloud).
    """

    depth: np.ndarray
    confidence: np.ndarray | None
    points: np.ndarray | None
    colors: np.ndarray | None
    metric: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


def apply_rep117(depth: np.ndarray, min_depth: float, max_depth: float) -> np.ndarray:
    """Mark out-of-range pixels the REP 117 way. depth: (H, W) float32 metres, modified copy returned.

    A model clamps to its range, so a prediction at max_depth means "at least max_depth" (sky): +Inf.
    """
    out = depth.astype(np.float32, copy=True)
    finite = np.isfinite(out)
    out[~finite] = np.nan
    with np.errstate(invalid="ignore"):
        out[finite & (out >= max_depth * (1 - 1e-4))] = np.inf
        out[finite & (out <= min_depth)] = -np.inf
    return out


class DepthPipeline:
    """Runs an engine on RGB frames and derives everything the node publishes."""

    def __init__(self, engine: DepthEngine, options: PipelineOptions):
        self.engine = engine
        self.options = options
        meta = engine.metadata
        self.min_depth = options.min_depth or float(meta.min_depth)
        self.max_depth = options.max_depth or float(meta.max_depth)
        self.metric = meta.output_kind == "metric"
        if options.points_stride < 1:
            raise ValueError(f"points_stride must be >= 1, got {options.points_stride}")

    def process(self, rgb: np.ndarray, projection: np.ndarray) -> FrameResult:
        """One frame. rgb: (H, W, 3) uint8; projection: (3, 4) P of this image (pixels)."""
        result = self.engine.infer(rgb)
        timings = dict(result.timings)
        depth = result.depth
        if self.metric:
            depth = apply_rep117(depth, self.min_depth, self.max_depth)
        points = colors = None
        if self.options.publish_points and self.metric:
            start = time.perf_counter()
            stride = self.options.points_stride
            points = backproject(depth, projection, stride=stride)
            if self.options.colorize_points:
                colors = np.ascontiguousarray(rgb[::stride, ::stride])
            timings["cloud"] = (time.perf_counter() - start) * 1e3
        return FrameResult(depth, result.confidence, points, colors, self.metric, timings)
