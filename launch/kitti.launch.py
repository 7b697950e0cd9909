"""`ros2 launch depth_node kitti.launch.py model:=/path/model.onnx [use_lidar:=true]`

Runs depth_node on the kitti2bag topics with config/kitti.yaml and publishes /depth, /depth/camera_info, /points.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

CAMERA = "/kitti/camera_color_left"


def generate_launch_description() -> LaunchDescription:
    params_file = os.path.join(get_package_share_directory("depth_node"), "config", "kitti.yaml")
    model = LaunchConfiguration("model")
    use_lidar = LaunchConfiguration("use_lidar")
    return LaunchDescription(
        [
            DeclareLaunchArgument("model", description="exported depthkd model (.onnx or .engine)"),
            DeclareLaunchArgument("use_lidar", default_value="false", description="align depth to the Velodyne"),
            Node(
                package="depth_node",
                executable="depth_node",
                name="depth_node",
                output="screen",
                parameters=[params_file, {"model": model, "use_lidar": use_lidar}],
                remappings=[
                    ("image", f"{CAMERA}/image_raw"),
                    ("image/compressed", f"{CAMERA}/image_raw/compressed"),
                    ("camera_info", f"{CAMERA}/camera_info"),
                    ("lidar", "/kitti/velo/pointcloud"),
                    ("depth", "/depth"),
                    ("depth/relative", "/depth/relative"),
                    ("depth/camera_info", "/depth/camera_info"),
                    ("depth/confidence", "/depth/confidence"),
                    ("points", "/points"),
                ],
            ),
        ]
    )
