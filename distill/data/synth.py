"""`distill synth`: render the procedural KITTI-like world to disk in KITTI's own layouts, plus rosbag2 recordings.

OUT/
  kitti_raw/<date>/calib_cam_to_cam.txt, calib_velo_to_cam.txt, calib_imu_to_velo.txt (the IMU is at the Velodyne)
  kitti_raw/<date>/<date>_drive_NNNN_sync/image_02/data/%010d.png          RGB, rectified camera 2
  kitti_raw/<date>/<date>_drive_NNNN_sync/image_02/timestamps.txt
  kitti_raw/<date>/<date>_drive_NNNN_sync/velodyne_points/data/%010d.bin  (N, 4) float32 x, y, z, reflectance
  kitti_raw/<date>/<date>_drive_NNNN_sync/velodyne_points/timestamps{,_start,_end}.txt
  kitti_raw/<date>/<date>_drive_NNNN_sync/oxts/data/%010d.txt, timestamps.txt, dataformat.txt
                                                     the ego poses as KITTI OXTS packets (distill.data.oxts)
  data_depth_annotated/{train,val}/<date>_drive_NNNN_sync/proj_depth/groundtruth/image_02/%010d.png
                                                     dense uint16, metres * 256, 0 = invalid (sky, beyond 255 m)
  splits/{train,val,test}.txt                        Eigen format, one drive never appears in two splits
  bags/<date>_drive_NNNN/                            rosbag2 (mcap or sqlite3) with the kitti2bag topics and
                                                     /tf odom -> base_link per frame

The ground-truth depth is z along the optical axis of rectified camera 2 at each pixel centre, from the same ray
cast as the image; the scan is cast in the same world at the same instant, so projecting it with the calib files
(the KITTI raw devkit projection) lands on the ground truth. Same arguments, same bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from distill.data.oxts import OXTS_FIELDS, oxts_from_poses, oxts_line
from distill.data.synth_bag import DriveBag
from distill.data.synth_calib import Rig, cam_to_cam_text, make_rig, velo_to_cam_text
from distill.data.synth_raycast import cast
from distill.data.synth_sensors import camera_grid, camera_rays, lidar_grid
from distill.data.synth_shade import lidar_points, render_image
from distill.data.world import FRAME_PERIOD, STYLES, Street, build_street
from distill.errors import UserError

BAGS = ("mcap", "sqlite3", "none")
MIN_SIZE, MAX_SIZE = (32, 64), (2048, 4096)  # (height, width) pixels
FRAMES_PER_DRIVE = 40
SPLIT_SHARES = {"val": 0.15, "test": 0.15}
GT_FOLDER = {"train": "train", "val": "val", "test": "val"}  # KITTI's depth benchmark has no test labels folder
MAX_DEPTH = 255.0  # metres; farther is invalid (uint16 / 256 ends at 255.996 m)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class Drive:
    """One drive: number (NNNN), split (train/val/test) and frame count."""

    number: int
    split: str
    frames: int


def plan_drives(frames: int) -> list[Drive]:
    """Split `frames` into drives: ~70/15/15 % train/val/test by drive, at least one frame per split.

    With fewer than 3 frames there is one drive and every split lists it.
    """
    if frames < 3:
        return [Drive(1, "train", frames)]
    shares = {split: max(1, round(frames * share)) for split, share in SPLIT_SHARES.items()}
    counts = {"train": frames - sum(shares.values()), **shares}
    drives: list[Drive] = []
    for split, count in counts.items():
        pieces = -(-count // FRAMES_PER_DRIVE)
        for piece in range(pieces):
            drives.append(Drive(len(drives) + 1, split, count // pieces + (piece < count % pieces)))
    return drives


def check_arguments(out: Path, frames: int, seed: int, domain: str, size: tuple[int, int], bag: str) -> None:
    """Raise UserError for anything a user can get wrong, before any work is done."""
    check_part(frames, seed, domain)
    check_output(out, size, bag)


def check_part(frames: int, seed: int, domain: str) -> None:
    """Raise UserError for a bad frame count, seed or domain."""
    if not isinstance(frames, int) or frames < 1:
        raise UserError(f"--frames must be a whole number >= 1, got {frames!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed must be a whole number >= 0, got {seed!r}")
    if domain not in STYLES:
        raise UserError(f"unknown --domain {domain!r}; choose one of {', '.join(STYLES)}")


def check_output(out: Path, size: tuple[int, int], bag: str) -> None:
    """Raise UserError for a bad bag storage, image size or output folder (created when missing)."""
    if bag not in BAGS:
        raise UserError(f"unknown --bag {bag!r}; choose one of {', '.join(BAGS)}")
    height, width = size
    if not (MIN_SIZE[0] <= height <= MAX_SIZE[0] and MIN_SIZE[1] <= width <= MAX_SIZE[1]):
        raise UserError(
            f"--size {height}x{width} is out of range; height {MIN_SIZE[0]}-{MAX_SIZE[0]}, "
            f"width {MIN_SIZE[1]}-{MAX_SIZE[1]} pixels (KITTI: 375x1242)"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty; remove it or choose a new one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {out}: {error.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable")


def timestamp_text(stamp_ns: int) -> str:
    """KITTI's timestamp format, e.g. "2011-09-26 13:02:25.964389445" (UTC)."""
    seconds, nanoseconds = divmod(stamp_ns, 10**9)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + f".{nanoseconds:09d}"


def drive_start_ns(date: str, number: int) -> int:
    """Stamp of a drive's first frame: drives of a day start an hour apart from 10:00 UTC."""
    day = datetime.strptime(date, "%Y_%m_%d").replace(tzinfo=timezone.utc)
    return (int(day.timestamp()) + 10 * 3600 + (number - 1) * 3600) * 10**9


def encode_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) float32 metres (0 = none) -> KITTI depth PNG values: uint16 metres * 256, 0 = invalid (> 255 m)."""
    code = np.rint(depth.astype(np.float64) * 256)
    return np.where((depth > 0) & (depth <= MAX_DEPTH), code, 0).astype(np.uint16)


def render_frame(
    street: Street, rig: Rig, rays: np.ndarray, time: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 RGB, depth (H, W) float32 metres (0 = sky) and scan (N, 4) float32 at `time` seconds."""
    position, yaw = street.ego.pose(time)
    # Work relative to the ego car so float32 keeps millimetres however far the drive goes.
    origin = np.array([position[0], position[1], 0.0])
    scene = street.scene.at(time, origin)
    camera = camera_grid(rig, rays, position - origin, yaw)
    hits = cast(scene, camera)
    image = render_image(street, scene, camera, hits, rng)
    depth = np.where(hits.prim >= 0, hits.t, np.float32(0.0))
    lidar = lidar_grid(position - origin, yaw)
    return image, depth, lidar_points(street, scene, lidar, cast(scene, lidar), rng)


def write_world(
    out: Path, frames: int, seed: int, domain: str = "kitti", size: tuple[int, int] = (375, 1242), bag: str = "mcap"
) -> None:
    """Render `frames` frames of the synthetic world into `out` (see the module docstring for the layout).

    Args:
        out: new or empty output folder.
        frames: total frames, split over drives ~70/15/15 % train/val/test.
        seed: any whole number >= 0; the same arguments give byte-identical files.
        domain: "kitti" (KITTI-like look and rig) or "shifted" (other palette, light, camera height/pitch/focal).
        size: image (height, width) in pixels; intrinsics scale with it.
        bag: rosbag2 storage per drive, "mcap", "sqlite3" or "none".
    """
    write_corpus(out, [(domain, frames, seed)], size, bag)


def write_corpus(
    out: Path, parts: Sequence[tuple[str, int, int]], size: tuple[int, int] = (375, 1242), bag: str = "none"
) -> None:
    """Render several domains into one world folder: each (domain, frames, seed) as `write_world` would, its drives
    under its style's own recording day, and one set of split files listing them all (a multi-domain corpus).

    Args:
        out: new or empty output folder.
        parts: (domain, frames, seed) per domain; each domain at most once (drives are named by the style's date).
        size: image (height, width) in pixels; intrinsics scale with it and with each style's focal length.
        bag: rosbag2 storage per drive, "mcap", "sqlite3" or "none".
    """
    domains = [domain for domain, _, _ in parts]
    if not parts or len(set(domains)) < len(domains):
        raise UserError(f"a corpus needs each domain at most once, got {domains}")
    for domain, frames, seed in parts:
        check_part(frames, seed, domain)
    check_output(out, size, bag)
    out = Path(out)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    try:
        for domain, frames, seed in parts:
            _write_domain(out, frames, seed, domain, size, bag, splits)
        (out / "splits").mkdir()
        for split, lines in splits.items():
            (out / "splits" / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines))
    except OSError as error:  # disk full, folder removed under us, ...
        raise UserError(f"cannot write the synthetic world into {out}: {error}") from None


def _write_domain(out: Path, frames: int, seed: int, domain: str, size, bag: str, splits: dict[str, list]) -> None:
    """Render one domain's drives into `out`, adding their split-file lines to `splits`."""
    style = STYLES[domain]
    rig = make_rig(size, style.date, style.focal_scale, style.pitch_deg, style.camera_raise, style.velo_height)
    rays = camera_rays(rig)
    drives = plan_drives(frames)
    write_calib(out / "kitti_raw" / style.date, rig)
    with tqdm(total=frames, desc=f"synth {domain}", unit="frame") as progress:
        for drive in drives:
            entropy = [seed, list(STYLES).index(domain), drive.number]
            lines = _write_drive(out, rig, rays, style, entropy, drive, bag, progress)
            for split in splits if len(drives) == 1 else [drive.split]:
                splits[split] += lines


def write_calib(folder: Path, rig: Rig) -> None:
    """calib_cam_to_cam.txt and calib_velo_to_cam.txt of the recording day `folder` (created)."""
    folder.mkdir(parents=True)
    year, month, day = rig.date.split("_")
    calib_time = f"{day}-{MONTHS[int(month) - 1]}-{year} 09:00:00"  # KITTI's format, locale-free
    (folder / "calib_cam_to_cam.txt").write_text(cam_to_cam_text(rig, calib_time))
    (folder / "calib_velo_to_cam.txt").write_text(velo_to_cam_text(rig, calib_time))
    # The ego poses are the Velodyne's, so the IMU sits at the Velodyne: identity IMU -> Velodyne.
    (folder / "calib_imu_to_velo.txt").write_text(f"calib_time: {calib_time}\nR: 1 0 0 0 1 0 0 0 1\nT: 0 0 0\n")


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) RGB uint8 or (H, W) uint16 PNG; OpenCV reports failure only by its return value."""
    if not cv2.imwrite(str(path), image[..., ::-1] if image.ndim == 3 else image):
        raise OSError(f"OpenCV could not write {path}")


def _write_drive(out, rig: Rig, rays, style, entropy: list[int], drive: Drive, bag: str, progress) -> list[str]:
    """Render and write one drive; returns its split-file lines."""
    name = f"{style.date}_drive_{drive.number:04d}"
    raw = out / "kitti_raw" / style.date / f"{name}_sync"
    images, scans = raw / "image_02" / "data", raw / "velodyne_points" / "data"
    depths = out / "data_depth_annotated" / GT_FOLDER[drive.split] / f"{name}_sync" / "proj_depth" / "groundtruth"
    for folder in (images, scans, depths / "image_02"):
        folder.mkdir(parents=True)
    street = build_street(style, np.random.default_rng(entropy), drive.frames)
    noise = np.random.default_rng(entropy + [1])
    start = drive_start_ns(style.date, drive.number)
    stamps = [start + frame * round(FRAME_PERIOD * 1e9) for frame in range(drive.frames)]
    poses = np.stack([street.ego.matrix(frame * FRAME_PERIOD) for frame in range(drive.frames)])
    odometry = _odometry(poses, rig.velo_height)
    with DriveBag(out / "bags" / name, bag, rig) if bag != "none" else contextlib.nullcontext() as recorder:
        if recorder:
            recorder.write_static_transform(stamps[0])
        for frame, stamp in enumerate(stamps):
            image, depth, points = render_frame(street, rig, rays, frame * FRAME_PERIOD, noise)
            _write_png(images / f"{frame:010d}.png", image)
            _write_png(depths / "image_02" / f"{frame:010d}.png", encode_depth(depth))
            points.tofile(scans / f"{frame:010d}.bin")
            if recorder:
                recorder.write_odometry(stamp, odometry[frame])
                recorder.write_frame(stamp, image, points)
            progress.update()
    _write_timestamps(raw, stamps)
    _write_oxts(raw / "oxts", poses, stamps)
    return [f"{style.date}/{name}_sync {frame} l" for frame in range(drive.frames)]


def _write_timestamps(raw: Path, stamps: list[int]) -> None:
    """KITTI's timestamp files: camera exposures, and Velodyne sweeps centred on them (start/end half a turn off)."""
    half_turn = round(FRAME_PERIOD * 1e9 / 2)

    def write(path: Path, offset: int) -> None:
        path.write_text("".join(f"{timestamp_text(stamp + offset)}\n" for stamp in stamps))

    write(raw / "image_02" / "timestamps.txt", 0)
    write(raw / "velodyne_points" / "timestamps.txt", 0)
    write(raw / "velodyne_points" / "timestamps_start.txt", -half_turn)
    write(raw / "velodyne_points" / "timestamps_end.txt", half_turn)


def _odometry(velo_poses: np.ndarray, velo_height: float) -> np.ndarray:
    """(N, 4, 4) odom -> base_link of (N, 4, 4) Velodyne poses in the world: base_link is on the road under the
    Velodyne and odom is base_link at the first frame."""
    base_in_velo = np.eye(4)
    base_in_velo[2, 3] = -velo_height
    base = velo_poses @ base_in_velo
    return np.linalg.inv(base[0]) @ base


def _write_oxts(folder: Path, poses: np.ndarray, stamps: list[int]) -> None:
    """KITTI's oxts folder of a drive: one packet per frame (`distill.data.oxts`), its timestamps and dataformat."""
    (folder / "data").mkdir(parents=True)
    packets = oxts_from_poses(poses, (np.array(stamps) - stamps[0]) / 1e9)
    for frame, packet in enumerate(packets):
        (folder / "data" / f"{frame:010d}.txt").write_text(oxts_line(packet))
    (folder / "timestamps.txt").write_text("".join(f"{timestamp_text(stamp)}\n" for stamp in stamps))
    (folder / "dataformat.txt").write_text("".join(f"{name}\n" for name in OXTS_FIELDS))
