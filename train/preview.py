"""Turntable previews of a twin, every frame carrying a visible AI label.

``turntable_cameras`` places cameras on a circle around the subject,
``write_turntable`` renders them through any ``render_fn`` (gsplat on the GPU,
a CPU compositor, a test stub), stamps :data:`AI_LABEL` on every frame and
writes numbered PNGs plus an MP4.

Camera conventions: ``viewmat`` is world-to-camera with OpenCV axes (x right,
y down, z forward), as gsplat's ``rasterization`` takes it; ``K`` puts pixel
centres at +0.5 as gsplat and nerfstudio do (the top-left pixel's centre is
(0.5, 0.5), the principal point of a centred lens is ``(width/2, height/2)``),
not at 0 as :mod:`rigs.geometry` does.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rigs.errors import ShapeError, TwinstudioError
from rigs.fileio import TMP_SUFFIX, atomic_write_bytes, fsync_dir
from rigs.geometry import look_at
from rigs.pngio import encode_png

#: the label every preview frame carries
AI_LABEL = "AI-generated digital twin"

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BANNER_ALPHA = 0.65  # opacity of the dark strip
_BANNER_MAX_FRACTION = 0.15  # of the image height
_FRAME_RE = re.compile(r"\d+\.png$")

#: ``render_fn(viewmat [4, 4], K [3, 3], width, height) -> rgb [H, W, 3]`` floats in [0, 1] (numpy or torch)
RenderFn = Callable[[np.ndarray, np.ndarray, int, int], Any]


class PreviewError(TwinstudioError):
    """A preview cannot be made from these arguments or this renderer's output."""

    exit_code = 2

    def __init__(self, message: str, *, frame: int | None = None, path: Path | str | None = None) -> None:
        where = f"{path}: " if path is not None else ""
        where += f"frame {frame}: " if frame is not None else ""
        super().__init__(f"{where}{message}", frame=frame, path=path)
        self.reason = message
        self.frame = frame
        self.path = Path(path) if path is not None else None


def _check_label(text: str) -> None:
    if not text or not text.strip():
        raise PreviewError("the AI label must not be empty")
    if not (text.isascii() and text.isprintable()):
        raise PreviewError(f"the AI label {text!r} must be printable ASCII (OpenCV's font has nothing else)")


def _banner_layout(width: int, height: int, text: str) -> tuple[int, float, int]:
    """(strip height px, font scale, thickness) of the label banner of a width x height image.

    The text spans 92 % of the width on small images and at least 60 % on large
    ones (at least 150 px where the image allows); the strip is about 10-18 % of the height.
    """
    (tw, th), base = cv2.getTextSize(text, _FONT, 1.0, 1)
    target_w = max(0.6 * width, min(0.92 * width, 150.0))
    scale = target_w / tw
    per_scale = th + base + 0.8 * th  # strip height per unit scale: text, descent, padding
    scale = min(scale, _BANNER_MAX_FRACTION * height / per_scale)
    thickness = max(1, round(scale * 1.4))
    (_, th), base = cv2.getTextSize(text, _FONT, scale, thickness)
    strip = min(height, max(1, math.ceil(th + base + 0.8 * th)))
    return strip, scale, thickness


def banner_height(width: int, height: int, text: str = AI_LABEL) -> int:
    """Height in pixels of the bottom strip :func:`label_image` changes."""
    return _banner_layout(width, height, text)[0]


def label_image(rgb_uint8: np.ndarray, text: str = AI_LABEL) -> np.ndarray:
    """A labelled copy of an RGB uint8 image [H, W, 3].

    The bottom :func:`banner_height` rows are darkened (a 65 % opaque black strip)
    and carry ``text`` in white, centred, sized to the image width; the rows
    above are left exactly as they were. Legible from 160x120 up.
    """
    img = np.asarray(rgb_uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ShapeError("rgb_uint8", tuple(img.shape), f"[H, W, 3] uint8 (got {img.dtype})")
    _check_label(text)
    h, w = img.shape[:2]
    strip_h, scale, thickness = _banner_layout(w, h, text)
    out = img.copy()
    strip = out[h - strip_h:]  # a view: drawing into it cannot touch the rows above
    strip[:] = np.round(strip.astype(np.float32) * (1.0 - _BANNER_ALPHA)).astype(np.uint8)
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thickness)
    x = max(0, (w - tw) // 2)
    y = (strip_h - th - base) // 2 + th  # baseline of the text block (caps + descent) centred in the strip
    cv2.putText(strip, text, (x, y), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def turntable_cameras(center: np.ndarray, radius: float, height: float, n: int, *, width: int, height_px: int,
                      fov_deg: float = 40.0, up: Sequence[float] = (0.0, 0.0, 1.0),
                      start_deg: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` cameras evenly spaced on a circle around ``center``, each looking at it.

    Camera i sits at ``center + height * up + radius * (cos a * e1 + sin a * e2)``
    with ``a = start_deg + 360 * i / n`` (degrees, counter-clockwise seen from
    above): ``radius`` is the horizontal distance from the vertical axis through
    ``center`` (metres), ``height`` the offset along ``up`` from ``center``
    (metres, may be negative), ``e1`` the world x axis projected perpendicular to
    ``up`` (the y axis where x is parallel to it) and ``e2 = up x e1``.
    ``fov_deg`` is the vertical field of view; pixels are square.

    Returns ``(viewmat, K)`` pairs: ``viewmat`` [4, 4] world-to-camera (OpenCV
    axes), ``K`` [3, 3] with ``cx = width / 2``, ``cy = height_px / 2`` (pixel
    centres at +0.5, as gsplat). Both float64.
    """
    c = np.asarray(center, dtype=np.float64)
    if c.shape != (3,):
        raise ShapeError("center", tuple(c.shape), "[3]")
    u = np.asarray(up, dtype=np.float64)
    if u.shape != (3,) or not np.linalg.norm(u) > 0:
        raise PreviewError(f"up must be a non-zero 3-vector, got {up!r}")
    if n < 1 or width < 1 or height_px < 1:
        raise PreviewError(f"need n >= 1 cameras and a positive image size, got n={n}, {width}x{height_px}")
    if not radius > 0:
        raise PreviewError(f"radius must be > 0 metres, got {radius}")
    if not 0 < fov_deg < 180:
        raise PreviewError(f"fov_deg must be in (0, 180), got {fov_deg}")
    u = u / np.linalg.norm(u)
    e1 = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = e1 - (e1 @ u) * u
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(u, e1)

    f = 0.5 * height_px / math.tan(math.radians(fov_deg) / 2.0)
    K = np.array([[f, 0.0, width / 2.0], [0.0, f, height_px / 2.0], [0.0, 0.0, 1.0]])
    cams = []
    for i in range(n):
        a = math.radians(start_deg + 360.0 * i / n)
        pos = c + height * u + radius * (math.cos(a) * e1 + math.sin(a) * e2)
        cams.append((look_at(pos, c, u).matrix, K.copy()))
    return cams


def _to_uint8(rgb: Any, width: int, height: int, index: int) -> np.ndarray:
    if hasattr(rgb, "detach"):
        rgb = rgb.detach().float().cpu().numpy()
    a = np.asarray(rgb, dtype=np.float32)
    if a.shape != (height, width, 3):
        raise PreviewError(f"render_fn returned shape {a.shape}, expected ({height}, {width}, 3)", frame=index)
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_turntable(out_dir: Path | str, render_fn: RenderFn, cameras: Sequence[tuple[np.ndarray, np.ndarray]], *,
                    fps: int = 24, label: str = AI_LABEL, size: tuple[int, int] | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Render ``cameras`` through ``render_fn``, label every frame, write PNGs and an MP4.

    Writes ``out_dir/turntable/000.png`` ... (labelled, one per camera; stale
    frames of an earlier, longer turntable are removed) and
    ``out_dir/turntable.mp4`` (H.264 High profile through PyAV's libx264,
    ``yuv420p``, ``+faststart``: browsers and phones play it, and start before
    it has all arrived), both atomically.
    ``size`` is (width, height) in pixels, by default ``(2 cx, 2 cy)`` of the
    first camera's K (right for :func:`turntable_cameras`). An odd width or
    height is padded by one replicated row/column in the MP4 only (players need
    even sizes). ``on_progress(done, total)`` is called after each frame.

    Returns ``{"frames", "png_dir", "mp4", "width", "height", "fps", "label",
    "mp4_width", "mp4_height"}`` (paths as strings).
    """
    out_dir = Path(out_dir)
    if not cameras:
        raise PreviewError("no cameras to render")
    if fps < 1:
        raise PreviewError(f"fps must be >= 1, got {fps}")
    _check_label(label)
    for i, (viewmat, K) in enumerate(cameras):
        if np.shape(viewmat) != (4, 4) or np.shape(K) != (3, 3):
            raise PreviewError(f"camera needs viewmat [4, 4] and K [3, 3], got {np.shape(viewmat)} and "
                               f"{np.shape(K)}", frame=i)
    if size is None:
        K0 = np.asarray(cameras[0][1], dtype=np.float64)
        size = (round(2.0 * K0[0, 2]), round(2.0 * K0[1, 2]))
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise PreviewError(f"image size must be positive, got {width}x{height}")
    vw, vh = width + width % 2, height + height % 2

    n = len(cameras)
    png_dir = out_dir / "turntable"
    png_dir.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(n - 1)))
    names = [f"{i:0{digits}d}.png" for i in range(n)]
    mp4 = out_dir / "turntable.mp4"
    staging = out_dir / ("turntable.mp4" + TMP_SUFFIX)  # a folder: the encoder picks the container by extension
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    tmp_mp4 = staging / "turntable.mp4"
    try:
        with _H264Writer(tmp_mp4, vw, vh, fps, mp4) as writer:
            for i, (viewmat, K) in enumerate(cameras):
                rgb = _to_uint8(render_fn(np.asarray(viewmat), np.asarray(K), width, height), width, height, i)
                framed = label_image(rgb, label)
                atomic_write_bytes(png_dir / names[i], encode_png(framed), fsync=False)
                if (vw, vh) != (width, height):
                    framed = cv2.copyMakeBorder(framed, 0, vh - height, 0, vw - width, cv2.BORDER_REPLICATE)
                writer.write(framed)
                if on_progress is not None:
                    on_progress(i + 1, n)
        got = video_info(tmp_mp4)
        want = {"codec": "h264", "pix_fmt": "yuv420p", "frames": n, "width": vw, "height": vh, "faststart": True}
        if {k: got[k] for k in want} != want:
            raise PreviewError(f"the encoded video reads back as {got}, expected {want}", path=mp4)
        with open(tmp_mp4, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_mp4, mp4)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    keep = set(names)
    for stale in png_dir.iterdir():
        if _FRAME_RE.fullmatch(stale.name) and stale.name not in keep:
            stale.unlink()
    fsync_dir(png_dir)
    fsync_dir(out_dir)
    return {"frames": n, "png_dir": str(png_dir), "mp4": str(mp4), "width": width, "height": height,
            "fps": fps, "label": label, "mp4_width": vw, "mp4_height": vh}


class _H264Writer:
    """RGB frames to an H.264 MP4 (yuv420p, moov atom first) through PyAV's libx264."""

    def __init__(self, path: Path, width: int, height: int, fps: int, target: Path) -> None:
        import av

        try:
            self.container = av.open(str(path), mode="w", options={"movflags": "+faststart"})
            self.stream = self.container.add_stream("libx264", rate=fps)
        except (av.FFmpegError, ValueError) as e:  # no libx264 in this PyAV build
            raise PreviewError(f"cannot open an H.264 (libx264) encoder for {width}x{height}: {e}",
                               path=target) from e
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = {"crf": "18", "preset": "medium", "profile": "high"}

    def __enter__(self) -> _H264Writer:
        return self

    def write(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.container.mux(self.stream.encode())  # flush the encoder's delayed frames
        finally:
            self.container.close()


def video_info(path: Path | str) -> dict[str, Any]:
    """What a video holds, by decoding it with PyAV: codec, pixel format, profile, frames (counted),
    width, height, fps, duration (s) and ``faststart`` (its moov box before its media data)."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        cc = v.codec_context
        info = {"codec": cc.name, "pix_fmt": cc.pix_fmt, "profile": cc.profile, "width": cc.width,
                "height": cc.height, "fps": float(v.average_rate or 0),
                "duration": float(v.duration * v.time_base) if v.duration is not None else None}
        info["frames"] = sum(1 for _ in c.decode(video=0))
    info["faststart"] = _moov_first(Path(path))
    return info


def _moov_first(path: Path) -> bool:
    """Whether the MP4's top-level ``moov`` box comes before its ``mdat`` (a player can start at once)."""
    import struct

    with open(path, "rb") as f:
        while True:
            head = f.read(8)
            if len(head) < 8:
                return False
            size, kind = struct.unpack(">I4s", head)
            if kind in (b"moov", b"mdat"):
                return kind == b"moov"
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0] - 8
            elif size == 0:
                return False
            f.seek(size - 8, 1)
