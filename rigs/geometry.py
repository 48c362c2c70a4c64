"""Camera geometry in the OpenCV convention.

Conventions (shared by every stage):

* world frame: metres, z up, the floor is ``z = 0``;
* camera frame: OpenCV pinhole, x right, y down, z forward;
* a pose is world-to-camera, ``x_cam = R @ x_world + t``;
* intrinsics ``K`` 3x3 with the top-left pixel's centre at (0, 0), distortion
  ``k1 k2 p1 p2 k3`` (OpenCV's 5-parameter model).

The conversion to nerfstudio / OpenGL camera-to-world (x right, y up, z back)
happens in :func:`opencv_to_nerfstudio_c2w` and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rigs.errors import ShapeError


def _check(name: str, a: np.ndarray, shape: tuple[int | None, ...]) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    ok = a.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, a.shape))
    if not ok:
        want = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
        raise ShapeError(name, tuple(a.shape), want)
    return a


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels plus OpenCV distortion ``k1 k2 p1 p2 k3``."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    dist: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    @property
    def K(self) -> np.ndarray:  # noqa: N802 - the conventional name
        """The 3x3 camera matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def dist_array(self) -> np.ndarray:
        """Distortion as a float64 array of 5."""
        return np.asarray(self.dist, dtype=np.float64)

    @classmethod
    def from_lens(cls, width: int, height: int, focal_mm: float, sensor_mm: tuple[float, float],
                  principal_offset_px: tuple[float, float] = (0.0, 0.0),
                  dist: tuple[float, ...] = (0.0,) * 5) -> Intrinsics:
        """Intrinsics from a lens focal length and a sensor size (both mm)."""
        fx = focal_mm / sensor_mm[0] * width
        fy = focal_mm / sensor_mm[1] * height
        cx = (width - 1) / 2.0 + principal_offset_px[0]
        cy = (height - 1) / 2.0 + principal_offset_px[1]
        return cls(width, height, fx, fy, cx, cy, tuple(float(d) for d in dist))  # type: ignore[arg-type]

    def scaled(self, s: float) -> Intrinsics:
        """Intrinsics of the same lens on an image resized by ``s`` (pixel centres kept)."""
        w, h = round(self.width * s), round(self.height * s)
        return Intrinsics(w, h, self.fx * s, self.fy * s, (self.cx + 0.5) * s - 0.5,
                          (self.cy + 0.5) * s - 0.5, self.dist)

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "fx": self.fx, "fy": self.fy,
                "cx": self.cx, "cy": self.cy, "dist": list(self.dist)}

    @classmethod
    def from_dict(cls, d: dict) -> Intrinsics:
        return cls(int(d["width"]), int(d["height"]), float(d["fx"]), float(d["fy"]),
                   float(d["cx"]), float(d["cy"]), tuple(float(x) for x in d["dist"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Pose:
    """World-to-camera rigid transform: ``x_cam = R @ x_world + t``."""

    R: np.ndarray = field(default_factory=lambda: np.eye(3))  # [3, 3]
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))  # [3]

    def __post_init__(self) -> None:
        object.__setattr__(self, "R", _check("R", self.R, (3, 3)))
        object.__setattr__(self, "t", _check("t", self.t, (3,)))

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates, metres. [3]"""
        return -self.R.T @ self.t

    @property
    def matrix(self) -> np.ndarray:
        """The 4x4 world-to-camera matrix."""
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.R, self.t
        return m

    def inverse_matrix(self) -> np.ndarray:
        """The 4x4 camera-to-world matrix (OpenCV axes)."""
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.R.T, self.center
        return m

    def transform(self, points_world: np.ndarray) -> np.ndarray:
        """World points [N, 3] to camera coordinates [N, 3]."""
        p = _check("points_world", points_world, (None, 3))
        return p @ self.R.T + self.t

    def to_dict(self) -> dict:
        return {"R": self.R.tolist(), "t": self.t.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Pose:
        return cls(np.array(d["R"], dtype=np.float64), np.array(d["t"], dtype=np.float64))


@dataclass(frozen=True)
class Camera:
    """One calibrated camera: its id from the rig file, intrinsics and pose."""

    id: str
    intrinsics: Intrinsics
    pose: Pose

    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project world points [N, 3]; returns pixels [N, 2] and z-depth [N] in metres."""
        return project_points(points_world, self.intrinsics, self.pose)

    def to_dict(self) -> dict:
        return {"id": self.id, "intrinsics": self.intrinsics.to_dict(), "pose": self.pose.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Camera:
        return cls(d["id"], Intrinsics.from_dict(d["intrinsics"]), Pose.from_dict(d["pose"]))


def distort(xy: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Apply OpenCV's k1 k2 p1 p2 k3 model to normalised coordinates [N, 2]."""
    xy = _check("xy", xy, (None, 2))
    k1, k2, p1, p2, k3 = (float(v) for v in dist)
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    return np.stack([xd, yd], axis=-1)


def undistort(xy_d: np.ndarray, dist: np.ndarray, iterations: int = 20,
              dtype: type = np.float64) -> np.ndarray:
    """Invert :func:`distort` by Newton's method; [N, 2] -> [N, 2].

    Converges to ~1e-13 (normalised units) in 3-4 steps for the distortion of
    real lenses inside the image; with ``dtype=np.float32`` to ~1e-7 (about
    1e-4 px), twice as fast, for rendering.
    """
    xy_d = _check("xy_d", xy_d, (None, 2))
    k1, k2, p1, p2, k3 = (float(v) for v in dist)
    if not any((k1, k2, p1, p2, k3)):
        return xy_d.astype(dtype)
    tol = 1e-13 if np.dtype(dtype) == np.float64 else 2e-7
    xd, yd = xy_d[:, 0].astype(dtype), xy_d[:, 1].astype(dtype)
    x, y = xd.copy(), yd.copy()
    for _ in range(iterations):
        xx, yy, xy = x * x, y * y, x * y
        r2 = xx + yy
        radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
        drad = k1 + r2 * (2.0 * k2 + 3.0 * k3 * r2)  # d radial / d r2
        rx = x * radial + 2.0 * p1 * xy + p2 * (r2 + 2.0 * xx) - xd
        ry = y * radial + p1 * (r2 + 2.0 * yy) + 2.0 * p2 * xy - yd
        # Jacobian of distort (symmetric off-diagonal)
        j00 = radial + 2.0 * xx * drad + 2.0 * p1 * y + 6.0 * p2 * x
        j01 = 2.0 * xy * drad + 2.0 * p1 * x + 2.0 * p2 * y
        j11 = radial + 2.0 * yy * drad + 6.0 * p1 * y + 2.0 * p2 * x
        det = j00 * j11 - j01 * j01
        dx = (j11 * rx - j01 * ry) / det
        dy = (j00 * ry - j01 * rx) / det
        x -= dx
        y -= dy
        if max(np.abs(dx).max(initial=0.0), np.abs(dy).max(initial=0.0)) < tol:
            break
    return np.stack([x, y], axis=-1)


def project_points(points_world: np.ndarray, intr: Intrinsics, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
    """Project world points [N, 3] to distorted pixels [N, 2]; also returns z-depth [N].

    Equal to ``cv2.projectPoints`` (same model, float64). Points behind the
    camera get their pixels computed all the same; check ``depth > 0``.
    """
    pc = pose.transform(points_world)
    z = pc[:, 2]
    xy = pc[:, :2] / z[:, None]
    xy_d = distort(xy, intr.dist_array)
    uv = np.empty_like(xy_d)
    uv[:, 0] = intr.fx * xy_d[:, 0] + intr.cx
    uv[:, 1] = intr.fy * xy_d[:, 1] + intr.cy
    return uv, z


def pixel_rays(intr: Intrinsics, pose: Pose, uv: np.ndarray | None = None,
               dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Rays through pixels (default: every pixel centre, row-major).

    Returns the camera centre [3] and unit directions in world coordinates
    [N, 3] (N = width*height when ``uv`` is None), and honours distortion:
    the ray through pixel (u, v) projects back onto (u, v) (to 1e-9 px in
    float64; to ~1e-4 px with ``dtype=np.float32``, for rendering).
    """
    if uv is None:
        u, v = np.meshgrid(np.arange(intr.width, dtype=np.float64),
                           np.arange(intr.height, dtype=np.float64))
        uv = np.stack([u.ravel(), v.ravel()], axis=-1)
    uv = _check("uv", uv, (None, 2))
    xy_d = np.stack([(uv[:, 0] - intr.cx) / intr.fx, (uv[:, 1] - intr.cy) / intr.fy], axis=-1)
    xy = undistort(xy_d, intr.dist_array, dtype=dtype)
    d_cam = np.concatenate([xy, np.ones((len(xy), 1), dtype=dtype)], axis=1)
    d_cam /= np.linalg.norm(d_cam, axis=1, keepdims=True)
    return pose.center, d_cam @ pose.R.astype(dtype)  # R^T applied row-wise


def look_at(position: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, 0.0, 1.0)) -> Pose:
    """World-to-camera pose of a camera at ``position`` looking at ``target``.

    The image's "up" (-y in OpenCV) is as close to world ``up`` as possible.
    Raises ValueError when the viewing direction is parallel to ``up``.
    """
    c = _check("position", position, (3,))
    z = _check("target", target, (3,)) - c
    n = np.linalg.norm(z)
    if n == 0:
        raise ValueError("look_at: position and target coincide")
    z = z / n
    upv = _check("up", up, (3,))
    x = np.cross(z, upv)  # right = forward x up (OpenCV: y down)
    nx = np.linalg.norm(x)
    if nx < 1e-9:
        raise ValueError("look_at: viewing direction is parallel to up")
    x /= nx
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world coordinates
    return Pose(R, -R @ c)


#: flips OpenCV camera axes (x right, y down, z forward) to OpenGL (x right, y up, z back)
_CV_TO_GL = np.diag([1.0, -1.0, -1.0])


def opencv_to_nerfstudio_c2w(pose: Pose) -> np.ndarray:
    """The 4x4 camera-to-world matrix in nerfstudio/OpenGL axes (y up, z back).

    The one place where twinstudio changes camera conventions.
    """
    c2w = pose.inverse_matrix()
    c2w[:3, :3] = c2w[:3, :3] @ _CV_TO_GL
    return c2w


def nerfstudio_c2w_to_opencv(c2w: np.ndarray) -> Pose:
    """Inverse of :func:`opencv_to_nerfstudio_c2w`."""
    m = _check("c2w", c2w, (4, 4)) if np.shape(c2w) == (4, 4) else _check("c2w", c2w, (3, 4))
    r_cv = m[:3, :3] @ _CV_TO_GL
    R = r_cv.T
    return Pose(R, -R @ m[:3, 3])


def rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    """Angle of the rotation between two rotation matrices, in degrees."""
    c = (np.trace(Ra.T @ Rb) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))
