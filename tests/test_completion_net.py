"""Two-stage depth completion: the network, its training method, beam subsampling, export and runtime, the real
KITTI frame, and the benchmark's quick mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from depth_node.completion import resize_sparse, sanitize_aligned
from distill.completion.training import CompletionMethod, build_completion_method, masked_l1_l2, masked_log_l1
from distill.config import load_config, load_data_config
from distill.data import build_dataset
from distill.data.kitti import keep_beams, laser_rings, read_velodyne
from distill.data.synth_sensors import LIDAR_ELEVATIONS
from distill.errors import UserError
from distill.models import build_student
from distill.models.completion import CompletionNet, build_completion, pooled_guidance

REPO = Path(__file__).resolve().parents[1]
KITTI_SCAN = Path("kitti_raw_sample/2011_09_26/2011_09_26_drive_0001_sync/velodyne_points/data/0000000005.bin")


def completion_inputs(batch: int = 2, height: int = 32, width: int = 96, seed: int = 0):
    """Random but plausible inputs: image, aligned depth 2-60 m, a sparse map with ~10 % points, its mask."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, height, width, generator=generator)
    aligned = 2.0 + 58.0 * torch.rand(batch, 1, height, width, generator=generator)
    mask = (torch.rand(batch, 1, height, width, generator=generator) < 0.1).float()
    sparse = aligned * (0.8 + 0.4 * torch.rand(batch, 1, height, width, generator=generator)) * mask
    return image, aligned, sparse, mask


def test_untrained_network_returns_the_aligned_depth_with_the_input_shape():
    net = CompletionNet(widths=(4, 8, 8)).eval()
    image, aligned, sparse, mask = completion_inputs()
    with torch.no_grad():
        depth = net(image, aligned, sparse, mask).depth
    assert depth.shape == aligned.shape and torch.isfinite(depth).all()
    torch.testing.assert_close(depth, aligned)  # the zero-initialised head predicts no correction


@pytest.mark.parametrize("trust_logit, expected_on_points", [(30.0, "sparse"), (-30.0, "aligned"), (0.0, "halfway")])
def test_lidar_gate_blends_the_points_by_their_trust_and_leaves_other_pixels_alone(trust_logit, expected_on_points):
    net = CompletionNet(widths=(4, 8, 8), lidar_gate=True).eval()
    assert net.head.out_channels == 2 and net.spec["lidar_gate"] is True
    with torch.no_grad():
        net.head.bias[1] = trust_logit  # weights stay 0: the same trust at every pixel, no residual
        image, aligned, sparse, mask = completion_inputs()
        depth = net(image, aligned, sparse, mask).depth
    on = mask.bool()
    torch.testing.assert_close(depth[~on], aligned[~on])  # the gate acts on LiDAR pixels only
    expected = {"sparse": sparse, "aligned": aligned, "halfway": (aligned * sparse).clamp_min(1e-12).sqrt()}
    torch.testing.assert_close(depth[on], expected[expected_on_points][on])  # log-space blend: geometric mean at 0.5


def test_specs_without_the_gate_build_the_gate_free_network_their_weights_fit():
    old = CompletionNet(widths=(4, 8, 8))
    spec = {key: value for key, value in old.spec.items() if key != "lidar_gate"}  # written before the gate existed
    rebuilt = build_completion(spec)
    assert rebuilt.lidar_gate is False
    rebuilt.load_state_dict(old.state_dict())


def test_trained_weights_give_finite_depth_in_range_even_from_extreme_inputs():
    torch.manual_seed(0)
    net = CompletionNet(widths=(4, 8, 8), min_depth=0.5, max_depth=80.0)
    torch.nn.init.normal_(net.head.weight, std=1.0)
    image, aligned, sparse, mask = completion_inputs(height=48, width=80)  # not multiples of 8: still runs
    aligned[0, 0, :4] = 1e-6  # below the range: clamped before the log
    with torch.no_grad():
        depth = net.eval()(image, aligned, sparse, mask).depth
    assert depth.shape == (2, 1, 48, 80) and torch.isfinite(depth).all()
    assert float(depth.min()) >= 0.5 and float(depth.max()) <= 80.0


def test_full_resolution_variant_predicts_at_stride_1_and_takes_multiples_of_its_divisor():
    net = CompletionNet(widths=(4, 8, 8), output_stride=1).eval()
    assert net.size_divisor == 4 and net.spec["output_stride"] == 1
    torch.nn.init.normal_(net.head.weight, std=0.1)
    with torch.no_grad():
        depth = net(*completion_inputs(height=32, width=96)).depth
    assert depth.shape == (2, 1, 32, 96) and torch.isfinite(depth).all()
    with pytest.raises(UserError, match="output_stride"):
        CompletionNet(widths=(4, 8), output_stride=4)


def test_pooled_guidance_averages_the_residual_over_the_points_of_each_cell():
    residual, mask = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    residual[0, 0, 0, 0], residual[0, 0, 1, 1], mask[0, 0, 0, 0], mask[0, 0, 1, 1] = 1.0, 3.0, 1.0, 1.0
    level0, level1, level2 = pooled_guidance(residual, mask, 3)
    assert level0.shape == (1, 2, 4, 4) and level1.shape == (1, 2, 2, 2) and level2.shape == (1, 2, 1, 1)
    assert level1[0, :, 0, 0].tolist() == [2.0, 0.5]  # mean of 1 and 3; 2 of the 4 pixels hold a point
    assert level1[0, :, 1, 1].tolist() == [0.0, 0.0]  # an empty cell: no correction, density 0
    assert level2[0, :, 0, 0].tolist() == [2.0, 0.125]


def test_spec_rebuilds_the_same_architecture_and_bad_specs_are_user_errors():
    net = CompletionNet(widths=(4, 8, 8), max_depth=40.0)
    rebuilt = build_completion(net.spec)
    assert rebuilt.spec == net.spec and rebuilt.size_divisor == 8
    rebuilt.load_state_dict(net.state_dict())
    with pytest.raises(UserError, match="widths"):
        CompletionNet(widths=(4,))
    with pytest.raises(UserError, match="unexpected keyword"):
        build_completion({"kind": "completion", "width": 4})


def test_masked_losses_golden_values_and_empty_mask():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 10.0]]]], requires_grad=True)
    gt = torch.tensor([[[[2.0, 2.0], [1.0, 0.0]]]])
    l1, l2 = masked_l1_l2(pred, gt, gt > 0)
    assert float(l1.detach()) == pytest.approx(1.0) and float(l2.detach()) == pytest.approx(5.0 / 3.0)
    l1, l2 = masked_l1_l2(pred, gt, torch.zeros_like(gt, dtype=torch.bool))
    (l1 + l2).backward()
    assert float(l1.detach()) == 0.0 and pred.grad is not None
    # |ln 1 - ln 2|, 0, |ln 3 - ln 1| over the three labelled pixels: (ln 2 + ln 3) / 3 = ln 6 / 3
    assert float(masked_log_l1(pred, gt, gt > 0).detach()) == pytest.approx(math.log(6.0) / 3.0)
    assert float(masked_log_l1(pred, gt, torch.zeros_like(gt, dtype=torch.bool)).detach()) == 0.0


def test_laser_rings_recover_the_synthetic_beams_and_16_beams_keep_a_quarter():
    rng = np.random.default_rng(0)
    beam = rng.integers(0, 64, 5000)
    azimuth, distance = rng.uniform(-np.pi, np.pi, 5000), rng.uniform(2.0, 100.0, 5000)
    elevation = LIDAR_ELEVATIONS[beam]
    points = np.stack([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    points = (points * distance).T.astype(np.float32)
    assert np.array_equal(laser_rings(points), beam)
    kept = keep_beams(points, 16)
    assert np.array_equal(np.unique(laser_rings(kept)), np.arange(0, 64, 4))
    assert len(kept) == np.count_nonzero(beam % 4 == 0)
    with pytest.raises(UserError, match="lidar_beams"):
        keep_beams(points, 24)


def test_beam_subsampling_of_the_real_hdl64_scan_keeps_about_the_ring_share(shared_data):
    scan = read_velodyne(shared_data / KITTI_SCAN)
    for beams, share in ((32, 0.5), (16, 0.25)):
        kept = len(keep_beams(scan, beams)) / len(scan)
        print(f"real HDL-64E scan, {beams} beams keep {kept:.3f} of the points (ideal {share})")
        assert abs(kept - share) < 0.05 * (64 / beams)


def test_kitti_samples_carry_sparse_depth_that_lies_on_the_ground_truth(synth_root):
    counts = {}
    for beams in (64, 16):
        cfg = {"kind": "kitti", "root": synth_root, "lidar_beams": beams}
        sample = build_dataset(load_data_config(cfg), "train", augment=False)[0]
        sparse, gt = sample["sparse_depth"], sample["depth"]
        assert sparse.shape == gt.shape and sample["meta"]["lidar_beams"] == beams
        both = (sparse > 0) & (gt > 0)
        counts[beams] = int((sparse > 0).sum())
        # The scan is cast in the same world as the ground truth: points sit on it (up to pixel rounding at edges).
        assert float((torch.abs(sparse[both] - gt[both]) < 0.05 * gt[both]).float().mean()) > 0.9
    assert 0.2 < counts[16] / counts[64] < 0.33
    augmented = build_dataset(
        load_data_config({"kind": "kitti", "root": synth_root, "lidar_beams": [64, 16]}), "train", augment=True
    )
    assert {augmented[i]["meta"]["lidar_beams"] for i in range(len(augmented))} <= {64, 16}


def test_config_accepts_beam_counts_and_rejects_others():
    config = load_config(None, ["data.lidar_beams=[64, 16]"], check_paths=False)
    assert config.data.lidar_beams == [64, 16] and config.completion.widths == [12, 24, 48, 64]
    with pytest.raises(UserError, match="data.lidar_beams"):
        load_config(None, ["data.lidar_beams=24"], check_paths=False)


def test_resize_sparse_keeps_every_point_and_the_nearest_depth_wins():
    sparse = np.zeros((4, 6), np.float32)
    sparse[0, 0], sparse[3, 5], sparse[1, 2], sparse[1, 3] = 5.0, 7.0, 9.0, 3.0  # the last two share a half-size pixel
    half = resize_sparse(sparse, (2, 3))
    assert half[0, 0] == 5.0 and half[1, 2] == 7.0 and half[0, 1] == 3.0 and np.count_nonzero(half) == 3
    same = resize_sparse(sparse, (4, 6))
    np.testing.assert_array_equal(same, sparse)


def test_sanitize_aligned_maps_rep117_states_into_the_range():
    aligned = np.array([[np.inf, -np.inf, np.nan, 0.1, 50.0, 200.0]], np.float32)
    out = sanitize_aligned(aligned, 1.0, 80.0)
    assert out.dtype == np.float32 and out.tolist() == [[80.0, 1.0, 1.0, 1.0, 50.0, 80.0]]


def small_mono():
    return build_student("resnet18", bins=8, decoder_width=8).eval()


def completion_config(synth_root: Path, tmp_path: Path, *extra: str):
    overrides = [f"data.root={synth_root}", f"run.out_dir={tmp_path}", "model.weights=null", *extra]
    return load_config(REPO / "config" / "completion-effb0.yaml", overrides)


def test_build_method_refuses_validation_and_missing_lidar(synth_root, tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="data.val_split"):
        build_completion_method(completion_config(synth_root, tmp_path, "data.val_split=val"), small_mono(), cpu)
    with pytest.raises(UserError, match="data.lidar_beams"):
        build_completion_method(completion_config(synth_root, tmp_path, "data.lidar_beams=null"), small_mono(), cpu)


@pytest.mark.slow
def test_training_on_one_batch_lowers_the_loss_and_keeps_the_mono_model_frozen(synth_root, tmp_path):
    torch.manual_seed(0)
    config = completion_config(synth_root, tmp_path, "completion.widths=[8, 8, 16]")
    mono = small_mono()
    method = build_completion_method(config, mono, torch.device("cpu"))
    assert isinstance(method, CompletionMethod) and method.trainable_modules() == [method.student]
    frozen = {name: value.clone() for name, value in mono.state_dict().items()}
    dataset = build_dataset(
        load_data_config({"kind": "kitti", "root": synth_root, "lidar_beams": 64}), "train", augment=False
    )
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    optimizer = torch.optim.Adam(method.student.parameters(), lr=3e-3)
    method.train()
    losses = []
    for step in range(25):
        _, terms = method(batch, step)
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    print(f"completion loss on one batch: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0]
    assert not mono.training and all(torch.equal(frozen[k], v) for k, v in mono.state_dict().items())


def test_export_matches_pytorch_in_onnx_runtime_and_the_runner_keeps_rep117_states(tmp_path):
    import onnxruntime as ort

    from depth_node.completion import COMPLETION_INPUTS, CompletionRunner
    from distill.verbs.export import export_onnx

    torch.manual_seed(0)
    net = CompletionNet(widths=(4, 8, 8), max_depth=80.0, lidar_gate=True)
    torch.nn.init.normal_(net.head.weight, std=0.1)  # a non-trivial correction and trust, so parity is not "aligned"
    path, metadata = export_onnx(net.eval(), tmp_path, (32, 96), False, 17, {"kd": {"method": "completion"}})
    assert metadata.input_size == (32, 96) and metadata.output_kind == "metric" and metadata.arch == "completion"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert tuple(i.name for i in session.get_inputs()) == COMPLETION_INPUTS
    inputs = completion_inputs(batch=1, seed=3)
    with torch.no_grad():
        expected = net(*inputs).depth.numpy()
    (actual,) = session.run(None, dict(zip(COMPLETION_INPUTS, (x.numpy() for x in inputs))))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)

    runner = CompletionRunner(path, threads=1)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 100, 3), dtype=np.uint8)
    aligned = np.full((40, 100), 12.0, np.float32)
    aligned[0, :5], aligned[1, :5] = np.inf, -np.inf
    sparse = np.zeros((40, 100), np.float32)
    sparse[30, ::7] = 11.0
    depth = runner(rgb, aligned, sparse)
    assert depth.shape == (40, 100) and depth.dtype == np.float32
    assert np.isposinf(depth[0, :5]).all() and np.isneginf(depth[1, :5]).all()
    assert np.isfinite(depth[2:]).all() and 0.0 < depth[2:].min() and depth[2:].max() <= 80.0
    assert set(runner.last_timings) == {"preprocess", "inference", "postprocess"}
    with pytest.raises(ValueError, match="differ in size"):
        runner(rgb, aligned[:20], sparse)


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory) -> Path:
    """`benchmarks/completion.py --quick` run once: its cache (world, runs, export) and its JSON."""
    cache = tmp_path_factory.mktemp("bench-completion")
    command = [sys.executable, str(REPO / "benchmarks" / "completion.py"), "--quick", "--cache", str(cache),
               "--out", str(cache / "completion.json")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the 2-core machine is shared by the whole suite
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return cache


@pytest.mark.slow
def test_quick_benchmark_writes_every_row_for_both_lidars_and_the_latency(quick_bench):
    results = json.loads((quick_bench / "completion.json").read_text())
    for scored in (results, results["full_frame"]):  # KITTI protocol (Garg crop), and every pixel
        for beams in ("beams64", "beams16"):
            assert set(scored[beams]) == {"lidar_fill", "mono", "mono_aligned", "two_stage"}
            for metrics in scored[beams].values():
                assert {"rmse", "mae", "abs_rel", "d1"} <= set(metrics) and metrics["count"] > 0
                assert all(np.isfinite(v) for v in metrics.values())
    cropped, full = results["beams64"]["lidar_fill"], results["full_frame"]["beams64"]["lidar_fill"]
    assert cropped["rmse"] != full["rmse"]  # the two regions really are scored apart
    latency = results["latency_ms"]
    assert latency["image_size"] == [188, 621] and latency["network_input"] == [176, 608]
    assert 0 < latency["network_median"] <= latency["completion_median"]
    accuracy = {"two_stage_rmse_at_most_half_of_mono_aligned", "two_stage_rmse_below_lidar_fill",
                "two_stage_d1_at_least_0.97"}  # fmt: skip
    assert set(results["targets"]) == {
        "added_latency_at_most_20ms_cpu_time",
        *accuracy,
        *(f"{name}_full_frame" for name in accuracy),
    }


@pytest.mark.slow
def test_distill_export_of_a_completion_checkpoint_runs_in_the_runner(quick_bench, tmp_path):
    from depth_node.completion import CompletionRunner
    from distill.cli import main as distill_main

    (run,) = quick_bench.glob("*/completion")
    assert distill_main(["export", str(run), "--out", str(tmp_path), "--size", "32x96"]) == 0
    (path,) = tmp_path.glob("*.onnx")
    runner = CompletionRunner(path)
    rgb = np.zeros((32, 96, 3), np.uint8)
    depth = runner(rgb, np.full((32, 96), 10.0, np.float32), np.zeros((32, 96), np.float32))
    assert depth.shape == (32, 96) and np.isfinite(depth).all()

    # The node and depth_node_bag load it through the `completion_model` parameter.
    from depth_node import params
    from depth_node.engine import ModelLoadError
    from depth_node.pipeline import build_pipeline

    (mono_run,) = quick_bench.glob("*/mono")
    assert distill_main(["export", str(mono_run / "last"), "--out", str(tmp_path / "mono"), "--size", "32x96"]) == 0
    (mono,) = (tmp_path / "mono").glob("*.onnx")
    pipeline = build_pipeline(params.resolve({"model": str(mono), "completion_model": str(path)}))
    assert isinstance(pipeline.completion, CompletionRunner)
    assert build_pipeline(params.resolve({"model": str(mono)})).completion is None
    with pytest.raises(ModelLoadError, match="missing.onnx"):
        build_pipeline(params.resolve({"model": str(mono), "completion_model": str(tmp_path / "missing.onnx")}))


def read_kitti_bag(bag: Path) -> dict:
    """The last message of every topic of the real KITTI rosbag2 sample (one frame)."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    messages = {}
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        for connection, _, raw in reader.messages():
            messages[connection.topic] = reader.deserialize(raw, connection.msgtype)
    return messages


def rmse(depth: np.ndarray, truth: np.ndarray) -> float:
    valid = np.isfinite(truth) & (truth > 1e-3) & (truth < 80.0)
    return float(np.sqrt(np.mean((np.clip(np.nan_to_num(depth[valid], nan=1e-3), 1e-3, 80.0) - truth[valid]) ** 2)))


@pytest.mark.slow
def test_real_kitti_frame_lidar_aligned_depth_beats_the_unaligned_model(quick_bench, shared_data, tmp_path):
    """The must-hold of the issue: on the real KITTI frame (rosbag2 sample), the ONNX model trained briefly on the
    synthetic world, aligned to the frame's LiDAR, is closer to the official ground truth than unaligned."""
    from depth_node.alignment import align_depth, apply_alignment
    from depth_node.codec import camera_info_to_P, pointcloud2_to_xyz, transform_to_matrix
    from depth_node.completion import CompletionRunner
    from depth_node.engine import open_engine
    from depth_node.geometry import lidar_to_depth as project_lidar
    from depth_node.image_codec import image_to_numpy, to_rgb
    from distill.models import load_model
    from distill.verbs.export import export_onnx

    camera = "/kitti/camera_color_left"
    bag = read_kitti_bag(shared_data / "kitti_rosbag2_sample" / "kitti_0001_f5_mcap")
    rgb, projection = to_rgb(bag[f"{camera}/image_raw"]), camera_info_to_P(bag[f"{camera}/camera_info"])
    truth = image_to_numpy(bag[f"{camera}/depth_gt"])
    (tf,) = bag["/tf_static"].transforms
    camera_from_lidar = np.linalg.inv(transform_to_matrix(tf.transform))  # TF maps child (camera) into parent
    scan = pointcloud2_to_xyz(bag["/kitti/velo/pointcloud"])
    sparse = project_lidar(scan, camera_from_lidar, projection, *rgb.shape[:2])

    (mono_run,) = quick_bench.glob("*/mono")
    mono, config = load_model(mono_run / "last")
    mono_path, _ = export_onnx(mono, tmp_path, (64, 192), False, 17, config)
    raw = open_engine(mono_path, backend="onnxruntime-cpu").infer(rgb).depth
    fit = align_depth(raw, sparse, space="depth")
    aligned = apply_alignment(raw, fit)
    (completion_onnx,) = quick_bench.glob("*/export/*.onnx")
    completed = CompletionRunner(completion_onnx)(rgb, aligned, sparse)
    errors = {"unaligned": rmse(raw, truth), "aligned": rmse(aligned, truth), "two_stage": rmse(completed, truth)}
    print(
        f"real KITTI frame, RMSE vs the official ground truth (m): {errors}; alignment: {fit.reason}, "
        f"s={fit.scale:.3g} t={fit.shift:.3g} on {fit.points} LiDAR points"
    )
    assert fit.ok and fit.points > 5000
    assert errors["aligned"] < errors["unaligned"]
    assert np.isfinite(completed).all()
