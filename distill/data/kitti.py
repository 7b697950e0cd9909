"""KITTI raw in its published layout, Eigen split files, with either ground-truth source.

Layout (real KITTI and our synthetic world alike):
    raw_root/<date>/calib_cam_to_cam.txt, calib_velo_to_cam.txt
    raw_root/<date>/<date>_drive_XXXX_sync/image_02/data/%010d.png         (image_03 for the right camera)
    raw_root/<date>/<date>_drive_XXXX_sync/velodyne_points/data/%010d.bin  (N x 4 float32: x, y, z, reflectance)
    gt_root/{train,val}/<date>_drive_XXXX_sync/proj_depth/groundtruth/image_02/%010d.png  (uint16, m = value / 256)
    split file lines: "<date>/<date>_drive_XXXX_sync <frame> l|r"   (Eigen format; l = image_02, r = image_03)

Ground truth "velodyne" projects the scan as the KITTI raw devkit does (R_rect_00 [R|T] then P_rect_0<cam>, nearest
point per pixel); "annotated" reads the official depth-completion PNGs (Uhrig et al. 3DV 2017). The KB crop (Kuznietsov
et al., used by BTS/AdaBins) keeps the bottom-centred 352x1216 window: top = H - 352, left = (W - 1216) // 2.

With `lidar_beams` set, every sample also carries `sparse_depth`: the scan projected the same way after keeping only
that many of its 64 laser rings (every 2nd ring for 32, every 4th for 16), a cheaper LiDAR simulated from the HDL-64E
for depth completion (the two-stage completion of Gao et al., "Robust Lightweight Depth Estimation Model via Data-Free
Distillation").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from depth_node.geometry import points_to_depth_image, transform_points
from distill.data.oxts import read_imu_poses
from distill.data.samples import make_sample, read_depth_png, read_rgb
from distill.data.transforms import crop
from distill.errors import UserError

log = logging.getLogger(__name__)

KB_CROP = (352, 1216)
GT_METRES_PER_UNIT = 1.0 / 256.0
CALIB_FILES = ("calib_cam_to_cam.txt", "calib_velo_to_cam.txt")
SIDES = {"l": 2, "r": 3}
HDL64_BEAMS = 64
HDL64_ELEVATIONS = (2.0, -24.8)  # degrees, top and bottom beam of the HDL-64E (and of the synthetic world's LiDAR)


def read_calib_file(path: Path) -> dict[str, np.ndarray]:
    """Numeric entries of one KITTI calib file ("KEY: v1 v2 ..."), flat float64; text entries (calib_time) skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise UserError(f"cannot read KITTI calib file {path}: {error.strerror}") from None
    entries = {}
    for line in lines:
        key, sep, values = line.partition(":")
        if not sep:
            continue
        try:
            entries[key.strip()] = np.array([float(value) for value in values.split()])
        except ValueError:
            continue
    return entries


def read_calib(calib_dir: Path) -> dict[str, np.ndarray]:
    """Both calib files of a recording day, keyed as in the files (S_rect_02, R_rect_00, P_rect_02, ..., R, T)."""
    calib: dict[str, np.ndarray] = {}
    for name in CALIB_FILES:
        calib.update(read_calib_file(Path(calib_dir) / name))
    sizes = {"R": 9, "T": 3, "R_rect_00": 9}
    if missing := [key for key, size in sizes.items() if key not in calib or calib[key].size != size]:
        raise UserError(f"KITTI calib in {calib_dir} lacks or has malformed entries: {', '.join(missing)}")
    return calib


def camera_projection(calib: Mapping[str, np.ndarray], cam: int) -> tuple[np.ndarray, tuple[int, int]]:
    """P_rect_0<cam> as (3, 4) and the rectified image size (H, W) from S_rect_0<cam>."""
    projection, size = calib.get(f"P_rect_0{cam}"), calib.get(f"S_rect_0{cam}")
    if projection is None or projection.size != 12 or size is None or size.size != 2:
        raise UserError(f"KITTI calib_cam_to_cam.txt lacks a valid P_rect_0{cam} / S_rect_0{cam} entry")
    width, height = (int(round(value)) for value in size)
    return projection.reshape(3, 4), (height, width)


def velodyne_to_rectified(calib: Mapping[str, np.ndarray]) -> np.ndarray:
    """4x4 taking Velodyne points into the rectified reference camera: R_rect_00 @ [R | T]."""
    velo_to_cam = np.eye(4)
    velo_to_cam[:3, :3] = calib["R"].reshape(3, 3)
    velo_to_cam[:3, 3] = calib["T"]
    rectify = np.eye(4)
    rectify[:3, :3] = calib["R_rect_00"].reshape(3, 3)
    return rectify @ velo_to_cam


def camera_poses(drive_dir: Path, calib: Mapping[str, np.ndarray], cam: int = 2) -> dict[int, np.ndarray] | None:
    """Poses of rectified camera `cam` per frame of a drive, from its OXTS packets and calib_imu_to_velo.txt.

    Returns:
        frame number -> (4, 4) float64 T_world_cam (camera coordinates -> the devkit's local level frame, metres),
        or None when the drive has no oxts folder or its day no calib_imu_to_velo.txt.
    """
    drive_dir = Path(drive_dir)
    imu_calib_path = drive_dir.parent / "calib_imu_to_velo.txt"
    if not (drive_dir / "oxts" / "data").is_dir() or not imu_calib_path.is_file():
        return None
    imu_calib = read_calib_file(imu_calib_path)
    if imu_calib.get("R", np.empty(0)).size != 9 or imu_calib.get("T", np.empty(0)).size != 3:
        raise UserError(f"{imu_calib_path} lacks or has malformed R (9 numbers) / T (3 numbers)")
    velo_from_imu = np.eye(4)
    velo_from_imu[:3, :3], velo_from_imu[:3, 3] = imu_calib["R"].reshape(3, 3), imu_calib["T"]
    projection, _ = camera_projection(calib, cam)
    cam_from_rect = np.eye(4)
    cam_from_rect[:3, 3] = np.linalg.solve(projection[:, :3], projection[:, 3])
    # Affine, not rigid: the rounded calib numbers are what the projection uses, so invert them exactly.
    cam_from_imu = cam_from_rect @ velodyne_to_rectified(calib) @ velo_from_imu
    imu_from_cam = np.linalg.inv(cam_from_imu)
    return {frame: pose @ imu_from_cam for frame, pose in read_imu_poses(drive_dir).items()}


def read_velodyne(path: Path) -> np.ndarray:
    """A Velodyne scan .bin: (N, 4) float32 x, y, z (metres, Velodyne frame), reflectance."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.float32)
    except OSError as error:
        raise UserError(f"cannot read Velodyne scan {path}: {error.strerror}") from None
    if raw.size % 4:
        raise UserError(f"Velodyne scan {path} is truncated: {raw.size * 4} bytes is not a multiple of 16")
    return raw.reshape(-1, 4)


def project_scan(scan: np.ndarray, calib: Mapping[str, np.ndarray], cam: int = 2) -> np.ndarray:
    """Sparse depth of a scan in camera `cam` from already-read calib (see `project_velodyne`)."""
    projection, (height, width) = camera_projection(calib, cam)
    points = transform_points(velodyne_to_rectified(calib), scan[:, :3])
    return points_to_depth_image(points, projection, height, width)


def project_velodyne(scan: np.ndarray, calib_dir: Path, cam: int = 2) -> np.ndarray:
    """Project a Velodyne scan into rectified camera `cam` (the KITTI raw devkit projection).

    Args:
        scan: (N, 4) float32 as read from a .bin (x, y, z metres in the Velodyne frame, reflectance).
        calib_dir: folder holding calib_cam_to_cam.txt and calib_velo_to_cam.txt.
        cam: camera index, 2 = left colour, 3 = right colour.

    Returns:
        (H, W) float32 metres along the optical axis, H and W from S_rect_0<cam>; 0 where no point landed, the
        nearest point kept per pixel.
    """
    return project_scan(scan, read_calib(Path(calib_dir)), cam)


def laser_rings(points: np.ndarray, beams: int = HDL64_BEAMS, elevations=HDL64_ELEVATIONS) -> np.ndarray:
    """Laser ring of each point from its elevation angle, rings evenly spaced from the top beam to the bottom one.

    The HDL-64E's real beams are only nearly even (1/3° above -8.3°, 1/2° below), so on KITTI a few points land in
    a neighbour's ring; the share kept by `keep_beams` is still close to beams / 64.

    Args:
        points: (N, >=3) x, y, z metres in the LiDAR frame (z up).
        beams: rings of the sensor.
        elevations: (top, bottom) beam elevation in degrees.

    Returns:
        (N,) int ring index, 0 = top beam, clipped to [0, beams - 1].
    """
    top, bottom = elevations
    elevation = np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))
    ring = np.rint((top - elevation) * (beams - 1) / (top - bottom))
    return np.clip(ring, 0, beams - 1).astype(np.int64)


def keep_beams(scan: np.ndarray, beams: int) -> np.ndarray:
    """The points of a 64-beam scan that a `beams`-beam LiDAR with the same field of view would see: every
    (64 / beams)-th ring from the top.

    Args:
        scan: (N, C) points, columns x, y, z (metres, LiDAR frame) first.
        beams: 64, 32, 16, 8, 4, 2 or 1.
    """
    if beams not in (64, 32, 16, 8, 4, 2, 1):
        raise UserError(f"data.lidar_beams must divide the HDL-64E's 64 rings (64, 32, 16, ...), got {beams!r}")
    return scan[laser_rings(scan) % (HDL64_BEAMS // beams) == 0]


def read_split(path: Path) -> list[tuple[str, int, int]]:
    """Eigen-format split file -> [(drive "<date>/<date>_drive_XXXX_sync", frame index, camera 2 or 3)]."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise UserError(f"cannot read KITTI split file {path}: {error.strerror}") from None
    frames = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in SIDES or len(Path(parts[0]).parts) != 2:
            raise UserError(f"{path}:{number}: expected '<date>/<date>_drive_XXXX_sync <frame> l|r', got {line!r}")
        frames.append((parts[0], int(parts[1]), SIDES[parts[2]]))
    return frames


def list_frames(raw_root: Path, cam: int = 2) -> list[tuple[str, int, int]]:
    """Every frame of camera `cam` under raw_root, as split entries (for data that comes without split files)."""
    images = sorted(Path(raw_root).glob(f"*/*_sync/image_0{cam}/data/*.png"))
    return [(f"{image.parents[3].name}/{image.parents[2].name}", int(image.stem), cam) for image in images]


def annotated_gt_path(gt_root: Path, drive: str, frame: int, cam: int) -> Path | None:
    """The official depth-completion ground truth of a frame (train or val folder), or None if it has none."""
    relative = Path(Path(drive).name, "proj_depth", "groundtruth", f"image_0{cam}", f"{frame:010d}.png")
    for subset in ("train", "val"):
        if (candidate := gt_root / subset / relative).is_file():
            return candidate
    return None


def apply_kb_crop(sample: dict[str, Any]) -> dict[str, Any]:
    """Bottom-centred 352x1216 crop (KB/BTS convention), intrinsics adjusted."""
    height, width = sample["image"].shape[-2:]
    crop_height, crop_width = KB_CROP
    if height < crop_height or width < crop_width:
        name = sample["meta"]["name"]
        raise UserError(f"KB crop needs at least {crop_height}x{crop_width} pixels, {name} is {height}x{width}")
    top, left = height - crop_height, (width - crop_width) // 2
    sample = crop(sample, top, left, crop_height, crop_width)
    sample["meta"].update(crop_top=top, crop_left=left)
    return sample


class KittiDataset(Dataset):
    """KITTI raw frames of an Eigen split (or, with split_file None, every image_02 frame under raw_root) with
    annotated or projected-Velodyne depth.

    meta: name "<drive>/image_0<cam>/<frame>", drive, frame, cam, orig_height, orig_width (before any crop),
    crop_top, crop_left (offset of the KB crop in the original image, 0 without it), and with `lidar_beams` the beams
    of this sample's sparse_depth.

    `lidar_beams`: None (no sparse_depth), a ring count (64, 32, 16, ...; see `keep_beams`), or a list of them of
    which each sample draws one at random (numpy's global RNG, seeded per sample by data.sampling.SeededDataset).

    `labelled`: the (drive, frame, cam) entries that keep their ground truth; every other frame comes without depth
    (`valid` all False), the way unlabelled robot-log frames do. None: every frame is labelled.
    """

    def __init__(
        self,
        raw_root: Path,
        split_file: Path | None,
        gt: str = "annotated",
        gt_root: Path | None = None,
        kb_crop: bool = False,
        depth_range: tuple[float, float] = (1e-3, 80.0),
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        lidar_beams: int | list[int] | None = None,
        labelled: set[tuple[str, int, int]] | None = None,
    ):
        if gt not in ("annotated", "velodyne"):
            raise UserError(f"KITTI gt must be 'annotated' or 'velodyne', got {gt!r}")
        if gt == "annotated" and (gt_root is None or not Path(gt_root).is_dir()):
            raise UserError(f"KITTI gt 'annotated' needs gt_root, the data_depth_annotated folder; got {gt_root}")
        self.raw_root, self.gt, self.kb_crop = Path(raw_root), gt, kb_crop
        self.depth_range, self.transform = depth_range, transform
        self.lidar_beams, self.labelled = _beam_choices(lidar_beams), labelled
        self._calib: dict[Path, dict[str, np.ndarray]] = {}
        self._poses: dict[tuple[str, int], dict[int, np.ndarray] | None] = {}
        split = read_split(split_file) if split_file else list_frames(self.raw_root)
        self.frames = self._index(split, Path(gt_root) if gt_root else None, split_file or self.raw_root)

    def _index(self, split: list[tuple[str, int, int]], gt_root: Path | None, source: Path) -> list[tuple]:
        """Keep frames with ground truth; every kept frame's image (and scan) must exist."""
        frames, missing = [], []
        for drive, frame, cam in split:
            drive_dir = self.raw_root / drive
            image = drive_dir / f"image_0{cam}" / "data" / f"{frame:010d}.png"
            if self.gt == "annotated":
                depth = annotated_gt_path(gt_root, drive, frame, cam)
                if depth is None:
                    continue
            else:
                depth = drive_dir / "velodyne_points" / "data" / f"{frame:010d}.bin"
            missing += [path for path in (image, depth) if not path.is_file()]
            if self.lidar_beams and not (scan := _scan_path(drive_dir, frame)).is_file():
                missing.append(scan)
            frames.append((drive, frame, cam, image, depth))
        if missing:
            raise UserError(f"{len(missing)} file(s) listed by {source} are missing, first: {missing[0]}")
        if skipped := len(split) - len(frames):
            log.warning("KITTI: skipped %d of %d frames of %s without annotated depth", skipped, len(split), source)
        if not frames:
            raise UserError(f"no usable frames in {source} (raw_root {self.raw_root}, gt_root {gt_root})")
        return frames

    def __len__(self) -> int:
        return len(self.frames)

    def calib(self, drive: str) -> dict[str, np.ndarray]:
        """Calibration of the recording day of `drive`, read once."""
        calib_dir = self.raw_root / Path(drive).parent
        if calib_dir not in self._calib:
            self._calib[calib_dir] = read_calib(calib_dir)
        return self._calib[calib_dir]

    def camera_pose(self, index: int) -> np.ndarray | None:
        """(4, 4) T_world_cam of sample `index` (see `camera_poses`), None when its drive has no OXTS poses."""
        drive, frame, cam = self.frames[index][:3]
        if (drive, cam) not in self._poses:
            self._poses[(drive, cam)] = camera_poses(self.raw_root / drive, self.calib(drive), cam)
        poses = self._poses[(drive, cam)]
        return None if poses is None else poses.get(frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        drive, frame, cam, image_path, depth_path = self.frames[index]
        image = read_rgb(image_path)
        calib = self.calib(drive)
        projection, calib_size = camera_projection(calib, cam)
        if self.gt == "annotated":
            depth = read_depth_png(depth_path, GT_METRES_PER_UNIT)
        else:
            depth = project_scan(read_velodyne(depth_path), calib, cam)
        for path, shape in ((image_path, image.shape[:2]), (depth_path, depth.shape)):
            if shape != calib_size:
                expected = f"{calib_size[0]}x{calib_size[1]}"
                raise UserError(f"{path} is {shape[0]}x{shape[1]} pixels but S_rect_0{cam} says {expected}")
        height, width = calib_size
        meta = {
            "name": f"{Path(drive).name}/image_0{cam}/{frame:010d}",
            "drive": Path(drive).name, "frame": frame, "cam": cam,
            "orig_height": height, "orig_width": width, "crop_top": 0, "crop_left": 0,
        }  # fmt: skip
        sparse = None
        if self.lidar_beams:
            beams = int(np.random.choice(self.lidar_beams))
            scan = read_velodyne(_scan_path(self.raw_root / drive, frame))
            sparse, meta["lidar_beams"] = project_scan(keep_beams(scan, beams), calib, cam), beams
        if self.labelled is not None and (drive, frame, cam) not in self.labelled:
            depth = None  # an unlabelled frame: KD terms still see its image
        sample = make_sample(image, depth, projection[:, :3], meta, self.depth_range, sparse_depth=sparse)
        if self.kb_crop:
            sample = apply_kb_crop(sample)
        return self.transform(sample) if self.transform else sample


def _scan_path(drive_dir: Path, frame: int) -> Path:
    return drive_dir / "velodyne_points" / "data" / f"{frame:010d}.bin"


def _beam_choices(lidar_beams: int | list[int] | None) -> list[int]:
    """`lidar_beams` as a list of ring counts (empty: no sparse depth), each checked by `keep_beams`."""
    if lidar_beams is None:
        return []
    choices = [lidar_beams] if isinstance(lidar_beams, int) else list(lidar_beams)
    if not choices:
        raise UserError("data.lidar_beams: an empty list; give a ring count (64, 32, 16) or null")
    for beams in choices:
        keep_beams(np.zeros((0, 3), np.float32), beams)  # validates
    return choices
