"""`data.kind: nyu`: NYU Depth v2 exports (distill/data/nyu.py); no keys beyond the common ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from distill.data.registry import DataConfig, Transform, register_dataset
from distill.errors import UserError

if TYPE_CHECKING:
    from distill.data.nyu import NyuDataset


class NyuConfig(DataConfig):
    """`root`: the export's folder; `split` picks its `<split>` sub-folder where there is one."""

    kind: Literal["nyu"]


@register_dataset(NyuConfig, depth_range=(1e-3, 10.0), eval_crop="nyu")
def build_nyu(data: NyuConfig, split: str, transform: Transform | None) -> NyuDataset:
    from distill.data.nyu import NyuDataset

    if not data.root:
        raise UserError("data.root is required for kind 'nyu'")
    return NyuDataset(data.root, split=split, depth_range=(data.min_depth, data.max_depth), transform=transform)
