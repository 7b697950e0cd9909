"""Where the real sample recordings live: $DEPTHKD_SAMPLE_DATA, else the `shared/data` folder beside the checkout.

The samples are one real KITTI raw frame with its depth-completion annotations, the same frame as a rosbag2 and one
NYU Depth v2 frame. They are not in the repository (KITTI's licence is non-commercial, share-alike); the tests read
them from here, and `make demo` scores its student on the KITTI frame when it is here.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "DEPTHKD_SAMPLE_DATA"
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"

_DRIVE = "2011_09_26_drive_0001_sync"
_RAW = f"kitti_raw_sample/2011_09_26/{_DRIVE}"
_ANNOTATED = f"kitti_raw_sample/data_depth_annotated/train/{_DRIVE}/proj_depth/groundtruth"
_VELODYNE_RAW = f"kitti_raw_sample/data_depth_velodyne/train/{_DRIVE}/proj_depth/velodyne_raw"
_BAG = "kitti_rosbag2_sample/kitti_0001_f5_mcap"

# Every file the tests and the demo read, relative to the sample folder (KITTI raw frame 0000000005).
SAMPLE_FILES = (
    "kitti_raw_sample/2011_09_26/calib_cam_to_cam.txt",
    "kitti_raw_sample/2011_09_26/calib_velo_to_cam.txt",
    f"{_RAW}/image_02/data/0000000005.png",
    f"{_RAW}/image_03/data/0000000005.png",
    f"{_RAW}/velodyne_points/data/0000000005.bin",
    f"{_ANNOTATED}/image_02/0000000005.png",
    f"{_ANNOTATED}/image_03/0000000005.png",
    f"{_VELODYNE_RAW}/image_02/0000000005.png",
    f"{_BAG}/metadata.yaml",
    f"{_BAG}/kitti_0001_f5_mcap.mcap",
    "nyu_sample/images/bookstore_0001d_00001.jpg",
    "nyu_sample/annotations/bookstore_0001d_00001.png",
)


def sample_data_root() -> Path:
    """The sample folder: $DEPTHKD_SAMPLE_DATA when set and not empty, else `shared/data` beside the checkout."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser().resolve() if value else DEFAULT_ROOT


def missing_sample_files(root: Path) -> list[str]:
    """The entries of SAMPLE_FILES that are not files under `root`, in that order."""
    return [name for name in SAMPLE_FILES if not (root / name).is_file()]


def sample_data_problem(root: Path) -> str | None:
    """None when every file of SAMPLE_FILES is under `root`, else one line saying what is missing and how to fix it."""
    missing = missing_sample_files(root)
    if not missing:
        return None
    where = f"missing {', '.join(missing)}" if root.is_dir() else "no such folder"
    return (
        f"real sample data not found at {root} ({where}): set {ENV_VAR} to the folder holding kitti_raw_sample/, "
        f"kitti_rosbag2_sample/ and nyu_sample/ (the {len(SAMPLE_FILES)} files listed in distill/sample_data.py)"
    )
