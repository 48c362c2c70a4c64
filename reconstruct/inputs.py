"""Where reconstruction reads from: cameras files, a take's images, ground truth.

Every stage of ``reconstruct`` works on a *capture root*: a session folder
(``session.json`` + ``takes/<take>/<camera>/<frame:06d>.jpg``) or a virtual
render folder (``render.json``, same image layout). On virtual captures the
exact answers sit in a ground-truth root: ``<session>/.virtual/studio`` for a
session, the render folder itself for a render. ``GroundTruth`` reads them.

``cameras.json`` (schema ``twinstudio.cameras``, OpenCV convention,
world-to-camera poses) is the one camera file every stage writes and reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rigs.errors import TwinstudioError
from rigs.fileio import atomic_write_json
from rigs.geometry import Camera

CAMERAS_SCHEMA = "twinstudio.cameras"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAKE_KINDS = {"calib": "calibration", "stills": "stills", "motion": "motion"}


class ReconstructError(TwinstudioError):
    """The input cannot be reconstructed (exit code 2): names the file, take or camera."""

    exit_code = 2


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
    """'calibration' | 'stills' | 'motion' from a take id such as ``stills-002`` (None if unknown)."""
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
    """The take to use: ``take`` if given (checked), else the latest take of ``kind``."""
    root = Path(root)
    if take is not None:
        if not (root / "takes" / take).is_dir():
            raise ReconstructError(f"{root}: no take {take!r} (takes: {', '.join(list_takes(root)) or 'none'})",
                                   path=str(root), take=take)
        return take
    found = list_takes(root, kind)
    if not found:
        raise ReconstructError(f"{root}: no {kind} take", path=str(root), kind=kind)
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


__all__ = ["CAMERAS_SCHEMA", "GroundTruth", "ReconstructError", "capture_kind", "find_take", "list_takes",
           "read_cameras", "take_images", "write_cameras"]
