"""The per-frame depth pipeline on arrays, shared by the live node and the offline bag tool (no ROS, no torch).

RGB image + projection matrix (+ an optional LiDAR scan) in; depth with REP 117 states, optional confidence,
optional organised cloud, the LiDAR alignment used and per-stage timings out. `stream.FrameStream` drives it.

LiDAR (stage 2 of the two-stage completion of Gao et al., "Robust Lightweight Depth Estimation Model via Data-Free
Distillation"): the scan is projected with the LiDAR->camera transform and P, the model output is robustly aligned to it
(scale and shift; in depth space for metric and relative-depth models, in inverse space for relative-disparity ones)
with a temporal prior, and the aligned depth is what `depth` carries. A learned completion network plugs in through
`DepthPipeline.completion`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from depth_node.alignment import Alignment, AlignmentPrior, align_depth, apply_alignment
from depth_node.codec import PackedCloud, empty_cloud, set_cloud_colours
from depth_node.engine import DepthEngine, open_engine
from depth_node.geometry import backproject, lidar_to_depth
from depth_node.image_codec import message_array
from depth_node.params import transform_matrix

# (rgb (H, W, 3) uint8, aligned depth (H, W) metres, sparse LiDAR depth (H, W) metres 0 = none) -> (H, W) metres.
Completion = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class PipelineOptions:
    """Per-node processing options (ROS parameters of the same names, see depth_node.params).

    Attributes:
        min_depth, max_depth: metres; 0 takes the model's own range for a metric model's output, and no limit for
            LiDAR-aligned depth.
        publish_points: build the organised cloud.
        points_stride: keep every n-th row and column in the cloud.
        colorize_points: add PCL-packed rgb to the cloud.
        use_lidar: align to LiDAR scans passed to `process`.
        lidar_to_camera: (4, 4) transform taking LiDAR points into the camera frame.
        lidar_min_points, alignment_method, alignment_momentum: see `alignment.align_depth` / `AlignmentPrior`.
    """

    min_depth: float = 0.0
    max_depth: float = 0.0
    publish_points: bool = True
    points_stride: int = 1
    colorize_points: bool = False
    use_lidar: bool = False
    lidar_to_camera: np.ndarray = field(default_factory=lambda: np.eye(4))
    lidar_min_points: int = 20
    alignment_method: str = "huber"
    alignment_momentum: float = 0.9

    @classmethod
    def from_params(cls, params: dict) -> PipelineOptions:
        """From checked parameter values (`depth_node.params.resolve`)."""
        names = (
            "min_depth",
            "max_depth",
            "publish_points",
            "points_stride",
            "colorize_points",
            "use_lidar",
            "lidar_min_points",
            "alignment_method",
            "alignment_momentum",
        )
        transform = transform_matrix(params["lidar_to_camera"], "lidar_to_camera")
        return cls(**{name: params[name] for name in names}, lidar_to_camera=transform)


@dataclass
class FrameResult:
    """Outputs for one frame.

    Attributes:
        depth: (H, W) float32 at the input image resolution. When `metric`: metres, NaN invalid, +Inf beyond
            max_depth (sky), -Inf nearer than min_depth (REP 117); else the model's relative output (unitless).
        metric: whether `depth` is metric (the model is, or it was aligned to LiDAR): `depth` vs `depth/relative`.
        mono: (H, W) float32 raw model output (REP 117 states when the model is metric) when LiDAR is in use, else
            None: the node publishes it on `depth/mono`.
        alignment: the LiDAR alignment of this frame (check `.ok`), or None without LiDAR.
        confidence: (H, W) float32 in [0, 1], or None when the model has no bins.
        cloud: the organised cloud in PointCloud2 layout (for make_pointcloud2), or None when points are off or
            depth is not metric. `cloud.points`: (ceil(H/stride), ceil(W/stride), 3) float32 metres in the camera
            optical frame, NaN where depth is not finite; with colorize_points, PCL-packed rgb beside them.
        timings_ms: stage -> milliseconds (preprocess, inference, postprocess, align, cloud).
    """

    depth: np.ndarray
    metric: bool
    mono: np.ndarray | None = None
    alignment: Alignment | None = None
    confidence: np.ndarray | None = None
    cloud: PackedCloud | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def apply_rep117(depth: np.ndarray, min_depth: float, max_depth: float, out: np.ndarray | None = None) -> np.ndarray:
    """Mark out-of-range pixels the REP 117 way. depth: (H, W) metres; returns a float32 copy, or `out` (H, W) float32
    filled in place (it may be `depth` itself).

    Non-finite values become NaN (invalid). A model clamps to its range, so a prediction at max_depth means "at least
    max_depth" (sky): +Inf; at or below min_depth: -Inf.
    """
    if out is None:
        out = np.array(depth, dtype=np.float32, copy=True)
    elif out is not depth:
        np.copyto(out, depth)
    with np.errstate(invalid="ignore"):
        out[~np.isfinite(out)] = np.nan
        out[out >= max_depth * (1 - 1e-4)] = np.inf  # NaN compares False: stays NaN
        out[out <= min_depth] = -np.inf
    return out


def aligned_states(raw: np.ndarray, aligned: np.ndarray, space: str, min_depth: float, max_depth: float):
    """REP 117 states of LiDAR-aligned depth. Returns a float32 (H, W) copy of `aligned` with them set.

    Args:
        raw: (H, W) the prediction the alignment was applied to (±Inf kept from a metric model's own states).
        aligned: (H, W) `alignment.apply_alignment(raw, ...)`: metres, NaN where not positive.
        space: "depth" or "inverse"; in inverse space a non-positive aligned disparity is beyond any range: +Inf.
        min_depth, max_depth: metres, 0 = no limit.
    """
    beyond = np.isfinite(raw) & np.isnan(aligned) if space == "inverse" else np.isposinf(raw)
    out = apply_rep117(aligned, min_depth, max_depth or np.inf)
    out[beyond] = np.inf
    out[np.isneginf(raw)] = -np.inf
    return out


class DepthPipeline:
    """Runs an engine on RGB frames and derives everything the node publishes.

    Attributes:
        completion: optional learned depth completion, run on LiDAR-aligned frames (see `Completion`).
        prior: the temporal state of the LiDAR alignment (reset it when the scene changes, e.g. a new bag).
    """

    def __init__(self, engine: DepthEngine, options: PipelineOptions, completion: Completion | None = None):
        self.engine = engine
        self.completion = completion
        meta = engine.metadata
        self.model_metric = meta.output_kind == "metric"
        self.space = "inverse" if meta.output_kind == "relative_disparity" else "depth"
        self.prior = AlignmentPrior(momentum=options.alignment_momentum)
        self.configure(options)

    def configure(self, options: PipelineOptions) -> None:
        """Use these options from the next frame on (the node's run-time parameters); use_lidar must not change."""
        if options.points_stride < 1:
            raise ValueError(f"points_stride must be >= 1, got {options.points_stride}")
        if not 0.0 <= options.alignment_momentum < 1.0:
            raise ValueError(f"alignment_momentum must be in [0, 1), got {options.alignment_momentum}")
        meta = self.engine.metadata
        self.min_depth = options.min_depth or float(meta.min_depth)
        self.max_depth = options.max_depth or float(meta.max_depth)
        self.prior.momentum = options.alignment_momentum
        self.options = options  # last: a frame in flight reads either all old or all new options

    def process(
        self,
        rgb: np.ndarray,
        projection: np.ndarray,
        lidar_points: np.ndarray | None = None,
        lidar_to_camera: np.ndarray | None = None,
        want_points: bool = True,
        want_confidence: bool = True,
    ) -> FrameResult:
        """One frame.

        Args:
            rgb: (H, W, 3) uint8.
            projection: (3, 4) P of this image (pixels).
            lidar_points: (N, 3) metres in the LiDAR frame paired with this image, or None when there is none
                (used only with options.use_lidar; a missing or empty scan falls back on the temporal prior).
            lidar_to_camera: (4, 4) LiDAR->camera transform for this scan (e.g. from TF); default the option's.
            want_points: build the cloud (with options.publish_points); False when nobody listens to it.
            want_confidence: produce the confidence map (models with bins); False when nobody listens to it.
        """
        # Depth straight into a message buffer: the node publishes it without copying it again.
        out = message_array(rgb.shape[:2], np.float32)[1] if isinstance(rgb, np.ndarray) and rgb.ndim == 3 else None
        result = self.engine.infer(rgb, confidence=want_confidence, depth_out=out)
        timings = dict(result.timings)
        depth = result.depth  # the engine's own copy: marked in place
        raw = apply_rep117(depth, self.min_depth, self.max_depth, out=depth) if self.model_metric else depth
        frame = FrameResult(raw, self.model_metric, confidence=result.confidence, timings_ms=timings)
        if self.options.use_lidar:
            start = time.perf_counter()
            self._align(frame, rgb, projection, lidar_points, lidar_to_camera)
            timings["align"] = (time.perf_counter() - start) * 1e3
        if want_points and self.options.publish_points and frame.metric:
            start = time.perf_counter()
            stride, colour = self.options.points_stride, self.options.colorize_points
            frame.cloud = empty_cloud(-(-raw.shape[0] // stride), -(-raw.shape[1] // stride), colour)
            backproject(frame.depth, projection, stride=stride, out=frame.cloud.points)
            if colour:
                set_cloud_colours(frame.cloud, rgb[::stride, ::stride])
            timings["cloud"] = (time.perf_counter() - start) * 1e3
        return frame

    def _align(self, frame: FrameResult, rgb: np.ndarray, projection, lidar_points, lidar_to_camera) -> None:
        """Replace frame.depth by the LiDAR-aligned depth when the fit (or the prior) is usable."""
        raw = frame.depth
        height, width = raw.shape
        transform = self.options.lidar_to_camera if lidar_to_camera is None else lidar_to_camera
        if lidar_points is not None and len(lidar_points):
            sparse = lidar_to_depth(lidar_points, transform, projection, height, width)
        else:
            sparse = np.zeros((height, width), np.float32)
        options = self.options
        alignment = align_depth(
            raw,
            sparse,
            space=self.space,
            method=options.alignment_method,
            min_points=options.lidar_min_points,
            prior=self.prior,
        )
        frame.mono, frame.alignment = raw, alignment
        if not alignment.ok:
            return
        limits = (options.min_depth, options.max_depth)
        aligned = aligned_states(raw, apply_alignment(raw, alignment), self.space, *limits)
        if self.completion is not None:
            aligned = self.completion(rgb, aligned, sparse)
        frame.depth, frame.metric = aligned, True


def build_pipeline(params: dict) -> DepthPipeline:
    """The pipeline the node parameters describe: the depth engine, and the completion network when one is given.

    Raises:
        ModelLoadError: a model file is missing, corrupt, or not an exported depthkd model.
    """
    engine = open_engine(
        params["model"], params["backend"], params["device"], params["threads"] or None, params["resize"]
    )
    completion = None
    if params["completion_model"]:
        from depth_node.completion import CompletionRunner

        backend = "onnxruntime-cpu" if params["backend"] in ("auto", "onnxruntime") else params["backend"]
        completion = CompletionRunner(params["completion_model"], backend, params["device"], params["threads"] or None)
    return DepthPipeline(engine, PipelineOptions.from_params(params), completion=completion)
