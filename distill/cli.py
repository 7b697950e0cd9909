"""`distill <verb>`: one small function per verb, each delegating to the module that does the work.

User mistakes raise `distill.errors.UserError`; they are printed on one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.errors import UserError
from distill.parsing import size_argument

DESCRIPTION = (
    "depthkd's offline toolchain: make data, train teachers and distil CNN students, evaluate them, export them to "
    "ONNX/TensorRT for depth_node and measure their speed. `distill VERB --help` describes each verb."
)


def cmd_synth(args: argparse.Namespace) -> int:
    from distill.data.synth import write_world

    write_world(args.out, frames=args.frames, seed=args.seed, domain=args.domain, size=args.size, bag=args.bag)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from distill.training.run import run_training

    run_training(args.config, args.overrides)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distill.verbs.evaluate import run_eval

    run_eval(args.checkpoint, data=args.data, crop=args.crop, align=args.align, json_out=args.json)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from distill.models.info import print_info

    print_info(args.model, size=args.size, decoder_width=args.decoder_width, bins=args.bins)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distill.verbs.export import run_export

    run_export(
        args.checkpoint, out=args.out, formats=args.format, size=args.size, dynamic=args.dynamic, fp16=args.fp16,
        int8=args.int8, calib=args.calib, opset=args.opset, arch=args.arch, random_init=args.random_init,
        config=args.config, calib_method=args.calib_method, force=args.force,
    )  # fmt: skip
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from distill.verbs.cache import run_cache

    run_cache(args.config, args.overrides, out=args.out, splits=args.splits, fmt=args.fmt)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distill.verbs.bench import run_bench

    run_bench(args.model, backend=args.backend, size=args.size, runs=args.runs, threads=args.threads)
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from distill.verbs.viz import run_viz

    run_viz(
        args.source, model=args.model, out=args.out, max_frames=args.max_frames, colormap=args.colormap,
        depth_topic=args.depth_topic, image_topic=args.image_topic, hfov=args.hfov, points_stride=args.points_stride,
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=DESCRIPTION)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    synth = verbs.add_parser("synth", help="render the synthetic KITTI-like world (KITTI raw layout + rosbag2)")
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument(
        "--frames", type=int, default=20, help="total frames, split by drive ~70/15/15 into train/val/test (default 20)"
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--domain", choices=["kitti", "shifted"], default="kitti")
    synth.add_argument("--size", type=size_argument, default=(375, 1242), help="HEIGHTxWIDTH (default 375x1242)")
    synth.add_argument("--bag", choices=["mcap", "sqlite3", "none"], default="mcap")
    synth.set_defaults(func=cmd_synth)

    train = verbs.add_parser("train", help="train a student or teacher (supervised or distilled) from a config")
    train.add_argument("config", type=Path, help="experiment YAML overriding config/default.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 resume=true")
    train.set_defaults(func=cmd_train)

    evaluate = verbs.add_parser("eval", help="evaluate a checkpoint or ONNX model with the KITTI/NYU protocol")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--data", required=True, help="a config YAML or a dataset folder")
    evaluate.add_argument("--crop", choices=["garg", "eigen", "nyu", "none"], default=None)
    evaluate.add_argument(
        "--align", choices=["none", "median", "lsq"], default=None, help="default: the config's eval.align"
    )
    evaluate.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    evaluate.set_defaults(func=cmd_eval)

    info = verbs.add_parser("info", help="parameters and FLOPs of a student, teacher or checkpoint")
    info.add_argument("model", help="student arch (e.g. efficientnet_b0), teacher spec (timm:...) or checkpoint")
    info.add_argument(
        "--size", type=size_argument, default=(352, 1216), help="HEIGHTxWIDTH (default 352x1216; padded like export)"
    )
    info.add_argument("--decoder-width", type=int, default=None, help="head channels (default: model.decoder_width)")
    info.add_argument("--bins", type=int, default=None, help="depth bins of the head (default: model.bins)")
    info.set_defaults(func=cmd_info)

    export = verbs.add_parser("export", help="export a checkpoint to ONNX (and a TensorRT engine)")
    export.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint folder or file")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--format", default="onnx", help="comma-separated: onnx,engine")
    export.add_argument("--size", type=size_argument, default=(352, 1216), help="HEIGHTxWIDTH (default 352x1216)")
    export.add_argument(
        "--dynamic", action="store_true", help="dynamic batch/height/width (traced at --size rounded up to a multiple)"
    )
    export.add_argument("--fp16", action="store_true", help="also write <name>_fp16.onnx (GPU providers); FP16 engine")
    export.add_argument(
        "--int8", action="store_true", help="also write <name>_int8.onnx (static QDQ, needs --calib); INT8 engine"
    )
    export.add_argument(
        "--calib", type=Path, default=None, help="images/dataset/bag: the parity check's inputs, and INT8 calibration"
    )
    export.add_argument(
        "--calib-method", default=None, help="ONNX INT8 calibration: minmax | entropy | percentile (default: minmax)"
    )
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--arch", default=None, help="with --random-init: student architecture")
    export.add_argument("--config", type=Path, default=None, help="with --random-init: training config (its model:)")
    export.add_argument("--random-init", action="store_true", help="export an untrained student (tests, benchmarks)")
    export.add_argument("--force", action="store_true", help="replace an earlier export of the same name in --out")
    export.set_defaults(func=cmd_export)

    cache = verbs.add_parser("cache", help="precompute a teacher's outputs once, reused by every student run")
    cache.add_argument("config", type=Path, help="experiment YAML (the one you train students with)")
    cache.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.weights=runs/teacher-vit")
    cache.add_argument("--out", type=Path, default=None, help="cache folder (default: run.out_dir/<run.name>-teacher)")
    cache.add_argument("--splits", nargs="+", default=None, help="splits to cache (default: data.train_split)")
    cache.add_argument("--fmt", choices=["npy", "png"], default="npy")
    cache.set_defaults(func=cmd_cache)

    bench = verbs.add_parser("bench", help="latency of an exported model per backend")
    bench.add_argument("model", type=Path)
    bench.add_argument("--backend", default="onnxruntime")
    bench.add_argument("--size", type=size_argument, default=None, help="HEIGHTxWIDTH (default: the model's)")
    bench.add_argument("--runs", type=int, default=50)
    bench.add_argument("--threads", type=int, default=None, help="CPU inference threads (default: ONNX Runtime's)")
    bench.set_defaults(func=cmd_bench)
    viz = verbs.add_parser("viz", help="colourised depth/error PNGs, point-cloud PLY + preview from a model or a bag")
    viz.add_argument("source", type=Path, help="image file/folder, dataset (config YAML or KITTI folder), or bag")
    viz.add_argument("--model", type=Path, default=None, help="exported .onnx/.engine or checkpoint/run (not for bags)")
    viz.add_argument("--out", type=Path, default=Path("runs/viz"))
    viz.add_argument("--max-frames", type=int, default=10, help="frames to draw (0: all; default 10)")
    viz.add_argument("--colormap", default="turbo", choices=["turbo", "magma", "inferno", "plasma", "viridis"])
    viz.add_argument("--depth-topic", default="/depth", help="bags: 32FC1 depth topic, with <topic>/camera_info")
    viz.add_argument("--image-topic", default="/kitti/camera_color_left/image_raw", help="bags: image for cloud colour")
    viz.add_argument("--hfov", type=float, default=81.4, help="plain images: horizontal field of view, degrees")
    viz.add_argument("--points-stride", type=int, default=2, help="keep every n-th row/column in the cloud")
    viz.set_defaults(func=cmd_viz)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as error:
        print(f"distill {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
