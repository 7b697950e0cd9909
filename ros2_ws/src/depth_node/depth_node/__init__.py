"""depth_node: a ROS 2 node publishing dense metric depth and point clouds from an exported depthkd model.

Everything except node.py is ROS-free and torch-free (numpy, OpenCV, ONNX Runtime).
"""
