"""Quality checks of captured frames and takes.

Per frame: sharpness (variance of the Laplacian in the sharpest of 8x8 tiles,
on the image scaled to 640 px wide so the figure does not depend on the
resolution), the fractions of
clipped highlights (>= 250) and shadows (<= 5), and subject coverage (the
fraction of pixels that are neither the keyable backdrop, found by hue and
saturation, nor unlit studio). Thresholds come from the rig's ``[qa]`` table.
"""

from __future__ import annotations

import cv2
import numpy as np

from rigs.rigfile import QASettings

QA_WIDTH = 640


def frame_qa(data: bytes, qa: QASettings, *, expect_subject: bool = True) -> dict:
    """QA figures and flags of one encoded frame; flags name each failed check."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return {"flags": ["undecodable"]}
    h, w = img.shape[:2]
    if w > QA_WIDTH:
        img = cv2.resize(img, (QA_WIDTH, round(h * QA_WIDTH / w)), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    sharpness = _sharpest_tile(cv2.Laplacian(gray, cv2.CV_32F))
    highlights = float((gray >= 250).mean())
    shadows = float((gray <= 5).mean())
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)  # hue in 0..179 (2 degrees per unit)
    dh = np.abs(hsv[..., 0].astype(np.float32) * 2.0 - qa.backdrop_hue_deg)
    dh = np.minimum(dh, 360.0 - dh)
    keyed = (dh <= qa.backdrop_hue_tolerance_deg) & (hsv[..., 1] >= 64)
    backdrop = keyed | (hsv[..., 2] < 24)  # the backdrop, or the unlit studio (ceiling, rigging)
    coverage = float(1.0 - backdrop.mean())
    flags = []
    if expect_subject and sharpness < qa.min_sharpness:  # calibration: the board finder judges its views
        flags.append(f"blurred (sharpness {sharpness:.1f} < {qa.min_sharpness:g})")
    if highlights > qa.max_clipped_highlights:
        flags.append(f"clipped highlights {highlights:.1%}")
    if shadows > qa.max_clipped_shadows:
        flags.append(f"clipped shadows {shadows:.1%}")
    if expect_subject and coverage < qa.min_coverage:
        flags.append(f"subject not in frame (coverage {coverage:.1%})")
    return {"sharpness": round(sharpness, 2), "highlights": round(highlights, 5), "shadows": round(shadows, 5),
            "coverage": round(coverage, 4), "flags": flags}


def _sharpest_tile(lap: np.ndarray, grid: int = 8) -> float:
    """Variance of the Laplacian in the sharpest of grid x grid tiles.

    A subject or a board that fills a small part of a plain backdrop is judged by
    its own detail, not diluted by the backdrop; a blurred frame is soft everywhere.
    """
    h, w = lap.shape
    th, tw = h // grid, w // grid
    tiles = lap[: th * grid, : tw * grid].reshape(grid, th, grid, tw).astype(np.float64)
    return float(tiles.var(axis=(1, 3)).max())


def take_qa_flags(missing: list[tuple[str, int]], skew_s: float | None, qa: QASettings) -> list[str]:
    """Take-level flags: missing cameras and trigger skew over the rig's limit."""
    flags = []
    cams = sorted({c for c, _ in missing})
    if cams:
        flags.append(f"missing frames from {len(cams)} camera(s): {', '.join(cams)}")
    if skew_s is not None and skew_s > qa.max_skew:
        flags.append(f"trigger skew {skew_s * 1000:.0f} ms > {qa.max_skew * 1000:.0f} ms")
    return flags
