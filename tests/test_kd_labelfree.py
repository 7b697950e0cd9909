"""Label-free geometric KD: channel-wise and geometric terms, back-projection, PointNet, training from a rosbag."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_kd_tiekd import export_onnx_teacher

from depth_node.geometry import backproject
from distill.cli import main as distill_main
from distill.config import load_config
from distill.errors import UserError
from distill.kd.labelfree import (
    PointNetFeatures,
    backproject_pixels,
    build_pointnet,
    channel_wise_loss,
    geometric_loss,
    median_normalise,
    sample_pixels,
)
from distill.kd.registry import build_method
from distill.losses import silog_loss
from distill.models import build_student
from distill.models.base import DepthOutput
from distill.models.teachers.precomputed import write_precomputed

REPO = Path(__file__).resolve().parents[1]
K = torch.tensor([[100.0, 0.0, 10.0], [0.0, 50.0, 5.0], [0.0, 0.0, 1.0]])


def test_back_projection_of_a_known_pixel():
    depth = torch.zeros(1, 1, 20, 40)
    depth[0, 0, 15, 30] = 2.0  # row v = 15, column u = 30
    point = backproject_pixels(depth, K[None], torch.tensor([[15 * 40 + 30]]))
    # X = (30 - 10) * 2 / 100, Y = (15 - 5) * 2 / 50, Z = 2
    assert point.tolist() == [[[pytest.approx(0.4), pytest.approx(0.4), 2.0]]]


def test_back_projection_matches_the_node_geometry():
    rng = np.random.default_rng(0)
    depth = rng.uniform(1.0, 30.0, size=(12, 16)).astype(np.float32)
    intrinsics = np.array([[40.0, 0.0, 7.3], [0.0, 42.0, 5.1], [0.0, 0.0, 1.0]], dtype=np.float32)
    expected = backproject(depth, np.hstack([intrinsics, np.zeros((3, 1))])).reshape(-1, 3)
    index = torch.arange(12 * 16)[None]
    points = backproject_pixels(torch.from_numpy(depth)[None, None], torch.from_numpy(intrinsics)[None], index)
    np.testing.assert_allclose(points[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_channel_wise_loss_is_zero_for_identical_maps_and_positive_otherwise():
    torch.manual_seed(0)
    teacher = 1.0 + 20.0 * torch.rand(2, 1, 8, 8)
    valid = torch.ones_like(teacher, dtype=torch.bool)
    n_t = median_normalise(teacher, valid)
    assert float(channel_wise_loss(n_t, n_t.clone(), valid, tau=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(channel_wise_loss(median_normalise(teacher * 3, valid), n_t, valid, 1.0)) == pytest.approx(0, abs=1e-6)
    assert float(channel_wise_loss(n_t.flip(-1), n_t, valid, tau=1.0)) > 1e-3
    masked = valid.clone()
    masked[..., :4, :] = False
    changed = n_t.clone()
    changed[..., :4, :] = 50.0  # only masked positions differ
    assert float(channel_wise_loss(changed, n_t, masked, tau=2.0)) == pytest.approx(0.0, abs=1e-6)


def test_geometric_loss_is_zero_for_identical_depths_and_positive_otherwise():
    torch.manual_seed(0)
    teacher = 2.0 + 30.0 * torch.rand(2, 1, 8, 8)
    index = sample_pixels(teacher > 0, 16)
    phi = build_pointnet(None, seed=0)
    points, features = geometric_loss(teacher.clone(), teacher, K.expand(2, 3, 3), index, phi)
    assert float(points) == 0.0 and float(features) == 0.0
    points, features = geometric_loss(teacher * 1.5, teacher, K.expand(2, 3, 3), index, phi)
    assert float(points) > 0.01 and float(features) > 0.0


def test_pixel_sampling_picks_valid_pixels():
    valid = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    valid[0, 0, 2:6, 2:6] = True  # 16 valid pixels
    valid[1, 0, 0, :3] = True  # 3 valid pixels: sampled with replacement
    generator = torch.Generator().manual_seed(0)
    index = sample_pixels(valid, 10, generator)
    flat = valid.flatten(1)
    assert index.shape == (2, 10) and flat.gather(1, index).all()
    assert len(set(index[0].tolist())) == 10 and set(index[1].tolist()) <= {0, 1, 2}


def test_pointnet_is_a_frozen_seeded_max_pool_over_points():
    phi, again = build_pointnet(None, seed=3), build_pointnet(None, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(phi.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in phi.parameters()) and not phi.training
    points = torch.randn(1, 50, 3)
    features = phi(points)
    assert features.shape == (1, 1024)
    assert torch.allclose(phi(points[:, torch.randperm(50)]), features)  # order of points does not matter
    assert torch.allclose(phi(torch.cat([points, points[:, :7]], dim=1)), features)  # nor duplicates
    assert [m.out_features for m in PointNetFeatures().mlp if isinstance(m, torch.nn.Linear)] == [64, 128, 1024]


def test_a_relative_teacher_is_aligned_to_the_student_before_distilling(tmp_path):
    depth = torch.linspace(2.0, 40.0, 64).view(1, 1, 8, 8).expand(2, 1, 8, 8)
    write_precomputed(tmp_path / "cache", ["a", "b"], 7.0 / depth + 0.2, "relative_disparity")
    config = load_config(None, ["kd.method=labelfree", f"teacher.spec=precomputed:{tmp_path / 'cache'}",
                                "kd.labelfree.points=32"])  # fmt: skip
    method = build_method(config, build_student("resnet18", bins=4, decoder_width=8), torch.device("cpu"))
    batch = {"image": torch.rand(2, 3, 8, 8), "K": K.expand(2, 3, 3), "depth": torch.zeros(2, 1, 8, 8),
             "meta": {"name": ["a", "b"], "hflip": torch.tensor([False, False])}}  # fmt: skip
    terms = method.loss(batch, DepthOutput(depth=depth.clone()), step=0)
    assert set(terms) == {"channel", "geometric"}
    assert float(terms["channel"]) == pytest.approx(0.0, abs=1e-5)
    assert float(terms["geometric"]) == pytest.approx(0.0, abs=1e-5)
    assert float(method.loss(batch, DepthOutput(depth=depth.flip(-1)), step=0)["geometric"]) > 1e-3


@pytest.mark.slow
def test_labelfree_trains_from_a_synthetic_rosbag(tmp_path, capsys):
    world = tmp_path / "world"
    assert distill_main(["synth", str(world), "--frames", "4", "--size", "32x64", "--bag", "mcap"]) == 0
    bags = sorted(str(path) for path in (world / "bags").iterdir())
    onnx_file = export_onnx_teacher(tmp_path / "teacher.onnx")
    overrides = [
        f"data.bags=[{', '.join(bags)}]", "data.size=[32, 64]", "data.batch_size=2", "data.num_workers=0",
        "model.arch=resnet18", "model.bins=16", "model.decoder_width=8", "train.steps=4", "train.epochs=null",
        "train.amp=none", "train.log_every=1", "kd.labelfree.points=64", f"run.out_dir={tmp_path / 'runs'}",
        "run.device=cpu", "run.tensorboard=false", "teacher.weights=null",
        f"teacher.spec=onnx:{onnx_file}?output_kind=relative_disparity",
    ]  # fmt: skip
    assert distill_main(["train", str(REPO / "config" / "labelfree_bag.yaml"), *overrides]) == 0
    run_dir = tmp_path / "runs" / "labelfree-bag"
    with (run_dir / "train.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4 and {"channel", "geometric"} <= set(rows[0])
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    assert (run_dir / "last" / "model.safetensors").is_file() and not (run_dir / "val.csv").exists()
    assert "done:" in capsys.readouterr().out


def test_lidar_points_supervise_as_sparse_labels_when_weighted(tmp_path):
    depth = torch.linspace(2.0, 40.0, 64).view(1, 1, 8, 8).expand(2, 1, 8, 8).clone()
    write_precomputed(tmp_path / "cache", ["a", "b"], depth, "metric")
    common = ["kd.method=labelfree", f"teacher.spec=precomputed:{tmp_path / 'cache'}", "kd.labelfree.points=32",
              "kd.labelfree.lidar_weight=0.5"]  # fmt: skip
    config = load_config(None, ["data.kind=bag", "data.bags=[log.mcap]", *common], check_paths=False)
    method = build_method(config, build_student("resnet18", bins=4, decoder_width=8), torch.device("cpu"))
    sparse = torch.zeros(2, 1, 8, 8)
    sparse[:, :, 2, 3], sparse[:, :, 6, 1] = 5.0, 20.0
    batch = {"image": torch.rand(2, 3, 8, 8), "K": K.expand(2, 3, 3), "depth": torch.zeros(2, 1, 8, 8),
             "sparse_depth": sparse, "meta": {"name": ["a", "b"], "hflip": torch.tensor([False, False])}}  # fmt: skip
    student = torch.full((2, 1, 8, 8), 10.0)
    terms = method.loss(batch, DepthOutput(depth=student), step=0)
    expected = 0.5 * silog_loss(student, sparse, sparse > 0, config.train.silog_alpha, config.train.silog_lambda)
    assert set(terms) == {"channel", "geometric", "lidar"}
    assert float(terms["lidar"]) == pytest.approx(float(expected)) and float(terms["lidar"]) > 0.1
    without_lidar = load_config(None, common)  # kitti without lidar_beams: no points to supervise with
    with pytest.raises(UserError, match="lidar_weight=0.5 needs LiDAR points"):
        build_method(without_lidar, build_student("resnet18", bins=4, decoder_width=8), torch.device("cpu"))
