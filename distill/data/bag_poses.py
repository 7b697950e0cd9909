"""Vehicle and camera poses from a bag's /tf (odometry, e.g. odom -> base_link) and /tf_static, read with `rosbags`.

ROS convention (REP 105): a TransformStamped with header.frame_id = parent, child_frame_id = child is the pose of the
child in the parent, i.e. it maps child coordinates into the parent frame; stamps are header stamps in nanoseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from depth_node.codec import transform_to_matrix
from depth_node.geometry import lookup_transform
from distill.data.rosbag import TF_STATIC, _frame, _open, _stamp
from distill.errors import UserError

TF = "/tf"


def read_transforms(path: Path) -> tuple[dict[tuple[str, str], list[tuple[int, np.ndarray]]], dict]:
    """Every transform of a bag.

    Returns:
        dynamic: (parent, child) -> [(stamp ns, (4, 4) pose of child in parent)] from /tf, in stamp order.
        static: (parent, child) -> (4, 4) from /tf_static (the last one wins).
    """
    reader = _open(Path(path))
    dynamic: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    static: dict[tuple[str, str], np.ndarray] = {}
    try:
        connections = [c for c in reader.connections if c.topic in (TF, TF_STATIC)]
        for connection, log_time, raw in reader.messages(connections=connections):
            message = reader.deserialize(raw, connection.msgtype)
            for item in message.transforms:
                edge = (_frame(item.header.frame_id), _frame(item.child_frame_id))
                pose = transform_to_matrix(item.transform)
                if connection.topic == TF_STATIC:
                    static[edge] = pose
                else:
                    dynamic.setdefault(edge, []).append((_stamp(item.header, log_time), pose))
    finally:
        reader.close()
    return {edge: sorted(items, key=lambda item: item[0]) for edge, items in dynamic.items()}, static


def read_odometry(path: Path, parent: str = "odom", child: str = "base_link") -> tuple[np.ndarray, np.ndarray]:
    """The odometry of a bag: (N,) int64 stamps (ns) and (N, 4, 4) float64 poses of `child` in `parent` on /tf.

    Raises:
        UserError: the bag has no /tf transform from `parent` to `child` (the message names those it has).
    """
    dynamic, _ = read_transforms(path)
    if (parent, child) not in dynamic:
        found = ", ".join(f"{p} -> {c}" for p, c in sorted(dynamic)) or "none"
        raise UserError(f"rosbag {path}: no /tf transform {parent} -> {child} (found: {found})")
    items = dynamic[(parent, child)]
    return np.array([stamp for stamp, _ in items], np.int64), np.stack([pose for _, pose in items])


def camera_poses(
    path: Path, camera_frame: str, parent: str = "odom", child: str = "base_link"
) -> tuple[np.ndarray, np.ndarray]:
    """Poses of the camera in the odometry frame: (N,) stamps (ns) and (N, 4, 4) T_odom_camera, the /tf odometry
    composed with the static chain child -> camera_frame from /tf_static.

    Raises:
        UserError: no odometry, or /tf_static does not connect `child` to `camera_frame`.
    """
    stamps, odometry = read_odometry(path, parent, child)
    _, static = read_transforms(path)
    mount = lookup_transform(static, child, camera_frame)
    if mount is None:
        raise UserError(f"rosbag {path}: /tf_static has no transform chain from {child!r} to {camera_frame!r}")
    return stamps, odometry @ mount
