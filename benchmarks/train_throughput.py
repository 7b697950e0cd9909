"""Training throughput (images/s) of one full optimiser step for a student and a teacher, at two sizes.

Run: python benchmarks/train_throughput.py [--device cuda] [--amp bf16] [--sizes 128x416,352x1216] [--batch 8]
The step is the real one of `distill train` (Trainer.train_step: forward, SILog + chamfer, backward, clipping,
AdamW) on a fixed random batch, so the figure excludes data loading. Prints one Markdown row per model and size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from distill.config import load_config
from distill.data.sampling import ResumableSampler, SeededDataset
from distill.kd.registry import build_method
from distill.training.run import build_model_from_config
from distill.training.trainer import Trainer


def random_samples(count: int, size: tuple[int, int]) -> list[dict]:
    """Samples of the distill.data contract with random images and depth in 1-80 m (a tenth invalid)."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in range(count):
        depth = torch.rand(1, *size, generator=generator) * 79 + 1
        depth[torch.rand(1, *size, generator=generator) < 0.1] = 0
        image = torch.rand(3, *size, generator=generator)
        samples.append({"image": image, "depth": depth, "valid": depth > 0, "K": torch.eye(3), "meta": {"i": index}})
    return samples


def images_per_second(overrides: list[str], size: tuple[int, int], batch: int, steps: int, warmup: int) -> float:
    """Throughput over `steps` timed steps after `warmup` untimed ones."""
    config = load_config(None, [*overrides, f"data.size=[{size[0]}, {size[1]}]", f"data.batch_size={batch}",
                                f"train.steps={steps + warmup}", "train.epochs=null"])  # fmt: skip
    device = torch.device(config.run.device if config.run.device != "auto" else "cpu")
    model = build_model_from_config(config).to(device)
    method = build_method(config, model, device).to(device)
    dataset = SeededDataset(random_samples(batch, size), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=ResumableSampler(dataset, 0, True))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, method, loader, None, Path(run_dir), device)
        data = trainer.to_device(next(iter(loader)))
        for step in range(warmup):
            trainer.train_step(data, step, config.train.lr)
        _sync(device)
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            trainer.train_step(data, step, config.train.lr)
        _sync(device)
    return steps * batch / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--sizes", default="128x416,352x1216", help="comma-separated HEIGHTxWIDTH")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 8 on cuda, 2 on cpu)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on cuda, 3 on cpu)")
    parser.add_argument("--student", default="efficientnet_b0", help="student arch")
    parser.add_argument("--teacher", default="timm:vit_tiny_patch16_224", help="teacher spec")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    batch, steps = args.batch or (8 if cuda else 2), args.steps or (20 if cuda else 3)
    common = [f"run.device={args.device}", f"train.amp={args.amp}"]
    models = {
        f"student {args.student}": ["model.kind=student", f"model.arch={args.student}"],
        f"teacher {args.teacher}": ["model.kind=teacher", f"model.spec={args.teacher}"],
    }
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"training step throughput on {device_name}, batch {batch}, amp {args.amp}, {steps} timed steps\n")
    print("| model | size | images/s |\n|---|---|---:|")
    for size_text in args.sizes.split(","):
        size = tuple(int(v) for v in size_text.lower().split("x"))
        for name, overrides in models.items():
            rate = images_per_second([*common, *overrides], size, batch, steps, warmup=2)
            print(f"| {name} | {size[0]}x{size[1]} | {rate:.3g} |", flush=True)


if __name__ == "__main__":
    main()
