"""What a photo's EXIF says about the camera body that took it: grouping and focal-length priors.

Images of one physical body (same make, model, serial number, lens and
focal length, at the same image size) share one set of intrinsics in
structure from motion: a folder of 25 photos from one camera then has 4
intrinsic unknowns instead of 100, which is what lets the principal point
be estimated at all. The EXIF is read by Pillow (``Image.getexif`` and its
Exif IFD), not by hand.

Focal length priors, in order: the 35 mm-equivalent focal length
(``FocalLengthIn35mmFilm``, relative to the 43.27 mm diagonal of a 35 mm
frame); the focal length with the focal-plane resolution (sensor pixels per
unit, scaled to this image's width); neither: COLMAP's default guess,
1.2 x the longer side, marked as no prior so that it is estimated freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

#: diagonal of a 35 mm film frame (36 x 24 mm), in mm
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
#: COLMAP's focal length guess without a prior, times the longer image side
DEFAULT_FOCAL_FACTOR = 1.2
#: EXIF ResolutionUnit / FocalPlaneResolutionUnit -> millimetres per unit
_UNIT_MM = {1: None, 2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}

_ORIENTATION, _MAKE, _MODEL = 0x0112, 0x010F, 0x0110
_FOCAL, _FOCAL35, _SERIAL, _LENS = 0x920A, 0xA405, 0xA431, 0xA434
_FP_XRES, _FP_UNIT, _PIX_X, _PIX_Y = 0xA20E, 0xA210, 0xA002, 0xA003


@dataclass(frozen=True)
class PhotoInfo:
    """A photo's size as it is displayed (EXIF rotation applied) and its body's EXIF identity."""

    width: int
    height: int
    make: str = ""
    model: str = ""
    serial: str = ""
    lens: str = ""
    focal_mm: float | None = None
    focal_35mm: float | None = None
    orientation: int = 1  # EXIF orientation tag (1: as stored; 6 and 8: rotated a quarter turn)
    focal_px: float | None = None  # the focal length prior in pixels, when the EXIF gives one
    focal_source: str = ""  # how focal_px was found

    @property
    def has_identity(self) -> bool:
        return bool(self.make or self.model or self.serial)

    def body_key(self) -> tuple:
        """Images with the same key come from the same body, lens, zoom and image size."""
        focal = None if self.focal_mm is None else round(self.focal_mm, 2)
        return (self.make, self.model, self.serial, self.lens, focal, self.width, self.height)

    def body_label(self) -> str:
        """A short human name of the body: ``Canon EOS R5 #0123 50.0mm 8192x5464``."""
        parts = [" ".join(p for p in (self.make, self.model) if p) or "no EXIF body"]
        if self.serial:
            parts.append(f"#{self.serial}")
        if self.focal_mm is not None:
            parts.append(f"{self.focal_mm:g}mm")
        parts.append(f"{self.width}x{self.height}")
        return " ".join(parts)


def _text(v) -> str:
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    return str(v).strip().strip("\x00").strip() if v is not None else ""


def _number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def read_photo_info(path: Path | str) -> PhotoInfo:
    """The photo's displayed size and EXIF body data (empty where the file has none). Raises OSError
    (Pillow's) for a file that is not an image."""
    from PIL import ExifTags, Image

    with Image.open(path) as im:
        w, h = im.size
        exif = im.getexif()
        sub = exif.get_ifd(ExifTags.IFD.Exif) if exif else {}
    orientation = int(exif.get(_ORIENTATION, 1) or 1) if exif else 1
    if orientation in (5, 6, 7, 8):  # a quarter turn: displayed with width and height swapped
        w, h = h, w
    focal_mm = _number(sub.get(_FOCAL))
    focal35 = _number(sub.get(_FOCAL35))
    focal_px, source = None, ""
    if focal35 is not None:
        focal_px = focal35 / FULL_FRAME_DIAGONAL_MM * math.hypot(w, h)
        source = f"EXIF 35 mm equivalent {focal35:g} mm"
    elif focal_mm is not None:
        xres, unit = _number(sub.get(_FP_XRES)), _UNIT_MM.get(int(sub.get(_FP_UNIT, 2) or 2))
        if xres is not None and unit is not None:
            # focal-plane resolution is per sensor pixel of the full-size image; ours may be resized
            full_w = _number(sub.get(_PIX_X)) or (w if orientation not in (5, 6, 7, 8) else h)
            stored_w = w if orientation not in (5, 6, 7, 8) else h
            focal_px = focal_mm * xres / unit * stored_w / full_w
            source = f"EXIF focal length {focal_mm:g} mm and focal-plane resolution"
    return PhotoInfo(width=w, height=h, make=_text(exif.get(_MAKE)) if exif else "",
                     model=_text(exif.get(_MODEL)) if exif else "", serial=_text(sub.get(_SERIAL)),
                     lens=_text(sub.get(_LENS)), focal_mm=focal_mm, focal_35mm=focal35, orientation=orientation,
                     focal_px=focal_px, focal_source=source)


@dataclass
class Body:
    """One camera body (a group of photos that share intrinsics)."""

    id: str  # body01, body02, ...
    label: str
    width: int
    height: int
    images: list[str]  # names of the photos
    focal_px: float  # the starting focal length (pixels)
    focal_prior: bool  # True: from the EXIF (or a rig file); False: COLMAP's guess, estimated freely
    focal_source: str


def group_bodies(infos: dict[str, PhotoInfo], group: str = "body") -> dict[str, Body]:
    """Photos grouped into bodies. ``group``: ``"body"`` (by :meth:`PhotoInfo.body_key`), ``"one"`` (every
    photo from one camera; they must be the same size) or ``"image"`` (a camera per photo)."""
    keys: dict[tuple, list[str]] = {}
    for name in sorted(infos):
        info = infos[name]
        if group == "image":
            key: tuple = (name,)
        elif group == "one":
            key = ("one",)
        elif group == "body":
            key = info.body_key()
        else:
            raise ValueError(f"group {group!r}: use body, one or image")
        keys.setdefault(key, []).append(name)
    bodies: dict[str, Body] = {}
    width = len(str(len(keys)))
    for i, (_key, names) in enumerate(sorted(keys.items(), key=lambda kv: kv[1][0]), 1):
        first = infos[names[0]]
        sizes = {(infos[n].width, infos[n].height) for n in names}
        if len(sizes) > 1:
            raise ValueError("photos of one camera differ in size: " + ", ".join(
                f"{infos[n].width}x{infos[n].height} ({n})" for n in names[:4]))
        priors = [infos[n].focal_px for n in names if infos[n].focal_px is not None]
        if priors:
            focal, prior = float(sorted(priors)[len(priors) // 2]), True
            source = infos[names[0]].focal_source if infos[names[0]].focal_px is not None else "EXIF"
        else:
            focal, prior = DEFAULT_FOCAL_FACTOR * max(first.width, first.height), False
            source = f"no EXIF focal length: {DEFAULT_FOCAL_FACTOR} x the longer side, estimated"
        bid = f"body{i:0{max(2, width)}d}"
        bodies[bid] = Body(bid, first.body_label() if group != "image" else f"{names[0]} {first.width}x{first.height}",
                           first.width, first.height, names, focal, prior, source)
    return bodies


__all__ = ["Body", "PhotoInfo", "group_bodies", "read_photo_info"]
