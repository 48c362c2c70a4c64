"""Unmix the subject's foreground colour from a green-screen photo.

Model
    At the subject's edges a pixel is a mixture ``I = a F + (1 - a) B`` of the
    subject colour ``F`` and the backdrop colour ``B`` behind it, with ``a``
    the fraction of the pixel the subject covers (hair, motion and defocus
    blur, and the plain pixel grid). A twin trained on ``I`` learns green
    rims; it should be trained on ``F`` with ``a`` as its alpha. The mixing is
    taken as linear in the values given (8-bit sRGB-ish), which is how the
    tests synthesise it; a camera mixes in linear light, so on real photos the
    unmixed colour of a half-covered pixel is off by the curvature of the
    tone curve between ``F`` and ``B`` (small next to a green rim).

    JPEG stores chroma at half resolution (4:2:0), so the backdrop's chroma
    is also smeared over the subject's outer 1-2 px, which are fully subject:
    no per-pixel mixing model explains those pixels. Spill suppression
    (below) removes the green they carry; ``chroma_420=True`` models the
    subsampling itself.

Algorithm (``unmix``)
    Everything at full resolution happens in the mask's bounding box (plus a
    margin); only ``B`` without a plate is estimated over the whole frame, on
    a grid ``sigma_px / 2`` apart.

    1. ``B``: the clean plate when one is given, else ``estimate_backdrop``:
       a normalised Gaussian average (``sigma_px``) of the image over the
       pixels outside the mask dilated by ``gap_px`` (so mixed edge pixels and
       JPEG's chroma smear are not counted), filled into the subject by
       push-pull (the same average on coarser and coarser levels, until every
       pixel has support).
    2. The band: pixels within ``band_px`` of the mask boundary on either side
       (the mask dilated minus the mask eroded, a disc of radius ``band_px``).
       Outside it ``alpha`` is the mask and ``fg`` is the image inside the
       subject. The frame's own border is not a matte edge.
    3. ``F̂``, the local subject colour: a normalised Gaussian average (2 px)
       over the confident subject pixels (the mask eroded by ``band_px``),
       pushed outwards by push-pull so that every pixel of the frame has one.
       Thin parts (a finger, a strand of 2-3 px) have no eroded interior:
       there the *purest* mask pixels count instead, those whose distance
       ``|I - B|`` is at least 0.9 of the largest within ``band_px``, and only
       farther than ``2 band_px`` from any eroded interior.
    4. ``alpha`` in the band: the projection of ``I`` onto the line from ``B``
       to ``F̂``, ``clip(((I - B) . (F̂ - B)) / |F̂ - B|^2, 0, 1)``. Where the
       subject's colour is close to the backdrop's (``|F̂ - B|`` below
       ``COND_HI``, 25 levels; entirely below ``COND_LO``, 10 levels) the
       projection is ill-conditioned and is blended into the mask blurred by
       0.5 px.
    5. ``F`` in the band: ``F = B + (I - B) / a`` is ``F̂ + r / a`` with ``r =
       I - B - a (F̂ - B)`` the part of the pixel the line does not explain.
       It is computed as ``F̂ + r a / (a^2 + FG_SHRINK)`` (``FG_SHRINK =
       0.1^2``): within 4 % of the unmixed colour for ``a >= 0.5``, tending to
       ``F̂`` as ``a`` goes to 0, without a threshold where noise over ``a``
       jumps. Clipped to [0, 1]. Every pixel of ``fg``, alpha 0 ones included,
       holds a plausible subject colour (``F̂`` outside the subject), so
       interpolating ``fg`` later never drags in black or green.
    6. Spill suppression (``spill=True``), the rule: the backdrop's dominant
       channel ``c`` is the largest channel of the mean ``B`` over the band
       (G for a green screen), and its *excess* of a colour is ``X_c -
       max(other two)`` (for green: Vlahos' ``G - max(R, B)``). In the band,
       which covers the subject's outer ``band_px`` pixels, ``F_c`` is lowered
       so that ``excess(F) <= excess(F̂) + SPILL_TOLERANCE`` (0.005); the other
       two channels are kept. So a greenish fabric keeps the green its
       interior has, while a skin rim cannot be greener than skin. Nothing
       is done when the backdrop has no dominant channel (excess of mean
       ``B`` below 0.03: a grey backdrop).

4:2:0 JPEG (``chroma_420=True``)
    For images decoded from 4:2:0 JPEGs (the studio's takes; PIL's
    ``JpegImagePlugin.get_sampling(im) == 2``), with RGB channels and the
    chroma blocks starting at pixel (0, 0) (do not crop before unmixing). In
    JPEG's YCbCr the luma ``Y`` is full resolution and sees ``a``; the chroma
    ``C`` is the 2x2 block mean, bilinearly upsampled (libjpeg's "fancy"
    upsampling, what ``cv2.imdecode`` does), so it sees ``K a``, that blur of
    alpha. Alpha in the band minimises ``|Y_I - Y_B - a dY|^2 + |C_I - C_B -
    (K a) dC|^2 + PRIOR_WEIGHT |a - mask blurred 0.5 px|^2`` (``dY``, ``dC``:
    ``F̂ - B``), solved by conjugate gradients (converges in about 20
    iterations); the colour is ``F̂``'s chroma with the unmixed luma, ``F =
    F̂ + (Y residual) a / (a^2 + FG_SHRINK)`` on all three channels, so no
    chroma of the rim, green or otherwise, reaches ``F``. The pure pixels of
    thin parts have their chroma divided by their 4:2:0 coverage ``K``
    (blurred mask) before they make ``F̂``. Where the subject has no luma
    contrast to the backdrop (denim, the greenish fabric against this green)
    alpha within a chroma block comes from the prior. On the tests' scene
    after a q95 round trip: alpha RMS on edge pixels 0.09 (0.17-0.20 without
    the model; 0.017 on the lossless photo), colour error < 0.01, no green
    rim on any part (without the model a 2.6 px bar keeps a 0.15 green
    excess, and dark hair rims go black). Do not use it on images that were
    never 4:2:0: there it costs alpha accuracy (RMS 0.11 instead of 0.017).

Speed (one core, ``cv2.setNumThreads(1)``, 1280x960 image, subject box
218x485 px): ``unmix`` with a plate 19 ms, without 36 ms (``estimate_backdrop``
20 ms of it, a full-frame pass); with ``chroma_420`` 34 / 50 ms;
``downscale_premultiplied`` by 2: 14 ms.

Limits
    - One backdrop colour locally: ``B`` behind a pixel is the plate or a
      smooth average of the backdrop around the subject; a narrow gap of
      backdrop (between arm and body, under ``2 gap_px`` wide) has no samples
      of its own and gets ``B`` from farther away. Shadows and the subject's
      reflections on the backdrop next to the subject bias the estimate;
      a clean plate does not have that problem.
    - The mask must be accurate to about ``band_px``: mixed pixels outside the
      band keep alpha 0 or 1, and ``F̂`` comes from the mask eroded by
      ``band_px``.
    - ``F̂`` is a local average: where the subject's colour changes within
      ``band_px`` of its edge (a collar, a strand of hair over skin), the
      line ``B``-``F̂`` is wrong for the pixel and so are its alpha and
      colour; the same for a thin part joined to a larger one.
    - Subject colours within ~25 levels of the backdrop (green clothing on a
      green screen) get a blurred binary alpha, and spill suppression keeps
      their green.
    - Spill that reaches the subject's interior (green bounce light) is in
      ``F̂`` itself and is not removed; so is JPEG's chroma smear on a part
      thinner than ~2 ``band_px`` without ``chroma_420``.

Functions
    ``unmix(image, mask, plate=None)`` -> ``Matte``; ``estimate_backdrop``;
    ``downscale_premultiplied`` (how training images at a fraction of the size
    are made: area averages of ``a F`` and ``a``); ``composite``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from reconstruct.masks import _check_image as check_image
from reconstruct.masks import _disk
from rigs.errors import ShapeError, TwinstudioError

#: Gaussian width (px) of the local subject colour average F̂
FG_SIGMA_PX = 2.0
#: |F̂ - B| (colour in [0, 1]) below which alpha is the blurred mask, and above which it is the projection
COND_LO = 10 / 255
COND_HI = 25 / 255
#: regulariser of F = F̂ + r a / (a^2 + FG_SHRINK): the unmixed colour for a >> 0.1, F̂ as a -> 0
FG_SHRINK = 0.1 ** 2
#: spill suppression: excess(F) <= excess(F̂) + this, colour in [0, 1]
SPILL_TOLERANCE = 0.005
#: a backdrop whose dominant channel exceeds the others by less than this has no spill to suppress
MIN_BACKDROP_EXCESS = 0.03
#: a thin part's mask pixel is "pure" when |I - B| >= this fraction of the largest one within band_px
PURE_FRACTION = 0.9
#: Gaussian width (px) of the blurred mask used where the projection is ill-conditioned
SMOOTH_MASK_SIGMA_PX = 0.5
#: 4:2:0: weight of the blurred mask in alpha's least squares (a colour contrast of about 10 levels)
PRIOR_WEIGHT = (10 / 255) ** 2
#: 4:2:0: conjugate-gradient iterations for alpha
ALPHA_420_ITERATIONS = 30
#: 4:2:0: a thin part's chroma is divided by its 4:2:0 coverage, at least this
MIN_CHROMA_COVERAGE = 0.3

#: JPEG's luma and chroma (BT.601 full range) of RGB colours
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_CHROMA = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
#: the RGB change [3] of a (Cb, Cr) change [2] at constant luma
_RGB_FROM_CHROMA = np.linalg.inv(np.vstack([_LUMA, _CHROMA]))[:, 1:].astype(np.float32)


class MatteError(TwinstudioError, ValueError):
    """Bad arguments to the matting functions (a band of 0 px, a factor that does not divide the size)."""

    exit_code = 2


@dataclass
class Matte:
    """The subject's alpha and unmixed colour for one image; all colours in [0, 1], channels as given."""

    alpha: np.ndarray     # [H, W] float32 in [0, 1]: the mask outside the band, soft in it
    fg: np.ndarray        # [H, W, 3] float32 in [0, 1]: unmixed subject colour; F̂ where alpha is 0
    backdrop: np.ndarray  # [H, W, 3] float32 in [0, 1]: the plate, or the estimated backdrop
    plate: bool           # True when a clean plate was given
    band_px: int          # half-width of the band around the mask boundary that was unmixed


# ----------------------------------------------------------------------------- public functions


def unmix(image: np.ndarray, mask: np.ndarray, plate: np.ndarray | None = None, *, band_px: int = 3,
          spill: bool = True, chroma_420: bool = False) -> Matte:
    """Alpha and foreground colour of the subject in ``image`` [H, W, 3] uint8 with mask [H, W] bool.

    ``plate`` [H, W, 3] uint8 is the empty backdrop from the same camera and
    lighting; without it the backdrop is estimated around the subject
    (``estimate_backdrop``). Returns a ``Matte`` whose colours are in [0, 1],
    channels in the order given.

    ``chroma_420``: the image (and plate) were decoded from JPEGs with 4:2:0
    chroma, the studio's takes, whose chroma blocks start at the array's
    origin; channels must then be RGB. Alpha and colour are taken from the
    full-resolution luma and the half-resolution chroma as such (see the
    module docstring).
    """
    img = _check_image("image", image)
    h, w = img.shape[:2]
    m = _check_mask(mask, (h, w))
    if plate is not None:
        p = _check_image("plate", plate)
        if p.shape != img.shape:
            raise ShapeError("plate", tuple(p.shape), f"the image's shape {tuple(img.shape)}")
    if int(band_px) != band_px or band_px < 1:
        raise MatteError(f"band_px = {band_px!r}: must be an integer >= 1", band_px=band_px)
    band_px = int(band_px)

    backdrop = (p.astype(np.float32) * np.float32(1 / 255) if plate is not None
                else estimate_backdrop(img, m, gap_px=band_px))
    alpha = m.astype(np.float32)
    if not m.any():  # no subject: nothing to unmix, and no subject colour to push anywhere
        return Matte(alpha=alpha, fg=img.astype(np.float32) * np.float32(1 / 255), backdrop=backdrop,
                     plate=plate is not None, band_px=band_px)

    # the region of interest: the mask's bounding box with room for the band and its neighbourhood
    # (starting on an even pixel: JPEG's chroma blocks)
    ys, xs = _bbox(m, margin=2 * band_px + 4, even=True)
    I = img[ys, xs].astype(np.float32) * np.float32(1 / 255)  # [h, w, 3]
    B = backdrop[ys, xs]                                         # [h, w, 3]
    mk = m[ys, xs]
    mk8 = mk.view(np.uint8)
    disk = _disk(band_px)
    # outside the frame counts as subject for the erosion and as backdrop for the dilation:
    # the frame's border is no matte edge
    ero = cv2.erode(mk8, disk, borderType=cv2.BORDER_REPLICATE) > 0
    dil = cv2.dilate(mk8, disk, borderType=cv2.BORDER_REPLICATE) > 0
    band = dil & ~ero

    # F̂: confident interior, plus the purest pixels of thin parts far from any interior
    d2 = _sumsq(I - B)
    dmax = cv2.dilate(np.where(mk, d2, 0).astype(np.float32), disk)
    pure = mk & (d2 >= np.float32(PURE_FRACTION ** 2) * dmax) & (dmax > 0)
    pure &= ~(cv2.dilate(ero.view(np.uint8), _disk(2 * band_px)) > 0)
    conf = (ero | pure).astype(np.float32)
    smooth = cv2.GaussianBlur(mk.astype(np.float32), (0, 0), SMOOTH_MASK_SIGMA_PX)  # [h, w]
    src = I
    if chroma_420 and pure.any():
        # a thin part's chroma is averaged with the backdrop's over 2x2 blocks: undo that on its pure pixels
        src = I.copy()
        seen = np.maximum(_k420(smooth), np.float32(MIN_CHROMA_COVERAGE))[pure]
        dc = (_chroma(I[pure]) - _chroma(B[pure])) * (1 / seen - 1)[:, None]
        src[pure] = I[pure] + dc @ _RGB_FROM_CHROMA.T
    if conf.any():
        Fh = np.clip(_fill(src * conf[..., None], conf, FG_SIGMA_PX), 0.0, 1.0)
    else:  # a subject thinner than anything: its own mean colour
        Fh = np.broadcast_to(np.clip(src[mk].mean(axis=0), 0.0, 1.0), I.shape).astype(np.float32)

    bi = np.nonzero(band)
    Ib, Bb, Fb = I[bi], B[bi], Fh[bi]                 # [n, 3]
    D = Fb - Bb
    if chroma_420:
        # alpha from full-resolution luma and 2x2-block chroma; colour: F̂'s chroma, unmixed luma
        a = _alpha_420(I, B, Fh, mk, band, smooth)[bi]
        ry = (Ib - Bb - a[:, None] * D) @ _LUMA
        F = Fb + (ry * (a / (a * a + np.float32(FG_SHRINK))))[:, None]
    else:
        # alpha: projection onto the line B -> F̂, the blurred mask where that is ill-conditioned
        n2 = _sumsq(D)
        a = np.clip(_dot(Ib - Bb, D) / np.maximum(n2, np.float32(1e-8)), 0.0, 1.0)
        c = np.clip((np.sqrt(n2) - np.float32(COND_LO)) / np.float32(COND_HI - COND_LO), 0.0, 1.0)
        a = (c * a + (1 - c) * smooth[bi]).astype(np.float32)
        # F: F̂ plus the unexplained part over alpha, shrunk where alpha is tiny
        r = Ib - Bb - a[:, None] * D
        F = Fb + r * (a / (a * a + np.float32(FG_SHRINK)))[:, None]
    np.clip(F, 0.0, 1.0, out=F)
    if spill:
        F = _suppress_spill(F, Fb, Bb)
    # the subject's own detail in the band (a birthmark, a tattoo's ink, a seam near the outline): inside
    # the mask, far from the line B -> F̂ and no greener than F̂ is no mixture: kept as it is, opaque
    detail = _detail(Ib, Bb, Fb, D) & mk[bi]
    a = a.copy()
    if detail.any():
        a[detail] = 1.0
        F[detail] = Ib[detail]
    # the mask was cut at alpha 0.5 (reconstruct.masks): a soft alpha stays on the mask's side of it, so
    # nothing the mask calls subject turns transparent (and no backdrop pixel opaque)
    a = np.where(mk[bi], np.maximum(a, 0.5), np.minimum(a, 0.5)).astype(np.float32)

    # assemble: F̂ everywhere (pushed outwards), the image inside the subject, the unmixed band
    fg_roi = np.where(mk[..., None], I, Fh)
    fg_roi[bi] = F
    a_roi = alpha[ys, xs]
    a_roi[bi] = a
    fg = _embed(fg_roi, (h, w), ys, xs)
    return Matte(alpha=alpha, fg=fg, backdrop=backdrop, plate=plate is not None, band_px=band_px)


#: a band pixel whose distance from the line B -> F̂ exceeds this fraction of |F̂ - B| is not a mixture
DETAIL_RESIDUAL = 0.3
#: ... unless it is greener than F̂ by more than this, relative to brightness (spill, JPEG's chroma smear)
DETAIL_GREEN_TOLERANCE = 0.05


def _detail(I: np.ndarray, B: np.ndarray, Fh: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Band pixels [n] that the mixing model cannot explain and that show no backdrop colour: subject detail."""
    n2 = np.maximum(_sumsq(D), np.float32(1e-8))
    a = np.clip(_dot(I - B, D) / n2, 0.0, 1.0)
    res = np.sqrt(_sumsq(I - B - a[:, None] * D))
    k = int(np.argmax(np.median(B, axis=0)))  # the backdrop's dominant channel
    others = [c for c in range(3) if c != k]

    def excess(x: np.ndarray) -> np.ndarray:  # relative to brightness: a dark mark is not greener for being dark
        return (x[:, k] - np.maximum(x[:, others[0]], x[:, others[1]])) / np.maximum(x.max(axis=1), 0.05)

    return (res > np.float32(DETAIL_RESIDUAL) * np.sqrt(n2)) & (excess(I) <= excess(Fh) + DETAIL_GREEN_TOLERANCE)


def estimate_backdrop(image: np.ndarray, mask: np.ndarray, *, sigma_px: float = 6.0,
                      gap_px: int = 3) -> np.ndarray:
    """The backdrop colour [H, W, 3] float32 in [0, 1] behind and around the subject.

    A normalised Gaussian average (width ``sigma_px``) of the image over the
    pixels outside ``mask`` dilated by ``gap_px`` (mixed edge pixels and
    JPEG's chroma smear are not counted), filled into the subject region by
    push-pull. Follows brightness gradients at the scale of ``sigma_px``.
    """
    img = _check_image("image", image)
    m = _check_mask(mask, img.shape[:2])
    if not sigma_px > 0:
        raise MatteError(f"sigma_px = {sigma_px!r}: must be > 0", sigma_px=sigma_px)
    if int(gap_px) != gap_px or gap_px < 0:
        raise MatteError(f"gap_px = {gap_px!r}: must be an integer >= 0", gap_px=gap_px)
    I = img.astype(np.float32) * np.float32(1 / 255)   # becomes the weighted image: 0 near the subject
    weight = np.ones(m.shape, np.float32)
    if m.any():
        ys, xs = _bbox(m, margin=int(gap_px))
        near = m[ys, xs].view(np.uint8)
        if gap_px > 0:
            near = cv2.dilate(near, _disk(int(gap_px)), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        near = near > 0
        if near.all() and near.shape == m.shape:  # the subject fills the frame: no backdrop to see
            return np.broadcast_to(I.reshape(-1, 3).mean(axis=0), I.shape).astype(np.float32)
        weight[ys, xs][near] = 0
        I[ys, xs][near] = 0
    return _fill(I, weight, float(sigma_px))


def downscale_premultiplied(fg: np.ndarray, alpha: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fg_small [H/f, W/f, 3], alpha_small [H/f, W/f])`` float32, area-averaged premultiplied.

    ``alpha_small`` is the block mean of ``alpha``; ``fg_small`` is the block
    mean of ``alpha * fg`` over ``alpha_small`` where that is > 0, else the
    block mean of ``fg``. So compositing the small pair over a plain colour
    (or any background constant within each block) equals the block mean of
    the full-size composite; downscaling ``fg`` on its own would not.
    H and W must be divisible by ``factor``.
    """
    fg = np.asarray(fg, dtype=np.float32)
    alpha = np.asarray(alpha, dtype=np.float32)
    if fg.ndim != 3 or fg.shape[2] != 3:
        raise ShapeError("fg", tuple(fg.shape), "[H, W, 3]")
    if alpha.shape != fg.shape[:2]:
        raise ShapeError("alpha", tuple(alpha.shape), f"[H, W] = {fg.shape[:2]}")
    if int(factor) != factor or factor < 1:
        raise MatteError(f"factor = {factor!r}: must be an integer >= 1", factor=factor)
    factor = int(factor)
    h, w = alpha.shape
    if h % factor or w % factor:
        raise MatteError(f"factor {factor} does not divide the image size {h}x{w}", factor=factor,
                         shape=(h, w))
    if factor == 1:
        return fg.copy(), alpha.copy()
    size = (w // factor, h // factor)
    # INTER_AREA with an integer factor is the exact block mean
    pa = cv2.resize(fg * alpha[..., None], size, interpolation=cv2.INTER_AREA)
    a = cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
    out = cv2.resize(fg, size, interpolation=cv2.INTER_AREA)
    pos = a > 0
    out[pos] = pa[pos] / a[pos][:, None]
    return out, a


def composite(fg: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``alpha * fg + (1 - alpha) * background`` [H, W, 3] float32; background [H, W, 3] or a colour [3]."""
    fg = np.asarray(fg, dtype=np.float32)
    a = np.asarray(alpha, dtype=np.float32)[..., None]
    bg = np.asarray(background, dtype=np.float32)
    return (a * fg + (1 - a) * bg).astype(np.float32)


# ----------------------------------------------------------------------------- internals


def _suppress_spill(F: np.ndarray, Fh: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``F`` [n, 3] with the backdrop's dominant channel lowered to ``excess(F̂) + SPILL_TOLERANCE``."""
    mean_b = B.mean(axis=0)
    ch = int(np.argmax(mean_b))
    other = [k for k in range(3) if k != ch]
    if mean_b[ch] - mean_b[other].max() < MIN_BACKDROP_EXCESS:
        return F
    limit = (F[:, other].max(axis=1) + (Fh[:, ch] - Fh[:, other].max(axis=1))
             + np.float32(SPILL_TOLERANCE))
    F[:, ch] = np.minimum(F[:, ch], np.maximum(limit, 0.0))
    return F


def _fill(num: np.ndarray, den: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian average [h, w, 3] of ``x`` over weights ``den`` [h, w] (``num = x * den``).

    Pushed into the pixels without support. Wide averages (sigma >= 4 px)
    are taken on a grid ``sigma / 2`` px apart and interpolated back. Where
    the blurred weight is ~0 the value comes from push-pull: the same
    weighted average on coarser and coarser levels, interpolated back up.
    """
    h, w = den.shape
    q = int(sigma // 2) if sigma >= 4 else 1
    if q > 1 and min(h, w) >= 4 * q:
        size = (max(w // q, 1), max(h // q, 1))
        grid = np.dstack([cv2.resize(num, size, interpolation=cv2.INTER_AREA),
                          cv2.resize(den, size, interpolation=cv2.INTER_AREA)])
        val = _push_pull(cv2.GaussianBlur(grid, (0, 0), sigma / q))
        return cv2.resize(val, (w, h), interpolation=cv2.INTER_LINEAR)
    return _push_pull(cv2.GaussianBlur(np.dstack([num, den]), (0, 0), sigma))


def _push_pull(stack: np.ndarray, full: float = 1e-3) -> np.ndarray:
    """Weighted average [h, w, 3] of a [h, w, 4] (x * weight, weight) stack, filled where the weight is ~0.

    Down: area halving until every pixel of a level has some weight. Up: each
    level's own average where its weight is >= ``full``, blended towards the
    coarser level's (bilinear) below that.
    """
    levels = [stack]
    cur = stack
    while cur.shape[0] > 1 or cur.shape[1] > 1:
        if cur[..., 3].min() > 1e-6:
            break
        cur = cv2.resize(cur, (max((cur.shape[1] + 1) // 2, 1), max((cur.shape[0] + 1) // 2, 1)),
                         interpolation=cv2.INTER_AREA)
        levels.append(cur)
    val = cur[..., :3] / np.maximum(cur[..., 3:], np.float32(1e-12))
    for lev in reversed(levels[:-1]):
        up = cv2.resize(val, (lev.shape[1], lev.shape[0]), interpolation=cv2.INTER_LINEAR)
        den = lev[..., 3:]
        c = np.minimum(den * np.float32(1 / full), np.float32(1.0))
        val = c * (lev[..., :3] / np.maximum(den, np.float32(1e-12))) + (1 - c) * up
    return val.astype(np.float32, copy=False)


def _embed(roi: np.ndarray, shape: tuple[int, int], ys: slice, xs: slice) -> np.ndarray:
    """A [H, W, 3] frame holding ``roi`` at (ys, xs), its border pixels replicated outwards."""
    h, w = shape
    return cv2.copyMakeBorder(roi, ys.start, h - ys.stop, xs.start, w - xs.stop, cv2.BORDER_REPLICATE)


def _bbox(m: np.ndarray, margin: int, even: bool = False) -> tuple[slice, slice]:
    """Slices of the bounding box of ``m`` grown by ``margin`` (even start and size if asked)."""
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    h, w = m.shape
    y0, y1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h)
    x0, x1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w)
    if even:
        y0, x0 = y0 - y0 % 2, x0 - x0 % 2
        y1, x1 = min(y1 + (y1 - y0) % 2, h), min(x1 + (x1 - x0) % 2, w)
    return slice(y0, y1), slice(x0, x1)


# ----------------------------------------------------------------------------- 4:2:0 chroma


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """JPEG's (Cb, Cr) [..., 2] of RGB [..., 3] colours, without the 0.5 offset."""
    return rgb @ _CHROMA.T


def _k420(x: np.ndarray) -> np.ndarray:
    """What 4:2:0 JPEG does to a chroma plane [h, w]: 2x2 block means, bilinearly upsampled back.

    The block means start at pixel (0, 0); the upsampling is libjpeg's
    "fancy" one (3/4 of the own block, 1/4 of the next, edges clamped),
    what cv2.imdecode does. Odd sizes are padded by replication.
    """
    return _up2(_down2(x))[: x.shape[0], : x.shape[1]]


def _k420_t(y: np.ndarray) -> np.ndarray:
    """The adjoint of ``_k420`` (for the normal equations)."""
    h, w = y.shape
    if h % 2 or w % 2:
        y = np.pad(y, ((0, h % 2), (0, w % 2)))
    return _down2_t(_up2_t(y), (h, w))


def _down2(x: np.ndarray) -> np.ndarray:
    h, w = x.shape
    if h % 2 or w % 2:
        x = np.pad(x, ((0, h % 2), (0, w % 2)), mode="edge")
    return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3), dtype=np.float32)


def _down2_t(z: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    out = np.repeat(np.repeat(z * np.float32(0.25), 2, axis=0), 2, axis=1)
    if h % 2:  # the replicated row's share goes back to the row it copied
        out[h - 1] += out[h]
    if w % 2:
        out[:, w - 1] += out[:, w]
    return out[:h, :w]


def _up2(c: np.ndarray) -> np.ndarray:
    return _up2_1d(_up2_1d(c, 0), 1)


def _up2_t(f: np.ndarray) -> np.ndarray:
    return _up2_1d_t(_up2_1d_t(f, 1), 0)


def _up2_1d(c: np.ndarray, axis: int) -> np.ndarray:
    c = np.moveaxis(c, axis, 0)
    p = np.concatenate([c[:1], c, c[-1:]])
    out = np.empty((2 * c.shape[0],) + c.shape[1:], np.float32)
    out[0::2] = 0.75 * c + 0.25 * p[:-2]
    out[1::2] = 0.75 * c + 0.25 * p[2:]
    return np.moveaxis(out, 0, axis)


def _up2_1d_t(f: np.ndarray, axis: int) -> np.ndarray:
    f = np.moveaxis(f, axis, 0)
    ev, od = f[0::2], f[1::2]
    t = 0.75 * (ev + od)
    t[:-1] += 0.25 * ev[1:]
    t[0] += 0.25 * ev[0]
    t[1:] += 0.25 * od[:-1]
    t[-1] += 0.25 * od[-1]
    return np.moveaxis(t.astype(np.float32, copy=False), 0, axis)


def _alpha_420(I: np.ndarray, B: np.ndarray, Fh: np.ndarray, mk: np.ndarray, band: np.ndarray,
               prior: np.ndarray) -> np.ndarray:
    """Alpha [h, w] of a 4:2:0 JPEG region: least squares on luma and block chroma, near the prior.

    Luma sees ``a``: ``Y_I - Y_B = a (Y_F̂ - Y_B)``; chroma sees ``K a``, the
    4:2:0 blur of alpha: ``C_I - C_B = (K a) (C_F̂ - C_B)``. The band's alphas
    minimise the squared misfit of both plus ``PRIOR_WEIGHT (a - prior)^2``
    (the blurred mask: what is left where neither luma nor chroma tells
    subject from backdrop), by conjugate gradients; the rest is the mask.
    """
    dF = Fh - B
    dI = I - B
    dy, ey = dF @ _LUMA, dI @ _LUMA                  # luma contrast of the subject, of the pixel
    cF, cI = _chroma(dF), _chroma(dI)                # [h, w, 2]
    wy = dy * dy
    wc = _sumsq(cF)
    bc = _dot(cI, cF)
    mu = np.float32(PRIOR_WEIGHT)
    fixed = np.where(band, 0.0, mk).astype(np.float32)
    free = band.astype(np.float32)

    def normal(a: np.ndarray) -> np.ndarray:  # the normal matrix applied to a full-region alpha
        return (wy + mu) * a + _k420_t(wc * _k420(a))

    rhs = (dy * ey + _k420_t(bc) + mu * prior - normal(fixed)) * free
    x = np.clip(prior, 0, 1) * free  # start: the prior
    r = rhs - normal(x) * free
    d = r.copy()
    rr = float(_dot(r.ravel(), r.ravel()))
    tol = 1e-6 * max(float(_dot(rhs.ravel(), rhs.ravel())), 1e-12)
    for _ in range(ALPHA_420_ITERATIONS):
        if rr <= tol:
            break
        q = normal(d) * free
        step = rr / max(float(_dot(d.ravel(), q.ravel())), 1e-30)
        x += step * d
        r -= step * q
        rr_new = float(_dot(r.ravel(), r.ravel()))
        d = r + (rr_new / rr) * d
        rr = rr_new
    return np.clip(fixed + x, 0.0, 1.0)


def _sumsq(x: np.ndarray) -> np.ndarray:
    return np.einsum("...k,...k->...", x, x)


def _dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.einsum("...k,...k->...", x, y)


def _check_image(name: str, image: np.ndarray) -> np.ndarray:
    return check_image(name, image, order="")  # channels as given


def _check_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape) or mask.dtype != bool:
        raise ShapeError("mask", tuple(mask.shape), f"[H, W] = {tuple(shape)} bool (got {mask.dtype})")
    return np.ascontiguousarray(mask)
