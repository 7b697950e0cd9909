"""The primitive table of the synthetic world: a ground plane, boxes, vertical cylinders and spheres.

World frame: x along the street, y to the left, z up, metres; the road surface is z = 0. Index 0 of every table is
the ground plane, so a ray's hit index points straight into the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PLANE, BOX, CYLINDER, SPHERE = 0, 1, 2, 3

# Materials: shading and LiDAR reflectance are chosen per material (synth_shade.py).
GROUND, SIDEWALK, BUILDING, PAINT, GLASS, TIRE, METAL, TRUNK, FOLIAGE, SIGN = range(10)
MATERIALS = 10


@dataclass
class Scene:
    """All primitives of a street at one instant.

    kind: (N,) int8 PLANE/BOX/CYLINDER/SPHERE. center: (N, 3) metres (box centre, cylinder base centre, sphere
    centre). size: (N, 3) metres (box half extents; cylinder radius, radius, height; sphere radius x3).
    yaw: (N,) radians about z (boxes). speed: (N,) metres/second along x. material: (N,) int8.
    color: (N, 3) float32 linear albedo. param: (N, 4) float32 texture parameters of the material.
    offset: (3,) metres subtracted from the absolute world coordinates (keeps float32 work near the sensor).
    """

    kind: np.ndarray
    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    speed: np.ndarray
    material: np.ndarray
    color: np.ndarray
    param: np.ndarray
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __len__(self) -> int:
        return len(self.kind)

    def at(self, time: float, offset: np.ndarray) -> Scene:
        """The scene `time` seconds later (moving primitives advanced), coordinates relative to `offset` (3,)."""
        center = self.center - offset
        center[:, 0] += self.speed * time
        fields = {name: getattr(self, name) for name in ("kind", "size", "yaw", "speed", "material", "color", "param")}
        return Scene(center=center, offset=self.offset + offset, **fields)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding boxes (lo, hi), each (N, 3) metres; the ground plane gets an infinite box."""
        c, s = np.abs(np.cos(self.yaw)), np.abs(np.sin(self.yaw))
        half = self.size.copy()
        half[:, 0] = c * self.size[:, 0] + s * self.size[:, 1]
        half[:, 1] = s * self.size[:, 0] + c * self.size[:, 1]
        lo, hi = self.center - half, self.center + half
        cylinder = self.kind == CYLINDER
        lo[cylinder, 2] = self.center[cylinder, 2]
        hi[cylinder, 2] = self.center[cylinder, 2] + self.size[cylinder, 2]
        lo[self.kind == PLANE], hi[self.kind == PLANE] = -np.inf, np.inf
        return lo, hi


class SceneBuilder:
    """Collects primitives in order; `build()` returns the Scene (ground plane first)."""

    def __init__(self, ground_color: np.ndarray):
        self.rows: list[tuple] = []
        self._add(PLANE, (0, 0, 0), (0, 0, 0), 0.0, 0.0, GROUND, ground_color, (0, 0, 0, 0))

    def _add(self, kind, center, size, yaw, speed, material, color, param) -> None:
        self.rows.append((kind, center, size, yaw, speed, material, color, param))

    def box(self, lo, hi, material, color, param=(0, 0, 0, 0), yaw=0.0, speed=0.0) -> None:
        """Box spanning lo..hi (3,) metres in its own frame, turned by `yaw` about its centre."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        self._add(BOX, (lo + hi) / 2, (hi - lo) / 2, yaw, speed, material, color, param)

    def oriented_box(self, center, half, yaw, material, color, param=(0, 0, 0, 0), speed=0.0) -> None:
        self._add(BOX, center, half, yaw, speed, material, color, param)

    def cylinder(self, base, radius, height, material, color, param=(0, 0, 0, 0)) -> None:
        """Vertical cylinder standing on `base` (x, y, z) metres."""
        self._add(CYLINDER, base, (radius, radius, height), 0.0, 0.0, material, color, param)

    def sphere(self, center, radius, material, color, param=(0, 0, 0, 0)) -> None:
        self._add(SPHERE, center, (radius, radius, radius), 0.0, 0.0, material, color, param)

    def build(self) -> Scene:
        columns = list(zip(*self.rows))
        return Scene(
            kind=np.array(columns[0], np.int8),
            center=np.array(columns[1], np.float64),
            size=np.array(columns[2], np.float64),
            yaw=np.array(columns[3], np.float64),
            speed=np.array(columns[4], np.float64),
            material=np.array(columns[5], np.int8),
            color=np.array(columns[6], np.float32),
            param=np.array(columns[7], np.float32),
        )
