"""depth_node.memory: large per-frame buffers stop costing fresh pages once the glibc thresholds are raised."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# A frame's worth of buffers the way the receive path uses them: four 1.4 MB (a KITTI rgb8 image) allocations live
# at once, written, then freed. Counted in a fresh process, since the thresholds are process-wide.
ALLOCATE_FRAMES = """
import ctypes, json, resource, sys
from depth_node.memory import reuse_large_buffers
tuned = reuse_large_buffers() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
frames, size = 20, 1_400_000
def frame():
    buffers = [libc.malloc(size) for _ in range(4)]
    for buffer in buffers:
        ctypes.memset(buffer, 1, size)
    for buffer in buffers:
        libc.free(buffer)
frame()  # the first frame faults its pages in either way
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(frames):
    frame()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / frames
print(json.dumps({"tuned": tuned, "faults_per_frame": faults}))
"""


def faults_per_frame(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", ALLOCATE_FRAMES, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are a glibc feature")
def test_raised_thresholds_reuse_the_heap_instead_of_faulting_fresh_pages_every_frame():
    default, tuned = faults_per_frame("default"), faults_per_frame("tuned")
    pages_per_frame = 4 * 1_400_000 / 4096
    print(f"minor page faults per frame: glibc defaults {default['faults_per_frame']:.0f}, tuned "
          f"{tuned['faults_per_frame']:.0f} ({pages_per_frame:.0f} pages written)")  # fmt: skip
    assert tuned["tuned"] is True
    assert default["faults_per_frame"] > 0.5 * pages_per_frame  # the default gives the pages back every frame
    assert tuned["faults_per_frame"] < 0.05 * pages_per_frame  # tuned: the same heap pages, reused
