"""KITTI loader on the real frame in ../shared/data (2011_09_26_drive_0001_sync, frame 5) and on broken copies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from distill.config import load_data_config
from distill.data import build_dataset
from distill.data.kitti import (
    KittiDataset,
    project_velodyne,
    read_calib,
    read_split,
    read_velodyne,
)
from distill.data.samples import read_depth_png, read_rgb
from distill.errors import UserError

DRIVE = "2011_09_26/2011_09_26_drive_0001_sync"


@pytest.fixture(scope="module")
def kitti(shared_data) -> Path:
    """The real KITTI sample: raw data directly under it (no kitti_raw/ level), official depth maps beside it."""
    return shared_data / "kitti_raw_sample"


def official(kitti: Path, kind: str, cam: int = 2, max_depth: float = np.inf) -> np.ndarray:
    """An official depth map of the frame in metres, 0 = invalid (and, if given, from max_depth on)."""
    folder = {"groundtruth": "data_depth_annotated", "velodyne_raw": "data_depth_velodyne"}[kind]
    path = kitti / folder / "train" / Path(DRIVE).name / "proj_depth" / kind / f"image_0{cam}" / "0000000005.png"
    depth = read_depth_png(path, 1 / 256)
    return np.where(depth < max_depth, depth, 0)


def write_split(folder: Path, lines: list[str], name: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder


def fraction_confirmed(depth: np.ndarray, reference: np.ndarray, radius: int = 2, tolerance: float = 0.3) -> float:
    """Share of depth's points with a reference pixel within `radius` px whose depth differs by <= tolerance m."""
    rows, cols = np.nonzero(depth)
    confirmed = np.zeros(len(rows), bool)
    height, width = depth.shape
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            near = reference[np.clip(rows + dr, 0, height - 1), np.clip(cols + dc, 0, width - 1)]
            confirmed |= (near > 0) & (np.abs(near - depth[rows, cols]) <= tolerance)
    return confirmed.mean()


def test_projected_velodyne_agrees_with_official_sparse_map(kitti):
    scan = read_velodyne(kitti / DRIVE / "velodyne_points" / "data" / "0000000005.bin")
    assert scan.shape == (121_948, 4) and scan.dtype == np.float32
    depth = project_velodyne(scan, kitti / "2011_09_26", cam=2)
    reference = official(kitti, "velodyne_raw")
    assert depth.shape == (375, 1242) and depth.dtype == np.float32
    assert abs(int((depth > 0).sum()) - int((reference > 0).sum())) < 400  # 19,137 vs 19,154 official pixels
    assert fraction_confirmed(depth, reference) >= 0.90
    assert depth.max() < 90 and depth[depth > 0].min() > 1.0


def test_calib_and_split_readers(kitti, tmp_path):
    calib = read_calib(kitti / "2011_09_26")
    assert calib["P_rect_02"].reshape(3, 4)[0, 0] == pytest.approx(721.5377)
    assert calib["T"] == pytest.approx([-4.069766e-03, -7.631618e-02, -2.717806e-01])
    write_split(tmp_path, [f"{DRIVE} 5 l", "", f"{DRIVE} 12 r"])
    assert read_split(tmp_path / "test.txt") == [(DRIVE, 5, 2), (DRIVE, 12, 3)]


@pytest.mark.parametrize("gt", ["annotated", "velodyne"])
def test_sample_contract_on_real_frame(kitti, tmp_path, gt):
    split_dir = write_split(tmp_path, [f"{DRIVE} 5 l"])
    cfg = {"kind": "kitti", "root": kitti, "raw_root": kitti, "gt_root": kitti / "data_depth_annotated"}
    sample = build_dataset(load_data_config({**cfg, "split_dir": split_dir, "gt": gt}), "test", augment=False)[0]
    assert sample["image"].shape == (3, 375, 1242) and sample["image"].dtype == torch.float32
    png = read_rgb(kitti / DRIVE / "image_02" / "data" / "0000000005.png")
    assert torch.equal(sample["image"], torch.from_numpy(png).permute(2, 0, 1).float() / 255)
    assert sample["K"].flatten().tolist() == pytest.approx([721.5377, 0, 609.5593, 0, 721.5377, 172.854, 0, 0, 1])
    depth, valid = sample["depth"][0].numpy(), sample["valid"][0].numpy()
    assert np.array_equal(valid, depth > 0) and sample["valid"].dtype == torch.bool
    if gt == "annotated":
        # 111 official pixels lie beyond the default max_depth of 80 m and become invalid.
        assert np.array_equal(depth, official(kitti, "groundtruth", max_depth=80.0))
        assert valid.sum() == 90_839 - 111
    else:
        assert fraction_confirmed(depth, official(kitti, "velodyne_raw")) >= 0.90
    assert sample["meta"]["name"] == "2011_09_26_drive_0001_sync/image_02/0000000005"


def test_kb_crop_is_bottom_centred(kitti, tmp_path):
    split_dir = write_split(tmp_path, [f"{DRIVE} 5 l"])
    full = KittiDataset(kitti, split_dir / "test.txt", gt_root=kitti / "data_depth_annotated")[0]
    cropped = KittiDataset(kitti, split_dir / "test.txt", gt_root=kitti / "data_depth_annotated", kb_crop=True)[0]
    top, left = 375 - 352, (1242 - 1216) // 2
    assert cropped["image"].shape == (3, 352, 1216)
    assert torch.equal(cropped["image"], full["image"][:, top:, left : left + 1216])
    assert torch.equal(cropped["depth"], full["depth"][:, top:, left : left + 1216])
    assert cropped["K"][0, 2] == pytest.approx(609.5593 - left) and cropped["K"][1, 2] == pytest.approx(172.854 - top)
    assert (cropped["meta"]["crop_top"], cropped["meta"]["crop_left"]) == (top, left)


def test_right_camera_uses_image_03_and_p_rect_03(kitti, tmp_path):
    split_dir = write_split(tmp_path, [f"{DRIVE} 5 r"])
    sample = KittiDataset(kitti, split_dir / "test.txt", gt_root=kitti / "data_depth_annotated")[0]
    png = read_rgb(kitti / DRIVE / "image_03" / "data" / "0000000005.png")
    assert torch.equal(sample["image"], torch.from_numpy(png).permute(2, 0, 1).float() / 255)
    assert np.array_equal(sample["depth"][0].numpy(), official(kitti, "groundtruth", cam=3, max_depth=80.0))
    assert sample["meta"]["cam"] == 3


def test_default_layout_and_skipped_frames_warn_once(kitti, tmp_path, caplog):
    (tmp_path / "kitti_raw").symlink_to(kitti)
    (tmp_path / "data_depth_annotated").symlink_to(kitti / "data_depth_annotated")
    write_split(tmp_path / "splits", [f"{DRIVE} 5 l", f"{DRIVE} 6 l", f"{DRIVE} 7 l"], name="train")
    with caplog.at_level(logging.WARNING, logger="distill.data.kitti"):
        dataset = build_dataset(load_data_config({"kind": "kitti", "root": tmp_path}), "train", augment=True)
    assert len(dataset) == 1
    assert [record.getMessage() for record in caplog.records] == [
        f"KITTI: skipped 2 of 3 frames of {tmp_path / 'splits' / 'train.txt'} without annotated depth"
    ]


def test_without_split_file_every_left_frame_is_used(kitti, caplog):
    cfg = {"kind": "kitti", "root": kitti, "raw_root": kitti, "gt_root": kitti / "data_depth_annotated"}
    with caplog.at_level(logging.WARNING, logger="distill.data"):
        dataset = build_dataset(load_data_config(cfg), "val", augment=False)
    assert [frame[:3] for frame in dataset.frames] == [(DRIVE, 5, 2)]
    assert "no split file" in caplog.records[0].getMessage()


def broken_tree(kitti: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A raw tree with the real calib files, one image and one scan, and its split file."""
    day = tmp_path / "raw" / "2011_09_26"
    (day / Path(DRIVE).name / "image_02" / "data").mkdir(parents=True)
    (day / Path(DRIVE).name / "velodyne_points" / "data").mkdir(parents=True)
    for name in ("calib_cam_to_cam.txt", "calib_velo_to_cam.txt"):
        shutil.copy(kitti / "2011_09_26" / name, day / name)
    shutil.copy(kitti / DRIVE / "image_02" / "data" / "0000000005.png", day / Path(DRIVE).name / "image_02" / "data")
    scan = day / Path(DRIVE).name / "velodyne_points" / "data" / "0000000005.bin"
    np.zeros((10, 4), np.float32).tofile(scan)
    return tmp_path / "raw", write_split(tmp_path / "splits", [f"{DRIVE} 5 l"]) / "test.txt"


def test_missing_calib_file_is_a_user_error(kitti, tmp_path):
    raw, split = broken_tree(kitti, tmp_path)
    (raw / "2011_09_26" / "calib_velo_to_cam.txt").unlink()
    with pytest.raises(UserError, match="calib_velo_to_cam.txt"):
        KittiDataset(raw, split, gt="velodyne")[0]
    with pytest.raises(UserError, match="calib_velo_to_cam.txt"):
        project_velodyne(np.zeros((1, 4), np.float32), raw / "2011_09_26")


def test_truncated_scan_is_a_user_error(kitti, tmp_path):
    raw, split = broken_tree(kitti, tmp_path)
    scan = raw / DRIVE / "velodyne_points" / "data" / "0000000005.bin"
    scan.write_bytes(scan.read_bytes()[:-6])
    with pytest.raises(UserError, match=f"{scan}.*truncated"):
        KittiDataset(raw, split, gt="velodyne")[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png_is_a_user_error(kitti, tmp_path, damage):
    raw, split = broken_tree(kitti, tmp_path)
    image = raw / DRIVE / "image_02" / "data" / "0000000005.png"
    image.write_bytes(b"not a png at all" if damage == "garbage" else image.read_bytes()[:2000])
    with pytest.raises(UserError, match=str(image)):
        KittiDataset(raw, split, gt="velodyne")[0]
    depth = tmp_path / "depth.png"
    cv2.imwrite(str(depth), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="16-bit"):
        read_depth_png(depth, 1 / 256)


def test_bad_split_and_missing_files_are_user_errors(kitti, tmp_path):
    raw, _ = broken_tree(kitti, tmp_path)
    with pytest.raises(UserError, match=r"bad.txt:2: expected"):
        bad = write_split(tmp_path, [f"{DRIVE} 5 l", f"{DRIVE} five l"], name="bad") / "bad.txt"
        KittiDataset(raw, bad, gt="velodyne")
    with pytest.raises(UserError, match="cannot read KITTI split file"):
        KittiDataset(raw, tmp_path / "nope.txt", gt="velodyne")
    with pytest.raises(UserError, match="data_depth_annotated folder"):
        KittiDataset(raw, tmp_path / "splits" / "test.txt", gt_root=tmp_path / "no_such_folder")
    split = write_split(tmp_path, [f"{DRIVE} 5 l", f"{DRIVE} 9 l"], name="gap") / "gap.txt"
    with pytest.raises(UserError, match="0000000009"):
        KittiDataset(raw, split, gt="velodyne")


def test_labelled_split_leaves_the_other_training_frames_unlabelled(tmp_path):
    from distill.data.synth import write_world

    world = tmp_path / "world"
    write_world(world, frames=6, seed=3, domain="shifted", size=(32, 96), bag="none")
    train = (world / "splits" / "train.txt").read_text().splitlines()
    (world / "splits" / "few.txt").write_text(train[1] + "\n")
    config = load_data_config({"kind": "kitti", "root": world, "labelled_split": "few"})
    samples = [sample for sample in build_dataset(config, "train", augment=False)]
    assert len(samples) == len(train) == 4
    assert [bool(sample["valid"].any()) for sample in samples] == [False, True, False, False]
    assert all(float(sample["depth"].abs().sum()) == 0 for i, sample in enumerate(samples) if i != 1)
    assert all(sample["valid"].any() for sample in build_dataset(config, "test", augment=False))  # scoring keeps labels
    missing = load_data_config({"kind": "kitti", "root": world, "labelled_split": "nope"})
    with pytest.raises(UserError, match="data.labelled_split: no split file"):
        build_dataset(missing, "train", augment=False)
