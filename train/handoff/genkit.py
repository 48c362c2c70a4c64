"""The generation kit: a curated, captioned image set for fine-tuning a generative model of the subject.

``build_generation_kit(root, out_dir, subject_id, options)`` turns the stills
take of a capture (a session folder or a virtual render folder) into a folder
in Hugging Face's ``imagefolder`` convention, ready for a LoRA / DreamBooth
fine-tune of the person::

    <out_dir>/images/<camera>_<lighting>.jpg   square crop around the subject, size x size
    <out_dir>/masks/<camera>_<lighting>.png    the same crop of the subject mask, 0/255
    <out_dir>/metadata.jsonl                   one JSON object per image, sorted by file name

Each ``metadata.jsonl`` line holds ``file_name`` (relative to ``out_dir``, as
``imagefolder`` wants it), ``mask_file_name`` (``datasets`` decodes every
``*_file_name`` column as an image), the caption in ``text`` and the facts the
caption was made from (camera, view, elevation, azimuth, lighting, pose, crop
box, source image). Load it with ``load_dataset("imagefolder",
data_dir=out_dir)``: some ``datasets`` releases ignore a metadata file at the
root when given a bare path (huggingface/datasets#6442).

Crops
    A square centred on the bounding box of the subject's mask, of side
    ``max(w, h) * (1 + 2 * margin)`` (rounded up to whole pixels), resized to
    ``size`` x ``size`` with ``INTER_AREA`` when shrinking and ``INTER_CUBIC``
    when enlarging. Where the square leaves the image, the image is padded with
    its own border colour (``cv2.BORDER_REPLICATE``: the backdrop continues, no
    black bars for the model to learn) and the mask with 0. The mask goes
    through the same resize and is thresholded at 128, so it stays aligned
    with the image. ``crop_box_px`` is ``[x0, y0, side]`` in source pixels
    (``x0``/``y0`` may be negative where the crop was padded).

File formats
    Images are JPEG at ``jpeg_quality`` (95): the source stills are JPEGs
    already, so a lossless copy of a crop would preserve nothing that is
    there, at about 5x the size; q95 stays below the sensor noise, and every
    fine-tuning tool reads JPEG. Masks are PNG: they are binary, a lossy codec
    would smear their edges into grey, and PNG keeps them exact and small.
    Output is deterministic: fixed encoder settings, no timestamps, sorted
    lines, so the same input gives the same bytes (the bundle hashes them).

Views (where the camera stands relative to the subject)
    World frame: metres, z up (DESIGN.md). The subject centre is triangulated
    from the mask centroids of all cameras (least-squares point nearest to the
    rays through them); with fewer than two usable cameras it falls back to the
    capture volume's centre at half its height. A camera's azimuth is measured
    around that centre, from the subject's facing direction, positive towards
    the subject's LEFT; the eight 45-degree sectors are named from the
    subject's point of view: a camera on the subject's left sees the "left
    profile". Middle-ring cameras of ``virtual-ring-24`` sit exactly between two
    sectors (22.5 degrees off); a camera within ``BOUNDARY_TOLERANCE_DEG`` of a
    sector boundary takes the sector nearer to the front, so that its label
    does not flip with calibration noise. Elevation is the angle from the
    subject centre up to the camera: "high angle" above +15 degrees, "low
    angle" below -15, "eye level" between.

The subject's facing direction (``KitOptions.front_azimuth_deg``)
    A person's facing cannot be told from calibrated cameras alone, so it is
    taken, in this order, from:

    1. ``front_azimuth_deg`` when given (world azimuth, degrees,
       counter-clockwise from +x seen from above);
    2. the virtual studio's ground truth when the capture is virtual (and the
       cameras are in the studio frame): the facing of the posed skeleton in
       the take's ``frames.json``, ``(left) x (up)`` with ``left`` from the
       right to the left hip and shoulder. The synthetic person stands facing
       -y at rest (``rigs/virtual/person.py``, ``rigs/virtual/motion.py``) and
       stills are frame 0 of the clip, "exactly the rest pose", so this gives
       -90 degrees; the rig agrees: ``virtual-ring-24`` puts cam01 and the
       ``front`` light at (0, -3);
    3. otherwise the convention that the subject faces cam01 (the first
       camera, if there is no cam01): true of the rigs in ``rigs/library``
       laid out for a person (``virtual-ring-24``, ``studio-gphoto2-48``: cam01
       at (0, -3)); for any other rig pass ``front_azimuth_deg``.

    ``KitResult.front_source`` says which one was used.

Lighting
    The lighting step of each still (``train.dataset.frame_lighting``) becomes
    ``lighting`` and a plain-words ``lighting_description`` for the caption.
    The ``olat-rim-l`` / ``olat-rim-r`` descriptions keep the rig's light
    names ("left rim", "right rim"); in ``virtual-ring-24`` rim-l stands
    behind the subject on camera-left as seen from cam01, i.e. on the
    subject's right.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reconstruct.inputs import GroundTruth, find_take, read_cameras, verified_images
from rigs.errors import TwinstudioError
from rigs.fileio import TMP_SUFFIX, atomic_write_bytes
from rigs.geometry import Camera, pixel_rays
from train.dataset import frame_lighting

#: world azimuth (degrees) the virtual studio's person faces at rest: -y
VIRTUAL_FRONT_AZIMUTH_DEG = -90.0
#: a camera this close (degrees) to a sector boundary takes the sector nearer to the front
BOUNDARY_TOLERANCE_DEG = 2.0
#: elevation (degrees) above which a camera is "high angle" (below the negative: "low angle")
ELEVATION_LIMIT_DEG = 15.0
DEFAULT_POSE = "standing, arms relaxed"
METADATA_NAME = "metadata.jsonl"

#: view names by sector (0 = front ... 4 = back) and side
_SECTORS = ("front", "front-{side} three-quarter", "{side} profile", "back-{side} three-quarter", "back")

LIGHTING_DESCRIPTIONS: dict[str, str] = {
    "flat": "soft even studio light",
    "key-fill-rim": "three-point studio lighting",
    "olat-key": "single studio light from the key position",
    "olat-fill": "single studio light from the fill position",
    "olat-rim-l": "single studio light from the left rim position",
    "olat-rim-r": "single studio light from the right rim position",
    "olat-top": "single studio light from the top position",
    "olat-front": "single studio light from the front position",
}
GENERIC_LIGHTING = "studio lighting"


class KitError(TwinstudioError):
    """The generation kit cannot be built (exit code 2): names the file, take, camera or option."""

    exit_code = 2


@dataclass(frozen=True)
class KitOptions:
    size: int = 1024
    """Side of the square output images, pixels."""
    margin: float = 0.08
    """Border around the mask's bounding box, as a fraction of its larger side (on each side)."""
    take: str | None = None
    """Stills take to use (default: the latest)."""
    cameras: tuple[str, ...] | None = None
    """Cameras to use (default: every camera of the take that has masks and is calibrated)."""
    presets: tuple[str, ...] | None = None
    """Lighting steps to use, by name as the take records them (``flat``, ``olat-key``...); default all."""
    jpeg_quality: int = 95
    """JPEG quality of the images (masks are PNG)."""
    front_azimuth_deg: float | None = None
    """World azimuth the subject faces (degrees, counter-clockwise from +x); None: derive (module docstring)."""
    pose: str = DEFAULT_POSE
    """The subject's pose in words, for the captions (stills are one rest pose)."""

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 16:
            raise KitError(f"size must be an integer >= 16, not {self.size!r}", option="size")
        if not 0.0 <= self.margin <= 1.0:
            raise KitError(f"margin must be in [0, 1], not {self.margin!r}", option="margin")
        if not 1 <= self.jpeg_quality <= 100:
            raise KitError(f"jpeg_quality must be in [1, 100], not {self.jpeg_quality!r}", option="jpeg_quality")
        if self.front_azimuth_deg is not None and not math.isfinite(self.front_azimuth_deg):
            raise KitError(f"front_azimuth_deg must be finite, not {self.front_azimuth_deg!r}",
                           option="front_azimuth_deg")
        if self.cameras is not None and not self.cameras:
            raise KitError("cameras is empty: pass None for every camera", option="cameras")
        if self.presets is not None and not self.presets:
            raise KitError("presets is empty: pass None for every lighting step", option="presets")


@dataclass
class KitResult:
    out_dir: Path
    images: int
    skipped: dict[str, str]          # camera or take/camera/frame -> reason
    metadata: Path                   # <out_dir>/metadata.jsonl
    seconds: float
    front_azimuth_deg: float = 0.0   # world azimuth taken as the subject's front, degrees
    front_source: str = ""           # "option" | "virtual ground truth" | "camera cam01" ...
    subject_center: list[float] = field(default_factory=list)  # [3] metres, world frame


# ----------------------------------------------------------------------------- words


def lighting_description(name: str) -> str:
    """Plain words for a lighting step: the known presets', ``olat-<light>`` generically, else "studio lighting"."""
    if name in LIGHTING_DESCRIPTIONS:
        return LIGHTING_DESCRIPTIONS[name]
    if name.startswith("olat-") and len(name) > 5:
        return f"single studio light from the {name[5:].replace('-', ' ').replace('_', ' ')} position"
    return GENERIC_LIGHTING


def caption(subject_id: str, view: str, elevation: str, lighting: str, pose: str) -> str:
    """The training caption of one image.

    ``lighting`` is a description (:func:`lighting_description`); a known step
    name such as ``flat`` is translated. Example: ``"a photo of subj-042, full
    body, front-left three-quarter view, eye level, soft even studio light,
    standing, arms relaxed, plain studio backdrop"``.
    """
    light = LIGHTING_DESCRIPTIONS.get(lighting, lighting)
    return (f"a photo of {subject_id}, full body, {view} view, {elevation}, {light}, {pose}, "
            "plain studio backdrop")


def _azimuth_deg(vec: np.ndarray) -> float:
    return math.degrees(math.atan2(float(vec[1]), float(vec[0])))


def _wrap_deg(a: float) -> float:
    """Angle in (-180, 180]."""
    a = math.fmod(a, 360.0)
    if a <= -180.0:
        a += 360.0
    elif a > 180.0:
        a -= 360.0
    return a


def view_name(azimuth_deg: float) -> str:
    """Name of the 45-degree sector of an azimuth relative to the subject's front (positive: subject's left)."""
    rel = _wrap_deg(azimuth_deg)
    k = min(4, int((abs(rel) + 22.5 - BOUNDARY_TOLERANCE_DEG) // 45.0))
    return _SECTORS[k].format(side="left" if rel > 0 else "right")


def elevation_name(elevation_deg: float) -> str:
    """"high angle" above +15 degrees, "low angle" below -15, else "eye level"."""
    if elevation_deg > ELEVATION_LIMIT_DEG:
        return "high angle"
    if elevation_deg < -ELEVATION_LIMIT_DEG:
        return "low angle"
    return "eye level"


def camera_angles(camera: Camera, subject_center: np.ndarray,
                  front_azimuth_deg: float = VIRTUAL_FRONT_AZIMUTH_DEG) -> tuple[float, float]:
    """(azimuth, elevation) of a camera seen from the subject centre, degrees.

    Azimuth is relative to ``front_azimuth_deg`` (a world azimuth), positive
    towards the subject's left (counter-clockwise seen from above, z up), in
    (-180, 180]; elevation is the angle above the horizontal plane through the
    centre.
    """
    d = camera.pose.center - np.asarray(subject_center, dtype=np.float64).reshape(3)
    elevation = math.degrees(math.atan2(float(d[2]), math.hypot(float(d[0]), float(d[1]))))
    azimuth = _wrap_deg(_azimuth_deg(d) - front_azimuth_deg)
    return (180.0 if azimuth <= -179.95 else azimuth), elevation  # no "-180.0" once rounded to 0.1


def view_of(camera: Camera, subject_center: np.ndarray, *,
            front_azimuth_deg: float = VIRTUAL_FRONT_AZIMUTH_DEG) -> tuple[str, str, float]:
    """(view name, elevation name, azimuth degrees) of a camera around the subject.

    ``subject_center`` [3] is in world metres (z up); ``front_azimuth_deg`` is
    the world azimuth the subject faces (default: the virtual studio's person,
    facing -y). Views are named from the subject's point of view ("left
    profile": the camera is on the subject's left); the azimuth is relative to
    the front, positive towards the subject's left.
    """
    az, el = camera_angles(camera, subject_center, front_azimuth_deg)
    return view_name(az), elevation_name(el), az


# ----------------------------------------------------------------------------- geometry


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) of a mask's pixels > 127, or None if empty."""
    on = mask > 127
    cols = np.flatnonzero(on.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(on.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_square(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int]:
    """``(x0, y0, side)`` of the square centred on ``box`` with side ``max(w, h) * (1 + 2 margin)``, whole pixels."""
    x0, y0, x1, y1 = box
    side = math.ceil(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin) - 1e-9)
    side = max(side, 1)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return math.floor(cx - side / 2.0 + 0.5), math.floor(cy - side / 2.0 + 0.5), side


def cut_square(img: np.ndarray, x0: int, y0: int, side: int, size: int, *, is_mask: bool) -> np.ndarray:
    """The square ``[y0:y0+side, x0:x0+side]`` of ``img`` resized to ``size``; outside: border colour or 0 (mask)."""
    import cv2

    h, w = img.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    part = img[ya:yb, xa:xb]
    pads = (ya - y0, y0 + side - yb, xa - x0, x0 + side - xb)  # top, bottom, left, right
    if any(pads):
        # padding on a side happens only where the crop leaves the image there, so replicating the
        # part's border is replicating the image's border
        if is_mask:
            part = cv2.copyMakeBorder(part, *pads, cv2.BORDER_CONSTANT, value=0)
        else:
            part = cv2.copyMakeBorder(part, *pads, cv2.BORDER_REPLICATE)
    if side != size:
        interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
        part = cv2.resize(part, (size, size), interpolation=interp)
    if is_mask:
        part = np.where(part > 127, 255, 0).astype(np.uint8)
    return np.ascontiguousarray(part)


def triangulate_center(cameras: dict[str, Camera], centroids: dict[str, tuple[float, float]]) -> np.ndarray | None:
    """Least-squares point nearest to the rays through each camera's mask centroid (pixels); None if ill-posed."""
    a = np.zeros((3, 3))
    b = np.zeros(3)
    n = 0
    for cam_id in sorted(centroids):
        cam = cameras[cam_id]
        c, d = pixel_rays(cam.intrinsics, cam.pose, np.array([centroids[cam_id]], dtype=np.float64))
        d = d[0] / np.linalg.norm(d[0])
        p = np.eye(3) - np.outer(d, d)
        a += p
        b += p @ c
        n += 1
    if n < 2:
        return None
    ev = np.linalg.eigvalsh(a)
    if ev[0] < 1e-3 * ev[-1]:  # parallel rays: no single nearest point
        return None
    return np.linalg.solve(a, b)


def _volume_center(root: Path) -> np.ndarray:
    """The capture volume's centre at half its height (rig file of the capture), else (0, 0, 1) m."""
    rig = root / "rig.toml"
    if not rig.is_file():
        gt = GroundTruth.find(root)
        rig = gt.root / "rig.toml" if gt is not None else rig
    if rig.is_file():
        try:
            from rigs.rigfile import load_rig

            v = load_rig(rig).volume
            return np.array([float(v.center[0]), float(v.center[1]), float(v.height) / 2.0])
        except TwinstudioError:
            pass
    return np.array([0.0, 0.0, 1.0])


def _virtual_facing_deg(root: Path, take: str) -> float | None:
    """World azimuth the virtual person faces in ``take`` (from the ground-truth skeleton), or None."""
    gt = GroundTruth.find(root)
    if gt is None:
        return None
    try:
        frames = gt.frames(take).get("frames", [])
    except (TwinstudioError, OSError, ValueError):
        return VIRTUAL_FRONT_AZIMUTH_DEG
    for f in frames:
        j = f.get("joints") or {}
        pairs = [(j.get(f"{n}_l"), j.get(f"{n}_r")) for n in ("hip", "shoulder")]
        left = sum((np.asarray(lft, float) - np.asarray(rgt, float) for lft, rgt in pairs
                    if lft is not None and rgt is not None), np.zeros(3))
        left[2] = 0.0
        if np.linalg.norm(left) > 1e-6:
            facing = np.cross(left, [0.0, 0.0, 1.0])  # left = up x facing, so facing = left x up
            return _azimuth_deg(facing)
    return VIRTUAL_FRONT_AZIMUTH_DEG  # no skeleton recorded: the rest pose's documented facing


# ----------------------------------------------------------------------------- the stage


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "default"


def _encode(img: np.ndarray, ext: str, quality: int) -> bytes:
    import cv2

    if ext == ".jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 0,
                  cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 9]
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise KitError(f"OpenCV could not encode a {ext} image")
    return buf.tobytes()


def _read_cameras_checked(path: Path) -> dict[str, Camera]:
    if not path.is_file():
        raise KitError(f"{path}: no calibrated cameras; run 'twinstudio reconstruct run' first", path=str(path))
    try:
        cams = read_cameras(path)
        doc = json.loads(path.read_text())
    except (TwinstudioError, OSError, ValueError) as e:
        raise KitError(f"{path}: unreadable cameras file: {e}", path=str(path)) from e
    if doc.get("frame") == "sfm" or doc.get("units") == "arbitrary":
        raise KitError(f"{path}: cameras are in SfM's arbitrary frame (no metric z-up world), so views and "
                       "elevations cannot be named; reconstruct with the rig's camera positions", path=str(path))
    return cams


def build_generation_kit(root: Path | str, out_dir: Path | str, subject_id: str,
                         options: KitOptions = KitOptions(), *,
                         on_event: Callable[[dict], None] | None = None) -> KitResult:
    """Write the generation kit of a capture's stills into ``out_dir`` (layout in the module docstring).

    Reads ``<root>/recon/cameras.json`` and ``<root>/recon/masks/<take>/``.
    The kit is imagery made to teach generative models the subject, so a
    session's consent must cover ``generate`` today: else
    :class:`capture.consent.ConsentError` (exit 4), before anything is read or
    written. A virtual render folder (a synthetic person) needs none; any other
    folder is refused (ConsentInputError, exit 2: no consent can be checked).
    ``subject_id`` must be the session's subject.

    Images with a missing, empty or mis-sized mask, unreadable images and
    cameras absent from ``cameras.json`` are skipped and named in
    ``KitResult.skipped``; an input with nothing left to write raises
    :class:`KitError`. Images and masks of an earlier run that this run did not
    write are removed from ``images/`` and ``masks/``.
    """
    import cv2

    from capture.consent import require_session_consent

    t0 = time.perf_counter()
    root, out = Path(root), Path(out_dir)
    emit = on_event or (lambda ev: None)
    if not isinstance(subject_id, str) or not subject_id.strip():
        raise KitError(f"subject_id must be a non-empty string, not {subject_id!r}", option="subject_id")
    consent = require_session_consent(root, "generate")
    if consent is not None and consent.subject_id != subject_id:
        raise KitError(f"{root} is a session of subject {consent.subject_id!r}, not {subject_id!r}",
                       option="subject_id", subject=subject_id)

    # ---- validate every input before writing anything
    cameras_path = root / "recon" / "cameras.json"
    cameras = _read_cameras_checked(cameras_path)
    try:
        take = find_take(root, "stills", options.take)
        checked = verified_images(root, take)  # against session.json: a damaged frame is never shipped
        images = checked.images
        lighting = frame_lighting(root, take)
    except TwinstudioError as e:
        raise KitError(f"{root}: {e}", path=str(root), take=options.take) from e
    masks_root = root / "recon" / "masks" / take

    if options.cameras is not None:
        unknown = sorted(set(options.cameras) - set(images))
        if unknown:
            raise KitError(f"camera(s) {', '.join(unknown)} have no images in take {take} "
                           f"(cameras: {', '.join(sorted(images)) or 'none'})", camera=unknown[0], take=take)
    steps = {lighting.get(f, ("default", 0.0))[0] for frames in images.values() for f in frames}
    if options.presets is not None:
        unknown = sorted(set(options.presets) - steps)
        if unknown:
            raise KitError(f"lighting step(s) {', '.join(unknown)} are not in take {take} "
                           f"(steps: {', '.join(sorted(steps))})", preset=unknown[0], take=take)

    skipped: dict[str, str] = {Path(p).relative_to(root / "takes").with_suffix("").as_posix():
                               f"left out: {why}" for p, why in checked.left_out.items()}
    # (camera, frame, step, image path, mask path)
    items: list[tuple[str, int, str, Path, Path]] = []
    for cam in sorted(images):
        if options.cameras is not None and cam not in options.cameras:
            continue
        if cam not in cameras:
            skipped[cam] = f"not in {cameras_path.name} (uncalibrated)"
            continue
        if not (masks_root / cam).is_dir():
            skipped[cam] = f"no masks in {masks_root / cam}"
            continue
        for frame, img_path in images[cam].items():
            step = lighting.get(frame, ("default", 0.0))[0]
            if options.presets is not None and step not in options.presets:
                continue
            items.append((cam, frame, step, img_path, masks_root / cam / f"{frame:06d}.mask.png"))
    if not items:
        raise KitError(f"{root}: take {take} has no image to put in the generation kit "
                       f"(skipped: {skipped or 'nothing'})", path=str(root), take=take)

    # file stems: <camera>_<step>, with the frame appended where a camera has a step more than once
    counts: dict[tuple[str, str], int] = {}
    for cam, _, step, _, _ in items:
        counts[(cam, step)] = counts.get((cam, step), 0) + 1

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)

    written: list[dict] = []
    centroids: dict[str, tuple[float, float]] = {}
    n = len(items)
    for i, (cam, frame, step, img_path, mask_path) in enumerate(items):
        emit({"event": "progress", "stage": "generation kit", "done": i, "total": n})
        key = f"{take}/{cam}/{frame:06d}"
        if not mask_path.is_file():
            skipped[key] = f"no mask {mask_path}"
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            skipped[key] = f"unreadable mask {mask_path}"
            continue
        img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        if img is None:
            skipped[key] = f"unreadable image {img_path}"
            continue
        if mask.shape != img.shape[:2]:
            skipped[key] = (f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, "
                            f"image is {img.shape[1]}x{img.shape[0]}")
            continue
        box = mask_box(mask)
        if box is None:
            skipped[key] = f"empty mask {mask_path}"
            continue
        intr = cameras[cam].intrinsics
        if cam not in centroids and mask.shape == (intr.height, intr.width):
            ys, xs = np.nonzero(mask > 127)
            centroids[cam] = (float(xs.mean()), float(ys.mean()))
        x0, y0, side = crop_square(box, options.margin)
        stem = f"{cam}_{_safe(step)}" + (f"-{frame:06d}" if counts[(cam, step)] > 1 else "")
        image_rel, mask_rel = f"images/{stem}.jpg", f"masks/{stem}.png"
        atomic_write_bytes(out / image_rel, _encode(cut_square(img, x0, y0, side, options.size, is_mask=False),
                                                    ".jpg", options.jpeg_quality))
        atomic_write_bytes(out / mask_rel, _encode(cut_square(mask, x0, y0, side, options.size, is_mask=True),
                                                   ".png", options.jpeg_quality))
        written.append({"cam": cam, "step": step, "image": image_rel, "mask": mask_rel, "crop": [x0, y0, side],
                        "source": img_path.relative_to(root).as_posix() if img_path.is_relative_to(root)
                        else str(img_path)})
    if not written:
        raise KitError(f"{root}: no image of take {take} could be used (skipped: {skipped})",
                       path=str(root), take=take)

    # ---- views: the subject centre from the masks, the front from the option / ground truth / cam01
    center = triangulate_center(cameras, centroids)
    if center is None:
        center = _volume_center(root)
    if options.front_azimuth_deg is not None:
        front, source = float(options.front_azimuth_deg), "option"
    elif (virtual := _virtual_facing_deg(root, take)) is not None:
        front, source = virtual, "virtual ground truth"
    else:
        ref = "cam01" if "cam01" in cameras else min(cameras)
        front, source = _azimuth_deg(cameras[ref].pose.center - center), f"camera {ref}"

    lines = []
    for w in sorted(written, key=lambda w: w["image"]):
        az, el = camera_angles(cameras[w["cam"]], center, front)
        view, elev = view_name(az), elevation_name(el)
        light = lighting_description(w["step"])
        rec = {"file_name": w["image"], "mask_file_name": w["mask"],
               "text": caption(subject_id, view, elev, light, options.pose),
               "subject": subject_id, "camera": w["cam"], "view": view, "elevation": elev,
               "azimuth_deg": round(az, 1), "elevation_deg": round(el, 1),
               "lighting": w["step"], "lighting_description": light, "pose": options.pose,
               "crop_box_px": w["crop"], "source": w["source"]}
        lines.append(json.dumps(rec, ensure_ascii=False, allow_nan=False))
    metadata = out / METADATA_NAME
    atomic_write_bytes(metadata, ("\n".join(lines) + "\n").encode("utf-8"))

    # leftovers of an earlier run (other cameras or steps) would be images without metadata
    keep = {w["image"] for w in written} | {w["mask"] for w in written}
    for sub, ext in (("images", ".jpg"), ("masks", ".png")):
        for p in sorted((out / sub).iterdir()):
            rel = f"{sub}/{p.name}"
            if p.is_file() and rel not in keep and (p.suffix == ext or p.name.endswith(TMP_SUFFIX)):
                p.unlink()

    emit({"event": "progress", "stage": "generation kit", "done": n, "total": n})
    return KitResult(out, len(written), skipped, metadata, round(time.perf_counter() - t0, 2),
                     round(front, 3), source, [round(float(v), 4) for v in center])


__all__ = ["BOUNDARY_TOLERANCE_DEG", "DEFAULT_POSE", "ELEVATION_LIMIT_DEG", "GENERIC_LIGHTING",
           "LIGHTING_DESCRIPTIONS", "METADATA_NAME", "VIRTUAL_FRONT_AZIMUTH_DEG", "KitError", "KitOptions",
           "KitResult", "build_generation_kit", "camera_angles", "caption", "crop_square", "cut_square",
           "elevation_name", "lighting_description", "mask_box", "triangulate_center", "view_name", "view_of"]
