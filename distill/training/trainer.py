"""The training loop: one `distill.kd.method.Method` (what is optimised and its loss terms) driven step by step,
resumable exactly: AdamW, AMP, clipping, validation, checkpoints and a finiteness guard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from distill import checkpoint as ckpt
from distill.config import Config, changed_keys, to_dict
from distill.errors import UserError
from distill.kd.method import Batch, Method
from distill.logging_utils import RunLogger
from distill.metrics import format_metrics_table
from distill.models.base import DepthModel


def lr_at(step: int, total_steps: int, lr: float, lr_end: float, warmup_steps: int) -> float:
    """Learning rate of 0-based step `step`: linear warm-up 0 → lr, then linear decay lr → lr_end at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return lr + (lr_end - lr) * progress


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's state.json."""

    step: int = 0  # optimiser steps done
    best_value: float | None = None
    best_step: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteLossError(UserError):
    """The loss or the weights became NaN/Inf: the run stops before anything logs, validates or saves them."""


class FiniteGuard:
    """Remembers the first step whose loss terms were not all finite, without a device sync per step.

    `update` only queues a few scalar device ops; `first_bad` reads the result back (and agrees across DDP ranks).
    """

    def __init__(self) -> None:
        self.step: torch.Tensor | None = None  # 1-based step of the first non-finite loss; 0 while all were finite
        self.values: dict[str, torch.Tensor] = {}  # each term's value at that step (0 for terms it did not have)

    def update(self, done: int, terms: Mapping[str, torch.Tensor]) -> None:
        """Record the terms of step `done` (1-based)."""
        values = {name: value.detach().float().reshape(()) for name, value in terms.items()}
        finite = torch.stack([value.isfinite() for value in values.values()]).all()
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.long, device=finite.device)
        first = ~finite & (self.step == 0)
        self.step = torch.where(first, done, self.step)
        for name, value in values.items():
            self.values[name] = torch.where(first, value, self.values.get(name, torch.zeros_like(value)))

    def first_bad(self, world: int) -> tuple[int, dict[str, float]] | None:
        """(first step with a non-finite loss on any rank, this rank's non-finite terms there), or None."""
        if self.step is None:
            return None
        never = torch.iinfo(torch.long).max
        step = torch.where(self.step > 0, self.step, never)
        if world > 1:
            dist.all_reduce(step, op=dist.ReduceOp.MIN)
        if int(step) == never:
            return None
        values = {name: float(value) for name, value in self.values.items()}
        return int(step), {name: value for name, value in values.items() if not math.isfinite(value)}


class Trainer:
    """Runs a Method for `total_steps` optimiser steps with AdamW, AMP, clipping, validation and checkpoints.

    Args:
        config: the resolved run config.
        method: the method, already on `device` (not yet DDP-wrapped).
        loader: training DataLoader whose sampler is a `distill.data.sampling.ResumableSampler` (see training/run.py).
        validate: callable(model) -> metrics dict, run on rank 0 only; None disables validation.
        run_dir: where checkpoints and logs go (rank 0 writes).
        device: the rank's device.
    """

    def __init__(
        self,
        config: Config,
        method: Method,
        loader: torch.utils.data.DataLoader,
        validate: Callable[[DepthModel], dict[str, float]] | None,
        run_dir: Path,
        device: torch.device,
    ) -> None:
        self.config, self.method, self.loader, self.validate = config, method, loader, validate
        self.run_dir, self.device = run_dir, device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.steps_per_epoch = len(loader.sampler) // loader.batch_size
        train = config.train
        self.total_steps = train.steps if train.steps is not None else train.epochs * self.steps_per_epoch
        method.total_steps = self.total_steps
        params = [p for module in method.trainable_modules() for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.progress = Progress()
        self.finite = FiniteGuard()
        self.ddp = None
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            unused = method.find_unused_parameters
            self.ddp = nn.parallel.DistributedDataParallel(method, device_ids=ids, find_unused_parameters=unused)

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.config.train.amp
        if amp == "none":
            return None
        if self.device.type != "cuda":
            if self.rank == 0:
                tqdm.write(f"train.amp={amp} needs CUDA; training in float32 on {self.device.type}")
            return None
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def resume(self, directory: Path) -> None:
        """Continue from a checkpoint folder: weights, optimizer, scaler, progress and this rank's RNG state."""
        state = ckpt.read_state(directory)  # its fields have the schema's types (distill/checkpoint_schema.py)
        missing = [key for key in ("config", "progress", "rng") if state.get(key) is None]
        if missing:
            raise UserError(f"{directory / ckpt.STATE_FILE}: no {', '.join(missing)} (not written by distill train)")
        changed = [key for key in changed_keys(state["config"], to_dict(self.config)) if key != "run.resume"]
        if changed and self.rank == 0:
            tqdm.write(f"resume: config differs from the checkpoint's in {', '.join(changed)} (new values apply)")
        ckpt.load_model_weights(self.method.student, directory)
        self.method.load_extra_tensors(ckpt.load_method_tensors(directory))
        ckpt.load_optimizer(self.optimizer, directory, state)
        if state.get("scaler"):  # empty when the saved run did not use fp16
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        rng = state["rng"]
        if len(rng) == self.world:
            ckpt.restore_rng(rng[self.rank], origin=f"{directory / ckpt.STATE_FILE}: rng[{self.rank}]")
        elif self.rank == 0:
            tqdm.write(f"resume: saved with {len(rng)} processes, now {self.world}; RNG streams restart from the seed")

    def fit(self) -> Progress:
        """Train to `total_steps`, validating and checkpointing on the configured steps.

        Raises:
            NonFiniteLossError: a loss term or the weights became NaN/Inf. Finiteness is checked before every log,
                validation and checkpoint, so `last` keeps the last good weights.
        """
        logger = RunLogger(self.run_dir, enabled=self.rank == 0, tensorboard=self.config.run.tensorboard,
                           resume_step=self.progress.step)  # fmt: skip
        bar = tqdm(total=self.total_steps, initial=self.progress.step, disable=self.rank != 0, desc="train",
                   unit="it", dynamic_ncols=True)  # fmt: skip
        try:
            self._train(logger, bar)
        finally:
            bar.close()
            logger.close()
        return self.progress

    def _train(self, logger: RunLogger, bar: tqdm) -> None:
        train = self.config.train
        self.loader.sampler.set_position(self.progress.step, self.steps_per_epoch, self.loader.batch_size)
        batches = self._batches()
        self.method.train()
        tick, logged = time.perf_counter(), self.progress.step
        while self.progress.step < self.total_steps:
            step = self.progress.step
            lr = lr_at(step, self.total_steps, train.lr, train.lr_end, train.warmup_steps)
            terms = self.train_step(self.to_device(next(batches)), step, lr)
            self.progress.step = done = step + 1
            self.finite.update(done, terms)
            bar.update(1)
            log, val, save = (self._due(done, every) for every in (train.log_every, train.val_every, train.ckpt_every))
            if log or val or save:
                self._stop_if_not_finite()
            if log:
                values = {name: float(value) for name, value in terms.items()}
                rate = (done - logged) * self.loader.batch_size * self.world / (time.perf_counter() - tick)
                tick, logged = time.perf_counter(), done
                row = {"epoch": step // self.steps_per_epoch, "lr": lr, "loss": sum(values.values()), **values}
                logger.log("train", done, {**row, "images_per_s": rate})
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            if val and self.validate is not None:
                self._validate(logger)
            if save:
                self._save("last")

    def _stop_if_not_finite(self) -> None:
        """Raise NonFiniteLossError when some loss term has been NaN/Inf since the start (one device sync)."""
        found = self.finite.first_bad(self.world)
        if found is None:
            return
        step, terms = found
        shown = ", ".join(f"{name}={value}" for name, value in terms.items()) or "on another process"
        raise NonFiniteLossError(
            f"training stopped: the loss is not finite at step {step} ({shown}); {self._kept()}. "
            "Lower train.lr, keep train.grad_clip set, or look for broken samples in the data"
        )

    def _kept(self) -> str:
        """Which checkpoint a stopped run leaves, for its error message."""
        try:
            directory = ckpt.resolve_checkpoint(self.run_dir, prefer=("last",))
        except UserError:
            return "no checkpoint had been written"
        return f"the last good checkpoint is kept: {directory} (step {ckpt.read_state(directory).get('step')})"

    def _due(self, done: int, every: int) -> bool:
        """Whether a periodic action runs after `done` steps (every N steps, 0 = never, and always at the end)."""
        return done == self.total_steps or (every > 0 and done % every == 0)

    def _batches(self) -> Iterator[Batch]:
        """Batches forever, epoch after epoch (sampler and seeded dataset told the epoch first)."""
        while True:
            epoch = self.progress.step // self.steps_per_epoch
            self.loader.sampler.set_epoch(epoch)
            self.loader.dataset.epoch = epoch
            yield from self.loader

    def to_device(self, batch: Batch) -> Batch:
        """The batch's tensors on this rank's device (meta stays on the CPU)."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batch: Batch, step: int, lr: float) -> dict[str, torch.Tensor]:
        """One optimiser step at learning rate `lr`; returns the detached loss terms."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            _, terms = (self.ddp or self.method)(batch, step)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, self.config.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {name: value.detach() for name, value in terms.items()}

    def _validate(self, logger: RunLogger) -> None:
        """Rank 0 evaluates the student; every rank then joins in writing `best` if it improved."""
        improved = [False]
        if self.rank == 0:
            self.method.eval()
            metrics = self.validate(self.method.student)
            self.method.train()
            self.progress.last_metrics = metrics
            logger.log("val", self.progress.step, metrics)
            tqdm.write(format_metrics_table({f"step {self.progress.step}": metrics}))
            name, best = self.config.train.best_metric, self.progress.best_value
            value = metrics[name]
            improved[0] = best is None or (value > best if name.startswith("d") else value < best)
            if improved[0]:
                self.progress.best_value, self.progress.best_step = value, self.progress.step
        if self.world > 1:
            dist.broadcast_object_list(improved, src=0)
        if improved[0]:
            self._save("best")

    def _save(self, name: str) -> None:
        """Write run_dir/<name> (rank 0), with every rank's RNG state; never with NaN/Inf weights."""
        extra = self.method.extra_tensors()
        tensors = [*self.method.student.state_dict().values(), *extra.values()]
        if not torch.stack([t.isfinite().all() for t in tensors if t.is_floating_point()]).all():
            raise NonFiniteLossError(  # every rank holds the same weights, so every rank stops here
                f"training stopped at step {self.progress.step}: the weights are no longer finite (NaN/Inf) although "
                f"the loss was; {self._kept()}. Lower train.lr or keep train.grad_clip set"
            )
        rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, ckpt.capture_rng())
        else:
            rngs = [ckpt.capture_rng()]
        if self.rank != 0:
            return
        state = {
            "step": self.progress.step,
            "epoch": self.progress.step // self.steps_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "total_steps": self.total_steps,
            "world_size": self.world,
            "progress": vars(self.progress),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "config": to_dict(self.config),
        }
        optimizer = self.optimizer if name == "last" else None  # `best` is for evaluation and export only
        ckpt.save_checkpoint(self.run_dir / name, self.method.student, state, optimizer, extra)
