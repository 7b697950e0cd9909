"""Teacher caching: run a frozen teacher once over a dataset and store its outputs for every later student run.

    distill cache CONFIG [key=value ...] [--out DIR] [--splits train val] [--features] [--fmt npy|png]

reads the same experiment config as `distill train` (teacher:, data:), runs the teacher on every frame of the
splits without augmentation, and writes `distill.models.external`'s `precomputed:` format (one `<name>.npy` per frame,
keyed by the sample's meta name, plus `teacher.json`). Students then train from it with
`teacher.spec=precomputed:DIR teacher.weights=null`, skipping the teacher's forward pass. Existing files are kept
(an interrupted run resumes). `--features` also stores the teacher's feature maps as `<name>.features.safetensors`
(float16, keys stage0..stage3), read back with `read_features`.

Augmentation: a cached map matches the frame as loaded (resized to data.size), not a random crop of it. The KD
methods therefore refuse a precomputed teacher with `data.crop` set, and mirror the cached map of every sample the
training transform flipped (meta "hflip"). Colour jitter is not undone: the cached target is the teacher's view of
the unjittered image, which is what the student should predict anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from distill.config import Config, load_config
from distill.errors import UserError
from distill.kd.common import is_precomputed, load_teacher
from distill.models.base import DepthModel, DepthOutput
from distill.models.external import precomputed_path, write_precomputed

FEATURES_SUFFIX = ".features.safetensors"


def write_features(folder: Path, names: Sequence[str], features: Sequence[torch.Tensor]) -> None:
    """Store each frame's teacher features: features[l] is (B, C_l, H_l, W_l); saved as float16 per frame."""
    for i, name in enumerate(names):
        tensors = {
            f"stage{level}": f[i].detach().to("cpu", torch.float16).contiguous() for level, f in enumerate(features)
        }
        save_file(tensors, str(precomputed_path(folder, name, FEATURES_SUFFIX)))


def read_features(folder: Path, name: str) -> list[torch.Tensor]:
    """The cached features of frame `name`: a list of (C_l, H_l, W_l) float32 tensors, shallow to deep."""
    path = precomputed_path(folder, name, FEATURES_SUFFIX)
    if not path.is_file():
        raise UserError(f"{path} not found: no cached teacher features for frame {name!r} (cache with --features)")
    tensors = load_file(str(path))
    return [tensors[f"stage{level}"].float() for level in range(len(tensors))]


@torch.no_grad()
def teacher_outputs(teacher: DepthModel, image01: torch.Tensor, features: bool) -> DepthOutput:
    """The teacher's output on a (B, 3, H, W) [0, 1] batch; depth (B, 1, H, W) float32 at the batch's size."""
    from distill.evaluate import predict_depth

    if not features:
        return DepthOutput(depth=predict_depth(teacher, image01))
    height, width = image01.shape[-2:]
    if height % teacher.size_divisor or width % teacher.size_divisor:
        raise UserError(f"--features needs data.size divisible by {teacher.size_divisor}, got {height}x{width}")
    out = teacher(teacher.normalize(image01))
    if not out.features:
        raise UserError(f"--features: the teacher {type(teacher).__name__} gives no feature maps (black-box)")
    return DepthOutput(depth=out.depth.float(), features=out.features)


def cache_teacher(config: Config, out: Path, splits: Sequence[str], *, features: bool = False, fmt: str = "npy") -> int:
    """Run the config's teacher over the splits' frames (no augmentation) and cache its outputs in `out`.

    Args:
        config: resolved run config (teacher:, data:, run.device).
        out: cache folder (created); frames already in it are skipped.
        splits: data splits to cover (ignored by bags, which have one).
        features: also write the feature maps.
        fmt: "npy" (float32, any output kind) or "png" (uint16 metres x 256, metric teachers only).

    Returns:
        Number of frames written.
    """
    from torch.utils.data import DataLoader

    from distill.data import build_dataset

    device = torch.device("cuda" if config.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    teacher = load_teacher(config, device)
    if is_precomputed(teacher):
        raise UserError(f"teacher.spec={config.teacher.spec} is already a cache; name the live teacher instead")
    source = str(config.teacher.weights or config.teacher.spec)
    suffixes = ["." + fmt, *([FEATURES_SUFFIX] if features else [])]
    written = 0
    for split in dict.fromkeys(splits):
        dataset = build_dataset(config.data, split, augment=False)
        loader = DataLoader(dataset, batch_size=config.data.batch_size, num_workers=config.data.num_workers)
        for batch in tqdm(loader, desc=f"caching teacher ({split})", unit="batch"):
            names = list(batch["meta"]["name"])
            if all(precomputed_path(out, name, suffix).is_file() for name in names for suffix in suffixes):
                continue
            result = teacher_outputs(teacher, batch["image"].to(device), features)
            write_precomputed(out, names, result.depth, teacher.output_kind, min_depth=teacher.min_depth,
                              max_depth=teacher.max_depth, source=source, fmt=fmt)  # fmt: skip
            if features:
                write_features(out, names, result.features)
            written += len(names)
    return written


def run_cache(
    config_path: Path | str,
    overrides: Sequence[str] = (),
    *,
    out: Path | None = None,
    splits: Sequence[str] | None = None,
    features: bool = False,
    fmt: str = "npy",
) -> Path:
    """Cache the teacher of an experiment config (what a `distill cache` verb runs); returns the cache folder.

    Args:
        config_path: experiment YAML, as for `distill train`.
        overrides: `key=value` overrides.
        out: cache folder; None: run.out_dir / "<run.name>-teacher".
        splits: splits to cover; None: data.train_split.
        features, fmt: see `cache_teacher`.

    Raises:
        UserError: config, data or teacher mistakes.
    """
    config = load_config(config_path, overrides)
    out = Path(out or config.run.out_dir / f"{config.run.name}-teacher")
    count = cache_teacher(config, out, splits or [config.data.train_split], features=features, fmt=fmt)
    print(f"cached {count} new frames in {out}; train students from it with:")
    print(f"  distill train {config_path} teacher.spec=precomputed:{out} teacher.weights=null")
    return out
