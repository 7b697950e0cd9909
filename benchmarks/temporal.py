"""Temporal flicker of a student on the synthetic test sequences, before and after the node's temporal filter.

A small student (random init, 64x192, a few hundred steps) is trained on a synthetic KITTI-like world; its test-split
drives are scored with `distill.inference.evaluate` (KITTI metrics, Garg crop, no alignment; flicker from the OXTS
poses, `distill.flicker`). "after" runs the same predictions through `depth_node.temporal_filter.TemporalFilter` in
frame order, fed by the camera poses of each drive's bag (/tf odometry and /tf_static, `distill.data.bag_poses`),
as the node and `depth_node_bag` do with `temporal_filter` > 0. The world and the run are cached under --cache.

    OMP_NUM_THREADS=1 python benchmarks/temporal.py            # about 10 minutes on one core
    python benchmarks/temporal.py --quick                      # smoke run, tiny sizes (not written to results/)
Must hold (issue 18): flicker at least 30 % lower with RMSE at most 1 % higher.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "temporal.json"


@dataclass(frozen=True)
class Setting:
    size: tuple[int, int]  # [H, W] pixels, rendered and trained at
    frames: int  # frames of the world (~70/15/15 % train/val/test by drive, up to 40 frames a drive)
    arch: str
    steps: int
    batch: int
    weight: float  # temporal_filter
    tolerance: float  # temporal_tolerance


SETTINGS = {
    "quick": Setting(size=(32, 96), frames=24, arch="resnet18", steps=4, batch=2, weight=0.7, tolerance=0.2),
    "default": Setting(size=(64, 192), frames=200, arch="efficientnet_b0", steps=300, batch=8, weight=0.7,
                       tolerance=0.2),
}  # fmt: skip


def make_world(folder: Path, setting: Setting) -> Path:
    from distill.data.synth import write_world

    if not (folder / ".complete").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_world(folder, frames=setting.frames, seed=0, domain="kitti", size=setting.size, bag="mcap")
        (folder / ".complete").touch()
    return folder


def train_student(cache: Path, world: Path, setting: Setting) -> Path:
    """The student's run folder (trained unless its last checkpoint already has `steps` steps)."""
    from distill.checkpoint import read_state
    from distill.training.run import run_training

    height, width = setting.size
    name = f"student-{setting.arch}-{height}x{width}-{setting.steps}"
    run_dir = cache / "runs" / name
    last = run_dir / "last" / "state.json"
    if last.is_file() and read_state(last.parent)["step"] >= setting.steps:
        return run_dir
    lr = 1e-3
    overrides = ["run.device=cpu", "run.tensorboard=false", "run.seed=0", "data.kind=kitti", f"data.root={world}",
                 f"data.size=[{height}, {width}]", f"data.batch_size={setting.batch}", "data.num_workers=0",
                 "data.val_split=null", f"train.steps={setting.steps}", "train.epochs=null", f"train.lr={lr}",
                 f"train.lr_end={lr / 10}", f"train.warmup_steps={max(setting.steps // 20, 1)}", "train.log_every=50",
                 "train.val_every=0", f"train.ckpt_every={max(setting.steps // 4, 1)}", "model.kind=student",
                 f"model.arch={setting.arch}", "model.decoder_width=32", "model.bins=64",
                 f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}",
                 *(["run.resume=true"] if last.is_file() else [])]  # fmt: skip
    return run_training(None, overrides)


class FilteredPredictor:
    """A predictor whose outputs go through the temporal filter in dataset order (evaluate() feeds frames in order,
    one per batch), with each frame's camera pose from its drive's bag."""

    def __init__(self, predict, dataset, world: Path, weight: float, tolerance: float) -> None:
        from depth_node.temporal_filter import TemporalFilter

        self.predict, self.dataset, self.world = predict, dataset, world
        self.filter = TemporalFilter(weight, tolerance)
        self.index, self.poses = 0, {}

    def pose(self, drive: str, frame: int) -> tuple[np.ndarray, int]:
        """T_odom_camera and stamp of a frame, from /tf of its drive's bag (frame n = the n-th odometry message)."""
        from distill.data.bag_poses import camera_poses
        from distill.data.synth_bag import CAMERA_FRAME

        if drive not in self.poses:
            self.poses[drive] = camera_poses(self.world / "bags" / drive.removesuffix("_sync"), CAMERA_FRAME)
        stamps, poses = self.poses[drive]
        return poses[frame], int(stamps[frame])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from distill.data.kitti import camera_projection

        depth = self.predict(images)
        drive, frame, _, _, _ = self.dataset.frames[self.index]
        self.index += 1
        pose, stamp = self.pose(Path(drive).name, frame)
        P_rect, _ = camera_projection(self.dataset.calib(drive), 2)
        projection = np.concatenate([P_rect[:, :3], np.zeros((3, 1))], axis=1)  # the camera's own frame: Tx = 0
        filtered = self.filter(depth[0, 0].float().cpu().numpy(), projection, pose, stamp)
        return torch.from_numpy(filtered)[None, None]


def score(predict, dataset, max_depth: float) -> dict[str, float]:
    from distill.inference import evaluate

    metrics = evaluate(predict, dataset, crop="garg", align="none", min_depth=1e-3, max_depth=max_depth,
                       progress=False, temporal=True)  # fmt: skip
    return {key: float(metrics[key]) for key in ("flicker", "rmse", "abs_rel", "d1")} | {
        "pairs": int(metrics["flicker_pairs"]), "frames": int(metrics["count"])}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not written to results/)")
    parser.add_argument("--cache", type=Path, default=Path("runs/temporal_cache"))
    parser.add_argument("--out", type=Path, default=None, help=f"JSON to write (default {RESULTS}, --quick: none)")
    args = parser.parse_args(argv)
    setting = SETTINGS["quick" if args.quick else "default"]
    torch.manual_seed(0)
    started = time.perf_counter()
    height, width = setting.size
    world = args.cache / "worlds" / f"kitti-{height}x{width}-{setting.frames}"
    cached = (world / ".complete").is_file()  # seconds then count the scoring only
    run_dir = train_student(args.cache, make_world(world, setting), setting)

    from distill.config import load_config
    from distill.data import build_dataset
    from distill.inference import open_predictor

    config = load_config(None, [f"data.root={world}", "data.kind=kitti"])
    predict = open_predictor(run_dir / "last", "cpu")
    scores = {}
    for split in ("val", "test"):  # the filter's weight and tolerance were chosen on val; test is reported
        dataset = build_dataset(config.data, split, augment=False)
        filtered = FilteredPredictor(predict, dataset, world, setting.weight, setting.tolerance)
        scores[split] = {name: score(model, dataset, config.data.max_depth)
                         for name, model in (("before", predict), ("after", filtered))}  # fmt: skip
    before, after = scores["test"]["before"], scores["test"]["after"]
    report = {
        "before": before,
        "after": after,
        "method": f"node temporal filter (depth_node/temporal_filter.py, temporal_filter={setting.weight}, "
        f"temporal_tolerance={setting.tolerance}): the previous output carried into each frame with the /tf "
        "odometry of the drive's bag, blended as a weighted geometric mean where within the tolerance",
        "flicker_reduction": round(1 - after["flicker"] / before["flicker"], 4),
        "rmse_change": round(after["rmse"] / before["rmse"] - 1, 4),
        "val": scores["val"],
        "config": asdict(setting) | {"protocol": "test split of the synthetic world, KITTI metrics, Garg crop, no "
                                     "alignment, 1e-3..80 m; flicker without crop (distill.flicker); weight and "
                                     "tolerance chosen on the val split",
                                     "seconds": round(time.perf_counter() - started, 1), "cached": cached},
    }  # fmt: skip
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
