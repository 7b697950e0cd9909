"""Time the message-building paths of the depth node at KITTI size (375x1242).

Run: python benchmarks/cloud_packing.py [--runs 30] [--stride 1]
Prints median milliseconds of backproject + make_pointcloud2 with and without colour (target: whole cloud overhead
<= ~8 ms), of the node's path (back-projecting straight into the message buffer), next to the obvious
`PointCloud2(data=payload_bytes)`, whose constructor copies the payload into fresh memory once more, and of
depth_to_image_msg (32FC1).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from depth_node.codec import depth_to_image_msg, empty_cloud, make_pointcloud2, pack_cloud
from depth_node.geometry import backproject

KITTI_P = np.array([[721.5377, 0.0, 609.5593, 0.0], [0.0, 721.5377, 172.854, 0.0], [0.0, 0.0, 1.0, 0.0]])


def _median_ms(function, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _obvious_cloud(header, points: np.ndarray, rgb: np.ndarray | None):
    from sensor_msgs.msg import PointCloud2, PointField

    packed = pack_cloud(points, rgb)
    return PointCloud2(
        header=header,
        height=points.shape[0],
        width=points.shape[1],
        fields=[PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in packed.fields],
        point_step=packed.point_step,
        row_step=packed.point_step * points.shape[1],
        data=packed.payload.tobytes(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--stride", type=int, default=1, help="points_stride: keep every n-th row and column")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=1242)
    args = parser.parse_args()
    from std_msgs.msg import Header

    rng = np.random.default_rng(0)
    depth = rng.uniform(1.0, 80.0, (args.height, args.width)).astype(np.float32)
    depth[rng.random(depth.shape) < 0.1] = np.nan
    rgb = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)[:: args.stride, :: args.stride]
    header = Header(frame_id="camera_color_left")
    points = backproject(depth, KITTI_P, args.stride)
    shape = f"{points.shape[0]}x{points.shape[1]}"
    backproject_ms = _median_ms(lambda: backproject(depth, KITTI_P, args.stride), args.runs)
    print(f"backproject {shape}: {backproject_ms:.2f} ms")
    # The obvious path runs last: its fresh 7.5 MB buffers change the allocator's state for whatever follows.
    for name, colour in (("xyz", None), ("xyz+rgb", rgb)):
        pack_ms = _median_ms(lambda colour=colour: make_pointcloud2(header, points, colour), args.runs)
        size_mb = len(make_pointcloud2(header, points, colour).data) / 1e6
        print(
            f"make_pointcloud2 {name} {shape} ({size_mb:.1f} MB): {pack_ms:.2f} ms, "
            f"total with backproject {backproject_ms + pack_ms:.2f} ms"
        )
    height, width = points.shape[:2]

    def in_place() -> None:  # what the node does: back-project straight into the message buffer
        cloud = empty_cloud(height, width)
        backproject(depth, KITTI_P, args.stride, out=cloud.points)
        make_pointcloud2(header, cloud)

    print(f"node path xyz {shape} (empty_cloud + backproject(out=) + make_pointcloud2): "
          f"{_median_ms(in_place, args.runs):.2f} ms")  # fmt: skip
    depth_ms = _median_ms(lambda: depth_to_image_msg(depth, header), args.runs)
    print(f"depth_to_image_msg 32FC1 {args.height}x{args.width}: {depth_ms:.2f} ms")
    for name, colour in (("xyz", None), ("xyz+rgb", rgb)):
        obvious_ms = _median_ms(lambda colour=colour: _obvious_cloud(header, points, colour), args.runs)
        print(f"for comparison, PointCloud2(data=payload_bytes) {name}: {obvious_ms:.2f} ms")


if __name__ == "__main__":
    main()
