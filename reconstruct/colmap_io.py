"""Read and write COLMAP text models (``cameras.txt``, ``images.txt``, ``points3D.txt``).

Conventions, and the one place where they change:

* twinstudio (OpenCV) puts the top-left pixel's centre at (0, 0); COLMAP puts
  it at (0.5, 0.5). Writing adds 0.5 to the principal point
  (``cx_colmap = cx + 0.5``), reading subtracts it. Focal lengths and
  distortion coefficients are the same in both.
* poses are world-to-camera in both (``x_cam = R @ x_world + t``), COLMAP
  storing ``R`` as a unit quaternion ``QW QX QY QZ`` (Hamilton, ``qw >= 0``
  when written here).
* distortion ``k1 k2 p1 p2`` becomes COLMAP's ``OPENCV`` model, and with
  ``k3 != 0`` ``FULL_OPENCV`` (``k4 = k5 = k6 = 0``, the rational terms off,
  which is OpenCV's 5-parameter model).

One COLMAP camera per image: ``CAMERA_ID = IMAGE_ID = index + 1``. Besides the
three classic files the writer also puts a trivial ``rigs.txt`` and
``frames.txt`` (one rig and one frame per camera) in the folder, as COLMAP
>= 3.12 / pycolmap 4 write them: those readers take poses from ``frames.txt``
when it exists, so a stale one left by an earlier run would silently
override the poses in ``images.txt``. Older readers ignore both files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rigs.errors import ShapeError, TwinstudioError
from rigs.fileio import atomic_write_bytes
from rigs.geometry import Camera, Intrinsics, Pose

#: half a pixel: COLMAP pixel coordinates minus OpenCV pixel coordinates
PIXEL_OFFSET = 0.5

#: COLMAP models this module reads -> number of parameters
SUPPORTED_MODELS = {
    "SIMPLE_PINHOLE": 3,  # f cx cy
    "PINHOLE": 4,  # fx fy cx cy
    "SIMPLE_RADIAL": 4,  # f cx cy k
    "RADIAL": 5,  # f cx cy k1 k2
    "OPENCV": 8,  # fx fy cx cy k1 k2 p1 p2
    "FULL_OPENCV": 12,  # fx fy cx cy k1 k2 p1 p2 k3 k4 k5 k6
}

#: grey given to points written without colours
DEFAULT_POINT_COLOR = (128, 128, 128)

_ORTHONORMAL_TOL = 1e-6


class ColmapError(TwinstudioError):
    """A COLMAP model cannot be read or written: names the file, the line and the camera."""

    exit_code = 2

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None,
                 camera: str | None = None) -> None:
        where = str(path) if path is not None else "<colmap model>"
        if line is not None:
            where += f":{line}"
        if camera is not None:
            where += f" [camera {camera}]"
        super().__init__(f"{where}: {message}", path=path, line=line, camera=camera)
        self.reason = message
        self.path = Path(path) if path is not None else None
        self.line = line
        self.camera = camera


@dataclass(frozen=True)
class ColmapModel:
    """A COLMAP model in twinstudio's (OpenCV) conventions.

    ``cameras`` in IMAGE_ID order; ``names`` maps each camera id to its image
    NAME; ``points`` [N, 3] float64 in world units; ``colors`` [N, 3] uint8 RGB.
    """

    cameras: list[Camera]
    names: dict[str, str]
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # [N, 3]
    colors: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.uint8))  # [N, 3]


# --------------------------------------------------------------------------- quaternions

def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """Unit quaternion ``[w, x, y, z]`` (Hamilton, ``w >= 0``) of a rotation matrix [3, 3].

    COLMAP's order in its text files; pycolmap's ``Rotation3d.quat`` is the
    same quaternion in ``[x, y, z, w]`` order. Shepperd's method: accurate to
    float64 rounding for every rotation, including 180-degree ones.
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3):
        raise ShapeError("R", tuple(R.shape), "[3, 3]")
    tr = R[0, 0] + R[1, 1] + R[2, 2]
    if tr > 0.0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    qv = np.asarray(q, dtype=np.float64)
    qv /= np.linalg.norm(qv)
    return -qv if qv[0] < 0.0 else qv


def qvec_to_rotmat(q: np.ndarray) -> np.ndarray:
    """Rotation matrix [3, 3] of a quaternion ``[w, x, y, z]`` (Hamilton); normalises ``q`` first.

    Raises ValueError for a zero quaternion.
    """
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (4,):
        raise ShapeError("q", tuple(q.shape), "[4]")
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError(f"quaternion {q.tolist()} has no direction")
    w, x, y, z = q / n
    return np.array([
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
        [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
        [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
    ])


# --------------------------------------------------------------------------- writing

def _num(x: float) -> str:
    """Shortest text that reads back to the same float64."""
    return repr(float(x))


def _camera_line(cam_id: int, intr: Intrinsics) -> str:
    k1, k2, p1, p2, k3 = (float(d) for d in intr.dist)
    params = [intr.fx, intr.fy, intr.cx + PIXEL_OFFSET, intr.cy + PIXEL_OFFSET, k1, k2, p1, p2]
    if k3 == 0.0:
        model = "OPENCV"
    else:
        model = "FULL_OPENCV"
        params += [k3, 0.0, 0.0, 0.0]
    return f"{cam_id} {model} {int(intr.width)} {int(intr.height)} " + " ".join(_num(p) for p in params)


def _check_camera(cam: Camera) -> None:
    intr, R, t = cam.intrinsics, cam.pose.R, cam.pose.t
    values = [intr.fx, intr.fy, intr.cx, intr.cy, *intr.dist]
    if len(intr.dist) != 5:
        raise ColmapError(f"distortion has {len(intr.dist)} coefficients, expected 5 (k1 k2 p1 p2 k3)",
                          camera=cam.id)
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(R)) and np.all(np.isfinite(t))):
        raise ColmapError("intrinsics or pose hold a non-finite number", camera=cam.id)
    if intr.width <= 0 or intr.height <= 0 or intr.fx <= 0 or intr.fy <= 0:
        raise ColmapError(f"image size {intr.width}x{intr.height} and focal lengths "
                          f"{intr.fx}, {intr.fy} must be positive", camera=cam.id)
    err = np.abs(R.T @ R - np.eye(3)).max()
    if err > _ORTHONORMAL_TOL or np.linalg.det(R) < 0.0:
        raise ColmapError(f"pose R is not a rotation (|R^T R - I| = {err:.2g}, det = "
                          f"{np.linalg.det(R):.6g})", camera=cam.id)


def _check_name(name: str, cam_id: str) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ColmapError(f"image name {name!r} is empty or holds whitespace, which COLMAP's text "
                          "format cannot store", camera=cam_id)


def _points_lines(points: np.ndarray | None, point_colors: object) -> list[str]:
    if points is None:
        if point_colors is not None:
            raise ColmapError("point_colors given without points")
        return []
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ShapeError("points", tuple(pts.shape), "[N, 3]")
    if not np.all(np.isfinite(pts)):
        raise ColmapError("points hold a non-finite coordinate")
    if point_colors is None:
        cols = np.broadcast_to(np.asarray(DEFAULT_POINT_COLOR, dtype=np.int64), pts.shape)
    else:
        raw = np.asarray(point_colors)
        if raw.shape != pts.shape:
            raise ShapeError("point_colors", tuple(raw.shape), f"[{len(pts)}, 3]")
        if not np.issubdtype(raw.dtype, np.number) or not np.all(np.isfinite(raw)) \
                or raw.min(initial=0) < 0 or raw.max(initial=0) > 255 or np.any(raw != np.round(raw)):
            raise ColmapError("point_colors must be whole numbers 0..255 (RGB)")
        cols = raw.astype(np.int64)
    # ERROR 0.0 rather than COLMAP's -1 ("not computed"): readers that average
    # or threshold the error then keep these track-less points.
    return [f"{i + 1} {_num(p[0])} {_num(p[1])} {_num(p[2])} {c[0]} {c[1]} {c[2]} 0.0"
            for i, (p, c) in enumerate(zip(pts, cols))]


def write_colmap_text(folder: Path | str, cameras: Sequence[Camera],
                      image_names: dict[str, str] | None = None, points: np.ndarray | None = None,
                      point_colors: np.ndarray | None = None) -> None:
    """Write ``cameras`` (and optional ``points`` [N, 3], colours [N, 3] RGB 0..255) as a COLMAP text model.

    Creates ``folder`` if needed and writes ``cameras.txt``, ``images.txt``,
    ``points3D.txt`` (tracks empty) plus a trivial ``rigs.txt`` and
    ``frames.txt``, each atomically. Image ``i`` is ``cameras[i]`` with
    ``IMAGE_ID = CAMERA_ID = i + 1`` and NAME ``image_names.get(camera.id,
    f"{camera.id}.jpg")``. Principal points are shifted by +0.5 px to
    COLMAP's pixel convention. Every input is checked before anything is
    written; raises ColmapError (or ShapeError) naming the camera.
    """
    image_names = image_names or {}
    cameras = list(cameras)
    ids = [c.id for c in cameras]
    for cam in cameras:
        if ids.count(cam.id) > 1:
            raise ColmapError("camera id appears more than once", camera=cam.id)
        _check_camera(cam)
    names = [image_names.get(c.id, f"{c.id}.jpg") for c in cameras]
    for cam, name in zip(cameras, names):
        _check_name(name, cam.id)
        if names.count(name) > 1:
            raise ColmapError(f"image name {name!r} is given to more than one camera", camera=cam.id)
    point_lines = _points_lines(points, point_colors)

    cam_lines, image_lines, rig_lines, frame_lines = [], [], [], []
    for i, (cam, name) in enumerate(zip(cameras, names)):
        k = i + 1
        q = rotmat_to_qvec(cam.pose.R)
        pose = " ".join(_num(v) for v in (*q, *cam.pose.t))
        cam_lines.append(_camera_line(k, cam.intrinsics))
        image_lines += [f"{k} {pose} {k} {name}", ""]  # the empty line: no 2D points
        rig_lines.append(f"{k} 1 CAMERA {k}")
        frame_lines.append(f"{k} {k} {pose} 1 CAMERA {k} {k}")

    n = len(cameras)
    files = {
        "cameras.txt": ["# Camera list with one line of data per camera:",
                        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
                        "# Principal points in COLMAP's convention (top-left pixel centre at 0.5, 0.5)",
                        f"# Number of cameras: {n}", *cam_lines],
        "images.txt": ["# Image list with two lines of data per image:",
                       "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
                       "#   POINTS2D[] as (X, Y, POINT3D_ID)",
                       f"# Number of images: {n}, mean observations per image: 0", *image_lines],
        "points3D.txt": ["# 3D point list with one line of data per point:",
                         "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
                         f"# Number of points: {len(point_lines)}, mean track length: 0", *point_lines],
        "rigs.txt": ["# Rig calib list with one line of data per calib:",
                     ("#   RIG_ID, NUM_SENSORS, REF_SENSOR_TYPE, REF_SENSOR_ID, SENSORS[] as "
                      "(SENSOR_TYPE, SENSOR_ID, HAS_POSE, [QW, QX, QY, QZ, TX, TY, TZ])"),
                     f"# Number of rigs: {n}", *rig_lines],
        "frames.txt": ["# Frame list with one line of data per frame:",
                       ("#   FRAME_ID, RIG_ID, RIG_FROM_WORLD[QW, QX, QY, QZ, TX, TY, TZ], NUM_DATA_IDS, "
                        "DATA_IDS[] as (SENSOR_TYPE, SENSOR_ID, DATA_ID)"),
                       f"# Number of frames: {n}", *frame_lines],
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for fname, lines in files.items():
        atomic_write_bytes(folder / fname, ("\n".join(lines) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- reading

def strip_extension(name: str) -> str:
    """An image NAME without the extension of its last component: ``"a/cam01.jpg"`` -> ``"a/cam01"``."""
    head, sep, tail = name.rpartition("/")
    dot = tail.rfind(".")
    return head + sep + (tail[:dot] if dot > 0 else tail)


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every line of ``path``; ColmapError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ColmapError("file is missing", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ColmapError(f"cannot read: {e}", path=path) from None
    return [(i + 1, s.strip()) for i, s in enumerate(text.splitlines())]


def _parse(tokens: list[str], kinds: str, path: Path, lineno: int, what: str) -> list:
    """Convert ``tokens`` by ``kinds`` (``i`` int, ``f`` finite float)."""
    out: list = []
    for tok, kind in zip(tokens, kinds):
        try:
            v = int(tok) if kind == "i" else float(tok)
        except ValueError:
            raise ColmapError(f"{what}: {tok!r} is not {'an integer' if kind == 'i' else 'a number'}",
                              path=path, line=lineno) from None
        if kind == "f" and not np.isfinite(v):
            raise ColmapError(f"{what}: {tok!r} is not finite", path=path, line=lineno)
        out.append(v)
    return out


def colmap_intrinsics(model: str, width: int, height: int, p: list[float], path: Path | None = None,
                      lineno: int | None = None) -> Intrinsics:
    """Twinstudio intrinsics (OpenCV pixel convention) of a COLMAP camera model and its parameters."""
    off = PIXEL_OFFSET
    if model not in ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV"):
        raise ColmapError(f"COLMAP camera model {model} is not supported", path=path, line=lineno, model=model)
    if model == "SIMPLE_PINHOLE":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], (0.0,) * 5
    elif model == "PINHOLE":
        fx, fy, cx, cy = p
        dist = (0.0,) * 5
    elif model == "SIMPLE_RADIAL":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], (p[3], 0.0, 0.0, 0.0, 0.0)
    elif model == "RADIAL":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], (p[3], p[4], 0.0, 0.0, 0.0)
    elif model == "OPENCV":
        fx, fy, cx, cy = p[:4]
        dist = (p[4], p[5], p[6], p[7], 0.0)
    else:  # FULL_OPENCV
        if any(v != 0.0 for v in p[9:12]):
            raise ColmapError(f"FULL_OPENCV with rational terms k4 k5 k6 = {p[9:12]} cannot be "
                              "expressed in OpenCV's k1 k2 p1 p2 k3 model", path=path, line=lineno)
        fx, fy, cx, cy = p[:4]
        dist = (p[4], p[5], p[6], p[7], p[8])
    if width <= 0 or height <= 0 or fx <= 0 or fy <= 0:
        raise ColmapError(f"image size {width}x{height} and focal lengths {fx}, {fy} must be positive",
                          path=path, line=lineno)
    return Intrinsics(width, height, fx, fy, cx - off, cy - off, tuple(dist))  # type: ignore[arg-type]


def _read_cameras(path: Path) -> dict[int, Intrinsics]:
    cams: dict[int, Intrinsics] = {}
    for lineno, s in _data_lines(path):
        if not s or s.startswith("#"):
            continue
        tok = s.split()
        if len(tok) < 4:
            raise ColmapError(f"expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[], got {len(tok)} fields",
                              path=path, line=lineno)
        model = tok[1]
        if model not in SUPPORTED_MODELS:
            raise ColmapError(f"unsupported camera model {model!r} (supported: "
                              f"{', '.join(SUPPORTED_MODELS)})", path=path, line=lineno)
        n = SUPPORTED_MODELS[model]
        if len(tok) != 4 + n:
            raise ColmapError(f"model {model} takes {n} parameters, got {len(tok) - 4}",
                              path=path, line=lineno)
        cam_id, width, height = _parse(tok[:1] + tok[2:4], "iii", path, lineno, "camera")
        params = _parse(tok[4:], "f" * n, path, lineno, f"{model} parameters")
        if cam_id in cams:
            raise ColmapError(f"CAMERA_ID {cam_id} appears twice", path=path, line=lineno)
        cams[cam_id] = colmap_intrinsics(model, width, height, params, path, lineno)
    return cams


def _read_images(path: Path, intrinsics: dict[int, Intrinsics],
                 id_from_name: Callable[[str], str]) -> tuple[list[Camera], dict[str, str]]:
    lines = _data_lines(path)
    found: list[tuple[int, Camera, str]] = []
    image_ids: set[int] = set()
    where: dict[str, int] = {}
    i = 0
    while i < len(lines):
        lineno, s = lines[i]
        i += 1
        if not s or s.startswith("#"):
            continue
        i += 1  # the POINTS2D line that follows every image line (possibly empty)
        tok = s.split(maxsplit=9)
        if len(tok) != 10 or not tok[9].strip():
            raise ColmapError("expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, got "
                              f"{len(tok)} fields", path=path, line=lineno)
        image_id, = _parse(tok[:1], "i", path, lineno, "IMAGE_ID")
        q = _parse(tok[1:5], "ffff", path, lineno, "quaternion")
        t = _parse(tok[5:8], "fff", path, lineno, "translation")
        cam_ref, = _parse(tok[8:9], "i", path, lineno, "CAMERA_ID")
        name = tok[9].strip()
        if image_id in image_ids:
            raise ColmapError(f"IMAGE_ID {image_id} appears twice", path=path, line=lineno)
        image_ids.add(image_id)
        if cam_ref not in intrinsics:
            raise ColmapError(f"CAMERA_ID {cam_ref} is not in cameras.txt", path=path, line=lineno)
        try:
            R = qvec_to_rotmat(np.asarray(q))
        except ValueError as e:
            raise ColmapError(str(e), path=path, line=lineno) from None
        cid = id_from_name(name)
        if cid in where:
            raise ColmapError(f"image {name!r} gives camera id {cid!r}, as does line {where[cid]}",
                              path=path, line=lineno, camera=cid)
        where[cid] = lineno
        found.append((image_id, Camera(cid, intrinsics[cam_ref], Pose(R, np.asarray(t))), name))
    found.sort(key=lambda f: f[0])
    return [c for _, c, _ in found], {c.id: n for _, c, n in found}


def _read_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8)
    xyz: list[list[float]] = []
    rgb: list[list[int]] = []
    for lineno, s in _data_lines(path):
        if not s or s.startswith("#"):
            continue
        tok = s.split()
        if len(tok) < 8 or (len(tok) - 8) % 2:
            raise ColmapError("expected POINT3D_ID X Y Z R G B ERROR TRACK[] as (IMAGE_ID, POINT2D_IDX), "
                              f"got {len(tok)} fields", path=path, line=lineno)
        v = _parse(tok[:8], "ifffiiif", path, lineno, "3D point")
        if not all(0 <= c <= 255 for c in v[4:7]):
            raise ColmapError(f"colour {v[4:7]} is outside 0..255", path=path, line=lineno)
        xyz.append(v[1:4])
        rgb.append(v[4:7])
    return (np.asarray(xyz, dtype=np.float64).reshape(-1, 3),
            np.asarray(rgb, dtype=np.uint8).reshape(-1, 3))


def read_colmap_text(folder: Path | str, *,
                     id_from_name: Callable[[str], str] = strip_extension) -> ColmapModel:
    """Read a COLMAP text model into twinstudio cameras (OpenCV pixel convention).

    Reads ``cameras.txt`` (models SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL,
    RADIAL, OPENCV, and FULL_OPENCV with ``k4 = k5 = k6 = 0``), ``images.txt``
    (the pose per image) and ``points3D.txt`` (optional: no points when
    missing; tracks ignored). ``rigs.txt``/``frames.txt`` are not read: COLMAP
    writes each image's composed ``cam_from_world`` into ``images.txt``.
    Principal points are shifted by -0.5 px. A camera's id is
    ``id_from_name(NAME)``, by default the image NAME without its extension.
    Raises ColmapError naming the file and line.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ColmapError("is not a folder", path=folder)
    intrinsics = _read_cameras(folder / "cameras.txt")
    cameras, names = _read_images(folder / "images.txt", intrinsics, id_from_name)
    points, colors = _read_points(folder / "points3D.txt")
    return ColmapModel(cameras, names, points, colors)
