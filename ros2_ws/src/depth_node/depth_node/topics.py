"""The node's topics, listed once: what it subscribes to, what it publishes, and the KITTI (kitti2bag) topics the
launch file and the bag tool map them to. Plain data: no ROS import, so launch files can read it.

Topic names are relative: launch files remap them, and the bag tool writes each output under "/" + its name.
The README's topic tables are checked against these (tests/test_package.py).
"""

from __future__ import annotations

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
POINT_CLOUD = "sensor_msgs/msg/PointCloud2"
TF_MESSAGE = "tf2_msgs/msg/TFMessage"
ODOMETRY = "nav_msgs/msg/Odometry"

# Subscribed: relative name -> message type.
INPUTS: dict[str, str] = {
    "image": IMAGE,
    "image/compressed": COMPRESSED_IMAGE,
    "camera_info": CAMERA_INFO,
    "lidar": POINT_CLOUD,
    "/tf": TF_MESSAGE,  # with temporal_filter: odometry (absolute, as TF always is)
    "/tf_static": TF_MESSAGE,
    "odom": ODOMETRY,  # with temporal_filter and odometry: odom, instead of /tf
}

# Published per frame, in publishing order: relative name -> message type.
OUTPUTS: dict[str, str] = {
    "depth": IMAGE,  # 32FC1 metres (REP 117 states)
    "depth/relative": IMAGE,  # a relative model's output while no metric alignment is available
    "depth/mono": IMAGE,  # with LiDAR: the model's own output before alignment
    "depth/confidence": IMAGE,  # models with bins
    "depth/camera_info": CAMERA_INFO,  # the published resolution
    "points": POINT_CLOUD,  # organised cloud back-projected from `depth`
}

DIAGNOSTICS = "diagnostics"  # diagnostic_msgs/DiagnosticArray, every diagnostics_period

KITTI_CAMERA = "/kitti/camera_color_left"
# Inputs -> the kitti2bag topics (outputs go to "/" + their name).
KITTI_INPUTS: dict[str, str] = {
    "image": f"{KITTI_CAMERA}/image_raw",
    "image/compressed": f"{KITTI_CAMERA}/image_raw/compressed",
    "camera_info": f"{KITTI_CAMERA}/camera_info",
    "lidar": "/kitti/velo/pointcloud",
}


def kitti_remappings() -> list[tuple[str, str]]:
    """(relative name, absolute topic) for every input and output: the node on the kitti2bag topics."""
    return list(KITTI_INPUTS.items()) + [(name, "/" + name) for name in OUTPUTS]
