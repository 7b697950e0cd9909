"""The torch-free depth runtime: an exported depthkd model behind one `DepthEngine.infer(rgb) -> depth` call.

Backends: ONNX Runtime (CPU, CUDA or its TensorRT execution provider) and native TensorRT engines
(`trt_backend.py`). `open_engine(path, backend="auto")` picks TensorRT > ORT-CUDA > ORT-CPU by what is installed and
actually starts on this machine, logging why each better backend was skipped.

Pre/post-processing follow the model's embedded metadata (`metadata.py`): the RGB image is resized ("stretch") or
letterboxed (aspect kept, padded) to the network input, normalised, run, and every output map is brought back to the
input image's resolution (bilinear; letterbox padding removed) and clamped to the model's range. Because outputs
come back at the camera image resolution, the camera's intrinsics K/P stay valid for them unchanged;
`InputGeometry.input_intrinsics` gives K at the network input for anyone working at that resolution.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

from depth_node.metadata import ModelLoadError, ModelMetadata, check_onnx_file, error_summary, metadata_from_map
from depth_node.trt_backend import INPUT_NAME, BackendUnavailable, TensorRTRunner, find_cached_engine, read_sidecar

__all__ = ["BACKENDS", "DepthEngine", "EngineResult", "InputGeometry", "ModelLoadError", "ModelMetadata", "open_engine"]

LOG = logging.getLogger("depth_node.engine")
ResizeMode = Literal["stretch", "letterbox"]
ORT_PROVIDERS = {
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-cpu": "CPUExecutionProvider",
}
BACKENDS = ("auto", "tensorrt", "onnxruntime", *ORT_PROVIDERS)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass
class EngineResult:
    """One inference.

    Attributes:
        depth: (H, W) float32 at the input image resolution: metres for metric models (clamped to the model's
            [min_depth, max_depth]), unitless relative depth/disparity otherwise (see `metadata.output_kind`).
        confidence: (H, W) float32 in [0, 1] (max bin probability), or None for models without bins.
        timings: milliseconds per stage: preprocess, inference, postprocess.
    """

    depth: np.ndarray
    confidence: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class InputGeometry:
    """Where an image lands in the network input: content (h, w) at (top, left), the rest padding.

    The image is resized by (scale_y, scale_x) = (content_h / image_h, content_w / image_w); "letterbox" keeps the
    two equal (up to rounding to whole pixels) and centres the content, "stretch" fills the input.
    """

    image_size: tuple[int, int]
    input_size: tuple[int, int]
    content_size: tuple[int, int]
    top: int = 0
    left: int = 0

    @property
    def scale(self) -> tuple[float, float]:
        """(scale_y, scale_x) from image pixels to input pixels."""
        return self.content_size[0] / self.image_size[0], self.content_size[1] / self.image_size[1]

    def input_intrinsics(self, K: np.ndarray) -> np.ndarray:
        """K (3, 3) of the image -> K of the network input (pixel centres at integers, as in geometry.py)."""
        scale_y, scale_x = self.scale
        out = np.array(K, dtype=np.float64, copy=True)
        out[0, 0], out[0, 1], out[1, 1] = K[0, 0] * scale_x, K[0, 1] * scale_x, K[1, 1] * scale_y
        out[0, 2] = (K[0, 2] + 0.5) * scale_x - 0.5 + self.left
        out[1, 2] = (K[1, 2] + 0.5) * scale_y - 0.5 + self.top
        return out


def plan_input(image_size: tuple[int, int], input_size: tuple[int, int], mode: ResizeMode) -> InputGeometry:
    """How an (H, W) image maps onto an (h, w) network input under `mode` ("stretch" or "letterbox")."""
    (height, width), (in_h, in_w) = image_size, input_size
    if mode == "stretch":
        return InputGeometry((height, width), (in_h, in_w), (in_h, in_w))
    if mode != "letterbox":
        raise ValueError(f"resize mode must be 'stretch' or 'letterbox', got {mode!r}")
    scale = min(in_h / height, in_w / width)
    content = (min(in_h, max(1, round(height * scale))), min(in_w, max(1, round(width * scale))))
    return InputGeometry((height, width), (in_h, in_w), content, (in_h - content[0]) // 2, (in_w - content[1]) // 2)


def resize_method(source: tuple[int, int], target: tuple[int, int]) -> int:
    """The OpenCV interpolation for resizing an (H, W) image to (h, w): INTER_AREA (averaging, no aliasing) when a
    side shrinks more than 2x, INTER_LINEAR otherwise. Bilinear's 2x2 footprint still reaches every source pixel down
    to half size, and at KITTI's 375x1242 -> 352x1216 it took 1.1 ms where INTER_AREA's non-integer averaging took
    18 ms (2-core CPU), more than half the time an INT8 student spends in its network."""
    shrink = max(source[0] / target[0], source[1] / target[1])
    return cv2.INTER_AREA if shrink > 2.0 else cv2.INTER_LINEAR


def preprocess(image: np.ndarray, geometry: InputGeometry, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (1, 3, h, w) float32 (image/255 - mean) / std; letterbox padding is 0 (= the mean)."""
    content_h, content_w = geometry.content_size
    if (content_h, content_w) != image.shape[:2]:
        method = resize_method(image.shape[:2], (content_h, content_w))
        image = cv2.resize(image, (content_w, content_h), interpolation=method)
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    offset = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    letterboxed = geometry.content_size != geometry.input_size
    batch = (np.zeros if letterboxed else np.empty)((1, 3, *geometry.input_size), np.float32)
    content = batch[0, :, geometry.top : geometry.top + content_h, geometry.left : geometry.left + content_w]
    for channel in range(3):  # one plane at a time, written in place: ~10x faster than a broadcast over (h, w, 3)
        np.multiply(image[..., channel], scale[channel], out=content[channel])
        content[channel] += offset[channel]
    return batch


def postprocess(
    output: np.ndarray, geometry: InputGeometry, clamp: tuple[float, float] | None, out: np.ndarray | None = None
) -> np.ndarray:
    """(h, w) network output map -> (H, W) float32 at the image resolution: padding cropped, bilinear, clamped; into
    `out` ((H, W) float32, e.g. a message buffer: image_codec.message_array) when given, else a new array."""
    top, left = geometry.top, geometry.left
    content = output[top : top + geometry.content_size[0], left : left + geometry.content_size[1]]
    height, width = geometry.image_size
    if out is not None and (out.shape != (height, width) or out.dtype != np.float32):
        raise ValueError(f"out must be float32 {(height, width)}, got {out.dtype} {out.shape}")
    if content.shape != (height, width):
        content = np.ascontiguousarray(content, np.float32)
        content = cv2.resize(content, (width, height), dst=out, interpolation=cv2.INTER_LINEAR)
    elif out is None:
        content = np.array(content, np.float32)  # the caller's own copy, not a view of the network's buffer
    else:
        np.copyto(out, content)
        content = out
    if clamp is not None:
        np.clip(content, *clamp, out=content)
    return content


class Runner(Protocol):
    """A backend: runs the network on a normalised (B, 3, h, w) float32 batch."""

    name: str
    metadata: ModelMetadata
    input_shape: tuple

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]: ...


class OrtRunner:
    """ONNX Runtime session with one execution provider (plus CPU for the ops it lacks).

    `inputs` lists the graph's input names, "image" first: a depth model takes only the image, a completion network
    (completion.py) also takes depth maps, passed to `run` by name.
    """

    def __init__(
        self, path: Path, provider: str, device: int = 0, threads: int | None = None, inputs: tuple = (INPUT_NAME,)
    ):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if provider not in available:
            raise BackendUnavailable(f"ONNX Runtime here has no {provider} (it has {', '.join(available)})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: provider fallbacks are reported by us, once
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # Idle worker threads sleep instead of spinning: the node shares the CPU with the rest of the robot's stack,
        # and spinning threads on a busy CPU made latency worse here (170 vs 124 ms, 2 threads, loaded 2-core box).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        check_onnx_file(path)  # before ONNX Runtime reads anything the file points at
        providers: list = [(provider, _provider_options(provider, path, device))]
        if provider == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
            providers.append(("CUDAExecutionProvider", {"device_id": device}))
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as error:  # ORT's exception types are not part of its public API
            raise ModelLoadError(f"{path}: not a readable ONNX model ({error_summary(error)})") from None
        active = self.session.get_providers()
        if active[0] != provider:
            raise BackendUnavailable(f"{provider} did not start (ONNX Runtime fell back to {active[0]})")
        self.metadata = metadata_from_map(self.session.get_modelmeta().custom_metadata_map, str(path))
        self.input_shape = _check_graph(self.session, self.metadata, path, tuple(inputs))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.name = f"onnxruntime[{provider}]"

    def run(self, image: np.ndarray, **extra: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, {INPUT_NAME: image, **extra})
        return dict(zip(self.output_names, values))


def _provider_options(provider: str, path: Path, device: int) -> dict:
    if provider == "CPUExecutionProvider":
        return {}
    if provider == "CUDAExecutionProvider":
        return {"device_id": device}
    cache = str(path.parent / "ort_trt_cache")  # ORT's own engine cache: the first start builds, later ones load
    return {"device_id": device, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}  # fmt: skip


def _check_graph(session, metadata: ModelMetadata, path: Path, expected: tuple) -> tuple:
    """The graph must take the `expected` inputs ((B, 3, H, W) image first) and give the outputs its metadata lists."""
    inputs = session.get_inputs()
    if tuple(i.name for i in inputs) != expected or len(inputs[0].shape) != 4:
        found = [(i.name, i.shape) for i in inputs]
        raise ModelLoadError(f"{path}: expected inputs {list(expected)} ((B, 3, H, W) image first), found {found}")
    shape = tuple(d if isinstance(d, int) else -1 for d in inputs[0].shape)
    if metadata.input_size is not None and shape[2:] != tuple(metadata.input_size):
        raise ModelLoadError(f"{path}: graph input is {shape[2:]} but its metadata says {metadata.input_size}")
    outputs = [o.name for o in session.get_outputs()]
    if sorted(outputs) != sorted(metadata.outputs):
        raise ModelLoadError(f"{path}: graph outputs {outputs} differ from its metadata's {list(metadata.outputs)}")
    return shape


class DepthEngine:
    """An exported model ready to run on RGB images. Build it with `open_engine`."""

    def __init__(self, runner: Runner, metadata: ModelMetadata, resize: ResizeMode = "stretch", input_size=None):
        self._runner = runner
        self.metadata = metadata
        self.resize = resize
        self.fallbacks: list[str] = []  # why better backends were skipped (auto), for the node's log
        plan_input((1, 1), (1, 1), resize)  # rejects an unknown mode now, not at the first frame
        if input_size is not None and metadata.input_size is not None and tuple(input_size) != metadata.input_size:
            raise ValueError(f"model input is fixed at {metadata.input_size}; input_size={tuple(input_size)} differs")
        if input_size is not None and any(int(v) % metadata.size_divisor for v in input_size):
            raise ValueError(f"input_size {tuple(input_size)} must be multiples of {metadata.size_divisor}")
        self.input_size = tuple(int(v) for v in input_size) if input_size is not None else metadata.input_size
        self._geometry: InputGeometry | None = None

    @property
    def backend_name(self) -> str:
        """e.g. "onnxruntime[CPUExecutionProvider]" or "tensorrt[10.3.0, efficientnet_b0]"."""
        return self._runner.name

    def geometry_for(self, image_size: tuple[int, int]) -> InputGeometry:
        """Input geometry for an (H, W) image (cached: cameras keep their size)."""
        image_size = (int(image_size[0]), int(image_size[1]))
        if self._geometry is None or self._geometry.image_size != image_size:
            if self.input_size is not None:
                self._geometry = plan_input(image_size, self.input_size, self.resize)
            else:  # a dynamic model runs at the image's own size, rounded up to what the network accepts
                divisor = self.metadata.size_divisor
                target = tuple(math.ceil(v / divisor) * divisor for v in image_size)
                if self.resize == "letterbox":  # pad only, no resampling
                    top, left = (target[0] - image_size[0]) // 2, (target[1] - image_size[1]) // 2
                    self._geometry = InputGeometry(image_size, target, image_size, top, left)
                else:
                    self._geometry = plan_input(image_size, target, self.resize)
        return self._geometry

    def infer(self, image_rgb: np.ndarray, confidence: bool = True, depth_out=None) -> EngineResult:
        """Depth for one (H, W, 3) uint8 RGB image; see `EngineResult` for what comes back.

        confidence: resize the model's confidence map too (False: `EngineResult.confidence` is None).
        depth_out: (H, W) float32 array to write `EngineResult.depth` into (the node's outgoing message buffer).
        """
        start = time.perf_counter()
        _check_image(image_rgb)
        geometry = self.geometry_for(image_rgb.shape[:2])
        batch = preprocess(image_rgb, geometry, self.metadata.mean, self.metadata.std)
        ran = time.perf_counter()
        outputs = self._runner.run(batch)
        done = time.perf_counter()
        meta = self.metadata
        depth_range = (meta.min_depth, meta.max_depth) if meta.output_kind == "metric" else None
        depth = postprocess(outputs["depth"][0, 0], geometry, depth_range, out=depth_out)
        confidence_map = None
        if confidence and "confidence" in outputs:
            confidence_map = postprocess(outputs["confidence"][0, 0], geometry, (0.0, 1.0))
        end = time.perf_counter()
        timings = {"preprocess": ran - start, "inference": done - ran, "postprocess": end - done}
        timings = {stage: seconds * 1e3 for stage, seconds in timings.items()}
        return EngineResult(depth, confidence_map, timings)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        described = f"shape {image.shape} dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {described}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")


def open_engine(
    path: str | Path,
    backend: str = "auto",
    device: int = 0,
    threads: int | None = None,
    resize: ResizeMode = "stretch",
    input_size: tuple[int, int] | None = None,
) -> DepthEngine:
    """Load an exported model (.onnx, or a TensorRT .engine with its sidecar) on the requested backend.

    Args:
        path: model file written by `distill export`.
        backend: "auto" (TensorRT > ORT-CUDA > ORT-CPU, first that starts), "tensorrt", "onnxruntime"
            (ORT on the GPU if it starts, else CPU), or one ORT provider: "onnxruntime-cpu" / "-cuda" / "-tensorrt".
        device: CUDA device index for GPU backends.
        threads: CPU threads for ONNX Runtime (None or 0: ORT's default, all cores).
        resize: "stretch" (fill the input) or "letterbox" (keep the aspect ratio, pad).
        input_size: (h, w) network input for dynamic models (default: the image size rounded up to size_divisor).

    Raises:
        ModelLoadError: missing/corrupt file, not an exported depthkd model, or an engine for another TensorRT/GPU.
        ValueError: unknown backend or resize mode.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    skipped: list[str] = []
    for name, make in _attempts(path, backend, device):
        try:
            runner = make(threads)
            _smoke_test(runner)
        except ModelLoadError as error:
            if name.startswith("onnxruntime"):  # the file itself is bad: no other backend will read it
                raise
            skipped.append(f"{name}: {error}")
        except BackendUnavailable as error:
            skipped.append(f"{name}: {error}")
        else:
            for reason in skipped:
                LOG.info("backend %s", reason)
            engine = DepthEngine(runner, runner.metadata, resize=resize, input_size=input_size)
            engine.fallbacks = skipped
            return engine
    raise ModelLoadError(_with_reasons(f"{path}: no {backend} backend could run it", skipped))


def _smoke_test(runner: Runner) -> None:
    """Run a GPU backend once at load: a provider can start and still fail on its first batch (cuDNN, memory)."""
    if runner.name.endswith("[CPUExecutionProvider]"):
        return
    meta = runner.metadata
    size = meta.input_size or (2 * meta.size_divisor, 2 * meta.size_divisor)
    try:
        runner.run(np.zeros((1, 3, *size), np.float32))
    except Exception as error:  # any failure here means: use the next backend
        raise BackendUnavailable(f"{runner.name} failed its first run ({error_summary(error)})") from None


def _with_reasons(message: str, skipped: list[str]) -> str:
    return message + (f" (skipped: {'; '.join(skipped)})" if skipped else "")


def _attempts(path: Path, backend: str, device: int) -> list[tuple[str, object]]:
    """(name, threads -> runner) in the order to try them."""
    is_engine = path.suffix.lower() in ENGINE_SUFFIXES

    def tensorrt(threads):
        if is_engine:
            return TensorRTRunner(path, device)
        cached = find_cached_engine(path, device)
        if cached is None:
            raise BackendUnavailable(f"no engine built from {path.name} for this TensorRT/GPU (distill export ...)")
        return TensorRTRunner(cached, device)

    def ort(variant):
        def make(threads):
            return OrtRunner(_onnx_for(path) if is_engine else path, ORT_PROVIDERS[variant], device, threads)

        return make

    if backend == "tensorrt":
        return [("tensorrt", tensorrt)]
    if backend in ORT_PROVIDERS:
        return [(backend, ort(backend))]
    gpu_ort = [("onnxruntime-cuda", ort("onnxruntime-cuda")), ("onnxruntime-cpu", ort("onnxruntime-cpu"))]
    if backend == "onnxruntime":
        return gpu_ort
    return [("tensorrt", tensorrt), ("onnxruntime-tensorrt", ort("onnxruntime-tensorrt")), *gpu_ort]


def _onnx_for(engine_path: Path) -> Path:
    """The ONNX file an engine was built from (named in its sidecar), for ONNX Runtime fallback."""
    sidecar = read_sidecar(engine_path)
    onnx = engine_path.parent / str(sidecar.get("onnx", ""))
    if not sidecar.get("onnx") or not onnx.is_file():
        raise ModelLoadError(f"{engine_path}: ONNX Runtime needs the source ONNX file {onnx.name!r} beside the engine")
    return onnx
