"""`distill train CONFIG [key=value ...]`: set up a run (processes, folder, data, model, method) and train it.

One command for every scale: plain `distill train` uses one process on one device; under
`torchrun --nproc_per_node=N -m distill.cli train ...` each process trains with DistributedDataParallel
(gloo on CPU, nccl on CUDA), reading RANK / WORLD_SIZE / LOCAL_RANK from the environment. Rank 0 alone writes
the run folder: config.yaml (resolved config), train.csv / val.csv, tb/, last/ and best/ checkpoints, and for a
method with `diagnostics()` (DisDepth: ghost advantage, LAM support) its values after the last step in diagnostics.json.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from distill.config import Config, load_config, save_config
from distill.errors import UserError


def run_training(config_path: Path | str | None, overrides: Sequence[str] = ()) -> Path:
    """Train as the config says; returns the run folder. Config mistakes surface before torch is imported."""
    config = load_config(config_path, overrides)
    import torch.distributed as dist

    from distill.kd.registry import resolve_kd
    from distill.training.trainer import Trainer

    resolve_kd(config)

    device = _init_processes(config)
    if config.train.amp == "auto":  # resolved here, so only an explicit bf16/fp16 on CPU warns
        config.train.amp = "bf16" if device.type == "cuda" else "none"
    try:
        run_dir = _run_dir(config)
        resume_from = _resume_checkpoint(config, run_dir)
        _seed_everything(config.run.seed + (dist.get_rank() if dist.is_initialized() else 0))
        loader, validate = _train_loader(config), _validator(config, device)  # data mistakes surface first
        model = build_model_from_config(config).to(device)
        method = build_task_method(config, model, device).to(device)
        trainer = Trainer(config, method, loader, validate, run_dir, device)
        if resume_from is not None:
            trainer.resume(resume_from)
        if trainer.rank == 0:
            save_config(config, run_dir / "config.yaml")
            start = f"resuming at step {trainer.progress.step}" if resume_from else "starting"
            print(f"run {run_dir}: {start}, {trainer.total_steps} steps on {device} x{trainer.world}")
        trainer.fit()
        if trainer.rank == 0 and hasattr(method, "diagnostics"):
            (run_dir / "diagnostics.json").write_text(json.dumps(method.diagnostics(), indent=1))
        if trainer.rank == 0:
            print(f"done: {run_dir / 'last'}" + (f", best {run_dir / 'best'}" if (run_dir / "best").is_dir() else ""))
        return run_dir
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_task_method(config: Config, model, device):
    """What `run.task` trains: `model` under `kd:` (supervised or distilled), or a completion network on top of it."""
    if config.run.task == "completion":
        from distill.completion.training import build_completion_method

        return build_completion_method(config, model, device)
    from distill.kd.registry import build_method

    return build_method(config, model, device)


def _init_processes(config: Config):
    """This process's device; joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch
    import torch.distributed as dist

    wanted = config.run.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device: cuda requested but no CUDA device is available (use auto or cpu)")
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if not use_cuda:
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _run_dir(config: Config) -> Path:
    """out_dir/name, or the first free name-2, name-3, ... for a new run; agreed by all ranks via rank 0."""
    import torch.distributed as dist

    base = config.run.out_dir / config.run.name
    chosen = [base]
    if not dist.is_initialized() or dist.get_rank() == 0:
        if not config.run.resume:
            names = itertools.chain([base], (base.with_name(f"{base.name}-{i}") for i in itertools.count(2)))
            chosen = [next(path for path in names if not path.exists() or not any(path.iterdir()))]
            if chosen[0] != base:  # later commands and KD configs that name `base` keep using the first run
                print(f"{base} is taken: this run is {chosen[0]} (run.name=... picks another, run.resume=true "
                      f"continues {base})")  # fmt: skip
        chosen[0].mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def _resume_checkpoint(config: Config, run_dir: Path) -> Path | None:
    """run_dir's last checkpoint when run.resume is set (a UserError if there is none)."""
    from distill.checkpoint import resolve_checkpoint

    if not config.run.resume:
        return None
    try:
        return resolve_checkpoint(run_dir, prefer=("last",))
    except UserError as error:
        raise UserError(f"run.resume: no checkpoint to resume in {run_dir} ({error})") from None


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_from_config(config: Config):
    """The model `model:` describes (student or teacher, in train mode), with `model.weights` loaded when set."""
    from distill.models import load_model

    spec = config.model
    common = {"min_depth": spec.min_depth, "max_depth": spec.max_depth, "bins": spec.bins,
              "decoder_width": spec.decoder_width, "output_stride": spec.output_stride}  # fmt: skip
    if spec.encoder_weights is not None:
        common["encoder_weights"] = spec.encoder_weights
    if spec.kind == "student":
        loaded = load_model(spec.arch, weights=spec.weights, lgconv=spec.lgconv, **common)
    else:  # built for the training size (data.size; null: KITTI's KB crop); timm teachers take any size anyway
        loaded = load_model(spec.spec, weights=spec.weights, img_size=config.data.size, **common)
    return loaded.model.train()


def _train_loader(config: Config):
    """DataLoader over the training split: seeded augmentation, resumable distributed sampling, full batches."""
    import torch
    from torch.utils.data import DataLoader

    from distill.data import build_dataset
    from distill.data.sampling import ResumableSampler, SeededDataset, loader_workers

    dataset = SeededDataset(build_dataset(config.data, config.data.train_split, augment=True), config.run.seed)
    sampler = ResumableSampler(dataset, seed=config.run.seed, drop_last=True)
    if len(sampler) < config.data.batch_size:
        raise UserError(
            f"data: the {config.data.train_split} split has {len(dataset)} frames, fewer than data.batch_size "
            f"({config.data.batch_size}) per process"
        )
    generator = torch.Generator().manual_seed(config.run.seed)  # worker seeds never consume the global RNG
    return DataLoader(
        dataset, batch_size=config.data.batch_size, sampler=sampler,
        num_workers=loader_workers(config.data.num_workers, len(dataset), config.data.batch_size),
        drop_last=True, pin_memory=torch.cuda.is_available(), generator=generator,
        persistent_workers=False,  # workers must see the new `epoch` of the dataset each epoch
    )  # fmt: skip


def _validator(config: Config, device):
    """Callable(model) -> validation metrics, or None when the config has no validation split."""
    from distill.data import build_dataset
    from distill.data.sampling import loader_workers
    from distill.inference import evaluate, model_predictor

    if config.data.val_split is None:
        return None
    dataset = build_dataset(config.data, config.data.val_split, augment=False)
    crop, data = config.eval.crop or config.data.eval_crop, config.data
    batch_size = data.batch_size if data.size else 1
    workers = loader_workers(data.num_workers, len(dataset), batch_size)

    def validate(model) -> dict[str, float]:
        return evaluate(
            model_predictor(model), dataset, crop=crop, align=config.eval.align, min_depth=data.min_depth,
            max_depth=data.max_depth, paste_full=data.size is None, batch_size=batch_size, num_workers=workers,
            device=device,
        )  # fmt: skip

    return validate
