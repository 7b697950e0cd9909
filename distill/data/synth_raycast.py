"""Vectorised ray casting of the synthetic world for ray grids (camera pixels, LiDAR beams).

All rays of a grid share one origin. Each primitive is intersected only with the rectangle of grid cells its
bounding box can reach (`grid.cells`: the box projected into the image, or its azimuth/elevation span for the
LiDAR), so the work follows the screen area objects cover instead of rays x objects. Intersections are analytic
and run in float32 on coordinates centred on the sensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.data.synth_scene import BOX, CYLINDER, GROUND, MATERIALS, PLANE, SPHERE, Scene

T_MIN = 1e-3  # metres: hits nearer than this along a ray are ignored (self-hits of shadow rays)


@dataclass
class Hits:
    """First hit of every ray of a grid. t: (H, W) float32 ray parameter (inf = none); prim: (H, W) int32 index
    into the scene table (-1 = none)."""

    t: np.ndarray
    prim: np.ndarray


@dataclass
class Surface:
    """The n rays of a grid that hit something, grouped by material (grid order within a material).

    index: (n,) int64 flat ray index into the grid. prim: (n,) int32. t: (n,) float32 ray parameters.
    point: (3, n) float32 metres in scene coordinates. normal: (3, n) float32 unit outward normals.
    local: (3, n) float32 point in the primitive's own frame. groups: (materials + 1,) start of each material's run.
    """

    index: np.ndarray
    prim: np.ndarray
    t: np.ndarray
    point: np.ndarray
    normal: np.ndarray
    local: np.ndarray
    groups: np.ndarray


def _box_t(o, d, center, half, yaw):
    """Ray parameter of the entry into a box turned by `yaw` (slab test); inf where missed."""
    ox, oy, oz = o[0] - center[0], o[1] - center[1], o[2] - center[2]
    dx, dy, dz = d
    if yaw:
        c, s = float(np.cos(yaw)), float(np.sin(yaw))
        ox, oy = c * ox + s * oy, c * oy - s * ox
        dx, dy = c * dx + s * dy, c * dy - s * dx
    near, far = None, None
    for origin, direction, extent in ((ox, dx, half[0]), (oy, dy, half[1]), (oz, dz, half[2])):
        inverse = 1.0 / direction
        t1, t2 = (-extent - origin) * inverse, (extent - origin) * inverse
        low, high = np.minimum(t1, t2), np.maximum(t1, t2)
        near = low if near is None else np.maximum(near, low)
        far = high if far is None else np.minimum(far, high)
    return np.where((near <= far) & (near > T_MIN), near, np.inf)


def _cylinder_t(o, d, base, size, _yaw):
    """Ray parameter of the first hit on a vertical cylinder (side or top cap); inf where missed."""
    ox, oy, oz = o[0] - base[0], o[1] - base[1], o[2] - base[2]
    dx, dy, dz = d
    radius, height = size[0], size[2]
    a = dx * dx + dy * dy
    along = -(ox * dx + oy * dy) / a
    # Distance of closest approach computed directly: no cancellation for thin poles seen from afar.
    px, py = ox + along * dx, oy + along * dy
    disc = radius * radius - (px * px + py * py)
    t_side = along - np.sqrt(np.maximum(disc, 0.0) / a)
    z = oz + t_side * dz
    t = np.where((disc >= 0) & (t_side > T_MIN) & (z >= 0) & (z <= height), t_side, np.inf)
    t_top = (height - oz) / dz
    qx, qy = ox + t_top * dx, oy + t_top * dy
    return np.where((qx * qx + qy * qy <= radius * radius) & (t_top > T_MIN) & (t_top < t), t_top, t)


def _sphere_t(o, d, center, size, _yaw):
    """Ray parameter of the first hit on a sphere; inf where missed."""
    ox, oy, oz = o[0] - center[0], o[1] - center[1], o[2] - center[2]
    dx, dy, dz = d
    a = dx * dx + dy * dy + dz * dz
    along = -(ox * dx + oy * dy + oz * dz) / a
    px, py, pz = ox + along * dx, oy + along * dy, oz + along * dz
    disc = size[0] * size[0] - (px * px + py * py + pz * pz)
    t = along - np.sqrt(np.maximum(disc, 0.0) / a)
    return np.where((disc >= 0) & (t > T_MIN), t, np.inf)


INTERSECT = {BOX: _box_t, CYLINDER: _cylinder_t, SPHERE: _sphere_t}


def intersect(scene: Scene, index: int, origin, directions: np.ndarray) -> np.ndarray:
    """Ray parameters of primitive `index` (not the ground) for rays origin + t * directions.

    Args:
        origin: (3,) or 3 arrays broadcasting with the directions, metres in scene coordinates.
        directions: (3, ...) float32.

    Returns:
        (...) float32 ray parameters, inf where missed.
    """
    center = [float(value) for value in scene.center[index]]
    size = [float(value) for value in scene.size[index]]
    return INTERSECT[int(scene.kind[index])](origin, directions, center, size, float(scene.yaw[index]))


def cast(scene: Scene, grid) -> Hits:
    """First hit of every ray of `grid` (a CameraGrid or LidarGrid) within its range."""
    dz = grid.dirs[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dz < 0, np.float32(-grid.origin[2]) / dz, np.float32(np.inf)).astype(np.float32)
        t[t > grid.t_max] = np.inf
        prim = np.where(np.isfinite(t), 0, -1).astype(np.int32)
        lo, hi = scene.bounds()
        solid = np.flatnonzero(scene.kind != PLANE)
        for index, r0, r1, c0, c1 in grid.cells(lo[solid], hi[solid]):
            index = int(solid[index])
            t_new = intersect(scene, index, grid.origin, grid.dirs[:, r0:r1, c0:c1])
            t_old = t[r0:r1, c0:c1]
            closer = t_new < t_old
            t_old[closer] = t_new[closer]
            prim[r0:r1, c0:c1][closer] = index
    beyond = t > grid.t_max
    t[beyond], prim[beyond] = np.inf, -1
    return Hits(t, prim)


def surface(scene: Scene, grid, hits: Hits) -> Surface:
    """Points, normals and primitive-local coordinates of the rays of `grid` that hit, grouped by material."""
    flat_prim = hits.prim.ravel()
    index = np.flatnonzero(flat_prim >= 0)
    material = scene.material[flat_prim[index]]
    order = np.argsort(material, kind="stable")
    index, material = index[order], material[order]
    prim, t = flat_prim[index], hits.t.ravel()[index]
    point = grid.origin[:, None].astype(np.float32) + t * grid.dirs.reshape(3, -1)[:, index]
    groups = np.searchsorted(material, np.arange(MATERIALS + 1))
    # The ground plane (material GROUND, first after sorting) needs no local frame and has normal +z.
    solid = groups[GROUND + 1]
    local = point.copy()
    local[:, solid:] -= scene.center.T.astype(np.float32)[:, prim[solid:]]
    turned = solid + np.flatnonzero(scene.yaw[prim[solid:]] != 0)
    c, s = np.cos(scene.yaw[prim[turned]]).astype(np.float32), np.sin(scene.yaw[prim[turned]]).astype(np.float32)
    x, y = local[0, turned], local[1, turned]
    local[0, turned], local[1, turned] = c * x + s * y, c * y - s * x
    normal = _local_normals(scene, prim, local, solid)
    x, y = normal[0, turned], normal[1, turned]
    normal[0, turned], normal[1, turned] = c * x - s * y, s * x + c * y
    return Surface(index, prim, t, point, normal, local, groups)


def _local_normals(scene: Scene, prim: np.ndarray, local: np.ndarray, start: int) -> np.ndarray:
    """(3, n) outward unit normals, in each primitive's own frame, at the local points (3, n) from `start` on;
    +z before `start` (the ground)."""
    normal = np.zeros_like(local)
    normal[2] = 1.0  # ground plane and cylinder caps
    kind = np.zeros(len(prim), np.int8)
    kind[start:] = scene.kind[prim[start:]]
    box = np.flatnonzero(kind == BOX)
    if box.size:
        # The face hit is the axis where the point is relatively farthest out.
        q = np.abs(local[:, box]) / scene.size.T.astype(np.float32)[:, prim[box]]
        on_x = (q[0] >= q[1]) & (q[0] >= q[2])
        on_y = ~on_x & (q[1] >= q[2])
        normal[:, box] = np.sign(local[:, box]) * np.stack([on_x, on_y, ~(on_x | on_y)])
    round_ = np.flatnonzero(kind >= CYLINDER)
    if round_.size:
        size = scene.size.T.astype(np.float32)[:, prim[round_]]
        part = local[:, round_]
        radial = np.hypot(part[0], part[1])
        side = (kind[round_] == CYLINDER) & (np.abs(radial - size[0]) < np.abs(part[2] - size[2]))
        sphere = kind[round_] == SPHERE
        normal[:, round_[side]] = np.stack(
            [part[0, side] / radial[side], part[1, side] / radial[side], 0 * radial[side]]
        )
        normal[:, round_[sphere]] = part[:, sphere] / size[0, sphere]
    return normal
