"""Procedural textures of the synthetic world: per-material albedo (linear RGB) and LiDAR reflectance at hit points.

Patterns are functions of absolute world coordinates (they stay put while the ego moves) and are box-filtered by the
pixel footprint (metres per pixel), so thin lines and window grids fade to their mean colour instead of aliasing.
A footprint of 0 gives the crisp pattern (used for LiDAR reflectance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.data.synth_raycast import Surface
from distill.data.synth_scene import BUILDING, FOLIAGE, GLASS, GROUND, METAL, PAINT, SIDEWALK, SIGN, TIRE, TRUNK, Scene

# LiDAR reflectance per material (KITTI-like 0..1): asphalt is dark, paint and signs are retro-reflective.
REFLECTANCE = np.zeros(10, np.float32)
for _material, _value in (
    (GROUND, 0.12), (SIDEWALK, 0.3), (BUILDING, 0.28), (PAINT, 0.4), (GLASS, 0.04),
    (TIRE, 0.05), (METAL, 0.45), (TRUNK, 0.3), (FOLIAGE, 0.25), (SIGN, 0.95),
):  # fmt: skip
    REFLECTANCE[_material] = _value


def hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic per-lattice-point random numbers in [0, 1) (integer hash), float32, shape of ix/iy."""
    h = ix.astype(np.int64).astype(np.uint32) * np.uint32(0x8DA6B343)
    h ^= iy.astype(np.int64).astype(np.uint32) * np.uint32(0xD8163841)
    h ^= np.uint32((seed * 0x9E3779B9) & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _fractal_table(size: int = 512, beta: float = 1.5) -> np.ndarray:
    """A tileable (size, size) fractal noise image (1/f^beta spectrum), float32, mean 0.5, std 0.18, in [0, 1]."""
    spectrum = np.fft.rfft2(np.random.default_rng(7).standard_normal((size, size)))
    frequency = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    frequency[0, 0] = 1.0
    spectrum *= frequency**-beta
    spectrum[0, 0] = 0.0
    table = np.fft.irfft2(spectrum, s=(size, size))
    return np.clip(0.5 + 0.18 * (table - table.mean()) / table.std(), 0.0, 1.0).astype(np.float32).ravel()


_TABLE_SIZE = 512
_TABLE = _fractal_table(_TABLE_SIZE)


def noise(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fractal noise in [0, 1] (mean 0.5) at coordinates x, y; features from ~1/8 to ~64 units, tiling every 64.

    A bilinear lookup in a precomputed tileable table: one lookup costs what one octave of hashed noise would.
    """
    u = x * np.float32(8.0) + np.float32(seed * 97.31)
    v = y * np.float32(8.0) + np.float32(seed * 61.77)
    fu, fv = np.floor(u), np.floor(v)
    wu, wv = u - fu, v - fv
    mask = _TABLE_SIZE - 1
    iu, iv = fu.astype(np.int64) & mask, fv.astype(np.int64) & mask
    iu1, row, row1 = (iu + 1) & mask, iv * _TABLE_SIZE, ((iv + 1) & mask) * _TABLE_SIZE
    bottom = _TABLE[row + iu] * (1 - wu) + _TABLE[row + iu1] * wu
    top = _TABLE[row1 + iu] * (1 - wu) + _TABLE[row1 + iu1] * wu
    return bottom * (1 - wv) + top * wv


def band(distance: np.ndarray, half_width: float, footprint: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] of a stripe |distance| < half_width seen through a pixel `footprint` metres wide."""
    return np.clip((half_width - np.abs(distance)) / np.maximum(footprint, 1e-4) + 0.5, 0.0, 1.0)


def periodic_band(coord: np.ndarray, period, fill, footprint: np.ndarray) -> np.ndarray:
    """Coverage of stripes filling `fill` of each `period`, centred; fades to `fill` where pixels span periods."""
    distance = (coord / period - np.floor(coord / period) - 0.5) * period
    crisp = band(distance, fill * period / 2, footprint)
    blur = np.clip(footprint / period * 2 - 0.5, 0.0, 1.0)
    return crisp * (1 - blur) + fill * blur


@dataclass
class Hit:
    """One material's share of the hits. world: (3, n) absolute metres; normal, local: (3, n); footprint: (n,)
    metres per pixel across the view ray, stretched: (n,) along the surface where it is seen at a grazing angle;
    param: (n, 4); half: (n, 3) primitive half size."""

    world: np.ndarray
    normal: np.ndarray
    local: np.ndarray
    footprint: np.ndarray
    stretched: np.ndarray
    param: np.ndarray
    half: np.ndarray


def _ground(street, hit: Hit, albedo: np.ndarray, refl: np.ndarray) -> None:
    """Asphalt with wear and lane markings inside the curbs, grass and earth beyond the sidewalks."""
    x, y, fp = hit.world[0], hit.world[1], hit.footprint
    road = np.abs(y) < street.road_half
    grain = noise(x * 1.5, y * 1.5, 12) * np.clip(1 - 3 * hit.stretched, 0, 1)  # fades before it aliases
    wear = noise(x * 0.08, y * 0.08, 11) * 0.5 + grain * 0.25
    tracks = 1 - 0.12 * band(np.abs(np.abs(y) - street.lane_edge / 2) - 0.8, 0.35, fp)
    albedo *= np.where(road, (0.75 + wear) * tracks, 0.6 + 0.8 * noise(x * 0.15, y * 0.15, 13))
    dashes = 1.0 if not street.dash else periodic_band(x, 3 * street.dash, 1 / 3, hit.stretched)
    centre = band(y, 0.07, fp) * dashes
    edge = band(np.abs(y) - street.lane_edge, 0.06, fp)
    marking = np.clip(centre + edge, 0, 1) * road
    paint = np.where(centre > 0, street.style.center_marking[:, None], street.style.marking[:, None])
    albedo[:] = albedo * (1 - marking) + paint * marking
    grass = ~road
    albedo[:, grass] = street.style.grass[:, None] * (0.5 + noise(x[grass] * 0.25, y[grass] * 0.25, 14))
    refl[:] = np.where(grass, 0.35, 0.12 + 0.6 * marking)


def _sidewalk(street, hit: Hit, albedo: np.ndarray, refl: np.ndarray) -> None:
    """Concrete slabs with joints on top, lighter curb stones on the sides."""
    x, y = hit.world[0], hit.world[1]
    joints = periodic_band(x, 1.5, 0.04, hit.stretched)
    albedo *= (0.8 + 0.35 * noise(x * 0.4, y * 0.4, 21)) * (1 - 0.35 * joints)
    albedo[:, hit.normal[2] < 0.5] *= 1.25


def _building(street, hit: Hit, albedo: np.ndarray, refl: np.ndarray) -> None:
    """Plaster walls with a grid of windows per floor (random shades per pane), dark roofs."""
    wall = hit.normal[2] < 0.5
    along = np.where(np.abs(hit.normal[0]) > 0.5, hit.world[1], hit.world[0])
    z = hit.world[2]
    floor_height, spacing, fill, seed = hit.param.T
    cols = periodic_band(along, spacing, fill, hit.footprint)
    rows = periodic_band(z - 0.3 * floor_height, floor_height, 0.45, hit.footprint)
    window = cols * rows * (z > floor_height * 0.9) * wall
    pane = hash01(np.floor(along / spacing), np.floor(z / floor_height) + seed.astype(np.int64) * 7, 31)
    glass = street.style.window[:, None] * (0.6 + 1.4 * pane)
    plinth = band(z, 0.6, hit.footprint)
    cornice = band(hit.local[2] - hit.half[:, 2], 0.35, hit.footprint)
    albedo *= (0.85 + 0.3 * noise(along * 0.2, z * 0.2, 32)) * (1 - 0.35 * plinth + 0.15 * cornice)
    albedo[:] = albedo * (1 - window) + glass * window
    albedo[:, ~wall] = np.float32(0.08) + albedo[:, ~wall] * 0.25
    refl[:] = 0.28 - 0.22 * window


def _car_paint(street, hit: Hit, albedo: np.ndarray, refl: np.ndarray) -> None:
    """Body colour with a dark sill; rear/front faces get lights and a number plate."""
    lx, ly, lz = hit.local
    hx, hy, hz = hit.half.T
    end = np.abs(hit.local[0]) > hx - 1e-3
    lights = end * band(np.abs(ly) - (hy - 0.22), 0.15, hit.footprint) * band(lz - hz * 0.45, 0.08, hit.footprint)
    light_color = np.where(lx > 0, np.float32([[0.9], [0.85], [0.7]]), np.float32([[0.6], [0.02], [0.02]]))
    plate = end * band(ly, 0.26, hit.footprint) * band(lz + hz * 0.2, 0.06, hit.footprint)
    sill = band(lz + hz, 0.12, hit.footprint) * (1 - end)
    albedo *= 1 - 0.6 * sill
    albedo[:] = albedo * (1 - lights - plate) + light_color * lights + np.float32(0.8) * plate
    refl[:] = 0.4 + 0.5 * (lights + plate)


def _glass(street, hit: Hit, albedo: np.ndarray, refl: np.ndarray) -> None:
    """Tinted windows; the cabin roof keeps the body colour."""
    roof = hit.normal[2] > 0.5
    albedo[:, ~roof] = np.float32([[0.02], [0.025], [0.03]])
    refl[:] = np.where(roof, 0.4, 0.04)


def _foliage(street, hit: Hit, albedo: np.ndarray, refl: np.ndarray) -> None:
    x, y, z = hit.world
    seed = hit.param[:, 0]
    leaves = noise(x * 0.6 + z * 0.4 + seed, y * 0.6 - z * 0.3, 41) + noise(x * 3 - z * 2, y * 3 + z * 2, 42) - 0.5
    albedo *= np.clip(0.3 + 1.4 * leaves, 0.1, 2.0) * (0.6 + 0.4 * hit.normal[2] ** 2)


def _trunk(street, hit: Hit, albedo: np.ndarray, refl: np.ndarray) -> None:
    angle = np.arctan2(hit.local[1], hit.local[0])
    albedo *= 0.7 + 0.6 * noise(angle * 0.8, hit.world[2] * 0.4, 51)


def _sign(street, hit: Hit, albedo: np.ndarray, refl: np.ndarray) -> None:
    """A coloured panel with a white rim on the face towards traffic, grey metal behind."""
    hy, hz = hit.half[:, 1], hit.half[:, 2]
    rim = np.maximum(band(np.abs(hit.local[1]) - hy, 0.05, hit.footprint),
                     band(np.abs(hit.local[2]) - hz, 0.05, hit.footprint))  # fmt: skip
    albedo[:] = albedo * (1 - rim) + np.float32(0.8) * rim
    back = -hit.normal[0] * np.sign(hit.world[1]) > 0.5
    albedo[:, back] = street.style.metal[:, None]
    refl[back] = 0.4


PAINTERS = {
    GROUND: _ground, SIDEWALK: _sidewalk, BUILDING: _building, PAINT: _car_paint, GLASS: _glass,
    FOLIAGE: _foliage, TRUNK: _trunk, SIGN: _sign,
}  # fmt: skip


def appearance(
    street, scene: Scene, surf: Surface, footprint: np.ndarray, view: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Albedo and LiDAR reflectance of the hit points of `surf` (in its order).

    Args:
        footprint: (n,) metres a pixel spans at each hit (0 = crisp patterns).
        view: (3, n) unit view directions, to widen the footprint on surfaces seen at a grazing angle; None = no.

    Returns:
        albedo (3, n) float32 linear RGB, reflectance (n,) float32 in [0, 1] before the incidence-angle falloff.
    """
    stretched = footprint if view is None else footprint / np.maximum(np.abs((view * surf.normal).sum(0)), 0.05)
    albedo = scene.color.T[:, surf.prim]
    refl = REFLECTANCE[scene.material[surf.prim]]
    world = surf.point + scene.offset[:, None].astype(np.float32)
    # Hits come grouped by material, so each painter works on views, not gathered copies.
    for kind, painter in PAINTERS.items():
        part = slice(surf.groups[kind], surf.groups[kind + 1])
        if part.stop > part.start:
            prim = surf.prim[part]
            hit = Hit(world[:, part], surf.normal[:, part], surf.local[:, part], footprint[part], stretched[part],
                      scene.param[prim], scene.size[prim].astype(np.float32))  # fmt: skip
            painter(street, hit, albedo[:, part], refl[part])
    return albedo, np.clip(refl, 0.0, 1.0)
