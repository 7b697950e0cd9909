"""`ros2 launch depth_node kitti.launch.py model:=/path/model.onnx [use_lidar:=true]`

Runs depth_node on the kitti2bag topics with the installed config/kitti.yaml and publishes its outputs
(depth_node.topics.OUTPUTS) under absolute names: /depth, /depth/camera_info, /points, ...
Without `launch` (PyPI ROS 2) the same is:
`depth_node --ros-args --params-file config/kitti.yaml -p model:=M -r image:=/kitti/camera_color_left/image_raw ...`
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from depth_node.topics import kitti_remappings

REMAPPINGS = kitti_remappings()  # every input on its kitti2bag topic, every output on /<name>


def generate_launch_description() -> LaunchDescription:
    params_file = os.path.join(get_package_share_directory("depth_node"), "config", "kitti.yaml")
    # Typed, so a launch argument is never re-read as YAML (a model path "2024" would become an integer).
    model = ParameterValue(LaunchConfiguration("model"), value_type=str)
    use_lidar = ParameterValue(LaunchConfiguration("use_lidar"), value_type=bool)
    return LaunchDescription(
        [
            DeclareLaunchArgument("model", description="exported depthkd model (.onnx or TensorRT .engine)"),
            DeclareLaunchArgument("use_lidar", default_value="false", description="align depth to the Velodyne"),
            Node(
                package="depth_node",
                executable="depth_node",
                name="depth_node",
                output="screen",
                parameters=[params_file, {"model": model, "use_lidar": use_lidar}],
                remappings=REMAPPINGS,
            ),
        ]
    )
