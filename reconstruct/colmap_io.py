"""Read and write COLMAP models through pycolmap, in twinstudio's conventions.

pycolmap (``Reconstruction.write_text`` / ``read_text`` / ``read_binary``)
does the files; this module only adds the conventions, which change here:

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

One COLMAP camera per image: ``CAMERA_ID = IMAGE_ID = index + 1``, each with
a trivial rig and frame (``rigs.txt``, ``frames.txt``, as pycolmap 4 writes
them). pycolmap takes poses from ``frames.txt`` when it exists, so writing
replaces all five files: a stale one left by an earlier run never overrides
the poses.

Before pycolmap reads a text model, :func:`read_colmap_text` checks it line
by line: pycolmap 4.2.1's reader names no file or line and takes some
garbage silently (measured: a zero quaternion is kept, a colour of 300 is
read as 44, a width of -640 as 2**64 - 640, a garbled 2D-points line is
accepted, a last image without its 2D-points line is dropped, and ``32O``
is read as 32 and then reported as ``Check failed: camera.VerifyParams()``).
"""

from __future__ import annotations

import os
import tempfile
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

#: the model files pycolmap 4 writes and reads
MODEL_FILES = ("cameras", "images", "points3D", "rigs", "frames")

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

    COLMAP's order in its text files; pycolmap's ``Rotation3d.quat``, which
    computes it, is the same quaternion in ``[x, y, z, w]`` order.
    """
    import pycolmap

    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3):
        raise ShapeError("R", tuple(R.shape), "[3, 3]")
    x, y, z, w = pycolmap.Rotation3d(R).quat
    q = np.array([w, x, y, z]) / np.linalg.norm([w, x, y, z])
    return -q if q[0] < 0.0 else q


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


# --------------------------------------------------------------------------- intrinsics

def colmap_params(intr: Intrinsics) -> tuple[str, list[float]]:
    """COLMAP model name and parameters (COLMAP pixel convention) of twinstudio intrinsics."""
    k1, k2, p1, p2, k3 = (float(d) for d in intr.dist)
    params = [intr.fx, intr.fy, intr.cx + PIXEL_OFFSET, intr.cy + PIXEL_OFFSET, k1, k2, p1, p2]
    return ("OPENCV", params) if k3 == 0.0 else ("FULL_OPENCV", [*params, k3, 0.0, 0.0, 0.0])


def colmap_intrinsics(model: str, width: int, height: int, p: list[float], path: Path | None = None,
                      lineno: int | None = None) -> Intrinsics:
    """Twinstudio intrinsics (OpenCV pixel convention) of a COLMAP camera model and its parameters."""
    if model not in SUPPORTED_MODELS:
        raise ColmapError(f"unsupported camera model {model!r} (supported: {', '.join(SUPPORTED_MODELS)})",
                          path=path, line=lineno)
    if any(v != 0.0 for v in p[9:12]):  # FULL_OPENCV: fx fy cx cy k1 k2 p1 p2 k3 k4 k5 k6
        raise ColmapError(f"FULL_OPENCV with rational terms k4 k5 k6 = {p[9:12]} cannot be "
                          "expressed in OpenCV's k1 k2 p1 p2 k3 model", path=path, line=lineno)
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):  # f cx cy [k1 [k2]]
        fx, fy, cx, cy, rest = p[0], p[0], p[1], p[2], p[3:]
    else:  # PINHOLE, OPENCV, FULL_OPENCV: fx fy cx cy [k1 k2 p1 p2 [k3]]
        fx, fy, cx, cy, rest = *p[:4], p[4:9]
    dist = tuple(rest) + (0.0,) * (5 - len(rest))
    if width <= 0 or height <= 0 or fx <= 0 or fy <= 0:
        raise ColmapError(f"image size {width}x{height} and focal lengths {fx}, {fy} must be positive",
                          path=path, line=lineno)
    return Intrinsics(width, height, fx, fy, cx - PIXEL_OFFSET, cy - PIXEL_OFFSET, dist)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- writing

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


def _checked_points(points: np.ndarray | None, point_colors: object) -> tuple[np.ndarray, np.ndarray]:
    """Points [N, 3] float64 and their colours [N, 3] uint8 (grey when not given), checked."""
    if points is None:
        if point_colors is not None:
            raise ColmapError("point_colors given without points")
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ShapeError("points", tuple(pts.shape), "[N, 3]")
    if not np.all(np.isfinite(pts)):
        raise ColmapError("points hold a non-finite coordinate")
    if point_colors is None:
        return pts, np.broadcast_to(np.asarray(DEFAULT_POINT_COLOR, dtype=np.uint8), pts.shape)
    raw = np.asarray(point_colors)
    if raw.shape != pts.shape:
        raise ShapeError("point_colors", tuple(raw.shape), f"[{len(pts)}, 3]")
    if not np.issubdtype(raw.dtype, np.number) or not np.all(np.isfinite(raw)) \
            or raw.min(initial=0) < 0 or raw.max(initial=0) > 255 or np.any(raw != np.round(raw)):
        raise ColmapError("point_colors must be whole numbers 0..255 (RGB)")
    return pts, raw.astype(np.uint8)


def write_colmap_text(folder: Path | str, cameras: Sequence[Camera],
                      image_names: dict[str, str] | None = None, points: np.ndarray | None = None,
                      point_colors: np.ndarray | None = None) -> None:
    """Write ``cameras`` (and optional ``points`` [N, 3], colours [N, 3] RGB 0..255) as a COLMAP text model.

    Creates ``folder`` if needed and writes, through pycolmap, ``cameras.txt``,
    ``images.txt``, ``points3D.txt`` (tracks empty, ERROR 0), ``rigs.txt`` and
    ``frames.txt`` (trivial rigs and frames), each atomically. Image ``i`` is
    ``cameras[i]`` with ``IMAGE_ID = CAMERA_ID = i + 1`` and NAME
    ``image_names.get(camera.id, f"{camera.id}.jpg")``. Principal points are
    shifted by +0.5 px to COLMAP's pixel convention. Every input is checked
    before anything is written; raises ColmapError (or ShapeError) naming the camera.
    """
    import pycolmap

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
    pts, cols = _checked_points(points, point_colors)

    rec = pycolmap.Reconstruction()
    for k, (cam, name) in enumerate(zip(cameras, names), start=1):
        model, params = colmap_params(cam.intrinsics)
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model=model, width=int(cam.intrinsics.width),
                                                        height=int(cam.intrinsics.height), params=params,
                                                        camera_id=k))
        w, x, y, z = rotmat_to_qvec(cam.pose.R)
        cam_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d([x, y, z, w]), np.asarray(cam.pose.t, np.float64))
        rec.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=k, image_id=k), cam_from_world)
    points3D = rec.points3D
    for p, c in zip(pts, cols):
        # ERROR 0 rather than COLMAP's -1 ("not computed"): readers that average
        # or threshold the error then keep these track-less points.
        points3D[rec.add_point3D(p, pycolmap.Track(), c)].error = 0.0

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="twinstudio-colmap-") as tmp:
        rec.write_text(tmp)
        for stem in MODEL_FILES:
            atomic_write_bytes(folder / f"{stem}.txt", (Path(tmp) / f"{stem}.txt").read_bytes())


# --------------------------------------------------------------------------- checking text files

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


def _check_numbers(tokens: list[str], dtype: type, path: Path, lineno: int, what: str) -> None:
    try:
        np.array(tokens, dtype=np.float64 if dtype is float else np.int64)
    except ValueError:
        raise ColmapError(f"{what}: not all {len(tokens)} fields are numbers", path=path, line=lineno) from None


def _check_cameras(path: Path) -> dict[int, int]:
    """Line-check ``cameras.txt``; returns {CAMERA_ID: line}."""
    lines: dict[int, int] = {}
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
        _parse(tok[4:], "f" * n, path, lineno, f"{model} parameters")
        if width <= 0 or height <= 0:
            raise ColmapError(f"image size {width}x{height} must be positive", path=path, line=lineno)
        if cam_id in lines:
            raise ColmapError(f"CAMERA_ID {cam_id} appears twice", path=path, line=lineno)
        lines[cam_id] = lineno
    return lines


def _check_images(path: Path, cameras: dict[int, int]) -> dict[int, int]:
    """Line-check ``images.txt`` (an image line, then its POINTS2D line); returns {IMAGE_ID: line}."""
    rows = _data_lines(path)
    lines: dict[int, int] = {}
    i = 0
    while i < len(rows):
        lineno, s = rows[i]
        i += 1
        if not s or s.startswith("#"):
            continue
        tok = s.split()
        if len(tok) != 10:
            raise ColmapError("expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME (a NAME without "
                              f"whitespace), got {len(tok)} fields", path=path, line=lineno)
        image_id, = _parse(tok[:1], "i", path, lineno, "IMAGE_ID")
        _parse(tok[1:5], "ffff", path, lineno, "quaternion")
        _parse(tok[5:8], "fff", path, lineno, "translation")
        cam_ref, = _parse(tok[8:9], "i", path, lineno, "CAMERA_ID")
        if image_id in lines:
            raise ColmapError(f"IMAGE_ID {image_id} appears twice", path=path, line=lineno)
        if cam_ref not in cameras:
            raise ColmapError(f"CAMERA_ID {cam_ref} is not in cameras.txt", path=path, line=lineno)
        lines[image_id] = lineno
        if i == len(rows):
            raise ColmapError("the image has no POINTS2D line after it (empty when there are no points): "
                              "COLMAP's reader would drop the image", path=path, line=lineno)
        lineno, s = rows[i]  # the POINTS2D line that follows every image line
        i += 1
        tok = s.split()
        if len(tok) % 3:
            raise ColmapError(f"expected POINTS2D[] as (X, Y, POINT3D_ID), got {len(tok)} fields",
                              path=path, line=lineno)
        _check_numbers(tok, float, path, lineno, "POINTS2D")
    return lines


def _check_points(path: Path) -> None:
    """Line-check ``points3D.txt``: every line at once through numpy, then the first bad one by itself."""
    heads: list[list[str]] = []  # POINT3D_ID X Y Z R G B ERROR of each point
    where: list[int] = []
    for lineno, s in _data_lines(path):
        if not s or s.startswith("#"):
            continue
        tok = s.split()
        if len(tok) < 8 or (len(tok) - 8) % 2:
            raise ColmapError("expected POINT3D_ID X Y Z R G B ERROR TRACK[] as (IMAGE_ID, POINT2D_IDX), "
                              f"got {len(tok)} fields", path=path, line=lineno)
        if len(tok) > 8:
            _check_numbers(tok[8:], int, path, lineno, "TRACK")
        heads.append(tok[:8])
        where.append(lineno)
    table = np.array(heads, dtype=str).reshape(-1, 8)
    try:
        ints, floats = table[:, [0, 4, 5, 6]].astype(np.int64), table[:, [1, 2, 3, 7]].astype(np.float64)
        ok = np.isfinite(floats).all(axis=1) & ((ints[:, 1:] >= 0) & (ints[:, 1:] <= 255)).all(axis=1)
    except ValueError:
        ok = np.zeros(len(table), dtype=bool)
    for i in np.flatnonzero(~ok):  # raises at the first
        v = _parse(heads[i], "ifffiiif", path, where[i], "3D point")
        if not all(0 <= c <= 255 for c in v[4:7]):
            raise ColmapError(f"colour {v[4:7]} is outside 0..255", path=path, line=where[i])


# --------------------------------------------------------------------------- reading

def strip_extension(name: str) -> str:
    """An image NAME without the extension of its last component: ``"a/cam01.jpg"`` -> ``"a/cam01"``."""
    head, sep, tail = name.rpartition("/")
    dot = tail.rfind(".")
    return head + sep + (tail[:dot] if dot > 0 else tail)


def _load(folder: Path, text: bool):
    """pycolmap ``Reconstruction`` of the model in ``folder``; its errors become ColmapError naming the folder."""
    import pycolmap

    with tempfile.TemporaryDirectory(prefix="twinstudio-colmap-") as tmp:
        src = folder
        if text and not (folder / "points3D.txt").is_file():  # pycolmap needs one: no points
            src = Path(tmp)
            for stem in MODEL_FILES:
                if (folder / f"{stem}.txt").is_file():
                    os.symlink((folder / f"{stem}.txt").resolve(), src / f"{stem}.txt")
            (src / "points3D.txt").touch()
        rec = pycolmap.Reconstruction()
        try:
            rec.read_text(src) if text else rec.read_binary(src)
        except (ValueError, IndexError, RuntimeError) as e:
            raise ColmapError(f"pycolmap {pycolmap.__version__} cannot read the model: {e}", path=folder) from None
    return rec


def read_colmap_text(folder: Path | str, *,
                     id_from_name: Callable[[str], str] = strip_extension) -> ColmapModel:
    """Read a COLMAP model (text, or binary when there is no ``cameras.txt``) through pycolmap.

    Camera models SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, and
    FULL_OPENCV with ``k4 = k5 = k6 = 0`` become twinstudio intrinsics, with
    principal points shifted by -0.5 px (OpenCV pixel convention). Poses are
    each image's ``cam_from_world`` (from ``frames.txt`` when there is one,
    as pycolmap reads them); ``points3D.txt`` is optional (no points when
    missing) and tracks are ignored. A camera's id is ``id_from_name(NAME)``,
    by default the image NAME without its extension. Text files are checked
    line by line first; raises ColmapError naming the file and line.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ColmapError("is not a folder", path=folder)
    text = (folder / "cameras.txt").is_file() or not (folder / "cameras.bin").is_file()
    ext = "txt" if text else "bin"
    cam_lines: dict[int, int] = {}
    image_lines: dict[int, int] = {}
    if text:
        cam_lines = _check_cameras(folder / "cameras.txt")
        image_lines = _check_images(folder / "images.txt", cam_lines)
        if (folder / "points3D.txt").is_file():
            _check_points(folder / "points3D.txt")
    rec = _load(folder, text)

    intrinsics = {cid: colmap_intrinsics(c.model.name, int(c.width), int(c.height), [float(x) for x in c.params],
                                         folder / f"cameras.{ext}", cam_lines.get(cid))
                  for cid, c in rec.cameras.items()}
    cameras: list[Camera] = []
    names: dict[str, str] = {}
    image_of: dict[str, int] = {}
    path = folder / f"images.{ext}"
    for image_id in sorted(rec.images):
        image, line = rec.images[image_id], image_lines.get(image_id)
        if not image.has_pose:
            raise ColmapError(f"image {image.name!r} has no pose", path=path, line=line)
        cam_from_world = image.cam_from_world()
        x, y, z, w = cam_from_world.rotation.quat
        try:
            R = qvec_to_rotmat(np.array([w, x, y, z]))
        except ValueError as e:
            raise ColmapError(str(e), path=path, line=line) from None
        cid = id_from_name(image.name)
        if cid in image_of:
            other = image_of[cid]
            raise ColmapError(f"image {image.name!r} gives camera id {cid!r}, as does "
                              + (f"line {image_lines[other]}" if other in image_lines else f"IMAGE_ID {other}"),
                              path=path, line=line, camera=cid)
        image_of[cid] = image_id
        cameras.append(Camera(cid, intrinsics[image.camera_id], Pose(R, np.array(cam_from_world.translation))))
        names[cid] = image.name
    points3D = rec.points3D
    point_ids = sorted(rec.point3D_ids())
    points = np.array([points3D[i].xyz for i in point_ids], dtype=np.float64).reshape(-1, 3)
    colors = np.array([points3D[i].color for i in point_ids], dtype=np.uint8).reshape(-1, 3)
    return ColmapModel(cameras, names, points, colors)
