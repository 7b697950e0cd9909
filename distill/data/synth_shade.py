"""Sensor outputs from ray hits: the camera image (sun, sky light, shadows, glossy cars, fog, sensor effects) and the
LiDAR point cloud with reflectance."""

from __future__ import annotations

import cv2
import numpy as np

from distill.data.synth_raycast import Hits, Surface, intersect, surface
from distill.data.synth_scene import GLASS, PAINT, PLANE, Scene
from distill.data.synth_sensors import box_corners
from distill.data.synth_textures import appearance

SHADOW_OFFSET = 0.02  # metres: shadow rays start this far off the surface to miss their own primitive


def sun_direction(style) -> np.ndarray:
    """(3,) unit vector towards the sun in world coordinates."""
    elevation, azimuth = np.radians(style.sun_elevation_deg), np.radians(style.sun_azimuth_deg)
    return np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])


def sky(style, directions: np.ndarray, sun: np.ndarray) -> np.ndarray:
    """Sky radiance (3, ...) float32 for unit view `directions` (3, ...): horizon-to-zenith gradient and sun glow."""
    up = np.sqrt(np.clip(directions[2], 0.0, 1.0))
    colour = style.sky_horizon[:, None] * (1 - up.ravel()) + style.sky_zenith[:, None] * up.ravel()
    glow = np.clip(np.tensordot(sun.astype(np.float32), directions, axes=1), 0.0, 1.0).ravel() ** 24
    colour += style.sun_color[:, None] * (0.25 * glow)
    return colour.reshape((3,) + directions.shape[1:])


def sunlit(scene: Scene, grid, surf: Surface, sun: np.ndarray) -> np.ndarray:
    """(n,) float32 1 where the hit point sees the sun, 0 in shadow (rays towards the sun against every primitive).

    A primitive can only shade the pixels whose rays reach its shadow volume (the primitive swept away from the sun
    down to the road), so each primitive is tested on that volume's rectangle of the grid.
    """
    shape = grid.dirs.shape[1:]
    origin = np.zeros((3, shape[0] * shape[1]), np.float32)
    origin[:, surf.index] = surf.point + SHADOW_OFFSET * surf.normal
    origin = origin.reshape(3, *shape)
    lit = np.zeros(shape[0] * shape[1], bool)
    lit[surf.index] = (surf.normal * sun[:, None].astype(np.float32)).sum(0) > 0
    lit = lit.reshape(shape)
    solid = np.flatnonzero(scene.kind != PLANE)
    corners = box_corners(*(bound[solid] for bound in scene.bounds()))
    # Shadow volume: the box and its outline cast along the sun onto the road (z = 0), as one convex hull.
    volumes = np.concatenate([corners, corners - (corners[..., 2:] / sun[2]) * sun], axis=1)
    directions = sun.astype(np.float32)[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        for index, r0, r1, c0, c1 in grid.cells_of_hulls(volumes):
            window = lit[r0:r1, c0:c1]
            if not window.any():
                continue
            t = intersect(scene, int(solid[index]), origin[:, r0:r1, c0:c1], directions)
            window &= ~np.isfinite(t)
    return lit.ravel()[surf.index].astype(np.float32)


def render_image(street, scene: Scene, grid, hits: Hits, rng: np.random.Generator) -> np.ndarray:
    """The camera image: (H, W, 3) uint8 sRGB."""
    style = street.style
    sun = sun_direction(style)
    norms = np.sqrt((grid.dirs**2).sum(0))
    unit = grid.dirs / norms
    image = sky(style, unit, sun)
    surf = surface(scene, grid, hits)
    view = unit.reshape(3, -1)[:, surf.index]
    albedo, _ = appearance(street, scene, surf, surf.t / np.float32(grid.K[0, 0]), view)
    colour = _light(style, scene, surf, albedo, view, sun, sunlit(scene, grid, surf, sun))
    fog = np.exp(-surf.t * norms.ravel()[surf.index] / np.float32(style.fog_distance))
    image.reshape(3, -1)[:, surf.index] = colour * fog + style.sky_horizon[:, None] * (1 - fog)
    return _sensor(image, rng)


def _light(style, scene, surf: Surface, albedo, view, sun, lit) -> np.ndarray:
    """Radiance (3, n): sun (Lambert, shadowed) plus hemispherical sky light; glossy paint and glass reflect the sky."""
    normal = surf.normal
    sun32 = sun.astype(np.float32)
    direct = np.clip((normal * sun32[:, None]).sum(0), 0.0, 1.0) * lit
    ambient = style.ambient[:, None] * (0.55 + 0.45 * normal[2])
    colour = albedo * (ambient + style.sun_color[:, None] * direct)
    glossy = np.flatnonzero(np.isin(scene.material[surf.prim], (PAINT, GLASS)))
    if glossy.size:
        n, v = normal[:, glossy], view[:, glossy]
        cosine = -(n * v).sum(0)
        mirror = v + 2 * cosine * n
        fresnel = 0.04 + 0.96 * (1 - np.clip(cosine, 0, 1)) ** 5
        highlight = np.clip((mirror * sun32[:, None]).sum(0), 0, 1) ** 80 * lit[glossy]
        colour[:, glossy] += fresnel * sky(style, mirror, sun) * 0.8 + style.sun_color[:, None] * highlight * 0.6
    return colour


def _tone_curve() -> np.ndarray:
    """Lookup table: linear radiance quantised to 1/1024 (up to 4) -> uint8 sRGB after exposure and gamma."""
    radiance = np.arange(4096, dtype=np.float64) / 1024
    return np.round(255 * (1 - np.exp(-1.6 * radiance)) ** (1 / 2.2)).astype(np.uint8)


_TONE = _tone_curve()


def _sensor(radiance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vignetting, tone map and gamma, slight optical blur, noise: (3, H, W) linear -> (H, W, 3) uint8 sRGB."""
    height, width = radiance.shape[1:]
    y, x = np.ogrid[-1 : 1 : height * 1j, -1 : 1 : width * 1j]
    vignette = (1024 * (1 - 0.18 * (x * x * 0.6 + y * y * 0.4))).astype(np.float32)
    index = np.minimum(radiance * vignette, 4095).astype(np.int16)
    image = cv2.GaussianBlur(_TONE[index.transpose(1, 2, 0)], (0, 0), 0.5)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(2.5)
    return np.clip(image + noise, 0, 255).round().astype(np.uint8)


def lidar_points(street, scene: Scene, grid, hits: Hits, rng: np.random.Generator) -> np.ndarray:
    """The scan: (N, 4) float32 x, y, z (metres, Velodyne frame), reflectance in [0, 1]; beams that hit, in order."""
    surf = surface(scene, grid, hits)
    _, reflectance = appearance(street, scene, surf, np.zeros(len(surf.prim), np.float32))
    incidence = np.abs((surf.normal * grid.dirs.reshape(3, -1)[:, surf.index]).sum(0))
    # Back to firing order (beam by beam, azimuth by azimuth), as a real scan.
    order = np.argsort(surf.index)
    reflectance = reflectance[order] * (0.35 + 0.65 * incidence[order]) + rng.normal(0.0, 0.02, len(order))
    xyz = surf.t[order] * grid.velo_dirs.reshape(3, -1)[:, surf.index[order]]
    return np.concatenate([xyz.T, np.clip(reflectance, 0, 1)[:, None]], axis=1).astype(np.float32)
