"""Teachers we run or read as they are: Hugging Face depth models, ONNX files and precomputed depth maps.

`distill.models.build_teacher` routes these specs here (options after `?`, joined by `&`):

    hf:<folder>[?output_kind=<kind>&size=<H>x<W>]
        A `transformers` depth-estimation model saved with `save_pretrained` (DPT, Depth Anything V1/V2, GLPN,
        ZoeDepth, ...). Loaded offline. Gives depth and the 4 backbone stages its own decoder reads as features.
    onnx:<file>[?output_kind=<kind>&min_depth=<m>&max_depth=<m>&device=cpu|cuda]
        A black-box ONNX model run with ONNX Runtime: depth only, no features, no gradients.
    precomputed:<dir>
        Depth maps cached as files, one per frame (see `write_precomputed`); `<dir>/teacher.json` declares them.

`output_kind` is one of "metric", "relative_depth", "relative_disparity" and overrides what the model declares. Options
can also be passed as keywords to `build_external_teacher` (a config's teacher block), e.g. output_kind="metric".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import get_args
from urllib.parse import parse_qsl

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from depth_node.metadata import METADATA_KEY, ModelMetadata, error_summary
from distill.data.samples import read_depth_png
from distill.errors import UserError, did_you_mean
from distill.models.base import IMAGENET_MEAN, IMAGENET_STD, DepthModel, DepthOutput, OutputKind
from distill.parsing import parse_size

SCHEME_OPTIONS = {
    "hf": ("output_kind", "size"),
    "onnx": ("output_kind", "min_depth", "max_depth", "device"),
    "precomputed": (),
}
# Families whose predicted_depth is in metres; the others (DPT/MiDaS, relative Depth Anything, Depth Pro's
# canonical inverse depth) predict relative disparity.
HF_METRIC_TYPES = ("glpn", "zoedepth")
# Normalisation of families whose folder lacks preprocessor_config.json (from their image processors' defaults).
HF_DEFAULT_MEAN_STD = {"dpt": ((0.5,) * 3, (0.5,) * 3), "glpn": ((0.0,) * 3, (1.0,) * 3)}
TEACHER_JSON = "teacher.json"
PNG_METRES_PER_UNIT = 1.0 / 256.0  # KITTI's uint16 depth PNGs


def build_external_teacher(
    spec: str, *, img_size: tuple[int, int] | None = None, min_depth: float = 1e-3, max_depth: float = 80.0, **options
) -> DepthModel:
    """Build the teacher an `hf:`, `onnx:` or `precomputed:` spec names.

    Args:
        spec: see the module docstring.
        img_size: (H, W) pixels the teacher will be fed; unused, these teachers take any size.
        min_depth, max_depth: metres, the caller's depth range, used where neither the model (config, metadata,
            teacher.json) nor the spec's min_depth/max_depth options declare one.
        **options: the spec's `?key=value` options given as keywords (e.g. from a config's teacher block; size may
            be [H, W]); they override the spec's. Unknown ones raise UserError.
    """
    scheme, path, parsed = parse_spec(spec)
    parsed.update({k: "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for k, v in options.items()})
    check_options(scheme, parsed, spec)
    kind = parsed.get("output_kind")
    if kind is not None and kind not in get_args(OutputKind):
        raise UserError(f"{spec}: output_kind must be one of {', '.join(get_args(OutputKind))}, got {kind!r}")
    if scheme == "hf":
        size = _parse_size(parsed["size"], spec) if "size" in parsed else None
        return HFTeacher(path, kind=kind, size=size, min_depth=min_depth, max_depth=max_depth)
    if scheme == "onnx":
        return OnnxTeacher(path, options=parsed, min_depth=min_depth, max_depth=max_depth)
    return PrecomputedTeacher(path)


def parse_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    """Split "scheme:path?key=value&..." into (scheme, path, options); bad schemes or syntax raise UserError."""
    scheme, _, rest = spec.partition(":")
    if scheme not in SCHEME_OPTIONS or not rest:
        raise UserError(f"teacher spec {spec!r} must look like {' or '.join(s + ':<path>' for s in SCHEME_OPTIONS)}")
    path, _, query = rest.partition("?")
    try:
        options = dict(parse_qsl(query, strict_parsing=True)) if query else {}
    except ValueError:
        raise UserError(f"teacher spec {spec!r}: options must look like ?key=value&key=value") from None
    return scheme, Path(path).expanduser(), options


def check_options(scheme: str, options: dict[str, str], spec: str) -> None:
    """Raise UserError (with a close match) for an option the scheme does not take."""
    for key in options:
        if key not in SCHEME_OPTIONS[scheme]:
            known = ", ".join(SCHEME_OPTIONS[scheme]) or "none"
            raise UserError(
                f"teacher spec {spec!r}: unknown option {key!r}{did_you_mean(key, SCHEME_OPTIONS[scheme])}"
                f" (options: {known})"
            )


def _parse_size(text: str, spec: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except UserError as error:
        raise UserError(f"teacher spec {spec!r}: {error}") from None


def _parse_float(options: dict[str, str], key: str, default: float, spec: str) -> float:
    try:
        return float(options.get(key, default))
    except ValueError:
        raise UserError(f"teacher spec {spec!r}: {key} must be a number, got {options[key]!r}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read JSON ({error})") from None


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), bilinear; a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def nearest_multiple(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The (H, W) nearest to (height, width) whose sides are positive multiples of `multiple` pixels."""
    return max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple)


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ViT tokens (B, N, C) -> (B, C, gh, gw), dropping the N - gh*gw leading CLS/register tokens.

    (B, C, h, w) maps (convolutional stages) pass through unchanged.
    """
    if tokens.dim() == 4:
        return tokens
    gh, gw = grid
    extra = tokens.shape[1] - gh * gw
    if extra < 0:
        raise RuntimeError(f"{tokens.shape[1]} tokens do not fill a {gh}x{gw} patch grid")
    return tokens[:, extra:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


class HFTeacher(DepthModel):
    """A `transformers` depth-estimation model saved in a local folder.

    ViTs need sides that are multiples of their patch size: the input is resized to the nearest multiple (or to the
    fixed size the model requires: `size=HxW` option, a fixed-size image processor, or DPT-ViT/hybrid's square
    `config.image_size`) and the depth resized back, so any input size works (`size_divisor` is 1).
    Features are the 4 backbone stages the model's decoder (neck) reads, as (B, C, h, w) maps at the patch grid of
    the resized input; models without a neck give their last 4 hidden states.
    """

    size_divisor = 1

    def __init__(
        self, folder: Path, *, kind: str | None, size: tuple[int, int] | None, min_depth: float, max_depth: float
    ):
        super().__init__()
        self.model = _load_hf_model(folder).eval()
        config = self.model.config
        processor_path = folder / "preprocessor_config.json"
        processor = _read_json(processor_path) if processor_path.is_file() else None
        metric = getattr(config, "depth_estimation_type", None) == "metric" or config.model_type in HF_METRIC_TYPES
        self.output_kind = kind or ("metric" if metric else "relative_disparity")
        self.mean, self.std = _hf_mean_std(config.model_type, processor)
        self.patch_size = _hf_patch_size(config)
        self.multiple = math.lcm(
            self.patch_size, *(int((processor or {}).get(key) or 1) for key in ("ensure_multiple_of", "size_divisor"))
        )
        self.fixed_size = size or _hf_fixed_size(config, processor)
        self.min_depth = min_depth
        declared_max = getattr(config, "max_depth", None)
        self.max_depth = float(declared_max) if metric and declared_max else max_depth
        self._neck_inputs: list[torch.Tensor] = []
        self._feature_info: tuple[list[int], list[int]] | None = None
        neck = getattr(self.model, "neck", None)
        if neck is not None:
            neck.register_forward_pre_hook(self._capture_neck_inputs)

    def _capture_neck_inputs(self, module: torch.nn.Module, args: tuple) -> None:
        self._neck_inputs = list(args[0])

    def internal_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the wrapped model runs at for an input of (height, width) pixels."""
        return self.fixed_size or nearest_multiple(height, width, self.multiple)

    def forward(self, x: torch.Tensor, names: list[str] | None = None) -> DepthOutput:
        """x: (B, 3, H, W) normalised with `mean`/`std`. Returns depth (B, 1, H, W) and 4 feature maps."""
        size = self.internal_size(*x.shape[-2:])
        has_neck = getattr(self.model, "neck", None) is not None
        out = self.model(pixel_values=_resize(x, size), output_hidden_states=not has_neck)
        depth = _resize(out.predicted_depth.unsqueeze(1), tuple(x.shape[-2:]))
        stages = self._neck_inputs if has_neck else list(out.hidden_states[-4:])
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        features = [tokens_to_map(stage, grid) for stage in stages]
        self._neck_inputs = []
        self._feature_info = ([f.shape[1] for f in features], [round(size[0] / f.shape[2]) for f in features])
        return DepthOutput(depth=depth, features=features)

    def _probe(self) -> tuple[list[int], list[int]]:
        if self._feature_info is None:
            side = 4 * self.multiple
            with torch.no_grad():
                self(torch.zeros(1, 3, side, side, device=next(self.model.parameters()).device))
        return self._feature_info

    def feature_channels(self) -> list[int]:
        return self._probe()[0]

    def feature_reductions(self) -> list[int]:
        """Nominal strides relative to the resized input (a fixed-size model's input is resized to that size)."""
        return self._probe()[1]


def _load_hf_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForDepthEstimation

    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a Hugging Face model folder (no config.json); save one with save_pretrained")
    try:
        # float32 whatever the saved dtype: inputs come as float32; callers wanting fp16 use autocast.
        return AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{folder}: cannot load a depth-estimation model ({error})") from None


def _hf_mean_std(model_type: str, processor: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if processor is None:
        return HF_DEFAULT_MEAN_STD.get(model_type, (IMAGENET_MEAN, IMAGENET_STD))
    if processor.get("do_normalize", True) and "image_mean" in processor and "image_std" in processor:
        return tuple(processor["image_mean"]), tuple(processor["image_std"])
    return (0.0,) * 3, (1.0,) * 3


def _hf_patch_size(config) -> int:
    backbone = getattr(config, "backbone_config", None)
    patch = getattr(config, "patch_size", None) or getattr(backbone, "patch_size", None) or 1
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def _hf_fixed_size(config, processor: dict | None) -> tuple[int, int] | None:
    """The one input size a model accepts, or None when any multiple of its patch size works."""
    if processor is not None and processor.get("do_resize", True) and not processor.get("keep_aspect_ratio", False):
        size = processor.get("size", {})
        if isinstance(size, int):
            return size, size
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
    if config.model_type == "dpt" and (getattr(config, "backbone_config", None) is None or config.is_hybrid):
        return int(config.image_size), int(config.image_size)  # DPT-ViT/hybrid: square grid, hybrid a fixed size
    return None


class OnnxTeacher(DepthModel):
    """A black-box ONNX depth model run with ONNX Runtime (response only: no features, no gradients).

    Its depthkd metadata (`depth_node.metadata.ModelMetadata`, as `distill export` writes it) gives mean/std, output
    kind, depth range and size divisor; a model without it is assumed to take ImageNet-normalised input and predict
    metric depth within the caller's range. Inputs are resized to the model's static height/width (or, for dynamic
    models, to the nearest multiple of the size divisor) and the depth resized back.
    """

    size_divisor = 1

    def __init__(self, path: Path, *, options: dict[str, str], min_depth: float, max_depth: float):
        super().__init__()
        self.session = _onnx_session(path, options.get("device", "cpu"))
        meta = _onnx_metadata(self.session, path)
        spec = f"onnx:{path}"
        self.mean, self.std = (meta.mean, meta.std) if meta else (IMAGENET_MEAN, IMAGENET_STD)
        self.output_kind = options.get("output_kind") or (meta.output_kind if meta else "metric")
        self.min_depth = _parse_float(options, "min_depth", meta.min_depth if meta else min_depth, spec)
        self.max_depth = _parse_float(options, "max_depth", meta.max_depth if meta else max_depth, spec)
        self.multiple = meta.size_divisor if meta else 1
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        batch, _, height, width = model_input.shape
        self.static_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        self.static_batch = batch if isinstance(batch, int) else None
        output_names = [output.name for output in self.session.get_outputs()]
        self.output_name = "depth" if "depth" in output_names else output_names[0]

    def internal_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the ONNX model runs at for an input of (height, width) pixels."""
        return self.static_size or nearest_multiple(height, width, self.multiple)

    def forward(self, x: torch.Tensor, names: list[str] | None = None) -> DepthOutput:
        """x: (B, 3, H, W) normalised with `mean`/`std`. Returns depth (B, 1, H, W) on x's device."""
        size = tuple(x.shape[-2:])
        pixels = _resize(x.detach().float(), self.internal_size(*size)).cpu().numpy().astype(self.input_dtype)
        step = self.static_batch or len(pixels)
        chunks = [
            self.session.run([self.output_name], {self.input_name: pixels[i : i + step]})[0]
            for i in range(0, len(pixels), step)
        ]
        depth = torch.from_numpy(np.concatenate(chunks).astype(np.float32))
        depth = depth.reshape(len(pixels), 1, *depth.shape[-2:])
        return DepthOutput(depth=_resize(depth, size).to(x.device))


def _onnx_session(path: Path, device: str):
    import onnxruntime as ort

    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    if device not in providers:
        raise UserError(f"onnx:{path}: device must be cpu or cuda, got {device!r}")
    if not path.is_file():
        raise UserError(f"{path}: ONNX file not found")
    try:
        return ort.InferenceSession(str(path), providers=providers[device])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf types for bad files
        raise UserError(f"{path}: cannot load the ONNX model ({error_summary(error)})") from None


def _onnx_metadata(session, path: Path) -> ModelMetadata | None:
    """The model's depthkd metadata, None when it has none; invalid metadata raises UserError."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        return None
    try:
        return ModelMetadata.from_json(text, str(path))
    except ValueError as error:  # ModelLoadError is a ValueError
        raise UserError(str(error)) from None


def precomputed_path(folder: Path, name: str, suffix: str) -> Path:
    """Where a frame's cached teacher depth lives: '/' in the frame name becomes '__'."""
    return Path(folder) / (name.replace("/", "__") + suffix)


class PrecomputedTeacher(DepthModel):
    """Teacher depth maps cached as files: `<dir>/<name>.npy` ((H, W) float32) or `<dir>/<name>.png` (uint16,
    metres x 256, KITTI style, 0 = invalid), declared by `<dir>/teacher.json` (output_kind, min_depth, max_depth,
    source). Maps stored at another size are resized to the input size (nearest where they have holes).
    """

    size_divisor = 1

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)
        declared = self.folder / TEACHER_JSON
        if not declared.is_file():
            raise UserError(
                f"{declared} not found: a precomputed teacher folder needs it, e.g. "
                '{"output_kind": "metric", "min_depth": 0.001, "max_depth": 80, "source": "..."}; '
                "caching a teacher with write_precomputed creates it"
            )
        meta = _read_json(declared)
        self.output_kind = meta.get("output_kind", "metric")
        if self.output_kind not in get_args(OutputKind):
            raise UserError(f"{declared}: output_kind must be one of {', '.join(get_args(OutputKind))}")
        self.min_depth = float(meta.get("min_depth", self.min_depth))
        self.max_depth = float(meta.get("max_depth", self.max_depth))
        self.source = meta.get("source", "")

    def forward(self, x: torch.Tensor, names: list[str] | None = None) -> DepthOutput:
        """x: (B, 3, H, W), used for its size and device; names: the batch's frame names (sample meta["name"])."""
        if names is None or len(names) != x.shape[0]:
            raise ValueError("a precomputed teacher needs the frame name of every image in the batch")
        size = tuple(x.shape[-2:])
        maps = []
        for name in names:
            depth = torch.from_numpy(self.read(name))[None, None]
            mode = "nearest" if bool((depth <= 0).any()) else "bilinear"
            maps.append(depth if depth.shape[-2:] == size else F.interpolate(depth, size=size, mode=mode))
        return DepthOutput(depth=torch.cat(maps).to(x.device))

    def read(self, name: str) -> np.ndarray:
        """The cached (H, W) float32 depth of frame `name` (metres or relative, per `output_kind`; 0 = invalid)."""
        npy, png = precomputed_path(self.folder, name, ".npy"), precomputed_path(self.folder, name, ".png")
        if npy.is_file():
            try:
                depth = np.load(npy, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise UserError(f"{npy}: cannot read ({error})") from None
        elif png.is_file():
            depth = read_depth_png(png, PNG_METRES_PER_UNIT)
        else:
            raise UserError(
                f"{npy} (or .png) not found: no cached teacher depth for frame {name!r}; "
                "cache the teacher over this dataset first (write_precomputed)"
            )
        depth = np.squeeze(depth)
        if depth.ndim != 2:
            raise UserError(f"{npy}: expected an (H, W) depth map, got shape {depth.shape}")
        return np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def write_precomputed(
    folder: Path,
    names: list[str],
    depths: torch.Tensor | np.ndarray | list,
    output_kind: str,
    *,
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    source: str = "",
    fmt: str = "npy",
) -> list[Path]:
    """Cache teacher depth maps for `PrecomputedTeacher`; call it batch by batch on the same folder.

    Args:
        folder: created if missing; `teacher.json` is written on the first call and must agree on later ones.
        names: frame names (sample meta["name"]), one per map.
        depths: (B, 1, H, W) or (B, H, W) tensor/array, or a list of (H, W) maps; metres for "metric".
        output_kind: "metric", "relative_depth" or "relative_disparity".
        min_depth, max_depth: metres, the teacher's range.
        source: free text naming the teacher (spec, checkpoint).
        fmt: "npy" (float32, any kind) or "png" (uint16 metres x 256, metric only, 0 = invalid).

    Returns:
        The files written.
    """
    if output_kind not in get_args(OutputKind):
        raise UserError(f"output_kind must be one of {', '.join(get_args(OutputKind))}, got {output_kind!r}")
    if fmt not in ("npy", "png") or (fmt == "png" and output_kind != "metric"):
        raise UserError(f"fmt must be 'npy', or 'png' for metric depth; got {fmt!r} for {output_kind}")
    if len(names) != len(depths):
        raise ValueError(f"{len(names)} names for {len(depths)} depth maps")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"output_kind": output_kind, "min_depth": min_depth, "max_depth": max_depth, "source": source}
    declared = folder / TEACHER_JSON
    if declared.is_file() and {k: v for k, v in _read_json(declared).items() if k in meta} != meta:
        raise UserError(f"{declared} describes another teacher; use a fresh folder for {source or output_kind}")
    declared.write_text(json.dumps(meta, indent=2) + "\n")
    written = []
    for name, depth in zip(names, depths):
        depth = np.squeeze(depth.detach().cpu().numpy() if torch.is_tensor(depth) else np.asarray(depth))
        path = precomputed_path(folder, name, "." + fmt)
        if fmt == "npy":
            np.save(path, depth.astype(np.float32))
        else:
            cv2.imwrite(str(path), np.clip(np.round(depth / PNG_METRES_PER_UNIT), 0, 65535).astype(np.uint16))
        written.append(path)
    return written
