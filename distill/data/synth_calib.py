"""Calibration of the synthetic rig in KITTI's format: KITTI's numbers, scaled to the image size, varied per domain.

Frames as in KITTI: Velodyne (x forward, y left, z up), camera (x right, y down, z forward). A point goes to the
rectified image of camera 2 as P_rect_02 @ R_rect_00 @ [R | T] @ X_velo (the KITTI raw devkit projection). Every number
the renderer uses is first rounded to what the text files hold (7 significant digits), so projecting a scan with the
written files lands exactly where the renderer put it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KITTI_SIZE = (375, 1242)  # height, width of KITTI's rectified images

# KITTI raw 2011_09_26 calibration (Geiger et al., IJRR 2013): rectified intrinsics, rectifying rotation of
# camera 0, metric offsets of the rectified cameras 0-3 (P_rect_0i = K @ [I | t_i]) and the Velodyne -> camera 0 pose.
KITTI_FX, KITTI_CX, KITTI_CY = 721.5377, 609.5593, 172.854
KITTI_R_RECT_00 = np.array(
    [
        [9.999239e-01, 9.837760e-03, -7.445048e-03],
        [-9.869795e-03, 9.999421e-01, -4.278459e-03],
        [7.402527e-03, 4.351614e-03, 9.999631e-01],
    ]
)
KITTI_CAMERA_OFFSETS = np.array(
    [
        [0.0, 0.0, 0.0],
        [-0.5371506, 0.0, 0.0],
        [0.05984926, -0.0003579300, 0.002745884],
        [-0.4728627, 0.002394970, 0.002729905],
    ]
)
KITTI_VELO_R = np.array(
    [
        [7.533745e-03, -9.999714e-01, -6.166020e-04],
        [1.480249e-02, 7.280733e-04, -9.998902e-01],
        [9.998621e-01, 7.523790e-03, 1.480755e-02],
    ]
)
KITTI_VELO_T = np.array([-4.069766e-03, -7.631618e-02, -2.717806e-01])


@dataclass(frozen=True)
class Rig:
    """The sensor rig of one domain at one image size, in the exact numbers the calib files hold.

    projections: (4, 3, 4) P_rect_00..P_rect_03; R_rect_00: (3, 3); velo_R, velo_T: Velodyne -> camera 0 (unrectified),
    metres; velo_height: metres of the Velodyne above the road; width, height: image size in pixels.
    """

    width: int
    height: int
    projections: np.ndarray
    R_rect_00: np.ndarray
    velo_R: np.ndarray
    velo_T: np.ndarray
    velo_height: float
    date: str

    @property
    def P_rect_02(self) -> np.ndarray:
        return self.projections[2]

    @property
    def K(self) -> np.ndarray:
        """(3, 3) intrinsics of rectified camera 2 (pixels)."""
        return self.P_rect_02[:, :3].copy()

    def cam2_from_velo(self) -> tuple[np.ndarray, np.ndarray]:
        """Affine map (A, b) with X_cam2 = A @ X_velo + b: rectified camera 2 coordinates, z = depth (metres)."""
        offset = np.linalg.solve(self.K, self.P_rect_02[:, 3])
        return self.R_rect_00 @ self.velo_R, self.R_rect_00 @ self.velo_T + offset

    def camera_pose_in_velo(self) -> tuple[np.ndarray, np.ndarray]:
        """Rigid pose of camera_color_left in velo_link (the /tf_static transform): rotation (3, 3), translation (3,).

        The written numbers are rounded, so A is orthonormal only to ~1e-6; the nearest rotation is returned.
        """
        A, b = self.cam2_from_velo()
        u, _, vt = np.linalg.svd(A)
        rotation = (u @ vt).T
        return rotation, -np.linalg.solve(A, b)


def rounded(values: np.ndarray) -> np.ndarray:
    """Round to the precision of KITTI's text files ("%.6e"), keeping the shape."""
    values = np.asarray(values, dtype=np.float64)
    return np.array([float(f"{value:.6e}") for value in values.ravel()]).reshape(values.shape)


def rotation_x(angle: float) -> np.ndarray:
    """(3, 3) rotation by `angle` radians about the x axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def make_rig(
    size: tuple[int, int],
    date: str,
    focal_scale: float = 1.0,
    pitch_deg: float = 0.0,
    camera_raise: float = 0.0,
    velo_height: float = 1.73,
) -> Rig:
    """KITTI's rig scaled to `size` (height, width), with the domain's focal length, camera pitch and height.

    Args:
        size: image (height, width) in pixels; intrinsics scale with it (pixel centres at integer coordinates).
        date: recording day "YYYY_MM_DD" (names the calib folder).
        focal_scale: factor on fx, fy (< 1 widens the field of view).
        pitch_deg: extra downward tilt of the cameras, degrees.
        camera_raise: metres the cameras sit higher than in KITTI relative to the Velodyne.
        velo_height: metres of the Velodyne above the road (KITTI: 1.73).
    """
    height, width = size
    scale = np.array([width / KITTI_SIZE[1], height / KITTI_SIZE[0]])
    fx, fy = KITTI_FX * focal_scale * scale
    cx, cy = (np.array([KITTI_CX, KITTI_CY]) + 0.5) * scale - 0.5
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    projections = np.stack([np.concatenate([K, (K @ offset)[:, None]], axis=1) for offset in KITTI_CAMERA_OFFSETS])
    # Pitch the cameras down about their x axis, then move them up: the Velodyne frame stays level on the car.
    velo_R = rotation_x(np.radians(pitch_deg)) @ KITTI_VELO_R
    camera_in_velo = -KITTI_VELO_R.T @ KITTI_VELO_T + np.array([0.0, 0.0, camera_raise])
    velo_T = -velo_R @ camera_in_velo
    return Rig(
        width,
        height,
        rounded(projections),
        rounded(KITTI_R_RECT_00),
        rounded(velo_R),
        rounded(velo_T),
        velo_height,
        date,
    )


def _line(key: str, values: np.ndarray) -> str:
    return f"{key}: " + " ".join(f"{value:.6e}" for value in np.ravel(values))


def cam_to_cam_text(rig: Rig, calib_time: str) -> str:
    """calib_cam_to_cam.txt in KITTI's layout and number format.

    The images are rendered already rectified, so each raw camera (S/K/D/R/T_0i) is described as its rectified self:
    K_0i = P_rect_0i[:, :3], no distortion, R_rect_0i = R_rect_00, and T_0i the offset from camera 0.
    """
    lines = [f"calib_time: {calib_time}", _line("corner_dist", [9.95e-02])]
    size = np.array([rig.width, rig.height], dtype=np.float64)
    for index, projection in enumerate(rig.projections):
        K = projection[:, :3]
        offset = rig.R_rect_00.T @ np.linalg.solve(K, projection[:, 3])
        for key, values in (
            ("S", size), ("K", K), ("D", np.zeros(5)), ("R", np.eye(3)), ("T", offset),
            ("S_rect", size), ("R_rect", rig.R_rect_00), ("P_rect", projection),
        ):  # fmt: skip
            lines.append(_line(f"{key}_0{index}", values))
    return "\n".join(lines) + "\n"


def velo_to_cam_text(rig: Rig, calib_time: str) -> str:
    """calib_velo_to_cam.txt in KITTI's layout and number format."""
    lines = [f"calib_time: {calib_time}", _line("R", rig.velo_R), _line("T", rig.velo_T)]
    lines += [_line("delta_f", np.zeros(2)), _line("delta_c", np.zeros(2))]
    return "\n".join(lines) + "\n"
