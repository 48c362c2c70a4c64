"""Pose parameters, forward kinematics and motion clips of the virtual person.

Conventions (shared with :mod:`rigs.virtual.person`):

* metres and radians; world frame z up, floor at ``z = 0``;
* at rest the person stands at the origin facing ``-y``, so ``+x`` is the
  person's LEFT, ``+y`` is behind them and ``+z`` is up;
* every joint's rest frame is parallel to the world frame, so a joint's local
  axes read the same way (x = left, y = back, z = up) before any rotation;
* a joint's Euler angles ``(ax, ay, az)`` give its local rotation
  ``R = Rx(ax) @ Ry(ay) @ Rz(az)`` (intrinsic x, then y', then z'');
* a joint's local-to-world transform is ``G_parent @ T(offset) @ R``; the root
  (pelvis) is ``T(pelvis_rest + root_translation) @ Rz(root_yaw) @ R_pelvis``,
  i.e. the yaw turns the body about the vertical through the pelvis.

Sign cheat sheet (rest frames): positive x rotation swings a hanging limb
backwards (hip extension, knee flexion) and tips the head forward (nod);
negative y rotation raises the LEFT arm sideways (abduction), positive y the
right arm; positive z rotation turns towards the person's left.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rigs.errors import ShapeError, TwinstudioError


class JointLike(Protocol):
    """Anything with a joint's name, parent name and rest offset (metres)."""

    name: str
    parent: str | None
    offset: np.ndarray  # [3]


def euler_xyz_matrix(angles: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rotation ``Rx(ax) @ Ry(ay) @ Rz(az)`` for Euler angles in radians. [3, 3]"""
    ax, ay, az = (float(a) for a in angles)
    cx, sx = math.cos(ax), math.sin(ax)
    cy, sy = math.cos(ay), math.sin(ay)
    cz, sz = math.cos(az), math.sin(az)
    return np.array([
        [cy * cz, -cy * sz, sy],
        [cx * sz + sx * sy * cz, cx * cz - sx * sy * sz, -sx * cy],
        [sx * sz - cx * sy * cz, sx * cz + cx * sy * sz, cx * cy],
    ])


def matrix_to_euler_xyz(R: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_xyz_matrix` (``|ay| < pi/2``); radians. [3]"""
    ay = math.asin(max(-1.0, min(1.0, float(R[0, 2]))))
    ax = math.atan2(-float(R[1, 2]), float(R[2, 2]))
    az = math.atan2(-float(R[0, 1]), float(R[0, 0]))
    return np.array([ax, ay, az])


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class PoseParams:
    """A pose of the virtual person.

    ``angles`` maps joint names to ``[3]`` XYZ Euler angles in radians in the
    joint's local frame (missing joints stay at rest); ``root_translation``
    (metres, world frame) is added to the pelvis rest position; ``root_yaw``
    (radians) turns the whole body about the world z axis through the pelvis.
    """

    angles: dict[str, np.ndarray] = field(default_factory=dict)
    root_translation: np.ndarray = field(default_factory=lambda: np.zeros(3))  # [3]
    root_yaw: float = 0.0

    def __post_init__(self) -> None:
        angles = {}
        for name, a in self.angles.items():
            arr = np.asarray(a, dtype=np.float64)
            if arr.shape != (3,):
                raise ShapeError(f"angles[{name!r}]", tuple(arr.shape), "[3]")
            angles[name] = arr
        t = np.asarray(self.root_translation, dtype=np.float64)
        if t.shape != (3,):
            raise ShapeError("root_translation", tuple(t.shape), "[3]")
        object.__setattr__(self, "angles", angles)
        object.__setattr__(self, "root_translation", t)
        object.__setattr__(self, "root_yaw", float(self.root_yaw))

    @classmethod
    def rest(cls) -> PoseParams:
        """The rest pose: every angle zero, no translation, no yaw."""
        return cls()


def forward_kinematics(joints: Sequence[JointLike], params: PoseParams | None = None
                       ) -> dict[str, np.ndarray]:
    """Local-to-world transforms ``[4, 4]`` of every joint (see module conventions).

    ``joints`` must be in topological order (parent before child) with exactly
    one root. Raises TwinstudioError for an angle given for an unknown joint.
    """
    params = params if params is not None else PoseParams()
    names = {j.name for j in joints}
    for name in params.angles:
        if name not in names:
            raise TwinstudioError(f"pose names an unknown joint {name!r}", joint=name)
    out: dict[str, np.ndarray] = {}
    for j in joints:
        a = params.angles.get(j.name)
        R = euler_xyz_matrix(a) if a is not None else np.eye(3)
        G = np.eye(4)
        if j.parent is None:
            G[:3, :3] = _rot_z(params.root_yaw) @ R
            G[:3, 3] = np.asarray(j.offset, dtype=np.float64) + params.root_translation
        else:
            P = out[j.parent]
            G[:3, :3] = P[:3, :3] @ R
            G[:3, 3] = P[:3, :3] @ np.asarray(j.offset, dtype=np.float64) + P[:3, 3]
        out[j.name] = G
    return out


@dataclass(frozen=True)
class MotionClip:
    """A named sequence of poses sampled at ``fps`` frames per second."""

    name: str
    fps: float
    frames: int
    poses: tuple[PoseParams, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.frames < 1 or self.fps <= 0:
            raise TwinstudioError("a clip needs frames >= 1 and fps > 0",
                                  frames=self.frames, fps=self.fps)
        if len(self.poses) != self.frames:
            raise TwinstudioError("a clip needs one pose per frame",
                                  frames=self.frames, poses=len(self.poses))

    def params(self, frame: int) -> PoseParams:
        """The pose at ``frame`` (0-based; deterministic)."""
        if not 0 <= frame < self.frames:
            raise IndexError(f"frame {frame} outside clip {self.name!r} of {self.frames} frames")
        return self.poses[frame]

    def time(self, frame: int) -> float:
        """Time of ``frame`` in seconds, ``frame / fps``."""
        return frame / self.fps


def _ease(s: float) -> float:
    """Quintic ease-in-out on [0, 1] (zero velocity and acceleration at both ends)."""
    s = min(max(s, 0.0), 1.0)
    return s * s * s * (s * (6.0 * s - 15.0) + 10.0)


def _bump(s: float) -> float:
    """Smooth 0 -> 1 -> 0 over [0, 1]."""
    return math.sin(math.pi * min(max(s, 0.0), 1.0)) ** 2


def _plant_feet(joints: Sequence[JointLike], angles: dict[str, np.ndarray],
                shift: np.ndarray, yaw: float, rest_ankle_z: float) -> PoseParams:
    """Set the ankle angles so the feet stay flat and lift the root so the
    lower ankle stays at its rest height (soles on the floor)."""
    trial = PoseParams(angles, shift, yaw)
    G = forward_kinematics(joints, trial)
    flat = _rot_z(yaw)
    for side in ("l", "r"):
        R_knee = G[f"knee_{side}"][:3, :3]
        angles[f"ankle_{side}"] = matrix_to_euler_xyz(R_knee.T @ flat)
    G = forward_kinematics(joints, PoseParams(angles, shift, yaw))
    low = min(G["ankle_l"][2, 3], G["ankle_r"][2, 3])
    return PoseParams(angles, shift + np.array([0.0, 0.0, rest_ankle_z - low]), yaw)


def _turn_and_raise(joints: Sequence[JointLike], s: float, rest_ankle_z: float,
                    leg_length: float) -> PoseParams:
    e, b = _ease(s), _bump(s)
    deg = math.radians
    knee = deg(10.0) * b                   # half the knee flexion
    dx = 0.03 * b                          # lateral weight shift, body frame
    roll = math.asin(dx / leg_length)      # leg roll that keeps the ankles in place
    yaw = deg(90.0) * e
    angles = {
        "spine": np.array([0.0, 0.0, deg(6.0) * b]),
        "chest": np.array([deg(-2.0) * b, 0.0, deg(6.0) * b]),
        "neck": np.array([deg(4.0) * b, 0.0, deg(5.0) * b]),
        "head": np.array([deg(8.0) * b, deg(-3.0) * b, deg(12.0) * b]),
        "shoulder_l": np.array([deg(-8.0) * e, deg(-70.0) * e, 0.0]),
        "shoulder_r": np.array([deg(-8.0) * e, deg(70.0) * e, 0.0]),
        "elbow_l": np.array([deg(-20.0) * e, 0.0, 0.0]),
        "elbow_r": np.array([deg(-20.0) * e, 0.0, 0.0]),
        "wrist_l": np.array([deg(-10.0) * e, 0.0, 0.0]),
        "wrist_r": np.array([deg(-10.0) * e, 0.0, 0.0]),
        "hip_l": np.array([-knee, roll, 0.0]),
        "hip_r": np.array([-knee, roll, 0.0]),
        "knee_l": np.array([2.0 * knee, 0.0, 0.0]),
        "knee_r": np.array([2.0 * knee, 0.0, 0.0]),
    }
    shift = _rot_z(yaw) @ np.array([dx, 0.0, 0.0])
    return _plant_feet(joints, angles, shift, yaw, rest_ankle_z)


def make_clip(name: str, pose_at: Callable[[float], PoseParams], frames: int,
              fps: float) -> MotionClip:
    """A clip sampling ``pose_at(s)`` at ``s = frame / (frames - 1)`` in [0, 1]."""
    if frames < 1:
        raise TwinstudioError("a clip needs frames >= 1", frames=frames)
    poses = tuple(pose_at(f / (frames - 1) if frames > 1 else 0.0) for f in range(frames))
    return MotionClip(name=name, fps=float(fps), frames=frames, poses=poses)


def default_clip(frames: int = 24, fps: float = 24.0) -> MotionClip:
    """The "turn and arm raise" clip.

    Over the clip the body turns 90 degrees to its left (ease-in-out), both
    arms raise sideways by 70 degrees with the elbows bending 20 degrees, the
    head nods and turns a little, and the hips shift sideways by up to 3 cm
    with a small knee bend (mid-clip). The feet stay flat with their soles on
    the floor. Frame 0 is exactly the rest pose.
    """
    from rigs.virtual.person import skeleton  # person.py imports this module

    joints = skeleton()
    rest = forward_kinematics(joints)
    rest_ankle_z = float(rest["ankle_l"][2, 3])
    leg = float(rest["hip_l"][2, 3] - rest_ankle_z)
    return make_clip("turn_and_raise",
                     lambda s: _turn_and_raise(joints, s, rest_ankle_z, leg), frames, fps)


def clip_from_params(name: str, poses: Sequence[PoseParams], fps: float) -> MotionClip:
    """A clip from an explicit list of poses."""
    return MotionClip(name=name, fps=float(fps), frames=len(poses), poses=tuple(poses))


__all__ = [
    "JointLike", "MotionClip", "PoseParams", "clip_from_params", "default_clip",
    "euler_xyz_matrix", "forward_kinematics", "make_clip", "matrix_to_euler_xyz",
]
