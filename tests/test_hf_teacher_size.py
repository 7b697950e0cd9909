"""HF teachers (distill/models/teachers/hf.py) run at their image processor's size by default, at the training
size with `size=train`, and give depth and features for the input they were handed."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from test_external_teachers import external, save_depth_anything
from transformers.models.dpt.image_processing_dpt import get_resize_output_image_size


def test_hf_teacher_runs_at_its_processor_size_and_resizes_back(tmp_path):
    folder = save_depth_anything(tmp_path / "da", "relative", processor=True)
    processor = transformers.DPTImageProcessor.from_pretrained(folder)
    teacher = external(f"hf:{folder}")
    for height, width in [(352, 1216), (128, 416), (480, 640), (1000, 300)]:
        expected = get_resize_output_image_size(torch.zeros(3, height, width), (518, 518), True, 14)
        assert teacher.internal_size(height, width) == (expected.height, expected.width)
    processed = processor(images=np.zeros((352, 1216, 3), dtype=np.uint8), return_tensors="pt")
    assert tuple(processed["pixel_values"].shape[-2:]) == (518, 1792)  # what transformers itself feeds the model
    small = save_depth_anything(tmp_path / "da_small", "relative")
    transformers.DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True,
                                   ensure_multiple_of=14).save_pretrained(small)  # fmt: skip
    seen = []
    for spec, runs_at, grid in ((f"hf:{small}", (42, 56), (3, 4)), (f"hf:{small}?size=train", (28, 42), (2, 3))):
        teacher = external(spec)
        teacher.model.register_forward_pre_hook(lambda module, args, kw: seen.append(kw["pixel_values"].shape[-2:]),
                                                with_kwargs=True)  # fmt: skip
        with torch.no_grad():
            out = teacher(torch.randn(1, 3, 30, 44))
        # processor: width 44 -> 56 (its scale 1.27 is the closer to 1), height 30 * 1.27 -> 42; train: nearest 14s
        assert tuple(seen[-1]) == runs_at
        assert out.depth.shape == (1, 1, 30, 44) and [tuple(f.shape[-2:]) for f in out.features] == [grid] * 4
