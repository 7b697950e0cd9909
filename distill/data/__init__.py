"""Datasets in the formats our users have (KITTI raw, NYU, rosbags) and the synthetic KITTI-like world.

Every dataset returns samples as dicts:
    image: (3, H, W) float32 RGB in [0, 1]
    depth: (1, H, W) float32 metres, 0 = invalid (no label)
    valid: (1, H, W) bool, depth > 0 and finite
    K:     (3, 3) float32 pinhole intrinsics of the returned image, pixels
    meta:  dict of str -> str/int/float (at least "name": a unique frame id)
"""
