"""Structure from motion: cameras from the images themselves, for captures without a calibration take.

``run_sfm(source, out_dir)`` works on a capture root (a session or a virtual
render folder: it uses a stills take) or on any folder of photos (the camera
id is the file stem). It extracts SIFT features with pycolmap (CPU), matches
every pair of cameras, maps with COLMAP, adjusts, and writes the result in
the same form as calibration: ``cameras.json`` (schema
``twinstudio.cameras``, ``method: "sfm"``) and a COLMAP text model in
``colmap/``. Nothing is downloaded (no vocabulary tree: pairs are listed
explicitly).

A folder of real photos (intrinsics estimated, ``intrinsics="free"``):

* **One camera per physical body.** Photos are grouped by their EXIF
  (``reconstruct.photos``: make, model, serial, lens, focal length, image
  size as displayed); a body's photos share one COLMAP camera, so a folder of
  25 photos from one camera has 4 intrinsic unknowns instead of 100. The
  focal length starts from the EXIF (35 mm equivalent, or focal length and
  focal-plane resolution) where present, else COLMAP's guess. ``group``:
  ``"one"`` (all photos from one camera) or ``"image"`` (a camera each);
  ``camera_model``: SIMPLE_PINHOLE ... FULL_OPENCV.
* **Principal point and distortion refined where the photos constrain them**
  (``_adjust_estimated``): after mapping, a body with at least 3 registered
  photos whose observations cover 60 % of an 8 x 8 grid over the frame gets
  its principal point refined (and kept only within 10 % of the shorter side
  of the centre); distortion is refined at 30 % coverage, else held at zero.
  The decision, the coverage and the estimates are in ``cameras.json``
  (``bodies``) and the command's summary. On the Strecha sets the principal
  point is 15-17 px off centre; holding it there costs COLMAP's defaults most
  of their error.
* **Two mappers, the better model kept** (``_map_estimated``, ``_choose``):
  COLMAP's incremental and global mappers run from the same features and
  matches, each model adjusted as above. A camera that the two place more
  than half a neighbour spacing apart (after a robust similarity fit) is left
  out with the reason: one of them is wrong and nothing says which. Kept: the
  model with more cameras left, then the lower reprojection error.
* **Real folders**: files that are not images by name are noted and skipped;
  images that do not decode cleanly (truncated, not an image) are named and
  left out, never decoded as grey (``reconstruct.inputs.decode_problems``);
  EXIF rotation is applied. Photos larger than 2000 px start SIFT at full
  resolution (no upsampled octave): 3x faster, no loss on these sets. The
  chroma key (below) is only used with a studio: a capture, or ``rig_path``.

Measured (``python benchmarks/sfm_real.py``, Strecha Herz-Jesus-P25 and
castle-P30, 3072x2048, against COLMAP 4.2.1's defaults in the same run):
see the README's table.

What makes it work on a person in a green studio (stock COLMAP fails there,
colmap #2318, #2576):

* **Known intrinsics, fixed.** Taken from a ``cameras.json`` or the rig
  file's lens data (``intrinsics="auto"``), scaled to the image size; the
  mapper then only estimates poses. ``"refine"`` refines focal lengths
  afterwards, one per physical camera, and keeps the known one where it would
  move by more than 5 % (distortion and principal points stay: a person in
  the middle of the frame does not observe them);
  ``"free"`` estimates them (one camera per body, as for a folder of photos
  above; in a capture each rig camera is a body).
* **All lighting steps of a stills take, one pose per camera.** The 8 images
  of a camera are one COLMAP *rig* frame (a sensor per step, identity
  ``sensor_from_rig``, held fixed), so their features add up to constrain one
  pose. Images are matched only with the same step of other cameras (the
  backdrop shadows move from step to step). This is what connects the side
  views, where the subject shows little texture.
* **No features on the subject's outline.** A keypoint whose descriptor
  window straddles the keyed silhouette (``|distance to the outline| < 3 x
  scale + 2 px``) mixes subject and backdrop: it is view-dependent, is not a
  3D point, and its matches between *opposite* cameras (front and back views
  are near mirror images at the outline) pass two-view verification and break
  the reconstruction. They are dropped (``mask_features="outline"``).
  Features inside the subject come from a fine pass on its bounding box (SIFT
  at twice the resolution); features on the backdrop and floor (shadows, the
  ceiling rim) from a coarse pass on the whole image: the subject alone is a
  narrow object (about 10 x 35 degrees of view) that leaves camera positions
  poorly determined, the studio around it spreads the points over the image.
* **Registration in two passes**: first with ``min_inliers`` 2D-3D inliers
  per image, then the cameras left over with half of that, continuing the
  same model.

Scale and frame: SfM has no metric scale. When the rig file's nominal camera
positions are available the result is moved into the rig frame by a
similarity (Umeyama) fit of the camera centres, so that it is in metres;
``cameras.json`` says so (``frame: "rig"``, ``alignment``). Without a rig the
frame and unit are COLMAP's (``frame: "sfm"``, ``units: "arbitrary"``).

Measured on the virtual ``virtual-ring-24`` stills take (24 cameras at
1280x960, 8 lighting steps, rig lens data as known intrinsics, a copy of the
rig file with every camera nudged by 30 mm / 0.75 deg as the rig file;
``python benchmarks/sfm.py``, three sensor-noise seeds): all 24 cameras
register on every seed; after a similarity fit to the exact cameras,
positions are 3.8 / 4.4 / 4.9 mm off (median; max 10 / 20 / 13 mm) and
rotations 0.17 / 0.10 / 0.12 deg (max 0.29 / 0.38 / 0.30); about 9000 points,
0.39 px; about 50 s per seed on two CPU cores. Before the rig-mode additions
(``reconstruct.sfm_rig``: peak threshold 0.002 on a take, two-view tracks
triangulated after mapping, rig positions as 3 cm priors in the last
adjustment) the same renders gave 5.8 / 15.9 / 7.4 mm and 0.16 / 0.45 / 0.17
deg, 4500 points. Without the priors (images alone) about 4-5 mm. That is
still short of calibration accuracy (2 mm / 0.1 deg): nearly all points are
on the narrow subject (a few hundred on the backdrop and floor), the cameras
beside it (cam03, cam07) see its narrow side with few features, and they are
the main links between the front and the back half of the ring, which stays
weakly tied (errors are a hinge of the halves, alike on all three rings).
Without the outline filter the opposite cameras "match" (wrong poses by
metres); with the subject alone (no backdrop features) only the front half
registers, to 15 mm. At half resolution (640x480) the six-camera test gives
9.5 mm / 0.55 deg median (16 mm / 0.59 deg before; its rig file is the exact
one, so there the priors are exact positions at 3 cm).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import combinations
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from reconstruct.colmap_io import ColmapError, colmap_intrinsics, colmap_params, read_colmap_text, write_colmap_text
from reconstruct.inputs import (
    GroundTruth,
    ReconstructError,
    decode_problems,
    find_take,
    read_cameras,
    verified_images,
    write_cameras,
)
from reconstruct.photos import Body, PhotoInfo, group_bodies, read_photo_info
from rigs.geometry import Camera, Intrinsics, Pose, project_points, rotation_angle_deg

#: files of a folder of photos that are read as images (any other file is noted and skipped)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
#: camera models for estimated intrinsics
CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV")

#: COLMAP's pixel centre minus OpenCV's (see ``colmap_io``)
_HALF = 0.5
#: a keypoint is on the outline when |distance to it| < OUTLINE_SCALES * scale + OUTLINE_PX
OUTLINE_SCALES = 3.0
OUTLINE_PX = 2.0
#: masking is used for an image only when the key finds a subject covering this fraction of it
_MASK_FRACTION = (0.001, 0.9)
_CROP_MARGIN = 32
#: SIFT starts from an upsampled image (first octave -1) for images up to this size (longest side);
#: larger photos start at full resolution: 3x faster, and their finest features are pixels wide already
FINE_MAX_SIDE = 2000


#: a registered camera farther than this (and than 4x the median) from its rig-file position is rejected
RIG_TOLERANCE_M = 0.1


class SfmError(ReconstructError):
    """Structure from motion cannot be done from these images (exit code 2)."""


@dataclass(frozen=True)
class SfmOptions:
    """How cameras are recovered from images."""

    take: str | None = None
    """Stills take of a capture root (default: the latest)."""
    frames: tuple[int, ...] | None = None
    """Frames (lighting steps) of the take to use; default all. Several frames of a camera share its pose."""
    intrinsics: Literal["auto", "known", "refine", "free"] = "auto"
    """'known': fixed from cameras_path or the rig's lens data; 'refine': those, focal lengths refined;
    'free': estimated, one camera per body (one frame per camera then); 'auto': 'known' when available."""
    min_registered: int = 3
    """Fail when fewer cameras register."""
    max_image_size: int = 3200
    """Images larger than this (pixels, longest side) are downscaled for feature extraction."""
    mask_features: Literal["outline", "subject", "none"] = "outline"
    """'outline': drop features on the keyed subject's outline; 'subject': keep only features inside it;
    'none': use every feature. Images in which the key finds no subject keep every feature."""
    peak_threshold: float = 0.004
    """SIFT peak threshold (COLMAP's default is 0.0067; lower finds more features on faint texture)."""
    max_features: int = 8192
    """At most this many features per image and pass."""
    min_inliers: int = 12
    """2D-3D inliers needed to register a camera in the first pass (the second pass takes half)."""
    group: Literal["body", "one", "image"] = "body"
    """Folder of photos: which images share intrinsics. 'body': one camera per physical body (EXIF make,
    model, serial, lens, focal length and image size); 'one': every image from one camera; 'image': a
    camera per image."""
    camera_model: str = "SIMPLE_RADIAL"
    """COLMAP camera model for estimated intrinsics: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL,
    OPENCV or FULL_OPENCV."""
    principal_point: Literal["auto", "refine", "hold"] = "auto"
    """Estimated intrinsics: refine principal points (and distortion) in the final adjustment where the data
    constrain them ('auto'), always, or never (held at the image centre)."""
    mapper: Literal["auto", "incremental", "global"] = "auto"
    """'auto': COLMAP's incremental and global mappers from the same matches, the better model kept
    (estimated intrinsics); 'incremental' or 'global' alone. Known intrinsics use the incremental mapper."""
    seed: int = 0
    """Random seed (RANSAC, mapper) for repeatable results."""
    rig_prior_m: float | None = 0.03
    """Capture take with a rig file: the last bundle adjustment also pulls each camera towards the rig's
    nominal position, with this standard deviation in metres (what the rig file's positions are good to);
    None: not used (``reconstruct.sfm_rig``)."""
    threads: int = 0
    """Worker threads (0: one per CPU core)."""


@dataclass(frozen=True)
class SfmProgress:
    """Event: a stage of ``run_sfm`` moved on."""

    stage: str  # "features" | "matching" | "mapping" | "adjusting" | "writing"
    done: int
    total: int
    detail: str = ""


@dataclass
class SfmResult:
    """Cameras recovered by SfM (or imported from COLMAP), in the rig frame when one was available."""

    cameras: dict[str, Camera]
    registered: list[str]
    unregistered: dict[str, str]  # camera -> why it was not registered
    points: int
    mean_reprojection_error_px: float | None
    seconds: float
    out_dir: Path
    cameras_path: Path
    colmap_dir: Path
    per_camera: dict[str, dict] = field(default_factory=dict)
    skipped_images: dict[str, str] = field(default_factory=dict)  # image -> why
    frame: str = "sfm"  # "rig" (metres, rig frame) | "sfm" (arbitrary)
    alignment: dict | None = None
    take: str | None = None
    ground_truth: dict | None = None
    verify_seconds: float = 0.0  # checking the images (manifest hashes, or decoding) before feature extraction
    notes: dict[str, str] = field(default_factory=dict)  # files of a folder not looked at (not images)
    bodies: dict[str, dict] | None = None  # estimated intrinsics: per body its images and what was refined
    mapping: dict | None = None  # estimated intrinsics: the mappers' candidates, the one kept, cameras left out


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _View:
    camera: str
    frame: int
    path: Path
    name: str  # relative to the image root, posix; the COLMAP image name


@dataclass
class _Inputs:
    image_root: Path
    take: str | None
    views: dict[str, list[_View]]  # camera -> its images, frame order
    sizes: dict[str, tuple[int, int]]  # camera -> (width, height)
    skipped: dict[str, str]  # image name -> why it is not used
    rig_path: Path | None
    verify_seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)  # file name -> why it was not looked at (not an image)
    photos: dict[str, PhotoInfo] = field(default_factory=dict)  # folder of photos: camera -> EXIF data


def _collect(source: Path, options: SfmOptions, rig_path: Path | None) -> _Inputs:
    """The images to use, by camera, after verification: a capture's frames against its manifest (sha256),
    a folder of photos by decoding each (a decoder's warning counts as corruption); the rest listed."""
    if not source.is_dir():
        raise SfmError(f"{source}: not a folder", path=str(source))
    t0 = time.perf_counter()
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    photos: dict[str, PhotoInfo | None] = {}
    if (source / "takes").is_dir():
        take = find_take(source, "stills", options.take)
        image_root = source / "takes" / take
        checked = verified_images(source, take, frames=options.frames, workers=options.threads or None)
        skipped = {Path(p).relative_to(image_root).as_posix(): why for p, why in checked.left_out.items()}
        frames_by_cam = checked.images
        views = {}
        for cam, frames in frames_by_cam.items():
            wanted = [f for f in frames if options.frames is None or f in options.frames]
            views[cam] = [_View(cam, f, frames[f], frames[f].relative_to(image_root).as_posix()) for f in wanted]
        views = {c: v for c, v in views.items() if v}
        if rig_path is None and (source / "rig.toml").is_file():
            rig_path = source / "rig.toml"
    else:
        take = None
        image_root = source
        entries = sorted(p for p in source.iterdir() if p.is_file())
        files = [p for p in entries if p.suffix.lower() in PHOTO_SUFFIXES]
        notes = {p.name: "not an image file (by its name); skipped" for p in entries if p not in files}
        bad = decode_problems(files, options.threads or None)
        skipped = {p.name: why for p, why in bad.items()}
        files = [p for p in files if p not in bad]
        photos = {}
        for p in files:
            try:
                photos[p.stem] = read_photo_info(p)
            except (OSError, SyntaxError, ValueError) as e:  # decoded above; its EXIF may still be broken
                photos[p.stem] = None
                notes[p.name] = f"EXIF unreadable ({e}); grouped as a body without EXIF"
        views = {}
        for p in files:
            if p.stem in views:
                raise SfmError(f"{source}: images {views[p.stem][0].path.name} and {p.name} give the same "
                               f"camera id {p.stem!r}", path=str(source), camera=p.stem)
            views[p.stem] = [_View(p.stem, 0, p, p.name)]
        photos = {c: info for c, info in photos.items() if c in views and info is not None}
    for cam, vs in views.items():
        for v in vs:
            if any(ch.isspace() for ch in v.name):
                raise SfmError(f"{v.path}: image names with whitespace cannot be stored in a COLMAP text model; "
                               "rename the file", path=str(v.path), camera=cam)
    if len(views) < 3:
        what = f"take {take}" if take else "folder"
        if skipped:
            raise SfmError(f"{image_root}: only {len(views)} camera(s) have readable images ({len(skipped)} "
                           f"unreadable); SfM needs at least 3. Left out: "
                           + "; ".join(f"{n} ({why})" for n, why in list(skipped.items())[:3])
                           + ("; ..." if len(skipped) > 3 else ""),
                           path=str(image_root), cameras=sorted(views), skipped=sorted(skipped),
                           left_out={str(image_root / n): why for n, why in skipped.items()})
        raise SfmError(f"{image_root}: {what} holds images of {len(views)} camera(s); SfM needs at least 3",
                       path=str(image_root), cameras=sorted(views))
    return _Inputs(image_root, take, views, {}, skipped, rig_path, time.perf_counter() - t0,
                   notes=notes if take is None else {}, photos=photos if take is None else {})


def _read_image(path: Path) -> np.ndarray | None:
    try:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return img if img is not None and img.size else None


# ----------------------------------------------------------------------------- features


@dataclass(frozen=True)
class _FeatureConfig:
    mask: str
    peak_threshold: float
    max_features: int
    max_image_size: int
    mask_options: object | None  # MaskOptions


class _Extractor:
    """A fine (first octave -1) and a coarse (first octave 0) SIFT extractor, one per thread."""

    def __init__(self, cfg: _FeatureConfig) -> None:
        import pycolmap

        def make(first_octave: int):
            o = pycolmap.FeatureExtractionOptions(num_threads=1, max_image_size=-1)
            o.sift.peak_threshold = cfg.peak_threshold
            o.sift.max_num_features = cfg.max_features
            o.sift.first_octave = first_octave
            return pycolmap.FeatureExtractor.create(o, device=pycolmap.Device.cpu)

        self.cfg = cfg
        self.fine = make(-1)
        self.coarse = make(0)

    def _sift(self, extractor, gray: np.ndarray, offset: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        import pycolmap

        kp, desc = extractor.extract_from_uint8_array(np.ascontiguousarray(gray))
        k = np.asarray(pycolmap.keypoints_to_matrix(kp), dtype=np.float64).reshape(-1, 4).copy()  # x y scale angle
        k[:, 0] += offset[0]
        k[:, 1] += offset[1]
        d = np.asarray(desc.data, dtype=np.uint8).reshape(len(k), 128)  # SIFT: 128 bytes per feature
        return k, d

    def extract(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Keypoints [N, 4] (x, y, scale, orientation; COLMAP pixels), descriptors [N, 128] uint8, masked?"""
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        s = 1.0
        if self.cfg.max_image_size > 0 and max(gray.shape) > self.cfg.max_image_size:
            s = self.cfg.max_image_size / max(gray.shape)
            gray = cv2.resize(gray, (round(gray.shape[1] * s), round(gray.shape[0] * s)),
                              interpolation=cv2.INTER_AREA)
            bgr = cv2.resize(bgr, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_AREA)
        subject = None
        if self.cfg.mask != "none":
            from reconstruct.masks import key_mask

            m = key_mask(bgr, self.cfg.mask_options) if self.cfg.mask_options is not None else key_mask(bgr)
            if _MASK_FRACTION[0] < m.mean() < _MASK_FRACTION[1]:
                subject = m
        if subject is None:
            k, d = self._sift(self.fine if max(gray.shape) <= FINE_MAX_SIDE else self.coarse, gray, (0, 0))
        else:
            h, w = subject.shape
            inside = cv2.distanceTransform(np.pad(subject.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
            ys, xs = np.nonzero(subject)
            x0, y0 = max(int(xs.min()) - _CROP_MARGIN, 0), max(int(ys.min()) - _CROP_MARGIN, 0)
            x1, y1 = min(int(xs.max()) + _CROP_MARGIN + 1, w), min(int(ys.max()) + _CROP_MARGIN + 1, h)
            parts = [(*self._sift(self.fine, gray[y0:y1, x0:x1], (x0, y0)), inside)]
            if self.cfg.mask == "outline":
                outside = cv2.distanceTransform((~subject).astype(np.uint8), cv2.DIST_L2, 5)
                parts.append((*self._sift(self.coarse, gray, (0, 0)), outside))
            ks, ds = [], []
            for k, d, dist in parts:
                xi = np.clip(k[:, 0].astype(int), 0, w - 1)  # COLMAP pixel i spans [i, i + 1)
                yi = np.clip(k[:, 1].astype(int), 0, h - 1)
                keep = dist[yi, xi] >= OUTLINE_SCALES * k[:, 2] + OUTLINE_PX
                ks.append(k[keep])
                ds.append(d[keep])
            k, d = np.concatenate(ks), np.concatenate(ds)
        if s != 1.0:
            k[:, :3] /= s
        return k.astype(np.float32), d, subject is not None


_worker: dict = {}


def _extractor_init(parent: int | None, cfg: _FeatureConfig) -> None:
    """A feature worker (process): dies with ``parent``; its extractor is made on first use."""
    if parent is not None:
        from rigs.procs import die_with_parent

        die_with_parent(parent=parent)
    _worker.clear()
    _worker["cfg"] = cfg


def _extract_file(path: Path) -> tuple[int, int, np.ndarray, np.ndarray, bool] | None:
    """(width, height, keypoints, descriptors, masked?) of an image file, or None when it cannot be read."""
    img = _read_image(path)
    if img is None:
        return None
    if "extractor" not in _worker:
        import pycolmap

        pycolmap.logging.minloglevel = 3
        _worker["extractor"] = _Extractor(_worker["cfg"])
    return (img.shape[1], img.shape[0], *_worker["extractor"].extract(img))


# ----------------------------------------------------------------------------- intrinsics


def _resolve_intrinsics(inputs: _Inputs, mode: str, cameras_path: Path | None,
                        rig) -> tuple[str, dict[str, Intrinsics] | None, str]:
    """(mode, per-camera intrinsics at the image size or None, where they came from)."""
    known: dict[str, Intrinsics] | None = None
    source = ""
    if mode != "free":
        if cameras_path is not None:
            known = {c: cam.intrinsics for c, cam in read_cameras(cameras_path).items()}
            source = str(cameras_path)
        elif rig is not None:
            known = {c.id: c.intrinsics for c in rig.cameras}
            source = f"rig nominal lens ({inputs.rig_path})"
    if mode == "auto":
        mode = "known" if known is not None else "free"
    if mode == "free":
        return "free", None, "estimated"
    if known is None:
        raise SfmError(f"intrinsics={mode!r} needs known intrinsics: pass cameras_path or rig_path, "
                       "or use intrinsics='free'", intrinsics=mode)
    out = {}
    for cam, (w, h) in inputs.sizes.items():
        if cam not in known:
            raise SfmError(f"camera {cam} has no intrinsics in {source}; use intrinsics='free'",
                           camera=cam, path=source)
        k = known[cam]
        if (k.width, k.height) != (w, h):
            s = w / k.width
            scaled = k.scaled(s)
            if (scaled.width, scaled.height) != (w, h):
                raise SfmError(f"camera {cam}: images are {w}x{h} but its intrinsics are for "
                               f"{k.width}x{k.height} (another aspect ratio)", camera=cam, path=source)
            k = scaled
        out[cam] = k
    return mode, out, source


def _estimated_camera(body: Body, model: str):
    """A COLMAP camera to estimate: the body's focal length (a prior or COLMAP's guess), the principal
    point at the image centre, no distortion."""
    import pycolmap

    cam = pycolmap.Camera.create_from_model_name(0, model, body.focal_px, body.width, body.height)
    cam.has_prior_focal_length = body.focal_prior
    return cam


def _colmap_camera(intr: Intrinsics, size: tuple[int, int]):
    import pycolmap

    w, h = size
    model, params = colmap_params(intr)
    cam = pycolmap.Camera(model=getattr(pycolmap.CameraModelId, model), width=w, height=h, params=params)
    cam.has_prior_focal_length = True
    return cam


def _intrinsics_of(cam) -> Intrinsics:
    """Twinstudio intrinsics (OpenCV pixels) of a pycolmap camera."""
    return colmap_intrinsics(cam.model.name, int(cam.width), int(cam.height), [float(x) for x in cam.params])


# ----------------------------------------------------------------------------- COLMAP plumbing


@contextlib.contextmanager
def _quiet_colmap() -> Iterator[None]:
    """Silence COLMAP's log (glog) while a stage runs; restore it afterwards."""
    import pycolmap

    old = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 3
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = old


def _write_database(db_path: Path, inputs: _Inputs, intr: dict[str, Intrinsics] | None, rig_mode: bool,
                    feats: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]],
                    bodies: dict[str, Body] | None = None, model: str = "SIMPLE_RADIAL") -> dict[int, _View]:
    """Cameras, rigs, frames, images, keypoints and descriptors; returns {image_id: view}.

    Known intrinsics: a COLMAP camera per camera (per lighting step in rig mode). Estimated intrinsics
    (``bodies``): a COLMAP camera per body, shared by its images, each image its own frame."""
    import pycolmap

    def sensor(cid: int):
        return pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cid)

    def write_features(iid: int, v: _View) -> None:
        k, d = feats[(v.camera, v.frame)]
        db.write_keypoints(iid, k)
        db.write_descriptors(iid, pycolmap.FeatureDescriptors(pycolmap.FeatureExtractorType.SIFT,
                                                              np.ascontiguousarray(d)))

    by_id: dict[int, _View] = {}
    with pycolmap.Database.open(db_path) as db:
        if bodies is not None:
            for body in bodies.values():
                cid = db.write_camera(_estimated_camera(body, model))
                rig = pycolmap.Rig()
                rig.add_ref_sensor(sensor(cid))
                rig_id = db.write_rig(rig)
                for cam in body.images:
                    v = inputs.views[cam][0]
                    iid = db.write_image(pycolmap.Image(name=v.name, camera_id=cid))
                    by_id[iid] = v
                    frame = pycolmap.Frame()
                    frame.rig_id = rig_id
                    frame.add_data_id(pycolmap.data_t(sensor(cid), iid))
                    write_features(iid, v)
                    db.write_frame(frame)
            return by_id
        for cam, views in inputs.views.items():
            cam_ids = [db.write_camera(_colmap_camera(intr[cam] if intr else None, inputs.sizes[cam]))
                       for _ in (views if rig_mode else views[:1])]
            rig = pycolmap.Rig()
            rig.add_ref_sensor(sensor(cam_ids[0]))
            for cid in cam_ids[1:]:
                rig.add_sensor(sensor(cid), pycolmap.Rigid3d())  # same pose as the reference
            rig_id = db.write_rig(rig)
            frame = pycolmap.Frame()
            frame.rig_id = rig_id
            for v, cid in zip(views, cam_ids):
                iid = db.write_image(pycolmap.Image(name=v.name, camera_id=cid))
                by_id[iid] = v
                frame.add_data_id(pycolmap.data_t(sensor(cid), iid))
                write_features(iid, v)
            db.write_frame(frame)
    return by_id


def _match(db_path: Path, pairs: list[tuple[str, str]], work: Path, options: SfmOptions, threads: int) -> None:
    import pycolmap

    pairs_path = work / "pairs.txt"
    pairs_path.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    mo = pycolmap.FeatureMatchingOptions(num_threads=threads)
    vo = pycolmap.TwoViewGeometryOptions()
    vo.ransac.random_seed = options.seed
    pycolmap.match_image_pairs(db_path, mo, pycolmap.ImportedPairingOptions(match_list_path=str(pairs_path)),
                               vo, device=pycolmap.Device.cpu)


def _match_stats(db_path: Path, by_id: dict[int, _View]) -> tuple[int, int, dict[tuple[str, str], int]]:
    """(verified image pairs, inlier matches, inliers per camera pair)."""
    import pycolmap

    with pycolmap.Database.open(db_path) as db:
        pair_ids, counts = db.read_two_view_geometry_num_inliers()
    per: dict[tuple[str, str], int] = {}
    n_pairs = n_inl = 0
    for pid, n in zip(pair_ids, counts):
        if n <= 0:
            continue
        a, b = pycolmap.pair_id_to_image_pair(pid)
        ca, cb = sorted((by_id[a].camera, by_id[b].camera))
        per[(ca, cb)] = per.get((ca, cb), 0) + int(n)
        n_pairs += 1
        n_inl += int(n)
    return n_pairs, n_inl, per


def _map(db_path: Path, image_root: Path, work: Path, options: SfmOptions, mode: str, threads: int,
         n_frames: int, on_event) -> object | None:
    """Incremental mapping in two passes; the largest model, or None."""
    import pycolmap

    free = mode == "free"
    registered = [0]

    def progress() -> None:
        registered[0] += 1
        if on_event:
            on_event(SfmProgress("mapping", min(registered[0], n_frames), n_frames))

    best = None
    input_path = ""
    for i, min_inl in enumerate((options.min_inliers, max(4, options.min_inliers // 2))):
        o = pycolmap.IncrementalPipelineOptions()
        o.num_threads = threads
        o.random_seed = options.seed
        o.multiple_models = False
        o.extract_colors = True
        o.ba_refine_focal_length = free
        o.ba_refine_extra_params = free
        o.ba_refine_principal_point = False
        o.ba_refine_sensor_from_rig = False
        o.mapper.abs_pose_refine_focal_length = free
        o.mapper.abs_pose_refine_extra_params = free
        o.mapper.abs_pose_min_num_inliers = min_inl
        o.mapper.random_seed = options.seed
        o.triangulation.random_seed = options.seed
        out = work / f"pass{i}"
        out.mkdir(parents=True, exist_ok=True)
        recs = pycolmap.incremental_mapping(db_path, image_root, out, o, input_path=input_path,
                                            next_image_callback=progress)
        if recs:
            best = max(recs.values(), key=lambda r: r.num_reg_frames())
            best.write(out)
            input_path = str(out)
        if best is None or best.num_reg_frames() >= n_frames:
            break
        registered[0] = best.num_reg_frames()
    return best


def _bodies(inputs: _Inputs, options: SfmOptions) -> dict[str, Body]:
    """Cameras that share estimated intrinsics: a folder's photos by body (EXIF), a capture's by camera id."""
    if options.camera_model not in CAMERA_MODELS:
        raise SfmError(f"camera model {options.camera_model!r}: use one of {', '.join(CAMERA_MODELS)}",
                       camera_model=options.camera_model)
    infos = {}
    for cam in inputs.views:
        w, h = inputs.sizes[cam]
        info = inputs.photos.get(cam)
        # the decoded size is the truth (EXIF rotation applied by the decoder)
        infos[cam] = replace(info, width=w, height=h) if info is not None else PhotoInfo(w, h)
    group = options.group if inputs.take is None else "image"  # a capture: one body per rig camera id
    try:
        return group_bodies(infos, group)
    except ValueError as e:
        raise SfmError(f"{inputs.image_root}: {e}; use group 'body' or 'image'", path=str(inputs.image_root),
                       group=group) from e


def _map_global(db_path: Path, image_root: Path, work: Path, options: SfmOptions, threads: int):
    """COLMAP's global mapper (GLOMAP) on the same database; the largest model, or None."""
    import pycolmap

    o = pycolmap.GlobalPipelineOptions()
    o.num_threads = threads
    o.random_seed = options.seed
    o.multiple_models = False
    m = o.mapper
    m.num_threads = threads
    m.random_seed = options.seed
    m.global_positioning.use_gpu = False
    m.bundle_adjustment.ceres.use_gpu = False
    m.bundle_adjustment.refine_principal_point = False
    out = work / "global"
    out.mkdir(parents=True, exist_ok=True)
    recs = pycolmap.global_mapping(db_path, image_root, out, o)
    if not recs:
        return None
    return max(recs.values(), key=lambda r: r.num_reg_frames())


#: principal points are refined for a body with at least this many registered images ...
PP_MIN_IMAGES = 3
#: ... whose observations cover at least this fraction of an 8 x 8 grid over the frame
PP_MIN_COVERAGE = 0.6
#: distortion is refined when the observations cover this fraction of the grid (else held at zero)
DISTORTION_MIN_COVERAGE = 0.3
#: a refined principal point further than this fraction of the shorter side from the centre is not believed
PP_MAX_OFFSET = 0.1


def _coverage(rec, images: list[int], cam) -> float:
    """Fraction of an 8 x 8 grid over the frame in which the images' tracked observations fall."""
    cells = np.zeros((8, 8), dtype=bool)
    for iid in images:
        xy = np.array([p.xy for p in rec.images[iid].points2D if p.has_point3D()]).reshape(-1, 2)
        if len(xy):
            gx = np.clip((xy[:, 0] / cam.width * 8).astype(int), 0, 7)
            gy = np.clip((xy[:, 1] / cam.height * 8).astype(int), 0, 7)
            cells[gy, gx] = True
    return float(cells.mean())


def _adjust_estimated(rec, options: SfmOptions, threads: int) -> dict[int, dict]:
    """Final adjustment of a model with estimated intrinsics: focal lengths always, principal points and
    distortion per COLMAP camera (body) where the data constrain them. Returns the decisions by camera id."""
    images: dict[int, list[int]] = {}
    for iid, img in rec.images.items():
        if img.has_pose:
            images.setdefault(img.camera_id, []).append(iid)
    decisions: dict[int, dict] = {}
    extra_ok, pp_ok = set(), set()
    for cid, iids in images.items():
        cam = rec.cameras[cid]
        cov = _coverage(rec, iids, cam)
        d: dict = {"registered_images": len(iids), "coverage": round(cov, 3)}
        has_extra = len(cam.extra_params_idxs()) > 0
        if has_extra and cov >= DISTORTION_MIN_COVERAGE:
            extra_ok.add(cid)
            d["distortion"] = "refined"
        elif has_extra:
            params = np.asarray(cam.params, dtype=np.float64).copy()
            params[list(cam.extra_params_idxs())] = 0.0
            cam.params = params
            d["distortion"] = (f"held at zero: observations cover {cov:.0%} of the frame "
                               f"(< {DISTORTION_MIN_COVERAGE:.0%})")
        if options.principal_point == "hold":
            d["principal_point"] = "held at the image centre (option)"
        elif options.principal_point == "refine" or (len(iids) >= PP_MIN_IMAGES and cov >= PP_MIN_COVERAGE):
            pp_ok.add(cid)
        else:
            d["principal_point"] = ("held at the image centre: " + (f"{len(iids)} image(s) (< {PP_MIN_IMAGES})"
                                    if len(iids) < PP_MIN_IMAGES else
                                    f"observations cover {cov:.0%} of the frame (< {PP_MIN_COVERAGE:.0%})"))
        decisions[cid] = d
    # COLMAP's options are global: refine what any body may refine, then put back what a body may not
    # (principal point at the centre, distortion at zero, or a principal point not believed) and adjust
    # again with those held
    _bundle_adjust(rec, True, threads, refine_extra=bool(extra_ok), refine_pp=bool(pp_ok), robust=False)
    held = set()
    for cid in images:
        cam = rec.cameras[cid]
        params = np.asarray(cam.params, dtype=np.float64).copy()
        pp_idx = list(cam.principal_point_idxs())
        if cid in pp_ok:
            off = params[pp_idx] - (cam.width / 2.0, cam.height / 2.0)
            if np.linalg.norm(off) > PP_MAX_OFFSET * min(cam.width, cam.height):
                decisions[cid]["principal_point"] = (f"held at the image centre: refinement moved it "
                                                     f"{np.linalg.norm(off):.0f} px, not believed")
            else:
                decisions[cid]["principal_point"] = "refined"
                decisions[cid]["principal_point_offset_px"] = [round(float(x), 2) for x in off]
                pp_idx = []
        if pp_idx and np.any(params[pp_idx] != (cam.width / 2.0, cam.height / 2.0)):
            params[pp_idx] = (cam.width / 2.0, cam.height / 2.0)
            held.add(cid)
        extra_idx = list(cam.extra_params_idxs())
        if extra_idx and cid not in extra_ok and np.any(params[extra_idx] != 0):
            params[extra_idx] = 0.0
            held.add(cid)
        cam.params = params
    if held:
        _bundle_adjust(rec, True, threads, robust=False)
    for cid in images:
        cam = rec.cameras[cid]
        decisions[cid]["model"] = cam.model.name
        decisions[cid]["params"] = [round(float(x), 6) for x in cam.params]
    return decisions


@dataclass
class _Mapping:
    """What the mappers did with estimated intrinsics: the candidates, the one kept and why."""

    chosen: str
    candidates: dict[str, dict]
    left_out: dict[str, str]  # camera -> why (the mappers disagree on where it is)
    bodies: dict[int, dict]  # COLMAP camera id of the kept model -> intrinsics decisions

    def summary(self) -> dict:
        return {"chosen": self.chosen, "candidates": self.candidates, "left_out": self.left_out}


#: a camera the two mappers place further apart than this fraction of the typical distance between
#: neighbouring cameras (and 10x the median disagreement) is left out of the kept model
DISAGREEMENT_NEIGHBOURS = 0.5


def _camera_centres(rec, by_id: dict[int, _View]) -> dict[str, np.ndarray]:
    out = {}
    for iid, img in rec.images.items():
        if img.has_pose:
            out.setdefault(by_id[iid].camera, np.asarray(img.projection_center(), dtype=np.float64))
    return out


def _disagreement(kept: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> tuple[dict[str, float], float]:
    """Per camera, how far apart two models put it (the other model similarity-aligned to the kept one,
    robustly), and the kept model's median nearest-neighbour camera distance."""
    common = sorted(set(kept) & set(other))
    if len(common) < 4:
        return {}, 0.0
    a = np.array([kept[c] for c in common])
    b = np.array([other[c] for c in common])
    pts = np.array(list(kept.values()))
    nn = float(np.median(np.sort(np.linalg.norm(pts[:, None] - pts[None], axis=2), axis=1)[:, 1]))
    # RANSAC over triplets of cameras (a least-squares fit would spread one misplaced camera over all)
    rng = np.random.default_rng(0)
    best = np.ones(len(common), dtype=bool)
    best_n = -1
    for _ in range(200):
        idx = rng.choice(len(common), 3, replace=False)
        try:
            s, R, t = umeyama(b[idx], a[idx])
        except SfmError:
            continue
        inl = np.linalg.norm((s * (R @ b.T)).T + t - a, axis=1) <= 0.1 * nn
        if inl.sum() > best_n:
            best, best_n = inl, int(inl.sum())
    try:
        s, R, t = umeyama(b[best], a[best]) if best.sum() >= 3 else umeyama(b, a)
    except SfmError:
        return {}, 0.0
    d = np.linalg.norm((s * (R @ b.T)).T + t - a, axis=1)
    return dict(zip(common, d.tolist())), nn


def _model_stats(rec, by_id: dict[int, _View]) -> dict:
    return {"registered": len(_camera_centres(rec, by_id)), "points": int(rec.num_points3D()),
            "reprojection_error_px": round(float(rec.compute_mean_reprojection_error()), 4)
            if rec.num_points3D() else None,
            "mean_track_length": round(float(rec.compute_mean_track_length()), 3) if rec.num_points3D() else None}


def _map_estimated(db_path: Path, image_root: Path, work: Path, options: SfmOptions, threads: int,
                   by_id: dict[int, _View], on_event) -> tuple[object | None, _Mapping | None]:
    """Estimated intrinsics: the incremental and the global mapper from the same matches, each model
    adjusted (:func:`_adjust_estimated`), the better one kept.

    Better: more cameras registered where both mappers agree, then the lower mean reprojection error.
    A camera that the two models put in clearly different places (after a similarity fit, further apart
    than half the distance between neighbouring cameras) is left out of the kept model with the reason:
    one of them is wrong and nothing says which.
    """
    n = len({v.camera for v in by_id.values()})
    models: dict[str, object] = {}
    candidates: dict[str, dict] = {}
    decisions: dict[str, dict] = {}
    names = [k for k in ("incremental", "global") if options.mapper in ("auto", k)]

    def run(name: str):
        t = time.perf_counter()
        if name == "incremental":
            rec = _map(db_path, image_root, work, options, "free", threads, n, on_event)
        else:
            try:  # the second opinion: its failure leaves the incremental model
                rec = _map_global(global_db, image_root, work, options, threads)
            except (RuntimeError, ValueError) as e:
                if options.mapper == "global":
                    raise SfmError(f"{image_root}: the global mapper failed: {e}", path=str(image_root)) from e
                return name, None, f"failed: {e}", time.perf_counter() - t
        if rec is None or rec.num_reg_frames() == 0:
            return name, None, None, time.perf_counter() - t
        return name, rec, _adjust_estimated(rec, options, threads), time.perf_counter() - t

    if on_event:
        on_event(SfmProgress("mapping", 0, n, " and ".join(names) + " mapper"))
    # the two mappers at the same time (much of each is single-threaded: registration, track building),
    # each with its own copy of the database: SQLite does not let both open one file at once
    global_db = db_path
    if len(names) == 2:
        global_db = work / "global.db"
        shutil.copyfile(db_path, global_db)
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(run, names))
    for i, (name, rec, decided, seconds) in enumerate(results):
        if name == "global" and rec is None and decided and len(names) == 2:
            results[i] = run(name)  # once more, alone (it failed next to the other: a busy database, memory)
    for name, rec, decided, seconds in results:
        if rec is None:
            candidates[name] = {"registered": 0, "seconds": round(seconds, 2),
                                **({"error": decided} if decided else {})}
            continue
        models[name], decisions[name] = rec, decided
        candidates[name] = {**_model_stats(rec, by_id), "seconds": round(seconds, 2)}
        if on_event:
            on_event(SfmProgress("mapping", n, n, f"{name} mapper: {candidates[name]['registered']} registered"))
    if global_db != db_path:
        global_db.unlink(missing_ok=True)
    if not models:
        return None, None
    centres = {k: _camera_centres(r, by_id) for k, r in models.items()}
    chosen, left_out = _choose(candidates, centres)
    return models[chosen], _Mapping(chosen, candidates, left_out, decisions[chosen])


def _choose(candidates: dict[str, dict], centres: dict[str, dict[str, np.ndarray]]) -> tuple[str, dict[str, str]]:
    """The model to keep and the cameras to leave out of it, without ground truth.

    ``candidates``: per mapper its figures (``registered``, ``reprojection_error_px``; updated here with
    ``agreed`` and ``disagreement_median``); ``centres``: per mapper its camera centres. With two
    models, a camera that they place further apart than ``DISAGREEMENT_NEIGHBOURS`` of the median
    distance between neighbouring cameras (and 10x the median disagreement) is unreliable in both.
    Kept: the model with the most cameras left, then the lower mean reprojection error.
    """
    names = [k for k in centres if k in candidates]
    flagged: dict[str, dict[str, str]] = {k: {} for k in names}
    if len(names) == 2:
        for k, other in (names, names[::-1]):
            d, nn = _disagreement(centres[k], centres[other])
            if not d or nn <= 0:
                continue
            med = float(np.median(list(d.values())))
            limit = max(DISAGREEMENT_NEIGHBOURS * nn, 10 * med)
            candidates[k]["disagreement_median"] = round(med / nn, 5)
            for c, dist in d.items():
                if dist > limit:
                    flagged[k][c] = (f"the {names[0]} and {names[1]} mappers place it {dist / nn:.1f} neighbour "
                                     "spacings apart: an unreliable registration, left out")
    for k in names:
        candidates[k]["agreed"] = len(centres[k]) - len(flagged[k])
    chosen = min(names, key=lambda k: (-candidates[k]["agreed"],
                                       candidates[k].get("reprojection_error_px") or float("inf")))
    return chosen, flagged[chosen]


def ba_options(threads: int, refine_focal: bool = False, refine_extra: bool = False, refine_pp: bool = False,
               robust: bool = True):
    """COLMAP bundle-adjustment options: poses and points, optionally focal lengths, distortion and principal
    points (of every camera: COLMAP's options are global); robust: Cauchy at 0.5 px; converged tightly."""
    import pycolmap

    bo = pycolmap.BundleAdjustmentOptions(refine_focal_length=refine_focal, refine_extra_params=refine_extra,
                                          refine_principal_point=refine_pp, refine_sensor_from_rig=False,
                                          print_summary=False)
    bo.ceres.loss_function_type = (pycolmap.LossFunctionType.CAUCHY if robust else
                                   pycolmap.LossFunctionType.TRIVIAL)
    bo.ceres.loss_function_scale = 0.5
    s = bo.ceres.solver_options
    s.max_num_iterations = 300
    s.function_tolerance = 1e-10
    s.gradient_tolerance = 1e-10
    s.num_threads = threads
    return bo


def ba_config(rec):
    """A bundle-adjustment configuration over every registered image of ``rec``."""
    import pycolmap

    config = pycolmap.BundleAdjustmentConfig()
    for iid, img in rec.images.items():
        if img.has_pose:
            config.add_image(iid)
    return config


def _bundle_adjust(rec, refine_focal: bool, threads: int, refine_extra: bool = False,
                   refine_pp: bool = False, robust: bool = True) -> None:
    """Bundle adjustment (:func:`ba_options`); the gauge is fixed by three points, so no camera is held."""
    import pycolmap

    config = ba_config(rec)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.THREE_POINTS)
    pycolmap.create_default_bundle_adjuster(ba_options(threads, refine_focal, refine_extra, refine_pp, robust),
                                            config, rec).solve()


def _collapse(rec, views_of_image: dict[int, _View]):
    """The same model with one image per physical camera holding the observations of all its images.

    In a rig-mode model the images of a camera (one per lighting step) share
    the camera's pose and (known) intrinsics, so this is the same problem with
    the camera's intrinsics tied into one COLMAP camera. Returns the new model
    and ``{image_id: view}`` (the camera's first registered image names it).
    """
    import pycolmap

    groups: dict[str, list[int]] = {}
    for iid in sorted(rec.images):
        if rec.images[iid].has_pose:
            groups.setdefault(views_of_image[iid].camera, []).append(iid)
    new = pycolmap.Reconstruction()
    remap: dict[tuple[int, int], tuple[int, int]] = {}  # (old image, point2D) -> (new image, point2D)
    views: dict[int, _View] = {}
    for k, (_cam, iids) in enumerate(sorted(groups.items()), start=1):
        first = rec.images[iids[0]]
        c = pycolmap.Camera(model=rec.cameras[first.camera_id].model, width=rec.cameras[first.camera_id].width,
                            height=rec.cameras[first.camera_id].height,
                            params=np.asarray(rec.cameras[first.camera_id].params), camera_id=k)
        new.add_camera_with_trivial_rig(c)
        xy = []
        for iid in iids:
            for idx, p2 in enumerate(rec.images[iid].points2D):
                if p2.has_point3D():
                    remap[(iid, idx)] = (k, len(xy))
                    xy.append(p2.xy)
        img = pycolmap.Image(name=first.name, keypoints=np.asarray(xy, dtype=np.float64).reshape(-1, 2),
                             camera_id=k, image_id=k)
        new.add_image_with_trivial_frame(img, first.cam_from_world())
        views[k] = views_of_image[iids[0]]
    for p in rec.points3D.values():
        els = [remap[(e.image_id, e.point2D_idx)] for e in p.track.elements if (e.image_id, e.point2D_idx) in remap]
        if len(els) >= 2:
            new.add_point3D(p.xyz, pycolmap.Track([pycolmap.TrackElement(i, j) for i, j in els]), p.color)
    return new, views


#: a refined focal length further than this from the known one is not believed (relative)
MAX_FOCAL_CHANGE = 0.05


def _refine_focal(rec, threads: int) -> dict[int, float]:
    """Refine focal lengths (one COLMAP camera per physical camera); returns camera_id -> relative change.

    A camera whose focal length would move by more than ``MAX_FOCAL_CHANGE``
    keeps its known one: a subject in the middle of the frame hardly separates
    focal length from distance.
    """
    known = {cid: np.asarray(cam.params, dtype=np.float64).copy() for cid, cam in rec.cameras.items()}
    _bundle_adjust(rec, True, threads)
    changes: dict[int, float | None] = {}
    for cid in sorted(rec.cameras):
        cam = rec.cameras[cid]
        idx = list(cam.focal_length_idxs())
        change = float(np.max(np.abs(np.asarray(cam.params)[idx] / known[cid][idx] - 1.0)))
        if change > MAX_FOCAL_CHANGE:
            cam.params = known[cid]
        changes[cid] = change
    _bundle_adjust(rec, False, threads)
    return changes


# ----------------------------------------------------------------------------- geometry helpers


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity ``dst ~ s R src + t`` by least squares (Umeyama 1991); src, dst [N, 3], N >= 3.

    Returns ``(s, R [3, 3], t [3])``. Raises SfmError when the points are degenerate (collinear).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, S, Vt = np.linalg.svd(cov)
    if len(src) < 3 or S[1] < 1e-12 * max(S[0], 1e-300):
        raise SfmError(f"cannot fit a similarity to {len(src)} camera centres (too few or collinear)")
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0
    R = U @ D @ Vt
    var = (xs ** 2).sum(1).mean()
    s = float(np.trace(np.diag(S) @ D) / var) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def _apply_similarity(cam: Camera, s: float, R: np.ndarray, t: np.ndarray) -> Camera:
    """The camera after moving the world by ``x' = s R x + t``."""
    Rc = cam.pose.R @ R.T
    c = s * R @ cam.pose.center + t
    return Camera(cam.id, cam.intrinsics, Pose(Rc, -Rc @ c))


def score_sfm(result_cameras: dict[str, Camera], gt: dict[str, Camera]) -> dict:
    """Errors of SfM cameras against exact ones after a similarity fit (Umeyama) of the camera centres.

    Returns ``registered`` (cameras common to both), ``total`` (ground-truth
    cameras), ``missing`` (ground-truth cameras not in the result), ``scale``
    of the fit, per camera ``position_mm`` and ``rotation_deg``, and their
    ``median_*`` and ``max_*``. With fewer than 3 common cameras only the counts.
    """
    common = sorted(c for c in result_cameras if c in gt)
    out: dict = {"registered": len(common), "total": len(gt), "missing": sorted(set(gt) - set(result_cameras))}
    if len(common) < 3:
        return out
    s, R, t = umeyama(np.array([result_cameras[c].pose.center for c in common]),
                      np.array([gt[c].pose.center for c in common]))
    per = {}
    for c in common:
        a = _apply_similarity(result_cameras[c], s, R, t)
        per[c] = {"position_mm": float(1000 * np.linalg.norm(a.pose.center - gt[c].pose.center)),
                  "rotation_deg": rotation_angle_deg(a.pose.R, gt[c].pose.R)}
    out["scale"] = s
    out["cameras"] = per
    for k in ("position_mm", "rotation_deg"):
        v = [p[k] for p in per.values()]
        out[f"median_{k}"] = float(np.median(v))
        out[f"max_{k}"] = float(np.max(v))
    return out


# ----------------------------------------------------------------------------- the stage


def run_sfm(source: Path | str, out_dir: Path | str, options: SfmOptions = SfmOptions(), *,
            cameras_path: Path | str | None = None, rig_path: Path | str | None = None,
            on_event: Callable[[SfmProgress], None] | None = None) -> SfmResult:
    """Cameras of a capture (or a folder of photos) by structure from motion.

    ``source``: a capture root (session or render folder; its stills take is
    used) or a folder of images (camera id = file stem). ``cameras_path``: a
    ``cameras.json`` with known intrinsics; ``rig_path``: a rig file (lens data
    and nominal camera positions; a capture root's ``rig.toml`` by default).
    Writes ``out_dir/cameras.json`` (OpenCV convention; metres in the rig
    frame when a rig was available), ``out_dir/colmap/`` (text model with the
    sparse points), ``out_dir/sparse/`` (binary model with the tracks: one
    image per camera holding the observations of all its lighting steps) and
    ``out_dir/sfm.db`` (features and matches). Raises SfmError (a ReconstructError) for input it
    cannot use, naming the folder, image or camera.

    A capture session needs its subject's consent to ``train`` in force (SfM
    models the person); a render folder or a folder of photos without a
    session names no subject. Images that fail verification are left out and
    listed in ``skipped_images`` with the reason.
    """
    import pycolmap

    from capture.consent import require_session_consent

    t0 = time.perf_counter()
    source, out = Path(source), Path(out_dir)
    if source.is_dir():
        require_session_consent(source, "train", photos_ok=True)
    inputs = _collect(source, options, Path(rig_path) if rig_path is not None else None)
    rig = None
    if inputs.rig_path is not None:
        from rigs.rigfile import load_rig

        rig = load_rig(inputs.rig_path)
    threads = options.threads if options.threads > 0 else (os.cpu_count() or 1)
    mask_options = None
    if rig is not None and options.mask_features != "none":
        from reconstruct.masks import MaskOptions

        mask_options = MaskOptions.for_rig(rig)
    # the chroma key needs a studio backdrop: a capture, or a folder of photos with its rig file
    mask = options.mask_features if rig is not None or inputs.take is not None else "none"
    cfg = _FeatureConfig(mask, _rig_peak_threshold(options, inputs), options.max_features,
                         options.max_image_size, mask_options)

    # -- read images and extract features: in worker processes (pycolmap's extractor holds the GIL)
    all_views = [v for vs in inputs.views.values() for v in vs]
    feats: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    sizes: dict[str, dict[tuple[int, int], list[str]]] = {}
    masked = 0
    workers = max(1, min(threads, len(all_views)))
    pool = None
    if workers == 1:
        _extractor_init(None, cfg)
        results = map(_extract_file, [v.path for v in all_views])
    else:
        # workers die with this process (a SIGKILLed CLI leaves no extractor running on)
        pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_extractor_init,
                                   initargs=(os.getpid(), cfg))
        results = pool.map(_extract_file, [v.path for v in all_views])
    try:
        with _quiet_colmap():
            for done, (v, res) in enumerate(zip(all_views, results), 1):
                if res is None:
                    inputs.skipped[v.name] = "unreadable"
                else:
                    w, h, k, d, m = res
                    sizes.setdefault(v.camera, {}).setdefault((w, h), []).append(v.name)
                    feats[(v.camera, v.frame)] = (k, d)
                    masked += int(m)
                if on_event:
                    on_event(SfmProgress("features", done, len(all_views), v.name))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for cam, by_size in sizes.items():
        if len(by_size) > 1:
            desc = "; ".join(f"{w}x{h}: {', '.join(names[:3])}" for (w, h), names in by_size.items())
            raise SfmError(f"camera {cam}: its images differ in size ({desc})", camera=cam)
        inputs.sizes[cam] = next(iter(by_size))
    inputs.views = {c: [v for v in vs if (v.camera, v.frame) in feats] for c, vs in inputs.views.items()}
    inputs.views = {c: vs for c, vs in inputs.views.items() if vs}
    if len(inputs.views) < 3:
        raise SfmError(f"{inputs.image_root}: only {len(inputs.views)} camera(s) have readable images "
                       f"({len(inputs.skipped)} unreadable); SfM needs at least 3",
                       path=str(inputs.image_root), skipped=sorted(inputs.skipped),
                       left_out={str(inputs.image_root / n): why for n, why in inputs.skipped.items()})

    mode, intr, intr_source = _resolve_intrinsics(inputs, options.intrinsics,
                                                  Path(cameras_path) if cameras_path is not None else None, rig)
    rig_mode = mode != "free" and any(len(vs) > 1 for vs in inputs.views.values())
    if not rig_mode:  # one image per camera: the first frame
        inputs.views = {c: vs[:1] for c, vs in inputs.views.items()}
    bodies = _bodies(inputs, options) if mode == "free" else None

    # -- database and matching (validated above; only now is anything replaced on disk)
    out.mkdir(parents=True, exist_ok=True)
    work_dir = out / "work"
    work_dir.mkdir(exist_ok=True)
    db_path = out / "sfm.db"
    for p in (db_path, *(db_path.parent.glob(db_path.name + "-*"))):
        p.unlink(missing_ok=True)
    cams = sorted(inputs.views)
    with _quiet_colmap():
        pycolmap.set_random_seed(options.seed)
        by_id = _write_database(db_path, inputs, intr, rig_mode, feats, bodies, options.camera_model)
        pairs = []  # rig mode: each lighting step with the same step of the other cameras
        for a, b in combinations(cams, 2):
            if rig_mode:
                fb = {v.frame: v for v in inputs.views[b]}
                pairs += [(va.name, fb[va.frame].name) for va in inputs.views[a] if va.frame in fb]
            else:
                pairs.append((inputs.views[a][0].name, inputs.views[b][0].name))
        if on_event:
            on_event(SfmProgress("matching", 0, len(pairs), f"{len(pairs)} image pairs"))
        _match(db_path, pairs, work_dir, options, threads)
        n_pairs, n_inliers, per_pair = _match_stats(db_path, by_id)
        if on_event:
            on_event(SfmProgress("matching", len(pairs), len(pairs), f"{n_pairs} verified pairs"))
        mapping = None
        if mode == "free":
            rec, mapping = _map_estimated(db_path, inputs.image_root, work_dir, options, threads, by_id, on_event)
        else:
            rec = _map(db_path, inputs.image_root, work_dir, options, mode, threads, len(cams), on_event)
            _rig_tracks(rec, db_path, rig_mode, threads)
    if rec is None or rec.num_reg_frames() == 0:
        best = max(per_pair.items(), key=lambda kv: kv[1], default=None)
        raise SfmError(f"{inputs.image_root}: mapping failed: no pair of cameras could start a reconstruction "
                       f"({n_pairs} verified image pairs, {n_inliers} inlier matches in all"
                       + (f"; best {best[0][0]}-{best[0][1]} with {best[1]}" if best else "") + ")",
                       path=str(inputs.image_root), verified_pairs=n_pairs, inlier_matches=n_inliers)

    # -- final adjustment
    if on_event:
        on_event(SfmProgress("adjusting", 0, 1))
    with _quiet_colmap():
        n_images: dict[str, int] = {}
        for iid, img in rec.images.items():
            if img.has_pose:
                n_images[by_id[iid].camera] = n_images.get(by_id[iid].camera, 0) + 1
        if mode != "free":  # estimated intrinsics were adjusted with each mapper's model (_map_estimated)
            rec, by_id = _collapse(rec, by_id)
            _bundle_adjust(rec, False, threads)
        focal_changes = ({by_id[cid].camera: ch for cid, ch in _refine_focal(rec, threads).items()}
                         if mode == "refine" else {})
    _rig_priors(rec, by_id, rig, rig_mode, options, threads)
    if on_event:
        on_event(SfmProgress("adjusting", 1, 1))

    cameras, per_camera, obs_err = _cameras_of(rec, by_id)
    left_out: dict[str, str] = dict(mapping.left_out) if mapping is not None else {}
    for c in left_out:
        cameras.pop(c, None)
        per_camera.pop(c, None)
    bodies_out = None
    if bodies is not None:
        body_of = {c: b.id for b in bodies.values() for c in b.images}
        for c in per_camera:
            per_camera[c]["body"] = body_of[c]
        decided = {body_of[by_id[iid].camera]: mapping.bodies.get(img.camera_id, {})
                   for iid, img in rec.images.items() if iid in by_id and img.has_pose}
        bodies_out = {b.id: {"label": b.label, "size": [b.width, b.height], "images": b.images,
                             "focal_start_px": round(b.focal_px, 3), "focal_prior": b.focal_prior,
                             "focal_source": b.focal_source, **decided.get(b.id, {"registered": False})}
                      for b in bodies.values()}
    for c, change in focal_changes.items():
        per_camera[c]["focal_refined"] = change <= MAX_FOCAL_CHANGE
        per_camera[c]["focal_change_pct"] = round(100 * change, 4)  # the refinement's proposal
    for c in per_camera:
        per_camera[c]["images"] = n_images[c]
    registered = sorted(cameras)
    unregistered = {}
    for c in cams:
        if c in left_out:
            unregistered[c] = left_out[c]
        elif c not in cameras:
            links = sum(n for (a, b), n in per_pair.items() if c in (a, b))
            unregistered[c] = ("no verified matches with other cameras" if links == 0 else
                               f"not registered ({links} inlier matches with other cameras)")
    if len(registered) < options.min_registered:
        raise SfmError(f"{inputs.image_root}: only {len(registered)} camera(s) registered "
                       f"({', '.join(registered) or 'none'}); {options.min_registered} needed. "
                       f"Not registered: {', '.join(unregistered)}", path=str(inputs.image_root),
                       registered=registered, unregistered=sorted(unregistered))

    # -- into the rig frame
    frame, alignment = "sfm", None
    if rig is not None:
        nominal = {c.id: c.pose.center for c in rig.cameras}
        common = [c for c in registered if c in nominal]
        if len(common) >= 3:
            src = np.array([cameras[c].pose.center for c in common])
            dst = np.array([nominal[c] for c in common])
            # robust fit: a camera registered far from where the rig file puts it (a false registration
            # on the plain backdrop) would tilt every other camera; fit without it and leave it out
            from reconstruct.sfm_rig import robust_rig_fit

            s, R, t, res, inl = robust_rig_fit(src, dst, RIG_TOLERANCE_M)
            for c, r_m, ok in zip(common, res, inl):
                if not ok:
                    unregistered[c] = (f"registered {r_m:.2f} m from its rig-file position after alignment: "
                                       "a false registration, left out")
                    cameras.pop(c)
            registered = [c for c in registered if c in cameras]
            rec.transform(pycolmap.Sim3d(s, pycolmap.Rotation3d(R), t))
            cameras = {c: _apply_similarity(cam, s, R, t) for c, cam in cameras.items()}
            frame = "rig"
            alignment = {"method": "umeyama similarity of camera centres to the rig's nominal positions, "
                                   "false registrations left out",
                         "rig": str(inputs.rig_path), "cameras": int(inl.sum()), "scale": s,
                         "rms_m": float(np.sqrt(np.mean(res[inl] ** 2))), "max_m": float(res[inl].max()),
                         "left_out": [c for c, ok in zip(common, inl) if not ok]}
            if len(registered) < options.min_registered:
                raise SfmError(f"{inputs.image_root}: only {len(registered)} camera(s) agree with the rig "
                               f"file after alignment; {options.min_registered} needed",
                               path=str(inputs.image_root), registered=registered, unregistered=sorted(unregistered))

    points = np.array([p.xyz for p in rec.points3D.values()]).reshape(-1, 3)  # [N, 3]
    colors = np.array([p.color for p in rec.points3D.values()], dtype=np.uint8).reshape(-1, 3)
    mean_err = float(np.mean(obs_err)) if len(obs_err) else None
    result = SfmResult(cameras=cameras, registered=registered, unregistered=unregistered, points=len(points),
                       mean_reprojection_error_px=mean_err, seconds=0.0, out_dir=out,
                       cameras_path=out / "cameras.json", colmap_dir=out / "colmap", per_camera=per_camera,
                       skipped_images=dict(inputs.skipped), frame=frame, alignment=alignment, take=inputs.take,
                       verify_seconds=inputs.verify_seconds, notes=dict(inputs.notes), bodies=bodies_out,
                       mapping=mapping.summary() if mapping is not None else None)
    gt = GroundTruth.find(source) if inputs.take is not None else None
    if gt is not None:
        result.ground_truth = score_sfm(cameras, gt.cameras())

    if on_event:
        on_event(SfmProgress("writing", 0, 1))
    sparse = out / "sparse"
    sparse.mkdir(exist_ok=True)
    rec.write(sparse)
    first = {c: inputs.views[c][0].name for c in registered}
    write_colmap_text(out / "colmap", [cameras[c] for c in registered], image_names=first,
                      points=points, point_colors=colors)
    result.seconds = time.perf_counter() - t0
    write_cameras(result.cameras_path, [cameras[c] for c in registered], per_camera=per_camera,
                  method="sfm", source=str(source), take=inputs.take,
                  frames=sorted({v.frame for vs in inputs.views.values() for v in vs}),
                  intrinsics=mode, intrinsics_source=intr_source, frame=frame,
                  units="m" if frame == "rig" else "arbitrary", alignment=alignment,
                  registered=registered, unregistered=unregistered, skipped_images=dict(inputs.skipped),
                  points=len(points),
                  mean_reprojection_error_px=None if mean_err is None else round(mean_err, 5),
                  matches={"image_pairs": len(pairs), "verified_pairs": n_pairs, "inlier_matches": n_inliers},
                  features={"mask": mask, "masked_images": masked,
                            "peak_threshold": options.peak_threshold},
                  seconds=round(result.seconds, 2), verify_seconds=round(result.verify_seconds, 3),
                  ground_truth=result.ground_truth, software=f"pycolmap {pycolmap.__version__}",
                  **({"bodies": bodies_out} if bodies_out is not None else {}),
                  **({"mapping": result.mapping} if result.mapping is not None else {}),
                  **({"notes": result.notes} if result.notes else {}))
    if on_event:
        on_event(SfmProgress("writing", 1, 1))
    if alignment is not None and alignment["rms_m"] > RIG_TOLERANCE_M:
        raise SfmError(f"{inputs.image_root}: the SfM cameras disagree with the rig file by "
                       f"{alignment['rms_m']:.2f} m RMS after alignment (a distorted reconstruction: too few "
                       f"features on the subject, a plain backdrop); not used. Shoot a calibration take. "
                       f"The model is in {out} for inspection.", path=str(inputs.image_root),
                       rms_m=alignment["rms_m"], out=str(out))
    return result


def _cameras_of(rec, by_id: dict[int, _View]) -> tuple[dict[str, Camera], dict[str, dict], list[float]]:
    """Registered cameras (from each camera's first image), per-camera statistics, every observation's error."""
    cameras: dict[str, Camera] = {}
    errs: dict[str, list[np.ndarray]] = {}
    n_images: dict[str, int] = {}
    for iid in sorted(rec.images):
        img = rec.images[iid]
        if not img.has_pose:
            continue
        v = by_id[iid]
        intr = _intrinsics_of(rec.cameras[img.camera_id])
        T = img.cam_from_world()
        pose = Pose(T.rotation.matrix(), np.asarray(T.translation))
        if v.camera not in cameras:
            cameras[v.camera] = Camera(v.camera, intr, pose)
        n_images[v.camera] = n_images.get(v.camera, 0) + 1
        xy, xyz = [], []
        for p2 in img.points2D:
            if p2.has_point3D():
                xy.append(p2.xy)
                xyz.append(rec.points3D[p2.point3D_id].xyz)
        if xy:
            uv, _ = project_points(np.asarray(xyz), intr, pose)
            errs.setdefault(v.camera, []).append(np.linalg.norm(uv - (np.asarray(xy) - _HALF), axis=1))
        else:
            errs.setdefault(v.camera, [])
    per: dict[str, dict] = {}
    all_err: list[float] = []
    for c in cameras:
        e = np.concatenate(errs[c]) if errs[c] else np.zeros(0)
        all_err += e.tolist()
        per[c] = {"registered": True, "images": n_images[c], "observations": len(e),
                  "reprojection_error_px": round(float(e.mean()), 5) if len(e) else None}
    return dict(sorted(cameras.items())), dict(sorted(per.items())), all_err


# ----------------------------------------------------------------------------- import


def _camera_id_from_name(name: str) -> str:
    """Camera id of a COLMAP image NAME: ``cam01/000003.jpg`` -> ``cam01`` (twinstudio layout),
    ``photos/IMG_0001.JPG`` -> ``IMG_0001``."""
    parts = name.replace("\\", "/").split("/")
    stem = parts[-1].rsplit(".", 1)[0] if "." in parts[-1][1:] else parts[-1]
    if stem.isdigit() and len(parts) > 1:
        return parts[-2]
    return stem


def import_colmap(model_dir: Path | str, out_dir: Path | str) -> SfmResult:
    """Import a COLMAP model (text, or binary read through pycolmap) into ``out_dir/cameras.json``.

    Principal points are shifted by -0.5 px to OpenCV's convention; camera ids
    come from image names (``cam01/000003.jpg`` -> ``cam01``, ``IMG_1.jpg`` ->
    ``IMG_1``). A camera seen in several images (several frames) must have one
    pose in all of them. Also writes the model back as ``out_dir/colmap/``
    (one image per camera). The frame and units are the model's.
    """
    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise SfmError(f"{model_dir}: not a folder", path=str(model_dir))
    mean_err = None
    try:
        if not (model_dir / "cameras.txt").is_file() and not (model_dir / "cameras.bin").is_file():
            raise SfmError(f"{model_dir}: no COLMAP model (cameras.txt or cameras.bin)", path=str(model_dir))
        if not (model_dir / "cameras.txt").is_file():  # binary: its tracks give the mean reprojection error
            import pycolmap

            with _quiet_colmap():
                rec = pycolmap.Reconstruction(model_dir)
            mean_err = float(rec.compute_mean_reprojection_error()) if rec.num_points3D() else None
        model = read_colmap_text(model_dir, id_from_name=lambda n: n)  # text or binary
    except ColmapError as e:
        raise SfmError(f"cannot import the COLMAP model: {e}", path=str(model_dir)) from e
    cameras: dict[str, Camera] = {}
    names: dict[str, str] = {}
    for img in model.cameras:  # img.id is the full image name here
        name = img.id
        cid = _camera_id_from_name(name)
        cam = Camera(cid, img.intrinsics, img.pose)
        if cid in cameras:
            prev = cameras[cid]
            scale = max(1.0, float(np.abs([c.pose.center for c in cameras.values()]).max()))
            if (np.linalg.norm(prev.pose.center - cam.pose.center) > 1e-6 * scale
                    or rotation_angle_deg(prev.pose.R, cam.pose.R) > 1e-4):
                raise SfmError(f"{model_dir}: camera {cid} appears in images {names[cid]} and {name} with "
                               "different poses", path=str(model_dir), camera=cid)
            continue
        cameras[cid] = cam
        names[cid] = name
    if not cameras:
        raise SfmError(f"{model_dir}: the model has no images", path=str(model_dir))
    ids = sorted(cameras)
    write_colmap_text(out / "colmap", [cameras[c] for c in ids], image_names=names, points=model.points,
                      point_colors=model.colors)
    seconds = time.perf_counter() - t0
    cameras_path = write_cameras(out / "cameras.json", [cameras[c] for c in ids],
                                 per_camera={c: {"registered": True, "image": names[c]} for c in ids},
                                 method="colmap-import", source=str(model_dir), frame="colmap",
                                 units="model", registered=ids, unregistered={}, points=len(model.points),
                                 mean_reprojection_error_px=mean_err, seconds=round(seconds, 3))
    return SfmResult(cameras={c: cameras[c] for c in ids}, registered=ids, unregistered={},
                     points=len(model.points), mean_reprojection_error_px=mean_err, seconds=seconds,
                     out_dir=out, cameras_path=cameras_path, colmap_dir=out / "colmap",
                     per_camera={c: {"registered": True, "image": names[c]} for c in ids}, frame="colmap")


# ----------------------------------------------------------------------------- rig mode (reconstruct.sfm_rig)


def _rig_peak_threshold(options: SfmOptions, inputs: _Inputs) -> float:
    """SIFT peak threshold: a capture take's faint studio texture takes the rig-mode one, unless the options
    ask for another than the default."""
    from reconstruct.sfm_rig import RIG_PEAK_THRESHOLD

    if inputs.take is not None and options.peak_threshold == SfmOptions.peak_threshold:
        return RIG_PEAK_THRESHOLD
    return options.peak_threshold


def _rig_tracks(rec, db_path: Path, rig_mode: bool, threads: int) -> None:
    """Rig mode: the mapper's model with two-view tracks (backdrop and floor) triangulated too."""
    if rig_mode and rec is not None:
        from reconstruct.sfm_rig import complete_tracks

        complete_tracks(rec, db_path, threads)


def _rig_priors(rec, by_id: dict[int, _View], rig, rig_mode: bool, options: SfmOptions,
                threads: int) -> dict | None:
    """Rig mode with a rig file: the last bundle adjustment with the nominal positions as priors."""
    if not rig_mode or rig is None or not options.rig_prior_m:
        return None
    from reconstruct.sfm_rig import adjust_with_rig_priors

    with _quiet_colmap():
        return adjust_with_rig_priors(rec, {i: v.camera for i, v in by_id.items()},
                                      {c.id: c.pose.center for c in rig.cameras}, options.rig_prior_m,
                                      RIG_TOLERANCE_M, threads)


__all__ = ["SfmError", "SfmOptions", "SfmProgress", "SfmResult", "import_colmap", "run_sfm", "score_sfm",
           "umeyama"]
