"""ament_python build of depth_node for `colcon build` on a real ROS 2 install (Jazzy/Kilted)."""

from glob import glob

from setuptools import setup

package_name = "depth_node"

setup(
    name=package_name,
    version="0.1.0",
    packages=[package_name],
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        # launch/ and config/ are links to the repository's top-level folders, so there is one copy of each.
        ("share/" + package_name + "/launch", sorted(glob("launch/*.launch.py"))),
        ("share/" + package_name + "/config", ["config/kitti.yaml"]),
    ],
    install_requires=["setuptools", "numpy", "opencv-python-headless", "onnxruntime", "rosbags", "tqdm", "pyyaml"],
    zip_safe=True,
    maintainer="depthkd maintainers",
    maintainer_email="maintainers@depthkd.invalid",
    description="Dense metric depth and point clouds from a camera with an exported depthkd model",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "depth_node = depth_node.node:main",
            "depth_node_bag = depth_node.bag:main",
        ],
    },
)
