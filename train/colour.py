"""Colour-difference figures for judging a trained twin's render against the ground truth.

What the figures mean to a person looking at the two images side by side:

* **ΔE00** (:func:`ciede2000`, :func:`delta_e_srgb`, :func:`mean_delta_e`) is the CIEDE2000
  colour difference, the CIE's current formula for "how different do these two colours look".
  Rough reading: below 1, nobody can tell the two apart; about 1 is a just-noticeable
  difference (a trained eye, side by side); 2-3 is perceptible at a glance; above 5 the two
  read as different colours (a skin tone that went grey or orange, a shirt that changed shade).
  Unlike PSNR it weighs errors the way the eye does: a shift in a dark shadow or a saturated
  red counts less than the same numeric shift in a mid-grey or a face.
  A *mean* ΔE00 over the subject's pixels of 1-2 is a faithful twin; a mean of 3 or more is a
  visible colour cast somewhere.
* **Backdrop excess** (:func:`backdrop_excess`) is how much one channel exceeds the larger of
  the other two, clipped at 0; for a green screen (channel 1) that is ``G - max(R, B)``,
  the "green rim" or spill a chroma-key backdrop leaves on hair and shoulders. 0 means no
  tint of that channel at all (a neutral or differently tinted pixel); 0.05 is a faint tint;
  0.2 or more is an obviously green pixel. On the subject it should be close to 0 everywhere.

Conventions: colours are sRGB in [0, 1] (divide 8-bit images by 255 first), channels in RGB
order on the last axis (``[..., 3]``); float values outside [0, 1] are clipped as a display
would show them. L*a*b* values are CIE 1976 L*a*b* relative to the D65 white of sRGB
(L* 0-100, sRGB white is exactly (100, 0, 0)). Everything is vectorised over the leading
axes and computed in float64.

The sRGB-to-XYZ matrix is the one IEC 61966-2-1 defines by its primaries and D65 white point
(x, y chromaticities), computed here in full precision; rounded to four places it is the
matrix printed in the standard. ΔE00 follows G. Sharma, W. Wu and E. N. Dalal, "The CIEDE2000
color-difference formula: implementation notes, supplementary test data, and mathematical
observations", Color Research and Application 30(1), 2005, case for case.
"""

from __future__ import annotations

import numpy as np

from rigs.errors import ShapeError

__all__ = [
    "SRGB_TO_XYZ",
    "WHITE_XYZ",
    "backdrop_excess",
    "ciede2000",
    "delta_e_srgb",
    "mean_delta_e",
    "srgb_to_lab",
]


def _srgb_to_xyz_matrix() -> np.ndarray:
    """The linear-sRGB -> XYZ matrix from IEC 61966-2-1's primaries and D65 white (Y of white = 1)."""
    primaries = np.array([[0.64, 0.33], [0.30, 0.60], [0.15, 0.06]])   # R, G, B (x, y)
    white = np.array([0.3127, 0.3290])                                 # D65 (x, y)

    def xyz(xy: np.ndarray) -> np.ndarray:  # the XYZ of chromaticity (x, y) with Y = 1, on the first axis
        x, y = xy[..., 0], xy[..., 1]
        return np.stack([x / y, np.ones_like(x), (1.0 - x - y) / y])

    p = xyz(primaries)                        # columns: the XYZ of each primary at Y = 1
    scale = np.linalg.solve(p, xyz(white))    # how much of each primary makes the white
    return p * scale


#: linear sRGB (RGB order) -> CIE XYZ, white (1, 1, 1) -> :data:`WHITE_XYZ`
SRGB_TO_XYZ: np.ndarray = _srgb_to_xyz_matrix()
#: XYZ of sRGB's D65 reference white (Y = 1), the white of :func:`srgb_to_lab`
WHITE_XYZ: np.ndarray = SRGB_TO_XYZ.sum(axis=1)
SRGB_TO_XYZ.setflags(write=False)
WHITE_XYZ.setflags(write=False)


def _as_colour(name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` as float64 with RGB (or L*a*b*) on a last axis of 3; ShapeError otherwise."""
    a = np.asarray(arr)
    if a.ndim == 0 or a.shape[-1] != 3:
        raise ShapeError(name, tuple(a.shape), "[..., 3]")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ShapeError(name, tuple(a.shape), f"[..., 3] of numbers (got {a.dtype})")
    return a.astype(np.float64, copy=False)


def _as_srgb(name: str, rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim > 0 and a.shape[-1] == 3 and not np.issubdtype(a.dtype, np.floating):
        # an 8-bit image passed as is would read as 255x too bright: refuse rather than clip it to white
        raise ShapeError(name, tuple(a.shape), f"[..., 3] float sRGB in [0, 1] (got {a.dtype}; divide by 255)")
    return np.clip(_as_colour(name, a), 0.0, 1.0)


def _srgb_decode(v: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 transfer function: encoded sRGB [0, 1] -> linear light [0, 1]."""
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


_LAB_EPS = (6.0 / 29.0) ** 3   # below this the CIE L*a*b* cube root is replaced by a straight line


def _lab_f(t: np.ndarray) -> np.ndarray:
    return np.where(t > _LAB_EPS, np.cbrt(t), t / (3.0 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1], shape ``[..., 3]`` (RGB order) -> CIE L*a*b* ``[..., 3]`` float64 (D65 white).

    White (1, 1, 1) is (100, 0, 0); pure red (1, 0, 0) is about (53.24, 80.09, 67.20).
    Float values outside [0, 1] are clipped; an integer (8-bit) array is refused (ShapeError).
    """
    v = _as_srgb("rgb", rgb)
    xyz = _srgb_decode(v) @ SRGB_TO_XYZ.T
    f = _lab_f(xyz / WHITE_XYZ)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


#: hue differences this close to 180 degrees (in radians; an ulp or two of rounding) count as exactly 180
_HALF_TURN_TOL = 1e-12
_HALF_TURN = np.pi + _HALF_TURN_TOL


def ciede2000(lab1: np.ndarray, lab2: np.ndarray, kL: float = 1, kC: float = 1, kH: float = 1) -> np.ndarray:
    """CIEDE2000 colour difference ΔE00 of two L*a*b* arrays ``[..., 3]`` (broadcast) -> ``[...]`` float64.

    Follows Sharma, Wu & Dalal (2005) step by step (equation numbers of the paper in the comments),
    including h' = 0 where a' = b = 0, Δh' = 0 and the mean hue h̄' = h'1 + h'2 where either
    chroma is 0, and the wrap-around cases of Δh' and h̄'. Symmetric in its two arguments.
    ``kL``, ``kC``, ``kH`` are the parametric weights (1 for the reference conditions).
    """
    c1 = _as_colour("lab1", lab1)
    c2 = _as_colour("lab2", lab2)
    L1, a1, b1 = c1[..., 0], c1[..., 1], c1[..., 2]
    L2, a2, b2 = c2[..., 0], c2[..., 1], c2[..., 2]

    # (2)-(7): a' stretched by G so that near-neutral hues are spread out; C', h'
    cab_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2.0
    cab7 = cab_mean ** 7
    g = 0.5 * (1.0 - np.sqrt(cab7 / (cab7 + 25.0 ** 7)))
    ap1, ap2 = (1.0 + g) * a1, (1.0 + g) * a2
    cp1, cp2 = np.hypot(ap1, b1), np.hypot(ap2, b2)
    # hue angles in radians, as in the authors' reference code. Two pairs of their table (10 and 14)
    # sit exactly on the |h'1 - h'2| = 180 degrees boundary of the Δh' and mean-hue cases, where the
    # formula jumps; floating point lands either side of it by an ulp, so hue differences within
    # _HALF_TURN_TOL of a half turn count as exactly a half turn (the paper's "<= 180" side).
    hp1 = _hue_radians(ap1, b1)
    hp2 = _hue_radians(ap2, b2)

    # (8)-(11): differences
    dLp = L2 - L1
    dCp = cp2 - cp1
    cprod = cp1 * cp2
    dh = hp2 - hp1
    dhp = np.where(cprod == 0, 0.0,
                   np.where(dh > _HALF_TURN, dh - 2.0 * np.pi,
                            np.where(dh < -_HALF_TURN, dh + 2.0 * np.pi, dh)))
    dHp = 2.0 * np.sqrt(cprod) * np.sin(dhp / 2.0)

    # (12)-(14): means; the mean hue takes the short way round the circle
    Lp_mean = (L1 + L2) / 2.0
    Cp_mean = (cp1 + cp2) / 2.0
    hsum = hp1 + hp2
    hp_mean = np.where(cprod == 0, hsum,
                       np.where(np.abs(hp1 - hp2) <= _HALF_TURN, hsum / 2.0,
                                np.where(hsum < 2.0 * np.pi, (hsum + 2.0 * np.pi) / 2.0,
                                         (hsum - 2.0 * np.pi) / 2.0)))
    hbar = np.degrees(hp_mean)   # T and Δθ are written in degrees in the paper

    # (15)-(22): weighting functions and the rotation term
    t = (1.0
         - 0.17 * np.cos(np.radians(hbar - 30.0))
         + 0.24 * np.cos(np.radians(2.0 * hbar))
         + 0.32 * np.cos(np.radians(3.0 * hbar + 6.0))
         - 0.20 * np.cos(np.radians(4.0 * hbar - 63.0)))
    dtheta = 30.0 * np.exp(-(((hbar - 275.0) / 25.0) ** 2))
    cp7 = Cp_mean ** 7
    rc = 2.0 * np.sqrt(cp7 / (cp7 + 25.0 ** 7))
    l50 = (Lp_mean - 50.0) ** 2
    sl = 1.0 + 0.015 * l50 / np.sqrt(20.0 + l50)
    sc = 1.0 + 0.045 * Cp_mean
    sh = 1.0 + 0.015 * Cp_mean * t
    rt = -np.sin(np.radians(2.0 * dtheta)) * rc

    lt = dLp / (kL * sl)
    ct = dCp / (kC * sc)
    ht = dHp / (kH * sh)
    # |RT| < 2, so the sum is >= 0 up to rounding; the clip only guards sqrt against -1e-17
    return np.sqrt(np.maximum(lt ** 2 + ct ** 2 + ht ** 2 + rt * ct * ht, 0.0))


def _hue_radians(ap: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hue angle h' in [0, 2 pi) radians; 0 where a' = b = 0 (Sharma et al. eq. 7)."""
    h = np.arctan2(b, ap)
    h = np.where(h < 0.0, h + 2.0 * np.pi, h)
    return np.where((ap == 0) & (b == 0), 0.0, h)


def delta_e_srgb(rgb1: np.ndarray, rgb2: np.ndarray) -> np.ndarray:
    """ΔE00 per pixel of two sRGB arrays in [0, 1] ``[..., 3]`` (broadcast) -> ``[...]`` float64."""
    return ciede2000(srgb_to_lab(rgb1), srgb_to_lab(rgb2))


def mean_delta_e(rgb1: np.ndarray, rgb2: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """Mean ΔE00 over the pixels where ``where`` is True (all pixels when None); None when there are none.

    ``rgb1`` and ``rgb2`` are sRGB in [0, 1] of the same shape ``[..., 3]``; ``where`` is a boolean
    mask of shape ``rgb1.shape[:-1]`` (the subject mask, typically). Only the selected pixels are
    converted.
    """
    a = np.asarray(rgb1)
    b = np.asarray(rgb2)
    if a.shape != b.shape:
        raise ShapeError("rgb2", tuple(b.shape), f"the shape of rgb1, {tuple(a.shape)}")
    if a.ndim == 0 or a.shape[-1] != 3:
        raise ShapeError("rgb1", tuple(a.shape), "[..., 3]")
    if where is not None:
        m = np.asarray(where)
        if m.shape != a.shape[:-1]:
            raise ShapeError("where", tuple(m.shape), f"{tuple(a.shape[:-1])} (rgb1's without the channel axis)")
        if m.dtype != bool:
            raise ShapeError("where", tuple(m.shape), f"a boolean mask (got {m.dtype})")
        a, b = a[m], b[m]
    else:
        a, b = a.reshape(-1, 3), b.reshape(-1, 3)
    if a.shape[0] == 0:
        return None
    return float(np.mean(delta_e_srgb(a, b)))


def backdrop_excess(rgb: np.ndarray, channel: int = 1) -> np.ndarray:
    """How much ``channel`` exceeds the larger of the other two, clipped at 0: ``[..., 3]`` -> ``[...]`` float64.

    With the default channel 1 (green) this is ``max(G - max(R, B), 0)``, the green rim a green
    screen leaves on the subject. Works in the input's units (0-1 floats, or 0-255 for uint8
    without wrap-around).
    """
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= channel <= 2:
        raise ValueError(f"channel must be 0, 1 or 2 (R, G, B), got {channel!r}")
    v = _as_colour("rgb", rgb)
    others = [c for c in range(3) if c != channel]
    return np.maximum(v[..., channel] - np.maximum(v[..., others[0]], v[..., others[1]]), 0.0)
