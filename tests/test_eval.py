"""`distill eval`: checkpoints and exported ONNX models on a synthetic KITTI-layout world, the papers' table + JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from distill.checkpoint import save_checkpoint
from distill.cli import main as cli_main
from distill.config import load_config, to_dict
from distill.data import build_dataset
from distill.errors import UserError
from distill.inference import paste_into_full, predict_depth
from distill.metrics import METRIC_KEYS, depth_metrics
from distill.models import build_student, load_model
from distill.verbs.evaluate import run_eval


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_student("resnet18", bins=16, decoder_width=16).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, student) -> Path:
    """A run folder holding a `last` checkpoint of the (untrained) student, as `distill train` writes it."""
    run = tmp_path_factory.mktemp("runs") / "student"
    config = to_dict(load_config(None, ["data.size=[64, 192]"]))
    save_checkpoint(run / "last", student, {"step": 0, "config": config})
    return run


def test_predict_depth_pads_to_the_size_divisor_and_crops_back(student):
    image = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        padded = student(student.normalize(F.pad(image, (0, 26, 0, 14), mode="replicate"))).depth[..., :50, :70]
        resized = F.interpolate(
            student(student.normalize(F.interpolate(image, (64, 192), mode="bilinear", antialias=True))).depth,
            (50, 70), mode="bilinear",
        )  # fmt: skip
    torch.testing.assert_close(predict_depth(student, image), padded)
    torch.testing.assert_close(predict_depth(student, image, size=(64, 192)), resized)


def test_kb_cropped_maps_are_pasted_into_the_full_frame():
    crop = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    meta = {"orig_height": 4, "orig_width": 6, "crop_top": 2, "crop_left": 1}
    full = paste_into_full(crop, meta)
    assert full.shape == (4, 6) and np.array_equal(full[2:, 1:4], crop) and full.sum() == crop.sum()
    assert paste_into_full(crop, {"name": "uncropped"}) is crop


def test_checkpoint_on_a_dataset_folder_prints_the_table_and_writes_json(tmp_path, run_dir, synth_root, capsys):
    out = tmp_path / "metrics.json"
    assert cli_main(["eval", str(run_dir), "--data", str(synth_root), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| AbsRel |" in printed and "| student " in printed
    report = json.loads(out.read_text())
    test_frames = len((synth_root / "splits" / "test.txt").read_text().splitlines())
    assert report["crop"] == "garg" and report["align"] == "none" and report["split"] == "test"
    assert report["metrics"]["count"] == test_frames
    assert all(np.isfinite(report["metrics"][key]) for key in METRIC_KEYS)


def test_sequences_with_poses_report_flicker_beside_the_kitti_metrics(tmp_path, run_dir, synth_root, capsys):
    """The synthetic world writes OXTS poses: consecutive test frames of a drive give flicker (see distill.flicker)."""
    out = tmp_path / "metrics.json"
    assert cli_main(["eval", str(run_dir), "--data", str(synth_root), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())["metrics"]
    lines = (synth_root / "splits" / "test.txt").read_text().splitlines()
    assert metrics["flicker_pairs"] == len(lines) - len({line.split()[0] for line in lines}) >= 1
    assert 0 < metrics["flicker"] < 1 and f"flicker {metrics['flicker']:.4f}" in printed
    for drive in (synth_root / "kitti_raw").glob("*/*_sync"):  # without poses there is no flicker, and no error
        (drive / "oxts" / "data").rename(drive / "oxts" / "moved")
    try:
        assert "flicker" not in run_eval(run_dir, data=synth_root)
    finally:
        for drive in (synth_root / "kitti_raw").glob("*/*_sync"):
            (drive / "oxts" / "moved").rename(drive / "oxts" / "data")


def test_config_yaml_data_section_and_eval_defaults_are_used(tmp_path, run_dir, synth_root):
    config = {"data": {"root": str(synth_root), "test_split": "val"}, "eval": {"crop": "none", "align": "median"}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = run_eval(run_dir, data=path, json_out=tmp_path / "m.json")
    report = json.loads((tmp_path / "m.json").read_text())
    assert (report["crop"], report["align"], report["split"]) == ("none", "median", "val")
    assert metrics["count"] == len((synth_root / "splits" / "val.txt").read_text().splitlines())
    unaligned = run_eval(run_dir, data=path, align="none")
    assert unaligned["abs_rel"] != metrics["abs_rel"]  # the command line overrides the config's eval section


@pytest.mark.slow
def test_exported_onnx_scores_like_its_checkpoint(tmp_path, run_dir, synth_root, student):
    from distill.verbs.export import export_onnx

    onnx_path, _ = export_onnx(student, tmp_path, (64, 192), dynamic=False, opset=17, config={})
    from_torch = run_eval(run_dir, data=synth_root)
    from_onnx = run_eval(onnx_path, data=synth_root, json_out=tmp_path / "onnx.json")
    assert from_onnx["count"] == from_torch["count"]
    for key in METRIC_KEYS:
        assert from_onnx[key] == pytest.approx(from_torch[key], rel=1e-3, abs=1e-4), key


def test_user_mistakes_are_one_line_errors(tmp_path, run_dir, synth_root):
    with pytest.raises(UserError, match="neither a config YAML nor a dataset folder"):
        run_eval(run_dir, data=tmp_path / "nothing")
    with pytest.raises(UserError, match="checkpoint not found"):
        run_eval(tmp_path / "no_run", data=synth_root)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="broken.onnx"):
        run_eval(tmp_path / "broken.onnx", data=synth_root)


def test_real_kitti_frame_with_kb_crop_is_scored_on_the_full_frame(tmp_path, run_dir, shared_data):
    kitti = shared_data / "kitti_raw_sample"
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "test.txt").write_text("2011_09_26/2011_09_26_drive_0001_sync 5 l\n")
    config = {"data": {"root": str(tmp_path), "raw_root": str(kitti), "gt_root": str(kitti / "data_depth_annotated"),
                       "kb_crop": True}}  # fmt: skip
    (tmp_path / "kitti.yaml").write_text(yaml.safe_dump(config))
    metrics = run_eval(run_dir, data=tmp_path / "kitti.yaml", crop="garg")
    assert metrics["count"] == 1

    # By hand: predict on the 352x1216 KB crop (top 23, left 13 of 375x1242), paste into the full frame, Garg-crop.
    sample = build_dataset(load_config(tmp_path / "kitti.yaml").data, "test", augment=False)[0]
    model, _ = load_model(run_dir)
    pred, gt = np.zeros((375, 1242)), np.zeros((375, 1242))
    pred[23:, 13:1229] = predict_depth(model, sample["image"][None], size=(64, 192))[0, 0].numpy()
    gt[23:, 13:1229] = sample["depth"][0].numpy()
    expected = depth_metrics(pred, gt, crop="garg")
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
