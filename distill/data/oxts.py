"""Vehicle poses in KITTI raw's OXTS format (GPS/IMU), written by `distill synth` and read back as 4x4 poses.

Layout of a drive: <drive>_sync/oxts/data/%010d.txt (one line of 30 numbers per frame, `OXTS_FIELDS`),
oxts/timestamps.txt and oxts/dataformat.txt; the recording day holds calib_imu_to_velo.txt (X_velo = R X_imu + T).

Poses follow the KITTI raw devkit (convertOxtsToPose.m, Geiger et al. IJRR 2013; pykitti's `pose_from_oxts_packet`):
a Mercator projection with scale s = cos(lat_0) of the drive's first frame, x = s R_e lon π / 180 (east),
y = s R_e ln tan((90 + lat) π / 360) (north), z = alt, R = Rz(yaw) Ry(pitch) Rx(roll); translations are taken
relative to the first frame (rotations stay absolute: yaw 0 = east). Numbers are written with 17 significant digits,
so poses read back equal the poses written to well under a millimetre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.errors import UserError

EARTH_RADIUS = 6378137.0  # metres, WGS-84 equatorial radius (the devkit's `er`)
# First frame of KITTI raw 2011_09_26_drive_0001 (Karlsruhe): where every synthetic drive starts.
ORIGIN = (49.015003823272, 8.4342971002335, 116.43032836914)  # lat, lon (degrees), alt (metres)
OXTS_FIELDS = (
    "lat", "lon", "alt", "roll", "pitch", "yaw", "vn", "ve", "vf", "vl", "vu", "ax", "ay", "az", "af", "al", "au",
    "wx", "wy", "wz", "wf", "wl", "wu", "pos_accuracy", "vel_accuracy", "navstat", "numsats", "posmode", "velmode",
    "orimode",
)  # fmt: skip
GRAVITY = 9.80665  # m/s², in the accelerations an IMU at rest measures (az, au)


def rotation_rpy(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations Rz(yaw) Ry(pitch) Rx(roll) of (N,) angles in radians (the OXTS convention)."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    return np.stack(
        [
            np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
            np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
            np.stack([-sp, cp * sr, cp * cr], -1),
        ],
        -2,
    )


def mercator(lat: np.ndarray, lon: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Degrees -> Mercator metres (x east, y north) at map scale `scale` (cos of the reference latitude)."""
    x = scale * np.radians(lon) * EARTH_RADIUS
    y = scale * EARTH_RADIUS * np.log(np.tan(np.radians(90.0 + np.asarray(lat)) / 2))
    return x, y


def inverse_mercator(x: np.ndarray, y: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Mercator metres (x east, y north) at `scale` -> latitude, longitude in degrees."""
    lon = np.degrees(np.asarray(x) / (scale * EARTH_RADIUS))
    lat = 2 * np.degrees(np.arctan(np.exp(np.asarray(y) / (scale * EARTH_RADIUS)))) - 90.0
    return lat, lon


def oxts_from_poses(poses: np.ndarray, times: np.ndarray) -> np.ndarray:
    """OXTS packets of a drive whose IMU poses are `poses`, the first frame placed at `ORIGIN`.

    Args:
        poses: (N, 4, 4) IMU poses in a local level frame (x east, y north, z up), metres; rotations with roll,
            pitch, yaw as in `rotation_rpy`.
        times: (N,) seconds of each frame.

    Returns:
        (N, 30) float64 in `OXTS_FIELDS` order. Velocities and rates are finite differences of the poses (np.gradient),
        in the local frame (vn, ve, vu) and the vehicle frame (vf, vl, wf, wl, wu; wx, wy, wz alike); accelerations
        likewise, with gravity added on the up axis as an accelerometer measures it.
    """
    poses, times = np.asarray(poses, np.float64), np.asarray(times, np.float64)
    rotation, position = poses[:, :3, :3], poses[:, :3, 3]
    roll = np.arctan2(rotation[:, 2, 1], rotation[:, 2, 2])
    pitch = -np.arcsin(np.clip(rotation[:, 2, 0], -1.0, 1.0))
    yaw = np.arctan2(rotation[:, 1, 0], rotation[:, 0, 0])
    scale = np.cos(np.radians(ORIGIN[0]))
    x0, y0 = mercator(ORIGIN[0], ORIGIN[1], scale)
    lat, lon = inverse_mercator(x0 + position[:, 0] - position[0, 0], y0 + position[:, 1] - position[0, 1], scale)
    alt = ORIGIN[2] + position[:, 2] - position[0, 2]
    count = len(poses)
    packets = np.zeros((count, len(OXTS_FIELDS)))
    packets[:, :6] = np.stack([lat, lon, alt, roll, pitch, yaw], -1)
    if count > 1:
        velocity = np.gradient(position, times, axis=0)
        acceleration = np.gradient(velocity, times, axis=0) + [0.0, 0.0, GRAVITY]
        rates = np.gradient(np.unwrap(np.stack([roll, pitch, yaw], -1), axis=0), times, axis=0)
        to_vehicle = np.transpose(rotation, (0, 2, 1))
        packets[:, 6:11] = np.concatenate([velocity[:, [1, 0]], np.einsum("nij,nj->ni", to_vehicle, velocity)], -1)
        packets[:, 11:14] = np.einsum("nij,nj->ni", to_vehicle, acceleration)
        packets[:, 14:17] = packets[:, 11:14]
        packets[:, 17:20] = rates
        packets[:, 20:23] = rates
    else:
        packets[:, [13, 16]] = GRAVITY
    packets[:, 23:] = [0.02, 0.01, 4, 10, 4, 4, 4]  # RTK-grade accuracies (m, m/s), navstat, satellites, modes
    return packets


def oxts_line(packet: np.ndarray) -> str:
    """One oxts/data file's text: 30 space-separated numbers, the flags as integers (KITTI's layout)."""
    # + 0.0 turns -0.0 into 0.0, so a level vehicle reads "0", not "-0".
    values = [f"{value + 0.0:.17g}" for value in packet[:25]] + [str(int(value)) for value in packet[25:]]
    return " ".join(values) + "\n"


def poses_from_oxts(packets: np.ndarray) -> np.ndarray:
    """The devkit's IMU poses of a drive's OXTS packets.

    Args:
        packets: (N, >= 6) lat, lon (degrees), alt (metres), roll, pitch, yaw (radians), ...

    Returns:
        (N, 4, 4) float64 IMU poses: x east, y north, z up, metres, translations relative to the first frame.
    """
    packets = np.asarray(packets, np.float64)
    scale = np.cos(np.radians(packets[0, 0]))
    x, y = mercator(packets[:, 0], packets[:, 1], scale)
    poses = np.tile(np.eye(4), (len(packets), 1, 1))
    poses[:, :3, :3] = rotation_rpy(packets[:, 3], packets[:, 4], packets[:, 5])
    poses[:, :3, 3] = np.stack([x - x[0], y - y[0], packets[:, 2] - packets[0, 2]], -1)
    return poses


def read_oxts(drive_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The OXTS packets of a drive folder (<drive>_sync/oxts/data/%010d.txt), in frame order.

    Returns:
        frames: (N,) int64 frame numbers (from the file names; a partial download may lack some).
        packets: (N, 30) float64 in `OXTS_FIELDS` order.

    Raises:
        UserError: no OXTS file, or one that is unreadable or does not hold 30 numbers.
    """
    files = sorted((Path(drive_dir) / "oxts" / "data").glob("*.txt"))
    if not files or not all(path.stem.isdigit() for path in files):
        raise UserError(f"no OXTS poses in {drive_dir}: expected oxts/data/0000000000.txt, ...")
    try:
        packets = [np.array(path.read_text().split(), dtype=np.float64) for path in files]
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the OXTS poses of {drive_dir}: {error}") from None
    if bad := [path.name for path, packet in zip(files, packets) if packet.size != len(OXTS_FIELDS)]:
        raise UserError(f"OXTS file {Path(drive_dir) / 'oxts' / 'data' / bad[0]} does not hold 30 numbers")
    return np.array([int(path.stem) for path in files], np.int64), np.stack(packets)


def read_imu_poses(drive_dir: Path) -> dict[int, np.ndarray]:
    """Frame number -> (4, 4) IMU pose of a drive folder (see `poses_from_oxts`)."""
    frames, packets = read_oxts(drive_dir)
    return dict(zip(frames.tolist(), poses_from_oxts(packets)))
