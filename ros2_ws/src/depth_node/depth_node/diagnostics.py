"""The node's `diagnostics` (diagnostic_msgs/DiagnosticStatus) from its frame counters, per-stage timings and the
last LiDAR alignment. Message building only: no rclpy.
"""

from __future__ import annotations

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from depth_node.alignment import Alignment

HARDWARE_ID = "depth_node"


def pipeline_status(counters: dict[str, int], stages: list[dict[str, float]]) -> DiagnosticStatus:
    """Frame counters and the median of each stage over the given frames.

    Args:
        counters: name -> count (frames_in, frames_out, dropped, bad_input, failed, no_camera_info, idle).
        stages: per frame, stage name -> milliseconds (the node's last frames).

    Returns:
        WARN while no frame came out for want of camera_info, or when frames fail to process; OK otherwise.
        Values: `<stage>_ms_p50` (two decimals) and every counter.
    """
    status = DiagnosticStatus(level=DiagnosticStatus.OK, name="depth_node: pipeline", hardware_id=HARDWARE_ID)
    status.message = f"{counters['frames_out']} frames out, {counters['dropped']} dropped"
    if counters["no_camera_info"] and not counters["frames_out"]:
        status.level, status.message = DiagnosticStatus.WARN, "no camera_info received"
    elif counters["failed"]:
        status.level = DiagnosticStatus.WARN
        status.message += f", {counters['failed']} failed to process (see the log)"
    names = sorted({name for frame in stages for name in frame})
    values = {f"{name}_ms_p50": np.median([f[name] for f in stages if name in f]) for name in names}
    values = {key: f"{value:.2f}" for key, value in values.items()} | {k: str(v) for k, v in counters.items()}
    status.values = [KeyValue(key=key, value=value) for key, value in values.items()]
    return status


def alignment_status(alignment: Alignment) -> DiagnosticStatus:
    """A frame's LiDAR alignment: scale, shift, residual (m), inliers / points; WARN when it failed."""
    level = DiagnosticStatus.OK if alignment.ok else DiagnosticStatus.WARN
    status = DiagnosticStatus(level=level, name="depth_node: lidar alignment", hardware_id=HARDWARE_ID)
    status.message = alignment.reason
    values = {
        "ok": alignment.ok,
        "from_prior": alignment.from_prior,
        "space": alignment.space,
        "scale": f"{alignment.scale:.6g}",
        "shift": f"{alignment.shift:.6g}",
        "residual_m": f"{alignment.residual:.4g}",
        "inliers": alignment.inliers,
        "points": alignment.points,
    }
    status.values = [KeyValue(key=key, value=str(value)) for key, value in values.items()]
    return status
