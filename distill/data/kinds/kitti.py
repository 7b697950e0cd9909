"""`data.kind: kitti`: KITTI raw with Eigen split files (distill/data/kitti.py), also the `distill synth` layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from distill.data.registry import DataConfig, Transform, register_dataset
from distill.errors import UserError

if TYPE_CHECKING:
    from distill.data.kitti import KittiDataset

log = logging.getLogger(__name__)

Beams = Literal[64, 32, 16, 8, 4]


class KittiConfig(DataConfig):
    """KITTI's keys. Below `root` by default: raw data in `root/kitti_raw`, annotated depth in
    `root/data_depth_annotated`, split files `root/splits/{train,val,test}.txt`; without a split file (and no
    `split_dir`) every image_02 frame under the raw folder is used, with a warning.

    Attributes:
        raw_root: raw data folder when it is not `root/kitti_raw`.
        gt_root: depth annotations folder when it is not `root/data_depth_annotated`.
        split_dir: folder of the split files when it is not `root/splits`.
        gt: "annotated" (official `proj_depth/groundtruth` PNGs; frames without one are skipped) or "velodyne"
            (the raw scan projected with the calib files).
        kb_crop: crop 352x1216 bottom-centred (KB/BTS convention) before resizing.
        lidar_beams: add `sparse_depth`, the Velodyne scan thinned to this many rings (a list: one drawn per
            sample; see `distill.data.kitti.keep_beams`); None: no sparse depth.
        labelled_split: name of a split file (beside the others) listing the training frames that keep their ground
            truth; the other frames of `train_split` come unlabelled (no depth: `valid` all False), as a few labelled
            frames among many unlabelled robot-log frames. Validation and test splits keep every label. None: every
            frame keeps its labels.
    """

    kind: Literal["kitti"]
    raw_root: Path | None = None
    gt_root: Path | None = None
    split_dir: Path | None = None
    gt: Literal["annotated", "velodyne"] = "annotated"
    kb_crop: bool = False
    lidar_beams: Beams | list[Beams] | None = None
    labelled_split: str | None = None


@register_dataset(KittiConfig, depth_range=(1e-3, 80.0), eval_crop="garg")
def build_kitti(data: KittiConfig, split: str, transform: Transform | None) -> KittiDataset:
    from distill.data.kitti import KittiDataset

    if not data.root:
        raise UserError("data.root is required for kind 'kitti'")
    raw_root = data.raw_root or data.root / "kitti_raw"
    split_dir = data.split_dir or data.root / "splits"
    split_file = split_dir / f"{split}.txt"
    if not data.split_dir and not split_file.is_file():
        log.warning("KITTI: no split file %s, using every image_02 frame under %s for %r", split_file, raw_root, split)
        split_file = None
    return KittiDataset(
        raw_root=raw_root,
        split_file=split_file,
        gt=data.gt,
        gt_root=data.gt_root or data.root / "data_depth_annotated",
        kb_crop=data.kb_crop,
        depth_range=(data.min_depth, data.max_depth),
        transform=transform,
        lidar_beams=data.lidar_beams,
        labelled=labelled_frames(data, split_dir, split),
    )


def labelled_frames(data: KittiConfig, split_dir: Path, split: str) -> set[tuple[str, int, int]] | None:
    """The frames of `data.labelled_split` when `split` is the training split, else None (every frame labelled)."""
    from distill.data.kitti import read_split

    if data.labelled_split is None or split != data.train_split:
        return None
    path = split_dir / f"{data.labelled_split}.txt"
    if not path.is_file():
        raise UserError(f"data.labelled_split: no split file {path}")
    return set(read_split(path))
