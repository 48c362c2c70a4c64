"""Does the twin look like the person? Subject figures and the likeness-marks check.

The whole-image PSNR of a studio render is mostly backdrop; what a person
judges is the subject, and what identifies them are a few details. This module
scores a held-out view of the twin against the (unmixed) photo the way a
person would look at it:

- **subject figures** (:func:`subject_figures`): PSNR over the subject's
  pixels (ground-truth alpha >= 0.5), SSIM averaged over the windows centred on
  them, the colour cast (mean CIEDE2000 over the same pixels,
  :mod:`train.colour`) and the **green rim**: the backdrop colour's excess
  (``G - max(R, B)`` for a green screen) on the subject's outer pixels (the
  ring of ground-truth alpha in (0, 1) and the 2 px just inside it), for the
  render and for the ground truth side by side. A twin that learnt the spill
  shows a rim the unmixed ground truth does not have.
- **likeness marks** (:func:`mark_views`, :func:`score_marks`): square patches
  around the marks that make a person recognisable (:data:`MARKS`: the face,
  the birthmark on the left forearm, the tattoo on the right one). Positions
  come from the virtual studio's ground-truth landmarks, projected into each
  held-out camera; a mark counts in a view only where the ground-truth depth
  says it is not hidden (the landmark's depth within :data:`VISIBLE_TOLERANCE_M`
  of the surface the camera sees at its pixel). The patch side is the mark's size in metres
  at its depth, at least :data:`MIN_PATCH_PX` pixels (SSIM needs room for its
  11-px window). Each patch is scored (PSNR, SSIM) and saved as a side by side
  (ground truth | render, enlarged).

Images are float arrays in [0, 1], RGB, [H, W, 3]; alphas [H, W].
Pixel coordinates follow nerfstudio and gsplat (the top-left pixel's centre is
(0.5, 0.5)); the ground-truth camera follows :mod:`rigs.geometry` (centre at 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.colour import backdrop_excess, mean_delta_e

#: mark -> (ground-truth landmark it is centred on, patch side in metres)
MARKS: dict[str, tuple[str, float]] = {
    "face": ("nose_tip", 0.22),
    "birthmark": ("birthmark", 0.07),
    "tattoo": ("tattoo", 0.10),
}
MIN_PATCH_PX = 24
VISIBLE_TOLERANCE_M = 0.015
RIM_INSIDE_PX = 2
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


# ----------------------------------------------------------------------------- SSIM


def _gauss_kernel() -> np.ndarray:
    x = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    g = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return (g / g.sum()).astype(np.float64)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM per window (Gaussian 11 px, sigma 1.5, data range 1, valid windows), channels averaged.

    Returns [H - 10, W - 10]: the value of the window centred on pixel (i + 5, j + 5).
    The same definition as pytorch_msssim's ``ssim`` (which averages this map).
    """
    import cv2

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim_map needs two [H, W, C] images of one shape, got {a.shape} and {b.shape}")
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"ssim_map needs images of at least {SSIM_WINDOW} px, got {a.shape[1]}x{a.shape[0]}")
    g = _gauss_kernel()
    r = SSIM_WINDOW // 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.sepFilter2D(x, cv2.CV_64F, g, g, borderType=cv2.BORDER_REFLECT)[r:-r, r:-r]

    c1, c2 = 0.01**2, 0.03**2
    out = np.zeros((a.shape[0] - 2 * r, a.shape[1] - 2 * r))
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = blur(x), blur(y)
        sxx = blur(x * x) - mx * mx
        syy = blur(y * y) - my * my
        sxy = blur(x * y) - mx * my
        out += ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return out / a.shape[2]


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """PSNR (data range 1) over the pixels ``where`` (all by default); None for none or identical pixels."""
    d = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2
    if where is not None:
        d = d[np.asarray(where, dtype=bool)]
    if d.size == 0:
        return None
    mse = float(d.mean())
    return None if mse <= 0 else -10.0 * math.log10(mse)


# ----------------------------------------------------------------------------- subject figures


def rim_pixels(alpha: np.ndarray) -> np.ndarray:
    """The subject's outer pixels: ground-truth alpha in (0.02, 0.98), and the 2 px inside the 0.5 boundary."""
    import cv2

    a = np.asarray(alpha, dtype=np.float32)
    inside = (a >= 0.5).astype(np.uint8)
    k = np.ones((2 * RIM_INSIDE_PX + 1, 2 * RIM_INSIDE_PX + 1), np.uint8)
    eroded = cv2.erode(inside, k, borderType=cv2.BORDER_REPLICATE) > 0
    return ((a > 0.02) & (a < 0.98)) | (inside.astype(bool) & ~eroded)


def subject_figures(gt: np.ndarray, render: np.ndarray, alpha: np.ndarray, *, backdrop_channel: int = 1) -> dict:
    """Subject PSNR, SSIM, mean CIEDE2000 and the green rim of one held-out view.

    ``gt`` and ``render`` are composited on the same background; ``alpha`` is the ground truth's.
    Figures that cannot be computed (no subject pixel) are None.
    """
    gt = np.clip(np.asarray(gt, dtype=np.float64), 0, 1)
    render = np.clip(np.asarray(render, dtype=np.float64), 0, 1)
    a = np.asarray(alpha, dtype=np.float64)
    sel = a >= 0.5
    out: dict = {"subject_pixels": int(sel.sum())}
    out["psnr_subject"] = psnr(gt, render, sel) if sel.any() else None
    r = SSIM_WINDOW // 2
    if min(gt.shape[:2]) >= SSIM_WINDOW and sel[r:-r, r:-r].any():
        out["ssim_subject"] = float(ssim_map(gt, render)[sel[r:-r, r:-r]].mean())
    else:
        out["ssim_subject"] = None
    out["delta_e"] = mean_delta_e(gt, render, sel)
    rim = rim_pixels(a)
    out["rim_pixels"] = int(rim.sum())
    out["rim_excess_render"] = float(backdrop_excess(render, backdrop_channel)[rim].mean()) if rim.any() else None
    out["rim_excess_gt"] = float(backdrop_excess(gt, backdrop_channel)[rim].mean()) if rim.any() else None
    return out


# ----------------------------------------------------------------------------- likeness marks


@dataclass(frozen=True)
class MarkView:
    """Where a likeness mark lies in one held-out image."""

    mark: str
    visible: bool
    why: str            # "" when visible, else why it is not scored
    uv: tuple[float, float] | None = None  # centre in the evaluated image (pixel centres at +0.5)
    side_px: int = 0


def landmark_visible(point: np.ndarray, camera, depth: np.ndarray,
                     tolerance_m: float = VISIBLE_TOLERANCE_M) -> tuple[bool, str]:
    """Is a surface point seen by a ground-truth camera (:class:`rigs.geometry.Camera`) with this z-depth map?

    Seen when it projects into the image in front of the camera and the depth map at that pixel holds the
    point's own depth, within ``tolerance_m`` (a nearer surface hides it; a farther one means the point is
    on the outline, seen edge-on).
    """
    uv, z = camera.project(np.asarray(point, dtype=np.float64)[None])
    u, v, z = float(uv[0, 0]), float(uv[0, 1]), float(z[0])
    h, w = depth.shape
    if z <= 0:
        return False, "behind the camera"
    if not (0 <= u <= w - 1 and 0 <= v <= h - 1):
        return False, "outside the image"
    seen = float(depth[int(round(v)), int(round(u))])
    if not np.isfinite(seen):
        return False, "no surface in the depth map there"
    if seen < z - tolerance_m:
        return False, f"hidden ({z - seen:.2f} m behind a nearer surface)"
    if seen > z + tolerance_m:
        return False, "on the outline (the pixel sees past it)"
    return True, ""


def mark_views(landmarks: dict[str, list[float]], gt_camera, depth: np.ndarray, K: np.ndarray,
               viewmat: np.ndarray, width: int, height: int) -> list[MarkView]:
    """Each of :data:`MARKS` in one held-out image: visible or not (and why), centre and patch side.

    ``gt_camera`` and ``depth`` are the virtual studio's camera (full size, distorted) and z-depth map,
    used for visibility only; ``K`` [3, 3] and ``viewmat`` [4, 4] (world-to-camera, OpenCV axes) are
    the evaluated image's pinhole camera (after undistortion, crop and downscale).
    """
    views = []
    for mark, (landmark, size_m) in MARKS.items():
        if landmark not in landmarks:
            views.append(MarkView(mark, False, f"no ground-truth landmark {landmark!r}"))
            continue
        p = np.asarray(landmarks[landmark], dtype=np.float64)
        ok, why = landmark_visible(p, gt_camera, depth)
        xc = viewmat[:3, :3] @ p + viewmat[:3, 3]
        if xc[2] <= 0:
            views.append(MarkView(mark, False, "behind the evaluated camera"))
            continue
        u = K[0, 0] * xc[0] / xc[2] + K[0, 2]
        v = K[1, 1] * xc[1] / xc[2] + K[1, 2]
        side = max(MIN_PATCH_PX, int(round(size_m * K[0, 0] / xc[2])))
        if ok and not (0 <= u < width and 0 <= v < height):
            ok, why = False, "outside the evaluated crop"
        views.append(MarkView(mark, ok, why, (float(u), float(v)), side))
    return views


def patch_box(uv: tuple[float, float], side: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a ``side``-px square centred on ``uv`` (pixel centres at +0.5), kept inside."""
    sw, sh = min(side, width), min(side, height)
    x0 = int(round(uv[0] - sw / 2))
    y0 = int(round(uv[1] - sh / 2))
    x0 = min(max(x0, 0), width - sw)
    y0 = min(max(y0, 0), height - sh)
    return x0, y0, x0 + sw, y0 + sh


def score_marks(gt: np.ndarray, render: np.ndarray, views: list[MarkView], *,
                save_prefix: Path | None = None) -> dict[str, dict]:
    """PSNR and SSIM of each visible mark's patch; side by sides saved as ``<save_prefix>_<mark>.png``."""
    h, w = gt.shape[:2]
    out: dict[str, dict] = {}
    for mv in views:
        if not mv.visible:
            out[mv.mark] = {"visible": False, "why": mv.why}
            continue
        x0, y0, x1, y1 = patch_box(mv.uv, mv.side_px, w, h)
        a, b = gt[y0:y1, x0:x1], render[y0:y1, x0:x1]
        rec = {"visible": True, "box": [x0, y0, x1, y1], "psnr": psnr(a, b),
               "ssim": float(ssim_map(a, b).mean()) if min(a.shape[:2]) >= SSIM_WINDOW else None}
        if save_prefix is not None:
            rec["side_by_side"] = _save_pair(Path(f"{save_prefix}_{mv.mark}.png"), a, b, mv.mark, rec)
        out[mv.mark] = rec
    return out


def _save_pair(path: Path, gt: np.ndarray, render: np.ndarray, mark: str, rec: dict) -> str:
    import cv2

    from rigs.fileio import atomic_write_bytes
    from rigs.pngio import encode_png

    pair = np.concatenate([gt, np.ones((gt.shape[0], 2, 3)), render], axis=1)
    scale = max(1, int(math.ceil(256 / gt.shape[0])))
    img = (np.clip(pair, 0, 1) * 255).round().astype(np.uint8)
    img = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    text = f"{mark}: truth | twin  SSIM {rec['ssim']:.3f}" if rec.get("ssim") is not None else mark
    bar = np.full((28, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_png(np.concatenate([bar, img], axis=0)), fsync=False)
    return path.name


__all__ = ["MARKS", "MarkView", "landmark_visible", "mark_views", "patch_box", "psnr", "rim_pixels",
           "score_marks", "ssim_map", "subject_figures"]
