"""Export a capture to a nerfstudio dataset: ``transforms.json`` + images + masks + seed points.

The dataset is what nerfstudio's ``nerfstudio-data`` dataparser reads:

- one frame per (camera, still) with its own intrinsics and OpenCV distortion
  (``fl_x fl_y cx cy w h k1 k2 p1 p2 k3``; the principal point moved by half a
  pixel, since nerfstudio puts the top-left pixel's centre at (0.5, 0.5)),
  camera-to-world in nerfstudio's OpenGL axes (converted in
  :func:`rigs.geometry.opencv_to_nerfstudio_c2w`, the one place that does it),
  ``mask_path``, and twinstudio's metadata: camera, take, frame, lighting preset
  (name and index) and, for motion frames, ``time`` in seconds;
- ``train_filenames`` / ``val_filenames`` / ``test_filenames``: whole cameras are
  held out, so evaluation is on views the twin never saw;
- ``images_<d>/`` and ``masks_<d>/`` at 1/2, 1/4, 1/8 (nerfstudio's layout for
  its ``downscale_factor``), ``sparse_pc.ply`` seed points from the
  reconstructed mesh, so splats start on the subject's surface.

By default (``unmix``, ``crop``) the images are not the photos themselves but
the **unmixed subject**: at the subject's edges a photo's pixels mix the
person with the green backdrop (and JPEG smears the green further in), and a
twin trained on them learns green rims. Each still is unmixed against its
clean plate (the empty studio from the same camera under the same lighting
step, :func:`reconstruct.inputs.plates_for`; without one the backdrop is
estimated around the subject) by :func:`reconstruct.matte.unmix`: a soft alpha
and the foreground colour ``F = (I - (1 - a) B) / a`` with spill suppressed.
The RGBA image (F, alpha) is undistorted to the camera's pinhole image (same
K), cropped to the subject's box plus a margin (edges on the coarsest
downscale's grid, the principal point moved by the crop's corner, no
distortion left for nerfstudio to undo) and downscaled premultiplied (area
averages of ``a F`` and ``a``). Training then spends its pixels on the person,
and the held-out ground truth is unmixed the same way. Each frame records its
``crop`` box, ``source_size``, ``plate`` and the green rim before and after
(``rim_excess_photo``, ``rim_excess_unmixed``).

Positions stay in the studio's frame (metres, z up): twin-splat's dataparser
applies no re-orientation or scaling, so a trained splat is already where the
mesh, the cameras and the motion trajectories are. Images are copied from the
take (a copy-on-write clone where the file system offers one, never a hard
link: the export shares no inode with the session) when ``unmix`` is off.

Every function here that reads or writes the subject's imagery first asks the
shared consent gate for scope ``train`` (:func:`require_train_consent`).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reconstruct.inputs import GroundTruth, find_take, read_cameras, verified_images
from rigs.errors import TwinstudioError
from rigs.fileio import atomic_write_bytes, atomic_write_json, copy_file
from rigs.geometry import Camera, opencv_to_nerfstudio_c2w
from rigs.pngio import encode_png

DATASET_SCHEMA = "twinstudio.nerfstudio-dataset"
DATASET_VERSION = 1
DATASET_DIR = "dataset"  # <root>/train/dataset
DOWNSCALES = (2, 4, 8)
CROP_MIN_MARGIN_PX = 16


class TrainError(TwinstudioError):
    """Training inputs or settings are unusable (exit code 2): names the file, take or camera."""

    exit_code = 2


def require_train_consent(root: Path | str) -> dict | None:
    """The consent terms that allow training on ``root``'s imagery today, or None for a virtual render.

    The shared gate (:func:`capture.consent.require_session_consent`, scope ``train``): ConsentError
    (exit 4) when no record of the session's subject allows it (expired, revoked, no ``train`` scope,
    another subject's), ConsentInputError (exit 2) for a folder that is neither a session nor a render.
    """
    from capture.consent import require_session_consent

    rec = require_session_consent(Path(root), "train")
    if rec is None:
        return None
    return {"consent_id": rec.consent_id, "subject_id": rec.subject_id, "valid_until": str(rec.valid_until)}


def require_dataset_consent(doc: dict, root: Path | str | None = None) -> dict | None:
    """The gate for an exported dataset: the consent of the session it was exported from (its
    ``twinstudio.source``), unless that is ``root``, already checked. A dataset whose source is gone
    cannot be checked: ConsentInputError (exit 2)."""
    src = (doc.get("twinstudio") or {}).get("source")
    if not src:
        raise TrainError("the dataset names no source session, so no consent can be checked")
    if root is not None and Path(src).resolve() == Path(root).resolve():
        return None
    return require_train_consent(src)


def finite_or_none(value) -> float | None:
    """``float(value)``, or None when it is NaN or infinite (files hold no NaN: an undefined figure is None)."""
    if hasattr(value, "detach"):  # a torch scalar
        value = value.detach()
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return v if math.isfinite(v) else None


def json_safe(obj, path: str = "", undefined: dict | None = None):
    """A copy of ``obj`` with every NaN / infinite float replaced by None.

    A replaced figure that no ``undefined`` entry explains yet is added to the top-level dict's
    ``undefined`` (``{"eval.per_camera.cam04.psnr": "not finite (nan)"}``), so the file says why.
    """
    top = undefined is None
    if top:
        undefined = dict(obj.get("undefined") or {}) if isinstance(obj, dict) else {}
    if isinstance(obj, float) and not math.isfinite(obj):
        undefined.setdefault(path.lstrip("."), f"not finite ({obj})")
        out = None
    elif isinstance(obj, dict):
        out = {k: json_safe(v, f"{path}.{k}", undefined) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = [json_safe(v, f"{path}[{i}]", undefined) for i, v in enumerate(obj)]
    else:
        out = obj
    if top and isinstance(out, dict) and undefined:
        out["undefined"] = undefined
    return out


@dataclass(frozen=True)
class ExportOptions:
    take: str | None = None                 # stills take (default: the latest)
    motion_take: str | None = None          # also export this motion take's frames (with time)
    holdout: tuple[str, ...] | None = None  # cameras held out for evaluation (default: every 6th)
    holdout_every: int = 6
    downscales: tuple[int, ...] = DOWNSCALES
    seed_points: int = 30_000               # points sampled from the reconstructed mesh
    seed: int = 0
    unmix: bool = True                      # subject colours unmixed from the backdrop (clean plate or estimate)
    crop: bool = True                       # each image cropped to the subject's box plus a margin
    crop_margin: float = 0.08               # of the box's larger side, at least CROP_MIN_MARGIN_PX

    def __post_init__(self) -> None:
        if self.holdout_every < 2:
            raise TrainError(f"holdout_every must be >= 2, not {self.holdout_every}")
        if any(d not in (2, 4, 8, 16) for d in self.downscales):
            raise TrainError(f"downscales must be among 2, 4, 8, 16, not {self.downscales}")
        if self.seed_points < 0:
            raise TrainError(f"seed_points must be >= 0, not {self.seed_points}")
        if not 0 <= self.crop_margin <= 1:
            raise TrainError(f"crop_margin must be in [0, 1] (a fraction of the subject's box), not {self.crop_margin}")
        if self.crop and not self.unmix:
            raise TrainError("crop needs unmix (the crop is the unmixed subject's box)")


@dataclass
class ExportResult:
    out_dir: Path
    transforms: Path
    frames: int
    train_cameras: list[str]
    holdout_cameras: list[str]
    presets: list[str]
    seed_points: int
    skipped: dict[str, str] = field(default_factory=dict)  # camera or image -> reason
    seconds: float = 0.0


def default_dataset_dir(root: Path | str) -> Path:
    return Path(root) / "train" / DATASET_DIR


def default_holdout(cameras: Sequence[str], every: int = 6) -> list[str]:
    """Every ``every``-th camera, starting in the middle of the first group (spread around the rig)."""
    cams = sorted(cameras)
    if len(cams) < 2:
        raise TrainError(f"a held-out camera needs at least 2 cameras, the capture has {len(cams)}")
    picked = cams[min(every // 2, len(cams) - 1)::every]
    return picked if len(picked) < len(cams) else picked[:1]


def frame_lighting(root: Path, take: str) -> dict[int, tuple[str, float]]:
    """``{frame: (lighting preset, time s)}`` of a take, from the session (or the virtual render's truth)."""
    if (root / "session.json").is_file():
        from capture.session import read_manifest

        rec = read_manifest(root).takes.get(take)
        if rec is None:
            raise TrainError(f"{root / 'session.json'}: no take {take!r}", path=str(root), take=take)
        return {f.index: (f.step or "default", float(f.time)) for f in rec.frames}
    gt = GroundTruth.find(root)
    if gt is None:
        raise TrainError(f"{root}: neither a session (no session.json) nor a virtual render", path=str(root))
    return {f["index"]: (f.get("step") or f.get("preset") or "default", float(f.get("time", 0.0)))
            for f in gt.frames(take)["frames"]}


def export_dataset(root: Path | str, out_dir: Path | str | None = None, options: ExportOptions = ExportOptions(),
                   *, cameras_path: Path | str | None = None, masks_dir: Path | str | None = None,
                   mesh_path: Path | str | None = None,
                   on_event: Callable[[dict], None] | None = None) -> ExportResult:
    """Write the nerfstudio dataset of a session (or virtual render folder) and return what it holds.

    ``cameras_path`` defaults to ``<root>/recon/cameras.json``, ``masks_dir`` to
    ``<root>/recon/masks`` and ``mesh_path`` to the take's reconstructed mesh;
    the masks are required (the twin is trained against them), the mesh is not
    (without it training starts from random points in the capture volume).

    The session's consent must allow ``train`` today (:func:`require_train_consent`), checked
    before anything is read or written.
    """
    t0 = time.perf_counter()
    root = Path(root)
    consent = require_train_consent(root)
    emit = on_event or (lambda ev: None)
    out = Path(out_dir) if out_dir is not None else default_dataset_dir(root)
    cameras_path = Path(cameras_path) if cameras_path is not None else root / "recon" / "cameras.json"
    masks_root = Path(masks_dir) if masks_dir is not None else root / "recon" / "masks"
    if not cameras_path.is_file():
        raise TrainError(f"{cameras_path}: no calibrated cameras; run 'twinstudio reconstruct run {root}' first",
                         path=str(cameras_path))
    cameras = read_cameras(cameras_path)
    take = find_take(root, "stills", options.take)
    takes = [take] + ([find_take(root, "motion", options.motion_take)] if options.motion_take else [])

    holdout = sorted(options.holdout) if options.holdout is not None else default_holdout(cameras,
                                                                                         options.holdout_every)
    unknown = sorted(set(holdout) - set(cameras))
    if unknown:
        raise TrainError(f"held-out camera(s) {', '.join(unknown)} not in {cameras_path}", camera=unknown[0])
    if len(holdout) >= len(cameras):
        raise TrainError("every camera is held out: nothing is left to train on")

    # every (take, camera, frame) that has an image, a mask and a calibrated camera
    skipped: dict[str, str] = {}
    items: list[tuple[str, str, int, Path, Path, str, float]] = []
    for tk in takes:
        lighting = frame_lighting(root, tk)
        checked = verified_images(root, tk)  # against session.json: a damaged frame never reaches the twin
        skipped.update({Path(p).relative_to(root / "takes").with_suffix("").as_posix(): f"left out: {why}"
                        for p, why in checked.left_out.items()})
        for cam, frames in checked.images.items():
            if cam not in cameras:
                skipped[cam] = f"not in {cameras_path.name} (uncalibrated)"
                continue
            for frame, img in frames.items():
                mask = masks_root / tk / cam / f"{frame:06d}.mask.png"
                if not mask.is_file():
                    skipped[f"{tk}/{cam}/{frame:06d}"] = f"no mask {mask}"
                    continue
                preset, t = lighting.get(frame, ("default", 0.0))
                items.append((tk, cam, frame, img, mask, preset, t))
    if not items:
        raise TrainError(f"{masks_root}: no image of take {take} has a mask; run "
                         f"'twinstudio reconstruct masks {root}' first", path=str(masks_root), take=take)
    presets = sorted({it[5] for it in items if it[0] == take}, key=lambda p: _first_index(items, p))
    for it in items:  # motion frames under a preset the stills lack still get an index
        if it[5] not in presets:
            presets.append(it[5])

    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "masks", *(f"images_{d}" for d in options.downscales),
                *(f"masks_{d}" for d in options.downscales)):
        (out / sub).mkdir(exist_ok=True)

    frames_json = []
    train_names: list[str] = []
    test_names: list[str] = []
    undist = _UndistortCache()
    plates = {}
    if options.unmix:
        from reconstruct.inputs import plates_for

        plates = {tk: plates_for(root, tk) for tk in takes}  # one manifest read per take
    for n, (tk, cam, frame, img, mask, preset, t) in enumerate(items):
        emit({"event": "progress", "stage": "export", "done": n, "total": len(items)})
        name = f"{cam}_{tk}_{frame:06d}"
        c = cameras[cam]
        if options.unmix:
            rec = _export_unmixed(root, out, name, c, img, mask, plates[tk].get(cam, {}).get(frame), options, undist)
        else:
            rec = _export_copied(out, name, c, img, mask, options)
        rec.update({"transform_matrix": opencv_to_nerfstudio_c2w(c.pose).tolist(),
                    "camera": cam, "take": tk, "frame": frame, "lighting": preset,
                    "lighting_index": presets.index(preset)})
        if tk != take:
            rec["time"] = t
        frames_json.append(rec)
        (test_names if cam in holdout else train_names).append(rec["file_path"])

    points = 0
    mesh = Path(mesh_path) if mesh_path is not None else root / "recon" / "mesh" / take / "mesh.ply"
    doc = {"camera_model": "OPENCV", "frames": frames_json,
           "train_filenames": train_names, "val_filenames": test_names, "test_filenames": test_names}
    if options.seed_points and mesh.is_file():
        points = write_seed_points(mesh, out / "sparse_pc.ply", options.seed_points, options.seed)
        doc["ply_file_path"] = "sparse_pc.ply"
    elif options.seed_points:
        skipped["seed points"] = f"no mesh {mesh}: training starts from random points"
    doc["twinstudio"] = {
        "schema": DATASET_SCHEMA, "version": DATASET_VERSION, "source": str(root.resolve()),
        "take": take, "takes": takes, "cameras_json": str(cameras_path.resolve()),
        "cameras_method": json.loads(cameras_path.read_text()).get("method"),
        "holdout": holdout, "presets": presets, "volume": _volume(root), "seed_points": points,
        "downscales": list(options.downscales), "skipped": skipped, "consent": consent,
        "images": ("unmixed subject (RGBA: foreground colour, alpha), undistorted" if options.unmix
                   else "the take's images, as captured"),
        "cropped": bool(options.crop), "plates": sum(1 for f in frames_json if f.get("plate")),
    }
    atomic_write_json(out / "transforms.json", doc)
    emit({"event": "progress", "stage": "export", "done": len(items), "total": len(items)})
    trained = sorted({f["camera"] for f in frames_json} - set(holdout))
    return ExportResult(out, out / "transforms.json", len(frames_json), trained, holdout, presets, points, skipped,
                        round(time.perf_counter() - t0, 2))


def _read_mask(mask: Path, c: Camera) -> np.ndarray:
    """A mask as bool [H, W], checked against the camera's size."""
    import cv2

    m = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise TrainError(f"{mask}: unreadable mask", path=str(mask), camera=c.id)
    if m.shape != (c.intrinsics.height, c.intrinsics.width):
        raise TrainError(f"{mask}: mask is {m.shape[1]}x{m.shape[0]}, camera {c.id} is "
                         f"{c.intrinsics.width}x{c.intrinsics.height}", path=str(mask), camera=c.id)
    return m > 127


def _read_rgb(path: Path, c: Camera | None = None, what: str = "image") -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise TrainError(f"{path}: unreadable {what}", path=str(path))
    if c is not None and bgr.shape[:2] != (c.intrinsics.height, c.intrinsics.width):
        raise TrainError(f"{path}: {what} is {bgr.shape[1]}x{bgr.shape[0]}, camera {c.id} is "
                         f"{c.intrinsics.width}x{c.intrinsics.height}", path=str(path), camera=c.id)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _export_copied(out: Path, name: str, c: Camera, img: Path, mask: Path, options: ExportOptions) -> dict:
    """The image as captured (copied), its binary mask and the downscales; the camera as calibrated."""
    image_rel = f"images/{name}{img.suffix.lower()}"
    mask_rel = f"masks/{name}.png"
    copy_file(img, out / image_rel)
    m = _read_mask(mask, c)
    _write_png(out / mask_rel, m.astype(np.uint8) * 255)
    _write_downscaled(out, name, img.suffix.lower(), img, m.astype(np.uint8) * 255, options.downscales)
    return {"file_path": image_rel, "mask_path": mask_rel, **nerfstudio_intrinsics(c)}


class _UndistortCache:
    """Remap tables from a camera's pinhole image (same K, no distortion) to its captured image; the last
    camera's kept (the export visits the images camera by camera)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._maps: tuple[np.ndarray, np.ndarray] | None = None

    def maps(self, c: Camera) -> tuple[np.ndarray, np.ndarray] | None:
        """(map_x, map_y) float32 [H, W] for cv2.remap, or None when the lens has no distortion."""
        i = c.intrinsics
        if not np.any(i.dist_array):
            return None
        key = (i.width, i.height, i.fx, i.fy, i.cx, i.cy, tuple(i.dist))
        if key != self._key:
            from rigs.geometry import distort

            ys, xs = np.mgrid[0:i.height, 0:i.width].astype(np.float64)
            xy = np.stack([(xs.ravel() - i.cx) / i.fx, (ys.ravel() - i.cy) / i.fy], axis=1)
            d = distort(xy, i.dist_array)
            self._maps = ((d[:, 0] * i.fx + i.cx).reshape(i.height, i.width).astype(np.float32),
                          (d[:, 1] * i.fy + i.cy).reshape(i.height, i.width).astype(np.float32))
            self._key = key
        return self._maps


def crop_box(alpha: np.ndarray, margin: float, align: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1): the box of ``alpha > 0`` grown by ``margin`` of its larger side (at least
    CROP_MIN_MARGIN_PX), its edges moved outwards to multiples of ``align`` and kept in the image; None when
    ``alpha`` is empty."""
    h, w = alpha.shape
    ys, xs = np.nonzero(alpha > 0)
    if not len(xs):
        return None
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    m = max(CROP_MIN_MARGIN_PX, int(math.ceil(margin * max(x1 - x0, y1 - y0))))
    x0, y0 = max(0, (x0 - m) // align * align), max(0, (y0 - m) // align * align)
    x1 = min(w // align * align, -(-(x1 + m) // align) * align)
    y1 = min(h // align * align, -(-(y1 + m) // align) * align)
    return x0, y0, x1, y1


def _export_unmixed(root: Path, out: Path, name: str, c: Camera, img: Path, mask: Path, plate_path: Path | None,
                    options: ExportOptions, undist: _UndistortCache) -> dict:
    """The subject unmixed from the backdrop (``plate_path``: its clean plate, or None to estimate the
    backdrop), undistorted to the camera's pinhole image and cropped.

    Writes ``images/<name>.png`` (RGBA: the foreground colour F and its alpha), ``masks/<name>.png``
    (alpha >= 0.5) and their downscales (area averages of alpha F and alpha); returns the frame's record
    with the crop's pinhole intrinsics (``cx, cy`` moved by the crop's corner, no distortion).
    """
    import cv2

    from reconstruct.matte import downscale_premultiplied, unmix
    from train.colour import backdrop_excess
    from train.likeness import rim_pixels

    rgb = _read_rgb(img, c)
    m = _read_mask(mask, c)
    plate = _read_rgb(plate_path, c, "clean plate") if plate_path is not None else None
    matte = unmix(rgb, m, plate, chroma_420=_is_jpeg_420(img))
    fg, alpha = matte.fg, matte.alpha
    rim = rim_pixels(alpha)
    photo = rgb.astype(np.float32) / 255.0
    before = float(backdrop_excess(photo)[rim].mean()) if rim.any() else None
    after = float(backdrop_excess(fg)[rim].mean()) if rim.any() else None
    maps = undist.maps(c)
    if maps is not None:  # the pinhole image: nerfstudio then leaves it as it is
        rgba = np.dstack([fg, alpha]).astype(np.float32)
        rgba = cv2.remap(rgba, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
        fg, alpha = rgba[..., :3], np.clip(rgba[..., 3], 0.0, 1.0)
    align = max((*options.downscales, 1))
    h, w = alpha.shape
    box = crop_box(alpha, options.crop_margin, align) if options.crop else None
    if box is None:
        box = (0, 0, w // align * align, h // align * align)
    x0, y0, x1, y1 = box
    fg, alpha = np.ascontiguousarray(fg[y0:y1, x0:x1]), np.ascontiguousarray(alpha[y0:y1, x0:x1])
    image_rel, mask_rel = f"images/{name}.png", f"masks/{name}.png"
    _write_rgba(out / image_rel, fg, alpha)
    _write_png(out / mask_rel, (alpha >= 0.5).astype(np.uint8) * 255)
    for d in options.downscales:
        f_d, a_d = downscale_premultiplied(fg, alpha, d)
        _write_rgba(out / f"images_{d}" / f"{name}.png", f_d, a_d)
        _write_png(out / f"masks_{d}" / f"{name}.png", (a_d >= 0.5).astype(np.uint8) * 255)
    i = c.intrinsics
    intr = {"fl_x": i.fx, "fl_y": i.fy, "cx": i.cx + 0.5 - x0, "cy": i.cy + 0.5 - y0, "w": x1 - x0, "h": y1 - y0,
            "k1": 0.0, "k2": 0.0, "k3": 0.0, "k4": 0.0, "p1": 0.0, "p2": 0.0}
    return {"file_path": image_rel, "mask_path": mask_rel, **intr, "crop": [x0, y0, x1, y1],
            "source_size": [w, h], "undistorted": maps is not None,
            "plate": plate_path.relative_to(root).as_posix() if plate_path is not None else None,
            "rim_excess_photo": None if before is None else round(before, 5),
            "rim_excess_unmixed": None if after is None else round(after, 5)}


def _is_jpeg_420(path: Path) -> bool:
    """Was the image stored as a JPEG with 4:2:0 chroma (colour at half resolution, edges smeared)?"""
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return False
    from PIL import Image, JpegImagePlugin

    try:
        with Image.open(path) as im:
            return im.format == "JPEG" and JpegImagePlugin.get_sampling(im) == 2
    except (OSError, ValueError):
        return False


def _write_rgba(path: Path, fg: np.ndarray, alpha: np.ndarray) -> None:
    rgba = np.dstack([fg, alpha])
    _write_png(path, np.clip(np.round(rgba * 255.0), 0, 255).astype(np.uint8))


def nerfstudio_intrinsics(camera: Camera) -> dict:
    """Per-frame intrinsics in nerfstudio's keys; the principal point moves by +0.5 px (pixel centres)."""
    i = camera.intrinsics
    k1, k2, p1, p2, k3 = (float(v) for v in i.dist_array[:5])
    return {"fl_x": i.fx, "fl_y": i.fy, "cx": i.cx + 0.5, "cy": i.cy + 0.5, "w": i.width, "h": i.height,
            "k1": k1, "k2": k2, "k3": k3, "k4": 0.0, "p1": p1, "p2": p2}


def read_dataset(path: Path | str) -> dict:
    """``transforms.json`` of an exported dataset (the folder or the file), checked to be twinstudio's."""
    p = Path(path)
    p = p / "transforms.json" if p.is_dir() else p
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise TrainError(f"{p} does not exist: export the dataset first ('twinstudio train export')",
                         path=str(p)) from None
    except ValueError as e:
        raise TrainError(f"{p}: not JSON: {e}", path=str(p)) from e
    meta = doc.get("twinstudio") or {}
    if meta.get("schema") != DATASET_SCHEMA or meta.get("version") != DATASET_VERSION:
        raise TrainError(f"{p}: not a twinstudio dataset ({DATASET_SCHEMA}/{DATASET_VERSION})", path=str(p))
    return doc


def write_seed_points(mesh_path: Path, out: Path, n: int, seed: int = 0) -> int:
    """``n`` coloured points sampled on the mesh's surface, as a binary PLY (plyfile): float32 x y z,
    uchar red green blue."""
    import open3d as o3d
    from plyfile import PlyData, PlyElement

    mesh = o3d.io.read_triangle_mesh(str(mesh_path))
    if len(mesh.triangles) == 0:
        raise TrainError(f"{mesh_path}: mesh has no triangles", path=str(mesh_path))
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.triangles)
    col = np.asarray(mesh.vertex_colors) if mesh.has_vertex_colors() else np.full_like(v, 0.5)
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    rng = np.random.default_rng(seed)
    tri = rng.choice(len(f), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    bary = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)
    pts = np.einsum("nk,nkd->nd", bary, v[f[tri]])
    rgb = np.einsum("nk,nkd->nd", bary, col[f[tri]])
    rec = np.empty(n, dtype=[(k, "<f4") for k in "xyz"] + [(k, "u1") for k in ("red", "green", "blue")])
    rec["x"], rec["y"], rec["z"] = pts.T
    rec["red"], rec["green"], rec["blue"] = np.clip(np.round(rgb * 255), 0, 255).T
    buf = io.BytesIO()
    PlyData([PlyElement.describe(rec, "vertex")], byte_order="<",
            comments=["seed points sampled on the reconstructed mesh"]).write(buf)
    atomic_write_bytes(out, buf.getvalue())
    return n


def _first_index(items: list, preset: str) -> int:
    return min(it[2] for it in items if it[5] == preset)


def _volume(root: Path) -> dict | None:
    rig = root / "rig.toml"
    if not rig.is_file():
        gt = GroundTruth.find(root)
        rig = gt.root / "rig.toml" if gt is not None else rig
    if not rig.is_file():
        return None
    from rigs.rigfile import load_rig

    v = load_rig(rig).volume
    return {"center": [v.center[0], v.center[1]], "radius": v.radius, "height": v.height}


def _write_png(path: Path, img: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(img), fsync=False)


def _write_downscaled(out: Path, name: str, suffix: str, img_path: Path, mask: np.ndarray,
                      factors: Sequence[int]) -> None:
    """``images_<d>/`` and ``masks_<d>/`` by area averaging (d must divide the image size)."""
    import cv2

    if not factors:
        return
    img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
    if img is None:
        raise TrainError(f"{img_path}: unreadable image", path=str(img_path))
    h, w = img.shape[:2]
    for d in factors:
        if h % d or w % d:
            raise TrainError(f"{img_path}: {w}x{h} is not divisible by the downscale factor {d}",
                             path=str(img_path))
        size = (w // d, h // d)
        small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix in (".jpg", ".jpeg") else []
        ok, buf = cv2.imencode(suffix, small, params)
        if not ok:
            raise TrainError(f"{img_path}: could not encode {suffix}", path=str(img_path))
        atomic_write_bytes(out / f"images_{d}" / f"{name}{suffix}", buf.tobytes(), fsync=False)
        m = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
        _write_png(out / f"masks_{d}" / f"{name}.png", np.where(m > 127.5, 255, 0).astype(np.uint8))


__all__ = ["DATASET_SCHEMA", "ExportOptions", "ExportResult", "TrainError", "default_dataset_dir",
           "default_holdout", "export_dataset", "finite_or_none", "frame_lighting", "json_safe",
           "nerfstudio_intrinsics", "read_dataset", "require_dataset_consent", "require_train_consent",
           "write_seed_points"]
