"""TensorRT engines from exported ONNX models, with the TensorRT 10 Python API.

FP32/FP16/INT8 (IInt8EntropyCalibrator2 fed by `distill.verbs.calibration` from a folder of images, a dataset
config or a rosbag), a workspace limit, a timing cache file reused across builds, an optimisation profile for dynamic
models, and the cache key + sidecar (`depth_node.trt_backend`) that make the runtime rebuild rather than misuse an
engine built for another TensorRT version, GPU or precision. Everything but `build_engine` and the calibrator runs
without TensorRT.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from depth_node.metadata import ModelMetadata
from depth_node.trt_backend import (
    INPUT_NAME,
    SIDECAR_FORMAT,
    BackendUnavailable,
    cuda_check,
    engine_cache_key,
    gpu_name,
    import_cudart,
    import_tensorrt,
    read_sidecar,
    sha256_file,
)
from distill.errors import UserError
from distill.verbs.calibration import CALIB_MAX_IMAGES, calibration_batches, calibration_images

WORKSPACE_GIB = 4
CALIB_BATCH = 8  # dynamic models; a static model's batch axis is fixed at 1


def optimisation_profile(size: tuple[int, int], divisor: int, max_batch: int = 4) -> dict[str, tuple[int, ...]]:
    """(min, opt, max) input shapes for a dynamic engine: half `size` up to 1.5x `size`, batch 1..max_batch.

    All sides are multiples of `divisor`; `opt` (the shape TensorRT tunes for) is (1, 3, *size).
    """

    def side(value: float, rounding) -> int:
        return max(divisor, int(rounding(value / divisor)) * divisor)

    height, width = size
    return {
        "min": (1, 3, side(height / 2, math.floor), side(width / 2, math.floor)),
        "opt": (1, 3, side(height, math.ceil), side(width, math.ceil)),
        "max": (max_batch, 3, side(height * 1.5, math.ceil), side(width * 1.5, math.ceil)),
    }


def timing_cache_name(trt_version: str, gpu: str) -> str:
    """Timing caches hold per-GPU, per-version kernel timings: one file per pair."""
    return f"timing-trt{trt_version}-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.cache"


def build_engine(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    metadata: ModelMetadata,
    size: tuple[int, int],
    calib: Path | None = None,
    workspace_gib: float = WORKSPACE_GIB,
    device: int = 0,
) -> Path:
    """Build (or reuse) `<onnx stem>.<cache key>.engine` plus its sidecar in out_dir. Returns the engine path.

    Args:
        onnx_path: a model written by `distill export`.
        precision: "fp32", "fp16" or "int8" (INT8 keeps FP16 for layers without INT8 kernels; needs `calib`).
        metadata: the ONNX model's depthkd metadata.
        size: (H, W) the dynamic profile is centred on (ignored for static models, whose size is fixed).
        calib: calibration images for INT8 (see `calibration_images`).
        workspace_gib: TensorRT workspace memory limit.
    """
    try:
        trt = import_tensorrt()
        gpu = gpu_name(device)
    except BackendUnavailable as error:
        raise UserError(
            f"--format engine needs TensorRT 10 (pip install tensorrt) and an NVIDIA GPU: {error}; "
            f"the ONNX model {onnx_path} runs anywhere with ONNX Runtime"
        ) from None
    center = metadata.input_size or size
    profile = optimisation_profile(center, metadata.size_divisor) if metadata.dynamic else None
    key = engine_cache_key(sha256_file(onnx_path), trt.__version__, gpu, precision, json.dumps(profile or ""))
    engine_path = Path(out_dir) / f"{onnx_path.stem}.{key}.engine"
    if engine_path.is_file() and _sidecar_matches(engine_path, key):
        print(f"engine up to date (same ONNX, TensorRT {trt.__version__}, GPU and precision): {engine_path}")
        return engine_path
    batches = None
    if precision == "int8":
        batch = CALIB_BATCH if metadata.dynamic else 1
        batches = list(calibration_batches(calibration_images(calib), metadata, center, batch, CALIB_MAX_IMAGES))
        if not batches:
            raise UserError(f"{calib}: fewer than {batch} usable images for INT8 calibration")
    timing_cache = Path(out_dir) / timing_cache_name(trt.__version__, gpu)
    serialized = _build(trt, onnx_path, precision, profile, batches, workspace_gib, timing_cache, engine_path)
    engine_path.write_bytes(serialized)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "key": key,
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "precision": precision,
        "onnx": os.path.relpath(onnx_path.resolve(), engine_path.parent.resolve()),
        "onnx_sha256": sha256_file(onnx_path),
        "profile": profile,
        "metadata": json.loads(metadata.to_json()),
    }
    engine_path.with_name(engine_path.name + ".json").write_text(json.dumps(sidecar, indent=1))
    return engine_path


def _sidecar_matches(engine_path: Path, key: str) -> bool:
    try:
        return read_sidecar(engine_path)["key"] == key
    except ValueError:
        return False


def _build(trt, onnx_path, precision, profile, batches, workspace_gib, timing_cache: Path, engine_path: Path) -> bytes:
    """Parse the ONNX file and build a serialized engine (TensorRT 10 API)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT cannot parse this ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    _set_precision(trt, config, precision)
    if profile is not None:
        shapes = builder.create_optimization_profile()
        shapes.set_shape(INPUT_NAME, profile["min"], profile["opt"], profile["max"])
        config.add_optimization_profile(shapes)
    if batches is not None:
        config.int8_calibrator = calibrator = make_calibrator(trt, batches, engine_path.with_suffix(".calib"))
        if profile is not None:  # calibration runs at the batches' own shape
            calibration = builder.create_optimization_profile()
            calibration.set_shape(INPUT_NAME, *([batches[0].shape] * 3))
            config.set_calibration_profile(calibration)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    print(f"building TensorRT {precision} engine from {onnx_path} (minutes the first time) ...")
    serialized = builder.build_serialized_network(network, config)
    if batches is not None:
        calibrator.free()
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def _set_precision(trt, config, precision: str) -> None:
    flags = {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}[precision]
    for name in flags:
        if not hasattr(trt.BuilderFlag, name):  # TensorRT 11 removed the precision flags (strong typing)
            raise UserError(
                f"TensorRT {trt.__version__} has no {name} builder flag (removed in TensorRT 11): build --fp16/--int8 "
                "engines with TensorRT 10, or an fp32 engine with this one"
            )
        config.set_flag(getattr(trt.BuilderFlag, name))


def make_calibrator(trt, batches: list[np.ndarray], cache_file: Path):
    """An IInt8EntropyCalibrator2 serving `batches` from one device buffer; the calibration table is cached in
    `cache_file` so a rebuild skips calibration."""
    cudart = import_cudart()
    host_to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.remaining = iter(batches)
            self.pointer = int(cuda_check(cudart.cudaMalloc(batches[0].nbytes)))

        def get_batch_size(self) -> int:
            return batches[0].shape[0]

        def get_batch(self, names):
            batch = next(self.remaining, None)
            if batch is None:
                return None
            cuda_check(cudart.cudaMemcpy(self.pointer, batch.ctypes.data, batch.nbytes, host_to_device))
            return [self.pointer]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            cache_file.write_bytes(bytes(memoryview(cache)))

        def free(self) -> None:
            cuda_check(cudart.cudaFree(self.pointer))

    return EntropyCalibrator()
