"""Teacher caching: run a frozen teacher once over a dataset and store its outputs for every later student run.

    distill cache CONFIG [key=value ...] [--out DIR] [--splits train val] [--fmt npy|png]

reads the same experiment config as `distill train` (teacher:, data:), runs the teacher on every frame of the
splits without augmentation, and writes the `precomputed:` format of `distill.models.teachers.precomputed` (one
`<name>.npy` per frame, keyed by the sample's meta name, plus `teacher.json`). Students then train from it with
`teacher.spec=precomputed:DIR teacher.weights=null`, skipping the teacher's forward pass. Existing files are kept
(an interrupted run resumes). Only depth is cached, which is all `PrecomputedTeacher` serves: methods that
distil features need the live teacher.

Augmentation: a cached map matches the frame as loaded (resized to data.size), not a random crop of it. The KD
methods therefore refuse a precomputed teacher with `data.crop` set, and mirror the cached map of every sample the
training transform flipped (meta "hflip"). Colour jitter is not undone: the cached target is the teacher's view of
the unjittered image, which is what the student should predict anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from distill.config import Config, load_config
from distill.errors import UserError
from distill.kd.teacher import is_precomputed, load_teacher
from distill.models.teachers.precomputed import precomputed_path, write_precomputed


def cache_teacher(config: Config, out: Path, splits: Sequence[str], *, fmt: str = "npy") -> int:
    """Run the config's teacher over the splits' frames (no augmentation) and cache its outputs in `out`.

    Args:
        config: resolved run config (teacher:, data:, run.device).
        out: cache folder (created); frames already in it are skipped.
        splits: data splits to cover (ignored by bags, which have one).
        fmt: "npy" (float32, any output kind) or "png" (uint16 metres x 256, metric teachers only).

    Returns:
        Number of frames written.
    """
    from torch.utils.data import DataLoader

    from distill.data import build_dataset
    from distill.data.sampling import loader_workers
    from distill.inference import predict_depth

    device = torch.device("cuda" if config.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    teacher = load_teacher(config, device)
    if is_precomputed(teacher):
        raise UserError(f"teacher.spec={config.teacher.spec} is already a cache; name the live teacher instead")
    source = str(config.teacher.weights or config.teacher.spec)
    written = 0
    for split in dict.fromkeys(splits):
        dataset = build_dataset(config.data, split, augment=False)
        workers = loader_workers(config.data.num_workers, len(dataset), config.data.batch_size)
        loader = DataLoader(dataset, batch_size=config.data.batch_size, num_workers=workers)
        for batch in tqdm(loader, desc=f"caching teacher ({split})", unit="batch"):
            names = list(batch["meta"]["name"])
            if all(precomputed_path(out, name, "." + fmt).is_file() for name in names):
                continue
            depth = predict_depth(teacher, batch["image"].to(device))
            write_precomputed(out, names, depth, teacher.output_kind, min_depth=teacher.min_depth,
                              max_depth=teacher.max_depth, source=source, fmt=fmt)  # fmt: skip
            written += len(names)
    return written


def run_cache(
    config_path: Path | str,
    overrides: Sequence[str] = (),
    *,
    out: Path | None = None,
    splits: Sequence[str] | None = None,
    fmt: str = "npy",
) -> Path:
    """Cache the teacher of an experiment config (what a `distill cache` verb runs); returns the cache folder.

    Args:
        config_path: experiment YAML, as for `distill train`.
        overrides: `key=value` overrides.
        out: cache folder; None: run.out_dir / "<run.name>-teacher".
        splits: splits to cover; None: data.train_split.
        fmt: see `cache_teacher`.

    Raises:
        UserError: config, data or teacher mistakes.
    """
    config = load_config(config_path, overrides)
    out = Path(out or config.run.out_dir / f"{config.run.name}-teacher")
    count = cache_teacher(config, out, splits or [config.data.train_split], fmt=fmt)
    print(f"cached {count} new frames in {out}; train students from it with:")
    print(f"  distill train {config_path} teacher.spec=precomputed:{out} teacher.weights=null")
    return out
