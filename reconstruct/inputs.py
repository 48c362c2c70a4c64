"""Where reconstruction reads from: cameras files, a take's images, ground truth.

Every stage of ``reconstruct`` works on a *capture root*: a session folder
(``session.json`` + ``takes/<take>/<camera>/<frame:06d>.jpg``) or a virtual
render folder (``render.json``, same image layout). On virtual captures the
exact answers sit in a ground-truth root: ``<session>/.virtual/studio`` for a
session, the render folder itself for a render. ``GroundTruth`` reads them.

``cameras.json`` (schema ``twinstudio.cameras``, OpenCV convention,
world-to-camera poses) is the one camera file every stage writes and reads.

Clean plates (``plates-nnn`` takes: the empty studio from every camera under
every lighting step of the stills) are looked up by camera and lighting step:
:func:`find_plate` gives the plate behind a still, so its edges can be
unmixed from the backdrop, ``F = (I - (1 - a) B) / a``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rigs.errors import TwinstudioError
from rigs.fileio import atomic_write_json, sha256_file
from rigs.geometry import Camera, Intrinsics

if TYPE_CHECKING:
    from capture.session import SessionManifest

CAMERAS_SCHEMA = "twinstudio.cameras"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAKE_KINDS = {"calib": "calibration", "plates": "plates", "stills": "stills", "motion": "motion"}


class ReconstructError(TwinstudioError):
    """The input cannot be reconstructed (exit code 2): names the file, take or camera."""

    exit_code = 2


class NoTakeError(ReconstructError):
    """The capture holds no take of the kind a stage needs: the stage does not apply to it (exit code 2)."""


# ----------------------------------------------------------------------------- cameras.json


def write_cameras(path: Path | str, cameras: Iterable[Camera], *, per_camera: Mapping[str, dict] | None = None,
                  **fields) -> Path:
    """Write ``cameras.json``: every camera, plus optional per-camera fields and top-level fields."""
    per_camera = per_camera or {}
    doc = {"schema": CAMERAS_SCHEMA, "version": 1, "convention": "opencv", **fields,
           "cameras": [{**c.to_dict(), **per_camera.get(c.id, {})} for c in cameras]}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, doc)
    return p


def read_cameras(path: Path | str) -> dict[str, Camera]:
    """Cameras of a ``cameras.json``, by id; a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ReconstructError(f"{p}: no cameras file (run `twinstudio reconstruct calibrate` or `sfm` first)",
                               path=str(p))
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ReconstructError(f"{p}: not valid JSON: {e}", path=str(p)) from e
    if not isinstance(doc, dict) or doc.get("schema") != CAMERAS_SCHEMA:
        raise ReconstructError(f"{p}: not a {CAMERAS_SCHEMA} file", path=str(p))
    if doc.get("convention", "opencv") != "opencv":
        raise ReconstructError(f"{p}: convention {doc.get('convention')!r}, expected 'opencv'", path=str(p))
    out: dict[str, Camera] = {}
    for i, c in enumerate(doc.get("cameras", [])):
        try:
            cam = Camera.from_dict(c)
        except (KeyError, TypeError, ValueError) as e:
            raise ReconstructError(f"{p}: cameras[{i}] is malformed ({e})", path=str(p), key=f"cameras[{i}]") from e
        out[cam.id] = cam
    return out


# ----------------------------------------------------------------------------- takes and images


def capture_kind(take_id: str) -> str | None:
    """'calibration' | 'plates' | 'stills' | 'motion' from a take id such as ``stills-002`` (None if unknown)."""
    return TAKE_KINDS.get(take_id.rsplit("-", 1)[0])


def list_takes(root: Path | str, kind: str | None = None) -> list[str]:
    """Take ids under ``root/takes`` in capture order, optionally of one kind.

    For a session, takes the manifest knows and that are not blocked; for a
    render folder, the folders.
    """
    root = Path(root)
    if (root / "session.json").is_file():
        from capture.session import read_manifest

        m = read_manifest(root)
        ids = [t.id for t in m.takes.values() if t.status != "blocked" and (kind is None or t.kind == kind)]
    else:
        ids = sorted(p.name for p in (root / "takes").glob("*-*") if p.is_dir())
        ids = [t for t in ids if kind is None or capture_kind(t) == kind]
    return sorted(ids, key=lambda t: (t.rsplit("-", 1)[-1], t))


def find_take(root: Path | str, kind: str, take: str | None = None) -> str:
    """The take to use: ``take`` if given (checked), else the latest take of ``kind``.

    A clean-plate take (the empty studio) is never taken for another kind, nor another kind for one.
    """
    root = Path(root)
    if take is not None:
        if not (root / "takes" / take).is_dir():
            raise ReconstructError(f"{root}: no take {take!r} (takes: {', '.join(list_takes(root)) or 'none'})",
                                   path=str(root), take=take)
        actual = capture_kind(take)
        if actual != kind and "plates" in (actual, kind):
            raise ReconstructError(f"{root}: take {take} is a {actual or 'unknown'} take, not a {kind} take"
                                   + (" (clean plates of the empty studio hold no subject)"
                                      if actual == "plates" else ""), path=str(root), take=take, kind=kind)
        return take
    found = list_takes(root, kind)
    if not found:
        raise NoTakeError(f"{root}: no {kind} take", path=str(root), kind=kind)
    return found[-1]


def take_images(root: Path | str, take: str) -> dict[str, dict[int, Path]]:
    """``{camera: {frame: image path}}`` of a take (``gt`` and hidden folders skipped)."""
    d = Path(root) / "takes" / take
    if not d.is_dir():
        raise ReconstructError(f"{d}: take folder missing", path=str(d), take=take)
    out: dict[str, dict[int, Path]] = {}
    for cam_dir in sorted(p for p in d.iterdir() if p.is_dir() and p.name != "gt" and not p.name.startswith(".")):
        frames = {int(p.stem): p for p in cam_dir.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit() and p.is_file()}
        if frames:
            out[cam_dir.name] = dict(sorted(frames.items()))
    return out


def take_steps(root: Path | str, take: str) -> dict[int, str]:
    """``{frame: lighting step name}`` of a take ("" for a session on a rig without presets).

    From ``session.json`` (the frames the take planned) for a session, from
    ``render.json`` (``takes[].steps``) for a virtual render folder.
    """
    root = Path(root)
    steps = _all_take_steps(root)[0]
    if take not in steps:
        src = "session.json" if (root / "session.json").is_file() else "render.json"
        raise ReconstructError(f"{root / src}: no take {take!r} (takes: {', '.join(steps) or 'none'})",
                               path=str(root / src), take=take)
    return steps[take]


def plate_steps(root: Path | str, take: str) -> dict[str, dict[str, Path]]:
    """The images of a plates take by lighting step and camera: ``{step: {camera: image path}}``.

    A session lists the frames ``session.json`` records as captured, a render
    folder the images on disk; a plate a camera missed is absent. The images
    are not verified here (see :func:`verified_images`).
    """
    root = Path(root)
    if capture_kind(take) != "plates":
        raise ReconstructError(f"take {take} is not a plates take (clean plates are plates-nnn)", take=take)
    steps, manifest = _all_take_steps(root)
    if take not in steps:
        raise ReconstructError(f"{root}: no take {take!r}", path=str(root), take=take)
    return _plate_images(root, take, steps[take], manifest)


def plates_for(root: Path | str, stills_take: str) -> dict[str, dict[int, Path]]:
    """The clean plate behind every frame of ``stills_take``: ``{camera: {frame: plate image}}``.

    For each frame, the image of the same camera under the same lighting step
    in the latest plates take that holds one; frames without a plate are left
    out. Reads the manifest once: use it rather than :func:`find_plate` for
    many frames.
    """
    root = Path(root)
    steps, manifest = _all_take_steps(root)
    if stills_take not in steps:
        raise ReconstructError(f"{root}: no take {stills_take!r} (takes: {', '.join(steps) or 'none'})",
                               path=str(root), take=stills_take)
    by_step: dict[str, dict[str, Path]] = {}
    for plates in list_takes(root, "plates"):  # oldest first: a later take's plates replace an earlier one's
        if plates in steps and (root / "takes" / plates).is_dir():
            for step, cams in _plate_images(root, plates, steps[plates], manifest).items():
                by_step.setdefault(step, {}).update(cams)
    out: dict[str, dict[int, Path]] = {}
    for frame, step in sorted(steps[stills_take].items()):
        for cam, path in by_step.get(step, {}).items():
            out.setdefault(cam, {})[frame] = path
    return dict(sorted(out.items()))


def find_plate(root: Path | str, stills_take: str, camera: str, frame: int) -> Path | None:
    """The clean plate behind frame ``frame`` of ``stills_take`` as seen by ``camera``, or None.

    The plate is the image of the same camera under the same lighting step
    (step names from ``session.json``, or ``render.json`` for a render
    folder) in the latest plates take that holds one; None when none does.
    Raises ReconstructError when ``stills_take`` or its frame is unknown.
    """
    root = Path(root)
    frames = take_steps(root, stills_take)
    if frame not in frames:
        raise ReconstructError(f"take {stills_take} has no frame {frame} (frames: "
                               f"{', '.join(map(str, sorted(frames))) or 'none'})", take=stills_take, frame=frame)
    return plates_for(root, stills_take).get(camera, {}).get(frame)


def _all_take_steps(root: Path) -> tuple[dict[str, dict[int, str]], SessionManifest | None]:
    """``({take: {frame: step}}, session manifest or None)`` of a session or render folder."""
    if (root / "session.json").is_file():
        from capture.session import read_manifest

        try:
            m = read_manifest(root)
        except TwinstudioError as e:
            raise ReconstructError(str(e), path=str(root / "session.json")) from e
        return {t.id: {f.index: f.step for f in t.frames} for t in m.takes.values()}, m
    if (root / "render.json").is_file():
        from rigs.virtual.render import load_render_manifest

        try:
            r = load_render_manifest(root / "render.json")
        except TwinstudioError as e:
            raise ReconstructError(str(e), path=str(root / "render.json")) from e
        return {t["id"]: dict(enumerate(t.get("steps", []))) for t in r.takes}, None
    raise ReconstructError(f"{root}: neither session.json nor render.json, so the lighting steps of its takes "
                           "are unknown", path=str(root))


def _plate_images(root: Path, take: str, steps: dict[int, str],
                  manifest: SessionManifest | None) -> dict[str, dict[str, Path]]:
    """``{step: {camera: image}}`` of one plates take: the captured frames of a session, a render's files."""
    if manifest is not None:
        rec = manifest.takes[take]
        images = {cam: {f: root / r.path for f, r in frames.items()} for cam, frames in rec.captured.items()}
    else:
        images = take_images(root, take)
    out: dict[str, dict[str, Path]] = {}
    for frame, step in sorted(steps.items()):
        for cam, frames in sorted(images.items()):
            if frame in frames and frames[frame].is_file():
                out.setdefault(step, {})[cam] = frames[frame]
    return out


# ----------------------------------------------------------------------------- verified inputs


@dataclass(frozen=True)
class VerifiedImages:
    """The frames of a take that passed verification, and the ones left out with the reason."""

    take: str | None
    images: dict[str, dict[int, Path]]  # camera -> frame -> path, frames that passed
    left_out: dict[str, str] = field(default_factory=dict)  # path -> why it was left out
    method: str = ""  # what they were checked against: "session.json" | "render.json" | "decode"
    seconds: float = 0.0  # time the verification took

    def count(self) -> int:
        return sum(len(v) for v in self.images.values())


def verified_images(root: Path | str, take: str, *, cameras: Collection[str] | None = None,
                    frames: Collection[int] | None = None, workers: int | None = None) -> VerifiedImages:
    """The frames of ``take`` that may be used, and ``{path: reason}`` for those that may not.

    A session's frames are checked against the size and sha256 that
    ``session.json`` records, a render folder's against ``render.json``: a
    frame whose bytes differ (truncated, overwritten), that is not listed, or
    that is listed but missing is left out. The capture decoded every listed
    frame for its QA, so a frame whose hash matches is not decoded again.
    Without a manifest every frame is decoded (:func:`decode_problem`).
    ``cameras``/``frames`` restrict the check to what a stage will read.
    """
    t0 = time.perf_counter()
    root = Path(root)
    on_disk = take_images(root, take) if (root / "takes" / take).is_dir() else {}
    on_disk = {c: {f: p for f, p in fr.items() if frames is None or f in frames}
               for c, fr in on_disk.items() if cameras is None or c in cameras}
    listed = _manifest_frames(root, take)
    left_out: dict[str, str] = {}
    todo: list[tuple[str, int, Path, tuple[str, int | None] | None]] = []
    if listed is not None:
        method, records = listed
        seen = set()
        for cam, fr in on_disk.items():
            for f, p in fr.items():
                rel = p.relative_to(root).as_posix()
                seen.add(rel)
                rec = records.get(rel)
                if rec is None:
                    left_out[str(p)] = f"not listed in {method}"
                    continue
                size = p.stat().st_size
                if rec[1] is not None and size != rec[1]:
                    left_out[str(p)] = (f"{'truncated: ' if size < rec[1] else ''}{size} bytes, "
                                        f"{method} records {rec[1]}")
                    continue
                todo.append((cam, f, p, rec))
        for rel in sorted(set(records) - seen):
            cam, name = rel.split("/")[-2:]
            stem = name.rsplit(".", 1)[0]
            if (cameras is None or cam in cameras) and stem.isdigit() and (frames is None or int(stem) in frames) \
                    and rel.startswith(f"takes/{take}/") and "/gt/" not in rel:
                left_out[str(root / rel)] = f"missing (listed in {method})"
    else:
        method = "decode"
        todo = [(cam, f, p, None) for cam, fr in on_disk.items() for f, p in fr.items()]

    def check(item) -> str | None:
        _, _, p, rec = item
        if rec is None:
            return decode_problem(p)
        try:
            return None if sha256_file(p) == rec[0] else f"sha256 differs from {method}"
        except OSError as e:
            return f"cannot be read: {e.strerror or e}"

    problems = _map_checks(check, todo, workers)
    good: dict[str, dict[int, Path]] = {}
    for (cam, f, p, _), why in zip(todo, problems):
        if why is None:
            good.setdefault(cam, {})[f] = p
        else:
            left_out[str(p)] = why
    good = {c: dict(sorted(fr.items())) for c, fr in sorted(good.items())}
    return VerifiedImages(take, good, dict(sorted(left_out.items())), method, time.perf_counter() - t0)


def _manifest_frames(root: Path, take: str) -> tuple[str, dict[str, tuple[str, int | None]]] | None:
    """``(manifest name, {relative path: (sha256, size or None)})`` of a take's frames, or None without one."""
    if (root / "session.json").is_file():
        from capture.session import read_manifest

        rec = read_manifest(root).takes.get(take)
        out = {} if rec is None else {r.path: (r.sha256, r.size) for fr in rec.captured.values() for r in fr.values()}
        return "session.json", out
    if (root / "render.json").is_file():
        from rigs.virtual.render import load_render_manifest

        try:
            m = load_render_manifest(root / "render.json")
        except TwinstudioError as e:
            raise ReconstructError(str(e), path=str(root / "render.json")) from e
        prefix = f"takes/{take}/"
        return "render.json", {i.path: (i.sha256, None) for i in m.images if i.path.startswith(prefix)}
    return None


def decode_problems(paths: Iterable[Path], workers: int | None = None) -> dict[Path, str]:
    """``{path: why}`` of the image files that do not decode cleanly (:func:`decode_problem`, warnings counted)."""
    paths = list(paths)
    return {p: why for p, why in zip(paths, _map_checks(decode_problem, paths, workers)) if why is not None}


def _map_checks(check, items: list, workers: int | None) -> list:
    """``check`` over ``items`` in threads (hashlib and Pillow release the GIL), warnings raised as errors."""
    if not items:
        return []
    n = max(1, min(workers or os.cpu_count() or 1, 8, len(items)))
    with warnings.catch_warnings():  # a decoder's warning is corruption here (one filter for every thread)
        warnings.simplefilter("error")
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(check, items))


def decode_problem(path: Path | str) -> str | None:
    """Why an image file cannot be used (truncated, not an image, a decoder warning), or None when it decodes.

    Decoded by Pillow, which refuses a truncated file (OpenCV's ``imread``
    only prints libjpeg's warning and returns the missing part grey). JPEGs
    are decoded at 1/8 scale: the whole entropy-coded stream is still read,
    at a fraction of the cost. Call it with warnings turned into errors
    (``warnings.simplefilter("error")``) to count a decoder's warnings too,
    as :func:`verified_images` does.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("L", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "cannot be decoded: not an image file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as e:
        return f"cannot be decoded: {e}"
    return None


def intrinsics_for_size(intr: Intrinsics, width: int, height: int) -> Intrinsics | None:
    """``intr`` for images of ``width`` x ``height`` (the same lens, resized), or None for another aspect ratio."""
    if (intr.width, intr.height) == (width, height):
        return intr
    scaled = intr.scaled(width / intr.width)
    return scaled if (scaled.width, scaled.height) == (width, height) else None


def left_out_summary(left_out: Mapping[str, str], limit: int = 3) -> str:
    """A short human line for left-out frames: count and the first few with their reason."""
    if not left_out:
        return ""
    items = list(left_out.items())[:limit]
    more = len(left_out) - len(items)
    return (f"{len(left_out)} frame(s) left out: " + "; ".join(f"{Path(p).name} of {Path(p).parent.name} ({r})"
                                                              for p, r in items)
            + (f"; and {more} more" if more > 0 else ""))


# ----------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class GroundTruth:
    """The virtual studio's exact answers for a capture root."""

    root: Path  # the render folder holding gt/cameras.json and takes/<take>/gt

    @classmethod
    def find(cls, capture_root: Path | str) -> GroundTruth | None:
        """The ground truth of a session or render folder, or None for a real capture."""
        r = Path(capture_root)
        for cand in (r, *sorted((r / ".virtual").glob("*"))):
            if (cand / "gt" / "cameras.json").is_file() and (cand / "render.json").is_file():
                return cls(cand)
        return None

    def cameras(self) -> dict[str, Camera]:
        return read_cameras(self.root / "gt" / "cameras.json")

    def take_dir(self, take: str) -> Path:
        return self.root / "takes" / take / "gt"

    def frames(self, take: str) -> dict:
        """The take's ``frames.json``: per frame the preset, time, mesh, joints, landmarks, board pose."""
        p = self.take_dir(take) / "frames.json"
        if not p.is_file():
            raise ReconstructError(f"{p}: no ground truth for take {take}", path=str(p), take=take)
        return json.loads(p.read_text())

    def mask(self, take: str, camera: str, frame: int) -> np.ndarray | None:
        """The exact subject mask (bool [H, W]) or None if not rendered."""
        import cv2

        p = self.take_dir(take) / camera / f"{frame:06d}.mask.png"
        m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED) if p.is_file() else None
        return None if m is None else m > 127

    def mesh_path(self, take: str, frame: int) -> Path | None:
        """The subject's mesh (PLY) at ``frame`` of ``take``, or None if the frame has no subject."""
        for f in self.frames(take)["frames"]:
            if f["index"] == frame and "mesh" in f:
                return self.take_dir(take) / f["mesh"]
        return None


__all__ = ["CAMERAS_SCHEMA", "GroundTruth", "NoTakeError", "ReconstructError", "VerifiedImages", "capture_kind",
           "decode_problem", "decode_problems", "find_plate", "find_take", "intrinsics_for_size", "left_out_summary",
           "list_takes", "plate_steps", "plates_for", "read_cameras", "take_images", "take_steps",
           "verified_images", "write_cameras"]
