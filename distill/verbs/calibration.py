"""Calibration images for INT8 (TensorRT engines and ONNX Runtime QDQ models) and the export's parity check.

A calibration source is a folder of images, a rosbag (its camera images) or a dataset config YAML (its `data`
section, train split); `calibration_batches` preprocesses them exactly as the runtime (`depth_node.engine`) does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from depth_node.engine import plan_input, preprocess
from depth_node.metadata import ModelMetadata
from distill.errors import UserError

CALIB_MAX_IMAGES = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
BAG_SUFFIXES = (".mcap", ".db3", ".bag")


def calibration_images(source: str | Path) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB images from a folder (recursive; 16-bit and grey images skipped), a rosbag (its camera
    images), or a dataset config YAML (its `data` section, train split). Raises UserError when there is none."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"calibration data not found: {source}")
    if source.suffix.lower() in BAG_SUFFIXES or (source / "metadata.yaml").is_file():
        yield from _dataset_images({"kind": "bag", "bags": [str(source)], "lidar_topic": None}, source)
    elif source.suffix.lower() in (".yaml", ".yml"):
        import yaml

        config = yaml.safe_load(source.read_text()) or {}
        yield from _dataset_images(config.get("data", config), source)
    else:
        yield from _folder_images(source)


def _folder_images(folder: Path) -> Iterator[np.ndarray]:
    import cv2

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    found = 0
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        # Depth maps (16-bit) and grey cameras would skew the activation ranges of an RGB model.
        if image is not None and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            found += 1
            yield cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if not found:
        raise UserError(f"{folder}: no 8-bit colour images ({', '.join(IMAGE_SUFFIXES)}) for calibration")


def _dataset_images(data_config: dict, source: Path) -> Iterator[np.ndarray]:
    from distill.config import load_data_config
    from distill.data import build_dataset

    dataset = build_dataset(load_data_config(data_config), split="train", augment=False)
    if len(dataset) == 0:
        raise UserError(f"{source}: the dataset has no frames for calibration")
    for index in range(len(dataset)):
        image = dataset[index]["image"].numpy().transpose(1, 2, 0)  # (3, H, W) [0, 1] -> (H, W, 3)
        yield np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def calibration_batches(
    images: Iterable[np.ndarray], metadata: ModelMetadata, input_size: tuple[int, int], batch_size: int, limit: int
) -> Iterator[np.ndarray]:
    """Normalised (batch_size, 3, H, W) float32 batches, preprocessed exactly as the runtime does (stretch resize).

    At most `limit` images are used; a last incomplete batch is dropped (TensorRT wants full batches).
    """
    pending: list[np.ndarray] = []
    for image, _ in zip(images, range(limit)):
        geometry = plan_input(image.shape[:2], input_size, "stretch")
        pending.append(preprocess(image, geometry, metadata.mean, metadata.std)[0])
        if len(pending) == batch_size:
            yield np.ascontiguousarray(np.stack(pending))
            pending = []
