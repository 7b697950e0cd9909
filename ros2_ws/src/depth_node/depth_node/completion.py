"""Depth completion of LiDAR-aligned frames (stage 3 of the two-stage completion of Gao et al., "Robust Lightweight
Depth Estimation Model via Data-Free Distillation"), torch-free: `CompletionRunner` runs an exported completion network
on one frame's RGB image, LiDAR-aligned depth and sparse LiDAR depth; `ip_basic_fill` is the classical IP-Basic fill of
the LiDAR points (Ku, Harakeh, Waslander, "In Defense of Classical Image Processing: Fast Depth Completion on the CPU",
CRV 2018), the baseline a learned completion must beat.

Stages 1 and 2 (the mono model, `engine.py`, and its alignment to the LiDAR, `alignment.py`) come first; the node's
pipeline passes the runner as its `completion` hook. The input conventions the network was trained with live here
too (`sanitize_aligned`, `resize_sparse`), so training (`distill.completion.training`) and the runtime share them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from .metadata import ModelLoadError


def sanitize_aligned(aligned: np.ndarray, min_depth: float, max_depth: float) -> np.ndarray:
    """Aligned depth as the completion network takes it: finite metres in [min_depth, max_depth].

    +Inf (beyond the range, REP 117) becomes max_depth; -Inf and NaN (`apply_alignment` gives NaN where s·pred + t is
    not positive, i.e. nearer than anything) become min_depth.

    Args:
        aligned: (H, W) metres, possibly with REP 117 states.
        min_depth, max_depth: metres.

    Returns:
        (H, W) float32 metres.
    """
    out = np.nan_to_num(np.asarray(aligned, np.float32), nan=min_depth, posinf=max_depth, neginf=min_depth)
    return np.clip(out, np.float32(min_depth), np.float32(max_depth))


def resize_sparse(sparse: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Sparse depth at another resolution with every point kept: each moves to the nearest pixel of the new grid
    (pixel centres at integers, as in geometry.py: u -> (u + 0.5)·w/W − 0.5) and the nearest depth wins a shared
    pixel. Nearest-neighbour image resizing would instead drop most points when shrinking.

    Args:
        sparse: (H, W) float32 metres, 0 (or non-finite) = no point.
        size: (h, w) of the result.

    Returns:
        (h, w) float32 metres, 0 = no point.
    """
    sparse = np.asarray(sparse, np.float32)
    (height, width), (old_height, old_width) = (int(size[0]), int(size[1])), sparse.shape
    with np.errstate(invalid="ignore"):
        rows, columns = np.nonzero(np.isfinite(sparse) & (sparse > 0))
    depth = sparse[rows, columns]
    rows = np.clip(np.rint((rows + 0.5) * (height / old_height) - 0.5), 0, height - 1).astype(np.int64)
    columns = np.clip(np.rint((columns + 0.5) * (width / old_width) - 0.5), 0, width - 1).astype(np.int64)
    nearest = np.full(height * width, np.inf, np.float32)
    np.minimum.at(nearest, rows * width + columns, depth)  # the z-buffer
    nearest[np.isinf(nearest)] = 0.0
    return nearest.reshape(height, width)


COMPLETION_INPUTS = ("image", "aligned", "sparse", "mask")  # graph inputs of an exported completion network


class CompletionRunner:
    """An exported completion network (`distill export` of a `run.task: completion` checkpoint) ready to run: stage 3 of
    the two-stage completion. Callable as `runner(rgb, aligned, sparse)`, so it plugs into
    `DepthPipeline(completion=...)`.

    The inputs are brought to the network input (image area-resized and normalised from the metadata, aligned depth
    sanitised and resized bilinearly, sparse points moved with `resize_sparse` so none is lost) and the output back
    to the image size (bilinear), clamped to the model's depth range. Out-of-range REP 117 states of `aligned` (±Inf)
    are kept in the output: the network only sees that range.

    Args:
        path: the exported .onnx file.
        backend: an ONNX Runtime provider key of `engine.ORT_PROVIDERS` ("onnxruntime-cpu", "-cuda", "-tensorrt").
        device: CUDA device index for GPU providers.
        threads: ONNX Runtime intra-op threads (None: ORT's default, all cores).

    Raises:
        ModelLoadError: missing/corrupt file, not an exported completion network, or no fixed input size.
    """

    def __init__(self, path: str | Path, backend: str = "onnxruntime-cpu", device: int = 0, threads: int | None = None):
        from .engine import ORT_PROVIDERS, OrtRunner

        if backend not in ORT_PROVIDERS:
            raise ValueError(f"completion backend must be one of {', '.join(ORT_PROVIDERS)}, got {backend!r}")
        self._runner = OrtRunner(Path(path), ORT_PROVIDERS[backend], device, threads, inputs=COMPLETION_INPUTS)
        self.metadata = self._runner.metadata
        if self.metadata.input_size is None:
            raise ModelLoadError(f"{path}: a completion network must be exported with a fixed --size, not --dynamic")
        self.last_timings: dict[str, float] = {}

    @property
    def backend_name(self) -> str:
        return self._runner.name

    def complete(self, rgb: np.ndarray, aligned: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """Dense metric depth of one frame.

        Args:
            rgb: (H, W, 3) uint8 RGB.
            aligned: (H, W) LiDAR-aligned depth, metres (REP 117 states allowed).
            sparse: (H, W) float32 projected LiDAR depth, metres, 0 = no point.

        Returns:
            (H, W) float32 metres in [min_depth, max_depth], ±Inf where `aligned` was ±Inf.
        """
        from .engine import plan_input, postprocess, preprocess

        start = time.perf_counter()
        aligned, sparse = np.asarray(aligned), np.asarray(sparse)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"rgb must be an (H, W, 3) uint8 image, got shape {rgb.shape} dtype {rgb.dtype}")
        if aligned.shape != rgb.shape[:2] or sparse.shape != rgb.shape[:2]:
            raise ValueError(f"rgb {rgb.shape}, aligned {aligned.shape} and sparse {sparse.shape} differ in size")
        meta = self.metadata
        geometry = plan_input(rgb.shape[:2], meta.input_size, "stretch")
        height, width = meta.input_size
        depth_in = sanitize_aligned(aligned, meta.min_depth, meta.max_depth)
        depth_in = cv2.resize(depth_in, (width, height), interpolation=cv2.INTER_LINEAR)[None, None]
        sparse_in = resize_sparse(sparse, (height, width))[None, None]
        feeds = {"aligned": depth_in, "sparse": sparse_in, "mask": (sparse_in > 0).astype(np.float32)}
        image = preprocess(rgb, geometry, meta.mean, meta.std)
        ran = time.perf_counter()
        output = self._runner.run(image, **feeds)["depth"][0, 0]
        done = time.perf_counter()
        depth = postprocess(output, geometry, (meta.min_depth, meta.max_depth))
        beyond = np.isinf(aligned)
        depth[beyond] = aligned[beyond]
        end = time.perf_counter()
        self.last_timings = {"preprocess": (ran - start) * 1e3, "inference": (done - ran) * 1e3,
                             "postprocess": (end - done) * 1e3}  # fmt: skip
        return depth

    __call__ = complete


# IP-Basic kernels (fill_in_fast): diamond for the first dilation, full squares for closing and the fills.
def _diamond(radius: int) -> np.ndarray:
    rows, cols = np.indices((2 * radius + 1, 2 * radius + 1)) - radius
    return (np.abs(rows) + np.abs(cols) <= radius).astype(np.uint8)


DIAMOND_KERNEL_5 = _diamond(2)
FULL_KERNEL_5 = np.ones((5, 5), np.uint8)
FULL_KERNEL_7 = np.ones((7, 7), np.uint8)
FULL_KERNEL_31 = np.ones((31, 31), np.uint8)
EMPTY = 0.1  # metres; IP-Basic treats values at or below this as empty, before and after inversion


def ip_basic_fill(
    sparse: np.ndarray,
    max_depth: float = 100.0,
    extrapolate: bool = True,
    blur: Literal["bilateral", "gaussian"] = "bilateral",
) -> np.ndarray:
    """Dense depth from sparse LiDAR depth by IP-Basic's fast morphological fill (Ku et al. 2018).

    Depth is inverted (max_depth − d) first so that dilation, a max filter, lets nearer points win over farther
    ones, keeping foreground edges. Then: 5x5 diamond dilation, 5x5 closing, 7x7 fill of empty pixels, optionally
    extension of each column's top value to the top of the frame plus a 31x31 fill, 5x5 median, bilateral (edge
    preserving, the paper's choice) or Gaussian (lower RMSE) blur, and inversion back.

    Args:
        sparse: (H, W) float32 metres, 0 or non-finite = no point; points beyond max_depth − 0.1 m are ignored.
        max_depth: inversion constant in metres, above any depth in the scan.
        extrapolate: fill the top of the frame (above the highest LiDAR row) and large holes.
        blur: "bilateral" or "gaussian".

    Returns:
        (H, W) float32 metres, 0 where nothing could be filled (e.g. above the scan without extrapolate).
    """
    depth = np.asarray(sparse, dtype=np.float32)
    if depth.ndim != 2 or depth.size == 0:
        raise ValueError(f"sparse depth must be a non-empty (H, W) array, got shape {depth.shape}")
    if not max_depth > 2 * EMPTY:
        raise ValueError(f"max_depth must be > {2 * EMPTY} m, got {max_depth}")
    if blur not in ("bilateral", "gaussian"):
        raise ValueError(f"unknown blur {blur!r}: expected 'bilateral' or 'gaussian'")
    with np.errstate(invalid="ignore"):
        valid = (depth > EMPTY) & (depth < max_depth - EMPTY)
    inverted = np.where(valid, np.float32(max_depth) - depth, np.float32(0.0))
    inverted = cv2.dilate(inverted, DIAMOND_KERNEL_5)
    inverted = cv2.morphologyEx(inverted, cv2.MORPH_CLOSE, FULL_KERNEL_5)
    inverted = _fill_empty(inverted, FULL_KERNEL_7)
    if extrapolate:
        inverted = _fill_empty(_extend_to_top(inverted), FULL_KERNEL_31)
    inverted = cv2.medianBlur(inverted, 5)
    if blur == "bilateral":
        inverted = cv2.bilateralFilter(inverted, 5, 1.5, 2.0)
    else:
        inverted = np.where(inverted > EMPTY, cv2.GaussianBlur(inverted, (5, 5), 0), inverted)
    filled = inverted > EMPTY
    return np.where(filled, np.float32(max_depth) - inverted, np.float32(0.0)).astype(np.float32, copy=False)


def _fill_empty(inverted: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Empty pixels take the kernel-neighbourhood maximum (the nearest depth); filled pixels keep their value."""
    return np.where(inverted > EMPTY, inverted, cv2.dilate(inverted, kernel))


def _extend_to_top(inverted: np.ndarray) -> np.ndarray:
    """Copy each column's topmost filled value into every row above it (LiDAR does not see the top of the frame)."""
    filled = inverted > EMPTY
    top = filled.argmax(axis=0)  # 0 for an empty column, whose top value is then 0 and changes nothing
    top_values = inverted[top, np.arange(inverted.shape[1])]
    above = np.arange(inverted.shape[0])[:, None] < top[None, :]
    return np.where(above, top_values[None, :], inverted)
