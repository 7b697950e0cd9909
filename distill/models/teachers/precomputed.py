"""`precomputed:<dir>`: teacher depth maps cached as files, one per frame; the writer and the reader of that format.

Layout of `<dir>`:
    teacher.json     {"output_kind": ..., "min_depth": m, "max_depth": m, "source": "..."} (what the maps are)
    <name>.npy       (H, W) float32 depth of frame `name` (metres, or relative per output_kind; 0 = invalid)
    <name>.png       or uint16 metres x 256, KITTI style (metric only; 0 = invalid)
A frame's name is its sample's meta["name"], "/" written as "__". `write_precomputed` (used by `distill cache`)
writes it; `PrecomputedTeacher` returns the maps for a batch's frame names. Depth only: no features.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from distill.data.samples import read_depth_png
from distill.errors import UserError
from distill.models.base import DepthModel, DepthOutput, OutputKind
from distill.models.teachers._external import read_json
from distill.models.teachers._scheme import register_teacher

TEACHER_JSON = "teacher.json"
PNG_METRES_PER_UNIT = 1.0 / 256.0  # KITTI's uint16 depth PNGs


def precomputed_path(folder: Path, name: str, suffix: str) -> Path:
    """Where a frame's cached teacher depth lives: '/' in the frame name becomes '__'."""
    return Path(folder) / (name.replace("/", "__") + suffix)


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
    if declared.is_file() and {k: v for k, v in read_json(declared).items() if k in meta} != meta:
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


class PrecomputedTeacher(DepthModel):
    """Teacher depth maps cached as files in the layout of the module docstring, declared by `teacher.json`.

    Maps stored at another size are resized to the input size (nearest where they have holes).
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
        meta = read_json(declared)
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


@register_teacher("precomputed", path=True)
def build_precomputed_teacher(folder: Path, *, img_size: Sequence[int], head_kw: dict[str, Any]) -> PrecomputedTeacher:
    """The maps' range and kind come from teacher.json: `img_size` and `head_kw` are unused."""
    return PrecomputedTeacher(folder)
