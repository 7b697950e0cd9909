"""Teacher caching: a teacher run once over a dataset gives the maps a `precomputed:` teacher later returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_kd_tiekd import export_onnx_teacher

from distill.cli import main as cli_main
from distill.config import load_config, load_data_config
from distill.data import build_dataset
from distill.data.synth import write_world
from distill.errors import UserError
from distill.kd.registry import build_method
from distill.kd.teacher import DistillMethod
from distill.models import build_student, build_teacher
from distill.verbs.cache import cache_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "world"
    write_world(root, frames=5, seed=1, size=(32, 64), bag="none")
    return root


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return export_onnx_teacher(tmp_path_factory.mktemp("onnx") / "teacher.onnx")


def experiment(tmp_path: Path, world: Path, onnx_file: Path) -> Path:
    config = {
        "run": {"name": "cached", "out_dir": str(tmp_path / "runs"), "device": "cpu"},
        "data": {"kind": "kitti", "root": str(world), "batch_size": 2, "num_workers": 0},
        "kd": {"method": "response"},
        "teacher": {"spec": f"onnx:{onnx_file}"},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cached_maps_are_the_teachers_maps(tmp_path, world, onnx_file):
    config = load_config(experiment(tmp_path, world, onnx_file), [])
    out = tmp_path / "cache"
    written = cache_teacher(config, out, ["train", "val"])
    dataset = build_dataset(config.data, "train", augment=False)
    val = build_dataset(config.data, "val", augment=False)
    assert written == len(dataset) + len(val)
    assert cache_teacher(config, out, ["train"]) == 0  # everything cached already: nothing recomputed

    live = build_teacher(f"onnx:{onnx_file}", img_size=(32, 64))
    cached = build_teacher(f"precomputed:{out}", img_size=(32, 64))
    assert cached.output_kind == "metric" and cached.max_depth == live.max_depth
    samples = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([s["image"] for s in samples])
    names = [s["meta"]["name"] for s in samples]
    expected = live(live.normalize(images)).depth
    assert torch.allclose(cached(images, names=names).depth, expected, atol=1e-5)


def test_cli_caches_and_prints_how_to_train_from_it(tmp_path, world, onnx_file, capsys):
    exp = experiment(tmp_path, world, onnx_file)
    assert cli_main(["cache", str(exp), "--out", str(tmp_path / "c"), "--splits", "test"]) == 0
    printed = capsys.readouterr().out
    assert f"teacher.spec=precomputed:{tmp_path / 'c'} teacher.weights=null" in printed
    test_frames = build_dataset(load_data_config({"kind": "kitti", "root": world}), "test", augment=False)
    assert len(list((tmp_path / "c").glob("*.npy"))) == len(test_frames)
    assert (
        cli_main(["cache", str(exp), f"teacher.spec=precomputed:{tmp_path / 'c'}", "--out", str(tmp_path / "d")]) == 2
    )
    assert "already a cache" in capsys.readouterr().err


def test_cached_teacher_follows_flips_and_refuses_random_crops(tmp_path, world, onnx_file):
    exp = experiment(tmp_path, world, onnx_file)
    config = load_config(exp, [])
    cache_teacher(config, tmp_path / "cache", ["train"])
    student = build_student("resnet18", bins=4, decoder_width=8)
    overrides = [f"teacher.spec=precomputed:{tmp_path / 'cache'}"]
    with pytest.raises(UserError, match="data.crop=.* is a random crop"):
        build_method(load_config(exp, [*overrides, "data.crop=[32, 32]"]), student, torch.device("cpu"))
    method = build_method(load_config(exp, overrides), student, torch.device("cpu"))
    assert isinstance(method, DistillMethod)
    dataset = build_dataset(config.data, "train", augment=False)
    names = [dataset[i]["meta"]["name"] for i in range(2)]
    batch = {"image": torch.rand(2, 3, 32, 64), "meta": {"name": names, "hflip": torch.tensor([False, True])}}
    depth, usable = method.teacher_output(batch)
    stored = [np.load(next((tmp_path / "cache").glob(name.replace("/", "__") + ".npy"))) for name in names]
    assert usable.all() and torch.equal(depth[0, 0], torch.from_numpy(stored[0]))
    assert torch.equal(depth[1, 0], torch.from_numpy(stored[1]).flip(-1))  # mirrored like the flipped sample
    with pytest.raises(UserError, match="'hflip' flag"):
        method.teacher_output({"image": batch["image"], "meta": {"name": names}})
