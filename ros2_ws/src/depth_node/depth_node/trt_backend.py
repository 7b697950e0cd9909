"""TensorRT engines: the cache key and JSON sidecar that pin an engine to its TensorRT version, GPU and precision,
and a runner executing a serialized engine with the TensorRT 10 Python API on a CUDA stream (cuda-python).

A TensorRT engine only runs on the TensorRT version and GPU model that built it, and carries none of our metadata,
so `distill export --format engine` writes `<name>.<key>.engine` plus `<name>.<key>.engine.json`:
    {"format": SIDECAR_FORMAT, "key": ..., "tensorrt": "10.x.y", "gpu": "NVIDIA ...", "precision": "fp16",
     "onnx": "<source onnx file name>", "onnx_sha256": ..., "profile": {...}, "metadata": {ModelMetadata}}
The runtime refuses an engine whose sidecar names another TensorRT version or GPU (rebuild it instead).
`tensorrt` and `cuda` are imported only when an engine is actually opened.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from depth_node.metadata import ModelLoadError, ModelMetadata

SIDECAR_FORMAT = "depthkd-tensorrt-engine/1"
PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME = "image"


class BackendUnavailable(RuntimeError):
    """This backend cannot run on this machine (package missing, no GPU); another backend may."""


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, precision: str, profile: str = "") -> str:
    """Name under which an engine built from one ONNX file is cached; any input change gives another key.

    Args:
        onnx_sha256: hex digest of the source ONNX file.
        trt_version: TensorRT version string, e.g. "10.3.0".
        gpu_name: CUDA device name, e.g. "NVIDIA GeForce RTX 4090".
        precision: "fp32", "fp16" or "int8".
        profile: text describing the optimisation profile (dynamic shapes), "" for static models.

    Returns:
        e.g. "trt10.3.0-nvidia-geforce-rtx-4090-fp16-1a2b3c4d5e6f": readable parts plus a hash of everything.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    gpu_slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "unknown-gpu"
    version_slug = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    digest = hashlib.sha256("\n".join([onnx_sha256, trt_version, gpu_name, precision, profile]).encode()).hexdigest()
    return f"trt{version_slug}-{gpu_slug}-{precision}-{digest[:12]}"


def sidecar_path(engine_path: str | Path) -> Path:
    """`model.engine` -> `model.engine.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: str | Path) -> dict:
    """The sidecar of an engine file, checked for shape; ModelLoadError naming the file otherwise."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ModelLoadError(
            f"{engine_path}: no sidecar {path.name} beside the engine; engines are used only with the sidecar "
            "`distill export --format engine` writes (TensorRT version, GPU, precision and model metadata)"
        )
    try:
        sidecar = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: engine sidecar is not valid JSON ({error})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ModelLoadError(f"{path}: not a depthkd engine sidecar (expected format {SIDECAR_FORMAT!r})")
    missing = [key for key in ("key", "tensorrt", "gpu", "precision", "metadata") if key not in sidecar]
    if missing:
        raise ModelLoadError(f"{path}: engine sidecar lacks {', '.join(missing)}")
    return sidecar


def check_sidecar(sidecar: dict, engine_path: str | Path, trt_version: str, gpu_name: str) -> ModelMetadata:
    """Refuse an engine built for another TensorRT version or GPU; return its model metadata otherwise."""
    built = (sidecar["tensorrt"], sidecar["gpu"])
    if built != (trt_version, gpu_name):
        source = f" `distill export {sidecar['onnx']} --format engine`" if sidecar.get("onnx") else " `distill export`"
        raise ModelLoadError(
            f"{engine_path}: engine built for TensorRT {built[0]} on '{built[1]}', but this machine has TensorRT "
            f"{trt_version} on '{gpu_name}'; rebuild it with{source} (or run the ONNX model with ONNX Runtime)"
        )
    return ModelMetadata.from_dict(sidecar["metadata"], str(engine_path))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_tensorrt():
    """The `tensorrt` module, or BackendUnavailable saying why not."""
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailable(f"TensorRT Python package not installed ({error})") from None
    return tensorrt


def import_cudart():
    """cuda-python's runtime API module (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as error:
            raise BackendUnavailable(f"cuda-python not installed ({error}); pip install cuda-python") from None
    return cudart


def cuda_check(result: tuple):
    """Unpack a cuda-python call result `(error, *values)`, raising BackendUnavailable on a CUDA error."""
    error, values = result[0], result[1:]
    if int(error) != 0:
        raise BackendUnavailable(f"CUDA error {error.name if hasattr(error, 'name') else error}")
    return values[0] if len(values) == 1 else values or None


def gpu_name(device: int = 0) -> str:
    """Name of CUDA device `device`, e.g. "NVIDIA GeForce RTX 4090" (BackendUnavailable without a usable GPU)."""
    cudart = import_cudart()
    properties = cuda_check(cudart.cudaGetDeviceProperties(device))
    return properties.name.decode(errors="replace").rstrip("\x00").strip()


def find_cached_engine(onnx_path: str | Path, device: int = 0) -> Path | None:
    """The newest engine `distill export` built from this very ONNX file for this machine's TensorRT and GPU, if any.

    Engines sit beside the ONNX file as `<stem>.<key>.engine`; any precision qualifies.
    """
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    here = (trt.__version__, gpu_name(device))
    candidates = sorted(onnx_path.parent.glob(f"{onnx_path.stem}.*.engine"), key=lambda p: p.stat().st_mtime)
    for engine in reversed(candidates):
        try:
            sidecar = read_sidecar(engine)
        except ModelLoadError:
            continue
        if (sidecar["tensorrt"], sidecar["gpu"]) == here and sidecar.get("onnx_sha256") == sha256_file(onnx_path):
            return engine
    return None


class TensorRTRunner:
    """Runs a serialized TensorRT engine: numpy (B, 3, H, W) float32 in, numpy outputs by name out."""

    def __init__(self, engine_path: str | Path, device: int = 0):
        path = Path(engine_path)
        sidecar = read_sidecar(path)  # first: a missing sidecar is the file's problem on any machine
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        cuda_check(cudart.cudaSetDevice(device))
        self.metadata = check_sidecar(sidecar, path, trt.__version__, gpu_name(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise ModelLoadError(
                f"{path}: TensorRT {trt.__version__} could not deserialize this engine (corrupt, or built by another "
                "TensorRT version): rebuild it with `distill export ... --format engine`"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self.input_names != [INPUT_NAME]:
            raise ModelLoadError(f"{path}: engine inputs are {self.input_names}, expected ['{INPUT_NAME}']")
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self.input_shape = tuple(self._engine.get_tensor_shape(INPUT_NAME))  # -1 marks a dynamic axis
        self._stream = cuda_check(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self.name = f"tensorrt[{trt.__version__}, {self.metadata.arch or path.name}]"

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            if pointer:
                cuda_check(self._cudart.cudaFree(pointer))
            pointer = int(cuda_check(self._cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """image: (B, 3, H, W) float32 normalised. Returns {"depth": (B, 1, H, W), ["confidence": (B, 1, H, W)]}."""
        cudart = self._cudart
        host_in = np.ascontiguousarray(image, dtype=self._dtypes[INPUT_NAME])
        if not self._context.set_input_shape(INPUT_NAME, host_in.shape):
            raise ValueError(f"input shape {host_in.shape} is outside the engine's optimisation profile")
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        pointer = self._device_buffer(INPUT_NAME, host_in.nbytes)
        cuda_check(cudart.cudaMemcpyAsync(pointer, host_in.ctypes.data, host_in.nbytes, to_device, self._stream))
        self._context.set_tensor_address(INPUT_NAME, pointer)
        outputs = {}
        for name in self.output_names:
            outputs[name] = np.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._dtypes[name])
            self._context.set_tensor_address(name, self._device_buffer(name, outputs[name].nbytes))
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        for name, host_out in outputs.items():
            pointer = self._buffers[name][0]
            cuda_check(cudart.cudaMemcpyAsync(host_out.ctypes.data, pointer, host_out.nbytes, to_host, self._stream))
        cuda_check(cudart.cudaStreamSynchronize(self._stream))
        return {name: value.astype(np.float32, copy=False) for name, value in outputs.items()}

    def close(self) -> None:
        """Free device buffers and the stream (also done at garbage collection)."""
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        if hasattr(self, "_buffers"):
            self.close()
