"""The node's parameters, declared once: name -> (default, description). ROS-free so the bag tool shares them.

README's parameter table mirrors this dict.
"""

PARAMETERS: dict[str, tuple[object, str]] = {
    "model": ("", "path to the exported model (.onnx, or a TensorRT .engine)"),
    "backend": ("auto", "auto | onnxruntime | tensorrt (auto: TensorRT > ORT-CUDA > ORT-CPU)"),
    "device": (0, "CUDA device index for GPU backends"),
    "threads": (0, "CPU inference threads (0: ONNX Runtime default)"),
    "image_transport": ("raw", "raw (subscribe `image`) | compressed (subscribe `image/compressed`)"),
    "publish_points": (True, "publish the organised point cloud on `points`"),
    "points_stride": (1, "keep every n-th row/column in `points`"),
    "colorize_points": (False, "add PCL-packed rgb to `points`"),
    "min_depth": (0.0, "metres; closer is published as -Inf (0: the model's minimum)"),
    "max_depth": (0.0, "metres; farther is published as +Inf (0: the model's maximum)"),
    "use_lidar": (False, "subscribe `lidar` (PointCloud2) for metric alignment/completion"),
    "lidar_to_camera": ([float(i % 5 == 0) for i in range(16)], "4x4 row-major LiDAR->camera (default identity)"),
    "lidar_max_dt": (0.05, "seconds; max stamp difference when pairing a cloud with an image"),
    "lazy": (True, "skip inference while nobody subscribes to any output"),
    "sub_reliability": ("best_effort", "input QoS reliability: best_effort | reliable"),
    "sub_depth": (1, "input QoS queue depth (keep last)"),
    "pub_reliability": ("reliable", "output QoS reliability: reliable | best_effort"),
    "pub_depth": (2, "output QoS queue depth (keep last)"),
    "diagnostics_period": (1.0, "seconds between `diagnostics` messages"),
}
