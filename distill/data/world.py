"""The procedural street world of `distill synth`: domain styles, the street of each drive and the ego track.

A drive is a straight street (x along it, y to the left, z up, road at z = 0) with a two-way road, lane markings,
raised sidewalks, buildings, trees, street lamps, signs, parked cars and moving traffic; the ego car drives in the
right-hand lane. Everything is drawn from one numpy Generator, so a seed gives the same street on every run.

The rest of the pipeline: synth_scene.py (primitive table), synth_sensors.py (camera and LiDAR ray grids),
synth_raycast.py (intersections), synth_textures.py / synth_shade.py (appearance, image, scan), synth_calib.py
(KITTI calibration), synth_bag.py (rosbag2) and synth.py (`distill synth`, files on disk).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from distill.data.synth_scene import (
    BUILDING,
    FOLIAGE,
    GLASS,
    METAL,
    PAINT,
    SIDEWALK,
    SIGN,
    TIRE,
    TRUNK,
    Scene,
    SceneBuilder,
)  # fmt: skip
from distill.data.synth_sensors import rotation_z

FRAME_PERIOD = 0.1  # seconds between frames (10 Hz, as KITTI)


def linear_rgb(*hex_colors: str) -> np.ndarray:
    """sRGB hex strings -> (N, 3) float32 linear RGB (gamma 2.2), the space shading works in."""
    return np.array([[int(c[i : i + 2], 16) / 255.0 for i in (1, 3, 5)] for c in hex_colors], np.float32) ** 2.2


@dataclass(frozen=True)
class Style:
    """Look and rig of a domain: palette (linear RGB), light, layout ranges (metres) and camera mounting."""

    date: str
    focal_scale: float
    pitch_deg: float
    camera_raise: float
    velo_height: float
    asphalt: np.ndarray
    marking: np.ndarray
    center_marking: np.ndarray
    sidewalk: np.ndarray
    grass: np.ndarray
    buildings: np.ndarray
    window: np.ndarray
    cars: np.ndarray
    foliage: np.ndarray
    trunk: np.ndarray
    metal: np.ndarray
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    sun_color: np.ndarray
    ambient: np.ndarray
    sun_elevation_deg: float
    sun_azimuth_deg: float
    fog_distance: float
    building_height: tuple[float, float]
    setback: tuple[float, float]
    lane_width: tuple[float, float]
    tree_rate: float
    parked_rate: float


STYLES = {
    # A sunny German residential street, as in KITTI's "residential" and "city" drives.
    "kitti": Style(
        date="2030_01_01", focal_scale=1.0, pitch_deg=0.0, camera_raise=0.0, velo_height=1.73,
        asphalt=linear_rgb("#5a5c5e")[0], marking=linear_rgb("#e8e8e4")[0], center_marking=linear_rgb("#e8e8e4")[0],
        sidewalk=linear_rgb("#a19d96")[0], grass=linear_rgb("#5d7a3a")[0],
        buildings=linear_rgb("#c9bfae", "#d8d2c4", "#b58e6f", "#e3dccb", "#9c9a95", "#c7a98b", "#ded6b8"),
        window=linear_rgb("#2b3540")[0],
        cars=linear_rgb("#d8d8d8", "#1e1e22", "#7d8288", "#8a1c1c", "#1d3a6b", "#f0f0ea", "#3b4a3a", "#a8a39a"),
        foliage=linear_rgb("#3f6b2a")[0], trunk=linear_rgb("#5b4532")[0], metal=linear_rgb("#8d9196")[0],
        sky_zenith=linear_rgb("#5f8fd0")[0], sky_horizon=linear_rgb("#cfdcea")[0],
        sun_color=np.float32([3.2, 3.0, 2.7]), ambient=np.float32([0.55, 0.6, 0.7]),
        sun_elevation_deg=38.0, sun_azimuth_deg=-40.0, fog_distance=450.0,
        building_height=(6.0, 16.0), setback=(0.5, 6.0), lane_width=(3.2, 3.8), tree_rate=0.55, parked_rate=0.6,
    ),
    # A dusty southern town at golden hour, seen from a higher, wider, downward-tilted camera.
    "shifted": Style(
        date="2031_06_15", focal_scale=0.8, pitch_deg=4.0, camera_raise=0.45, velo_height=2.05,
        asphalt=linear_rgb("#6e5f55")[0], marking=linear_rgb("#f2efe0")[0], center_marking=linear_rgb("#e0b020")[0],
        sidewalk=linear_rgb("#c7ad8a")[0], grass=linear_rgb("#a08a5a")[0],
        buildings=linear_rgb("#e6c9a0", "#d9905a", "#f0e2c8", "#b8664a", "#e8d7a8", "#c77f6b", "#f4efe4"),
        window=linear_rgb("#1c2a2a")[0],
        cars=linear_rgb("#e8c84a", "#2a6f6a", "#e0e0d8", "#b03a2e", "#4a4a4a", "#6a8caf", "#d9722b", "#f5f5f0"),
        foliage=linear_rgb("#6b7d2a")[0], trunk=linear_rgb("#6e5137")[0], metal=linear_rgb("#6d6a66")[0],
        sky_zenith=linear_rgb("#4a6ea8")[0], sky_horizon=linear_rgb("#f3c58e")[0],
        sun_color=np.float32([3.6, 2.5, 1.5]), ambient=np.float32([0.6, 0.5, 0.45]),
        sun_elevation_deg=14.0, sun_azimuth_deg=65.0, fog_distance=300.0,
        building_height=(3.5, 9.0), setback=(0.0, 3.0), lane_width=(3.4, 4.2), tree_rate=0.3, parked_rate=0.45,
    ),
}  # fmt: skip
# Further looks and rigs for multi-domain corpora (appended: the entropy of a world uses its style's index).
STYLES["overcast"] = replace(  # a grey northern city under cloud, long lens on a low mount
    STYLES["kitti"], date="2032_11_03", focal_scale=1.15, pitch_deg=-1.0, camera_raise=-0.15, velo_height=1.58,
    asphalt=linear_rgb("#44474a")[0], sidewalk=linear_rgb("#8c8c88")[0], grass=linear_rgb("#4a5e3a")[0],
    buildings=linear_rgb("#8a8f96", "#b0a89c", "#6e6a66", "#c2c4c6", "#7d6d5f", "#a3a9b0", "#5f646b"),
    sky_zenith=linear_rgb("#8e969e")[0], sky_horizon=linear_rgb("#c4c8cc")[0],
    sun_color=np.float32([1.2, 1.2, 1.25]), ambient=np.float32([0.9, 0.92, 0.98]),
    sun_elevation_deg=55.0, sun_azimuth_deg=10.0, fog_distance=220.0,
    building_height=(9.0, 24.0), setback=(0.0, 2.0), lane_width=(3.0, 3.5), tree_rate=0.25, parked_rate=0.75,
)  # fmt: skip
STYLES["van"] = replace(  # a green suburb at noon from a tall van: wide lens, high mount, pitched down
    STYLES["kitti"], date="2033_04_20", focal_scale=0.7, pitch_deg=6.0, camera_raise=0.7, velo_height=2.3,
    asphalt=linear_rgb("#4e4f50")[0], grass=linear_rgb("#4f8a2e")[0], foliage=linear_rgb("#2f5a20")[0],
    buildings=linear_rgb("#f2f0ea", "#b84a3a", "#e8e0c0", "#9aa8b8", "#d8c8a8", "#c0c8b8", "#a05a40"),
    sky_zenith=linear_rgb("#3f7fe0")[0], sky_horizon=linear_rgb("#b8d4f0")[0],
    sun_color=np.float32([3.4, 3.3, 3.1]), sun_elevation_deg=70.0, sun_azimuth_deg=120.0, fog_distance=600.0,
    building_height=(4.0, 8.0), setback=(3.0, 10.0), lane_width=(3.0, 3.6), tree_rate=0.8, parked_rate=0.35,
)  # fmt: skip


@dataclass(frozen=True)
class Street:
    """One drive's street: its primitives at time 0 plus what the ground shader needs (metres).

    road_half: centre line to curb. lane_edge: |y| of the solid line between driving lane and parking/curb.
    dash: length of a centre-line dash (0 = solid); period = 3 dashes.
    """

    scene: Scene
    road_half: float
    lane_edge: float
    dash: float
    ego: Ego
    style: Style


@dataclass(frozen=True)
class Ego:
    """The ego car's Velodyne: starts at x = 0 in the right-hand lane, weaves gently, `speed` metres/second."""

    lane_y: float
    speed: float
    sway: float
    sway_period: float
    phase: float
    height: float

    def pose(self, time: float) -> tuple[np.ndarray, float]:
        """Velodyne position (3,) in the world (metres) and heading (radians about z) at `time` seconds."""
        x = self.speed * time
        angle = 2 * np.pi * x / self.sway_period + self.phase
        y = self.lane_y + self.sway * np.sin(angle)
        yaw = np.arctan(self.sway * 2 * np.pi / self.sway_period * np.cos(angle))
        return np.array([x, y, self.height]), float(yaw)

    def matrix(self, time: float) -> np.ndarray:
        """(4, 4) pose of the Velodyne in the world at `time` seconds: X_world = M @ X_velo (metres)."""
        position, yaw = self.pose(time)
        pose = np.eye(4)
        pose[:3, :3] = rotation_z(yaw)
        pose[:3, 3] = position
        return pose


def build_street(style: Style, rng: np.random.Generator, frames: int) -> Street:
    """A street long enough for `frames` frames of ego motion plus LiDAR range behind and view range ahead."""
    lane = rng.uniform(*style.lane_width)
    parking = 2.3 if rng.random() < 0.75 else 0.0
    road_half = lane + parking + (0.0 if parking else 0.4)
    ego = Ego(-lane / 2, rng.uniform(6.0, 11.0), rng.uniform(0.0, 0.3), rng.uniform(60, 160), rng.uniform(0, 6.3),
              style.velo_height)  # fmt: skip
    x0, x1 = -130.0, ego.speed * FRAME_PERIOD * frames + 320.0
    builder = SceneBuilder(style.asphalt)
    for side in (1.0, -1.0):
        sidewalk = rng.uniform(2.0, 4.0)
        curb = rng.uniform(0.1, 0.16)
        y_in, y_out = side * road_half, side * (road_half + sidewalk)
        builder.box((x0, min(y_in, y_out), 0.0), (x1, max(y_in, y_out), curb), SIDEWALK, style.sidewalk)
        _buildings(builder, rng, style, side, road_half + sidewalk, x0, x1)
        _trees(builder, rng, style, side, road_half + 0.8, curb, x0, x1)
        _lamps_and_signs(builder, rng, style, side, road_half, curb, x0, x1)
        if parking:
            _parked_cars(builder, rng, style, side, road_half - 1.15, x0, x1)
    _traffic(builder, rng, style, lane, ego, x1)
    return Street(builder.build(), road_half, lane, float(rng.choice([0.0, 3.0, 4.0])), ego, style)


def _buildings(builder, rng, style: Style, side: float, y_front: float, x0: float, x1: float) -> None:
    """Blocks of houses along one side: varied length, depth, height, setback, colour and window grid."""
    x = x0 + rng.uniform(-10, 0)
    while x < x1:
        length, depth = rng.uniform(8, 30), rng.uniform(8, 18)
        front = y_front + rng.uniform(*style.setback)
        y = sorted((side * front, side * (front + depth)))
        height = rng.uniform(*style.building_height)
        color = style.buildings[rng.integers(len(style.buildings))] * rng.uniform(0.85, 1.1)
        windows = (rng.uniform(2.8, 3.4), rng.uniform(1.8, 3.2), rng.uniform(0.35, 0.6), rng.uniform(0, 1000))
        builder.box((x, y[0], 0.0), (x + length, y[1], height), BUILDING, color, windows)
        x += length + (rng.uniform(2, 14) if rng.random() < 0.35 else rng.uniform(0, 0.5))


def _trees(builder, rng, style: Style, side: float, y: float, base: float, x0: float, x1: float) -> None:
    """Street trees near the curb: a trunk (cylinder) and a crown (sphere)."""
    x = x0 + rng.uniform(0, 10)
    while x < x1:
        if rng.random() < style.tree_rate:
            radius, height = rng.uniform(1.3, 2.6), rng.uniform(1.8, 3.0)
            position = (x, side * (y + rng.uniform(-0.2, 0.4)))
            builder.cylinder((*position, base), rng.uniform(0.12, 0.22), height + radius * 0.5, TRUNK, style.trunk)
            color = style.foliage * rng.uniform(0.7, 1.2, 3).astype(np.float32)
            builder.sphere(
                (*position, base + height + radius * 0.8), radius, FOLIAGE, color, (rng.uniform(0, 1000), 0, 0, 0)
            )
        x += rng.uniform(7, 16)


def _lamps_and_signs(builder, rng, style: Style, side: float, road_half: float, base: float, x0: float, x1: float):
    """Street lamps (pole, arm over the road, lamp head) and traffic signs (thin pole, panel facing traffic)."""
    x = x0 + rng.uniform(0, 30)
    while x < x1:
        y, height = side * (road_half + 0.35), rng.uniform(6.0, 8.0)
        builder.cylinder((x, y, base), rng.uniform(0.07, 0.11), height, METAL, style.metal)
        arm_end = side * (road_half - 1.6)
        builder.box((x - 0.05, min(y, arm_end), height - 0.1), (x + 0.05, max(y, arm_end), height), METAL, style.metal)
        builder.box((x - 0.25, arm_end - 0.15, height - 0.25), (x + 0.25, arm_end + 0.15, height - 0.1), METAL,
                    style.metal * 0.6)  # fmt: skip
        if rng.random() < 0.5:
            sx, sy, top = x + rng.uniform(5, 12), side * (road_half + 0.5), rng.uniform(2.2, 2.8)
            builder.cylinder((sx, sy, base), 0.035, top, METAL, style.metal)
            panel = linear_rgb(*rng.choice(["#1d4fa0", "#c0201c", "#f2f2f2", "#f2c200"], 1))[0]
            builder.box((sx - 0.03, sy - 0.32, top - 0.1), (sx + 0.03, sy + 0.32, top + 0.54), SIGN, panel)
        x += rng.uniform(25, 40)


def _car(builder, rng, style: Style, x: float, y: float, yaw: float, speed: float = 0.0) -> None:
    """A car (body, glass cabin, two dark wheel boxes) or a van, centred at (x, y) on the road, heading `yaw`."""
    color = style.cars[rng.integers(len(style.cars))] * np.float32(rng.uniform(0.8, 1.1))
    van = rng.random() < 0.15
    length, width = (
        (rng.uniform(4.8, 5.6), rng.uniform(1.9, 2.05)) if van else (rng.uniform(3.8, 4.8), rng.uniform(1.65, 1.9))
    )
    top = rng.uniform(1.9, 2.3) if van else rng.uniform(0.95, 1.1)
    c, s = np.cos(yaw), np.sin(yaw)

    def part(along, half, z0, z1, material, tint):
        center = (x + c * along, y + s * along, (z0 + z1) / 2)
        builder.oriented_box(center, (half[0], half[1], (z1 - z0) / 2), yaw, material, tint, speed=speed)

    part(0.0, (length / 2, width / 2), 0.3, top, PAINT, color)
    if not van:
        cabin = rng.uniform(0.45, 0.6) * length
        part(-0.1 * length, (cabin / 2, width / 2 - 0.08), top, top + rng.uniform(0.42, 0.55), GLASS, color)
    for along in (length / 2 - 0.85, -length / 2 + 0.85):
        part(along, (0.33, width / 2 - 0.03), 0.0, 0.66, TIRE, np.float32([0.03, 0.03, 0.03]))


def _parked_cars(builder, rng, style: Style, side: float, y: float, x0: float, x1: float) -> None:
    x = x0 + rng.uniform(0, 6)
    while x < x1:
        if rng.random() < style.parked_rate:
            yaw = (0.0 if side < 0 else np.pi) + rng.normal(0, 0.03)
            _car(builder, rng, style, x, side * (abs(y) + rng.uniform(-0.15, 0.15)), yaw)
        x += rng.uniform(5.5, 8.0)


def _traffic(builder, rng, style: Style, lane: float, ego: Ego, x1: float) -> None:
    """Cars ahead in the ego lane (a bit faster than the ego car) and oncoming cars in the other lane."""
    x = rng.uniform(15, 40)
    for _ in range(rng.integers(0, 3)):
        _car(
            builder, rng, style, x, -lane / 2 + rng.normal(0, 0.1), rng.normal(0, 0.01), ego.speed + rng.uniform(0.5, 3)
        )
        x += rng.uniform(15, 40)
    x = rng.uniform(10, 60)
    while x < x1 * 1.6:
        _car(builder, rng, style, x, lane / 2 + rng.normal(0, 0.1), np.pi + rng.normal(0, 0.01), -rng.uniform(7, 12))
        x += rng.uniform(30, 90)
