"""CPU rasterizer of 3D Gaussians, for previews where there is no GPU.

gsplat 1.4.0's ``rasterization`` projects Gaussians with CUDA kernels and composites
pixels with a CUDA-only op, so it cannot run on a machine without a GPU. This module
re-implements its *classic* mode (pinhole camera, ``packed=False``, no antialiasing
compensation) twice, with the same rules: with ordinary torch ops, differentiable by
autograd (below), and compiled from C with hand-written backward passes
(:mod:`train.raster_c`, used where it could be built: about 4x faster on the preview's
crops; the torch ops remain the reference and the fallback):

* projection as gsplat's ``fully_fused_projection``: EWA splatting with the Jacobian's
  x/y clamped to 1.3x the field of view, ``eps2d`` added to the 2D covariance's diagonal,
  radius ``ceil(3 * sqrt(largest eigenvalue))``, and radius 0 for Gaussians outside
  ``[near_plane, far_plane]`` in depth or whose radius box misses the image;
* colours as gsplat: RGB as given, or spherical harmonics evaluated along
  ``normalise(mean - camera centre)`` in world space, plus 0.5, clamped at 0;
* compositing as gsplat's ``rasterize_to_pixels`` kernel: per pixel (evaluated at its
  centre, ``(col + 0.5, row + 0.5)``), front to back by depth,
  ``alpha = min(0.999, opacity * exp(-sigma))``, skipped where ``sigma < 0`` or
  ``alpha < 1/255``, stopping *before* the Gaussian that would take the transmittance
  to 1e-4 or below.

Differences from gsplat: the CUDA kernel tests each Gaussian against every pixel of the
16x16 tiles its radius box touches, while this module visits only the pixels inside the
radius box. A pixel outside the box is farther from the centre than 3 standard
deviations along the widest axis, so sigma > 4.5 and alpha < ``0.999 * exp(-4.5) ~ 0.011``
there: what this module leaves out is a faint rim of some footprints. Transmittance is accumulated
in float64 (the kernel multiplies float32s), so results agree to rounding otherwise.
Not supported: packed output, antialiased mode, other camera models, absgrad.

How (torch ops): (Gaussian, 4x4-pixel block) overlaps are listed and sorted by block, then depth; a
sort over these rows is much smaller than one over (Gaussian, pixel) pairs. Each row is
tested against its block's 16 pixels at once, and reading the rows in order for one
pixel slot after another groups the pairs by pixel, front to back, with no further
sort. The transmittance in front of each pair is then a per-pixel exclusive cumulative
sum of ``log(1 - alpha)``, and the weighted colours are scattered into the pixels.
Pairs are selected without autograd; only the drawn pairs are evaluated in the graph.
How (compiled): see ``_raster_cpu.c``: 16x16 tiles, each visiting its Gaussians front to
back over the pixels their ranges cover; the backward pass recovers each pixel's
transmittance from the forward's, as gsplat's kernel does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from gsplat.cuda._torch_impl import _eval_sh_bases_fast
from torch import Tensor

from train import raster_c

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
ALPHA_MIN = 1.0 / 255.0  # pairs below this alpha are skipped
ALPHA_MAX = 0.999  # alpha is clamped to this
T_MIN = 1e-4  # a pixel stops before the Gaussian that takes its transmittance to this
TILE_SIZE = 16  # only reported in ``info``, as gsplat's default tile size
BLOCK = 4  # pairs are enumerated in blocks of BLOCK x BLOCK pixels (speed only)


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    render_mode: str = "RGB",
    backgrounds: Tensor | None = None,
    max_pairs: int = 50_000_000,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render N Gaussians into C pinhole cameras, like gsplat's classic ``rasterization``.

    Args:
        means: [N, 3] centres in world space.
        quats: [N, 4] rotations as (w, x, y, z); normalised here.
        scales: [N, 3] standard deviations along the rotated axes (already activated).
        opacities: [N] in [0, 1] (already activated).
        colors: [N, D] colours, or with ``sh_degree`` [N, K, 3] SH coefficients
            (coefficient-major, K >= (sh_degree + 1) ** 2).
        viewmats: [C, 4, 4] world-to-camera matrices (OpenCV axes: x right, y down, z forward).
        Ks: [C, 3, 3] intrinsics in pixels; the top-left pixel's centre is (0.5, 0.5).
        width, height: image size in pixels.
        sh_degree: SH degree to evaluate, or None when ``colors`` are colours.
        near_plane, far_plane: depth range of the Gaussians' centres that are drawn.
        eps2d: added to the diagonal of each 2D covariance.
        render_mode: "RGB", "D" (accumulated depth), "ED" (expected depth), "RGB+D" or "RGB+ED".
        backgrounds: [C, D] colour behind the Gaussians (depth channels get 0 behind).
        max_pairs: the most candidate (Gaussian, pixel) pairs to test (the pixels of the
            4x4 blocks that each radius box touches); more raise ValueError.
        backend: "c" (the compiled rasteriser of :mod:`train.raster_c`), "torch" (torch
            ops, several times slower), or "auto": "c" where it could be built.

    Returns:
        render [C, H, W, X] (X = D, 1 or D + 1 by render mode), alpha [C, H, W, 1] and an
        ``info`` dict with gsplat's keys for ``DefaultStrategy``: means2d [C, N, 2] (in the
        autograd graph), radii [C, N] int32, depths, conics [C, N, 3], opacities [C, N],
        width, height, n_cameras, tile_width, tile_height, tile_size, and
        gaussian_ids = camera_ids = None (unpacked). Entries with radius 0 are not drawn
        and their values are not meaningful.
    """
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, not {render_mode!r}")
    if backend not in ("auto", "c", "torch"):
        raise ValueError(f"backend must be 'auto', 'c' or 'torch', not {backend!r}")
    if backend == "c" and not raster_c.available():
        raise RuntimeError(f"rasterize: the compiled rasteriser is unavailable ({raster_c.why_not()})")
    n_cams = viewmats.shape[0]
    n_gauss = means.shape[0]
    expected = {"means": (n_gauss, 3), "quats": (n_gauss, 4), "scales": (n_gauss, 3), "opacities": (n_gauss,),
                "viewmats": (n_cams, 4, 4), "Ks": (n_cams, 3, 3)}  # fmt: skip
    for name, tensor in zip(expected, (means, quats, scales, opacities, viewmats, Ks)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {list(expected[name])}, got {list(tensor.shape)}")

    compiled = backend != "torch" and not means.is_cuda and raster_c.available()
    if compiled and not (viewmats.requires_grad or Ks.requires_grad):
        per_camera = [raster_c.project(means, quats, scales, viewmats[c], Ks[c], width, height, eps2d, near_plane,
                                       far_plane) for c in range(n_cams)]
        radii, means2d, depths, conics = (torch.stack(t) for t in zip(*per_camera))
    else:
        radii, means2d, depths, conics = _project(
            means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane
        )
    opacities_c = opacities[None].expand(n_cams, n_gauss)

    if render_mode in ("D", "ED"):
        features = depths[..., None]
        backgrounds = None if backgrounds is None else backgrounds.new_zeros(n_cams, 1)
    else:
        features = _colors(means, colors, viewmats, sh_degree)
        if render_mode in ("RGB+D", "RGB+ED"):
            features = torch.cat([features, depths[..., None]], dim=-1)
            if backgrounds is not None:
                backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(n_cams, 1)], dim=-1)

    render, alpha = _composite(
        means2d, conics, opacities_c, features, depths, radii, width, height, backgrounds, max_pairs,
        compiled=compiled,
    )
    if render_mode in ("ED", "RGB+ED"):
        expected_depth = render[..., -1:] / alpha.clamp(min=1e-10)
        render = torch.cat([render[..., :-1], expected_depth], dim=-1)

    info = {
        "means2d": means2d,
        "radii": radii,
        "depths": depths,
        "conics": conics,
        "opacities": opacities_c,
        "width": width,
        "height": height,
        "n_cameras": n_cams,
        "gaussian_ids": None,
        "camera_ids": None,
        "tile_size": TILE_SIZE,
        "tile_width": math.ceil(width / TILE_SIZE),
        "tile_height": math.ceil(height / TILE_SIZE),
    }
    return render, alpha, info


def _quat_to_rotmat(quats: Tensor) -> Tensor:
    """[N, 4] (w, x, y, z), any norm -> [N, 3, 3] rotation matrices."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(-1, 3, 3)


def _project(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float,
    near_plane: float,
    far_plane: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project to pixels as gsplat's classic pinhole projection.

    Returns radii [C, N] int32, means2d [C, N, 2], depths [C, N], conics [C, N, 3].
    """
    rot = viewmats[:, :3, :3]  # [C, 3, 3]
    means_c = torch.einsum("cij,nj->cni", rot, means) + viewmats[:, None, :3, 3]  # [C, N, 3]
    x, y, depths = means_c.unbind(-1)
    depth_ok = (depths >= near_plane) & (depths <= far_plane)
    z = torch.where(depth_ok, depths, torch.ones_like(depths))  # keeps culled entries finite

    fx, fy, cx, cy = (Ks[:, None, 0, 0], Ks[:, None, 1, 1], Ks[:, None, 0, 2], Ks[:, None, 1, 2])
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    # Jacobian of the projection, with x/z and y/z clamped to 1.3x the field of view.
    lim_x = 0.3 * 0.5 * width / fx
    lim_y = 0.3 * 0.5 * height / fy
    tx = torch.minimum(torch.maximum(x / z, -cx / fx - lim_x), (width - cx) / fx + lim_x)
    ty = torch.minimum(torch.maximum(y / z, -cy / fy - lim_y), (height - cy) / fy + lim_y)
    zeros = torch.zeros_like(z)
    jac = torch.stack([fx / z, zeros, -fx * tx / z, zeros, fy / z, -fy * ty / z], dim=-1)
    jac = jac.reshape(*z.shape, 2, 3)

    # 2D covariance = A A^T with A = J R_view R_gauss S.
    rs = _quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3]
    a_mat = jac @ (rot[:, None] @ rs[None])  # [C, N, 2, 3]
    cov_xx = (a_mat[..., 0, :] ** 2).sum(-1) + eps2d
    cov_yy = (a_mat[..., 1, :] ** 2).sum(-1) + eps2d
    cov_xy = (a_mat[..., 0, :] * a_mat[..., 1, :]).sum(-1)
    det = cov_xx * cov_yy - cov_xy**2
    conics = torch.stack([cov_yy / det, -cov_xy / det, cov_xx / det], dim=-1)

    with torch.no_grad():
        mid = 0.5 * (cov_xx + cov_yy)
        largest_eig = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(largest_eig))
        mx, my = means2d.unbind(-1)
        on_image = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        radii = torch.where(depth_ok & (det > 0) & on_image, radius, 0.0).int()
    return radii, means2d, depths, conics


def _colors(means: Tensor, colors: Tensor, viewmats: Tensor, sh_degree: int | None) -> Tensor:
    """Per-camera colours [C, N, D]: as given, or evaluated from SH coefficients [N, K, 3]."""
    n_cams = viewmats.shape[0]
    if sh_degree is None:
        if colors.dim() != 2:
            raise ValueError(f"without sh_degree, colors must be [N, D], got {list(colors.shape)}")
        return colors[None].expand(n_cams, -1, -1)
    n_bases = (sh_degree + 1) ** 2
    if colors.dim() != 3 or colors.shape[1] < n_bases:
        raise ValueError(f"sh_degree={sh_degree} needs colors [N, >={n_bases}, 3], got {list(colors.shape)}")
    cam_centres = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    dirs = F.normalize(means[None] - cam_centres[:, None], dim=-1)  # [C, N, 3]
    bases = _eval_sh_bases_fast(n_bases, dirs)  # [C, N, n_bases]
    rgb = torch.einsum("cnk,nkd->cnd", bases, colors[:, :n_bases])
    return torch.clamp_min(rgb + 0.5, 0.0)


@torch.no_grad()
def _pixel_ranges(
    mx: Tensor, my: Tensor, a: Tensor, b: Tensor, c: Tensor, opacity: Tensor, radii: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Half-open pixel ranges [x0, x1) x [y0, y1) that each (camera, Gaussian) may draw into.

    The radius box (pixel centres within ``radius`` of the mean on both axes), cut to the
    image and to the bounding box of the ellipse where alpha can reach 1/255, a cut that
    loses no drawn pixel. Empty where the radius is 0.
    """
    radius = radii.flatten().to(mx.dtype)
    # alpha >= 1/255 needs sigma <= s = log(255 * opacity); that ellipse spans sqrt(2 s cov_xx) in x.
    s = torch.log(255.0 * opacity).clamp(min=0)
    det = a * c - b * b
    half_x = torch.minimum(radius, torch.sqrt(2 * s * c / det) * 1.001 + 1e-3)
    half_y = torch.minimum(radius, torch.sqrt(2 * s * a / det) * 1.001 + 1e-3)
    visible = radii.flatten() > 0
    half_x = torch.where(visible, half_x, -1.0)
    half_y = torch.where(visible, half_y, -1.0)
    # Pixel j is in range when |j + 0.5 - mx| <= half_x; likewise rows.
    x0 = torch.ceil(mx - half_x - 0.5).clamp(0, width).long()
    x1 = (torch.floor(mx + half_x - 0.5) + 1).clamp(0, width).long()
    y0 = torch.ceil(my - half_y - 0.5).clamp(0, height).long()
    y1 = (torch.floor(my + half_y - 0.5) + 1).clamp(0, height).long()
    return x0, torch.maximum(x0, x1), y0, torch.maximum(y0, y1)


@torch.no_grad()
def _block_rows(
    ranges: tuple[Tensor, Tensor, Tensor, Tensor],
    depths: Tensor,
    width: int,
    height: int,
    max_pairs: int,
) -> tuple[Tensor, Tensor]:
    """One row per (Gaussian, pixel block) overlap, sorted by block, then front to back.

    Returns the flat Gaussian index into [C * N] and the flat block index into
    [C * blocks_y * blocks_x] of each row.
    """
    n_cams, n_gauss = depths.shape
    blocks_x, blocks_y = math.ceil(width / BLOCK), math.ceil(height / BLOCK)
    x0, _, y0, _ = ranges
    bx0, by0 = x0 // BLOCK, y0 // BLOCK
    n_bx, n_by = _blocks_touched(ranges)
    counts = n_bx * n_by

    n_rows = int(counts.sum())
    _raise_if_too_many(n_rows * BLOCK * BLOCK, n_cams, width, height, max_pairs)
    gauss = torch.repeat_interleave(counts)  # each Gaussian repeated once per block it overlaps
    local = torch.arange(n_rows, device=gauss.device) - (torch.cumsum(counts, 0) - counts).index_select(0, gauss)
    n_bx = n_bx.index_select(0, gauss)
    bx = bx0.index_select(0, gauss) + local % n_bx
    by = by0.index_select(0, gauss) + local // n_bx
    block = ((gauss // n_gauss) * blocks_y + by) * blocks_x + bx

    # Sort by (block, depth); ties in depth keep the Gaussians' order, as gsplat's stable sort.
    depth_rank = torch.empty_like(counts)
    depth_rank[torch.argsort(depths.flatten(), stable=True)] = torch.arange(len(counts), device=gauss.device)
    order = torch.argsort(block * len(counts) + depth_rank.index_select(0, gauss))
    return gauss.index_select(0, order), block.index_select(0, order)


def _blocks_touched(ranges: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """How many BLOCK-wide columns and rows of blocks each pixel range touches (0 where it is empty)."""
    x0, x1, y0, y1 = ranges
    n_bx = torch.where(x1 > x0, (x1 + BLOCK - 1) // BLOCK - x0 // BLOCK, 0)
    n_by = torch.where(y1 > y0, (y1 + BLOCK - 1) // BLOCK - y0 // BLOCK, 0)
    return n_bx, n_by


def _raise_if_too_many(pairs: int, n_cams: int, width: int, height: int, max_pairs: int) -> None:
    if pairs > max_pairs:
        raise ValueError(
            f"rasterize: {pairs:,} candidate Gaussian-pixel pairs for {n_cams} camera(s) at "
            f"{width}x{height} exceed max_pairs={max_pairs:,}; render smaller images, use fewer or "
            "smaller Gaussians, or raise max_pairs"
        )


@torch.no_grad()
def _check_pairs(ranges: tuple[Tensor, Tensor, Tensor, Tensor], width: int, height: int, max_pairs: int) -> None:
    """The torch path's limit, for one camera: pixels of the BLOCK x BLOCK blocks the ranges touch."""
    n_bx, n_by = _blocks_touched(ranges)
    _raise_if_too_many(int((n_bx * n_by).sum()) * BLOCK * BLOCK, 1, width, height, max_pairs)


def _sigma(dx: Tensor, dy: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Gaussian exponent 0.5 * (a dx^2 + c dy^2) + b dx dy, with (dx, dy) = mean - pixel centre."""
    return 0.5 * c * dy * dy + 0.5 * a * dx * dx + dy * (b * dx)


def _alpha(opacity: Tensor, sigma: Tensor) -> Tensor:
    return torch.clamp_max(opacity * torch.exp(-sigma), ALPHA_MAX)


def _log_transmittance_before(log_keep: Tensor, pixel: Tensor) -> Tensor:
    """Per-pixel exclusive cumulative sum of ``log(1 - alpha)`` over pairs grouped by pixel."""
    exclusive = torch.cumsum(log_keep, 0) - log_keep
    is_first = torch.ones_like(pixel, dtype=torch.bool)
    is_first[1:] = pixel[1:] != pixel[:-1]
    first = torch.cummax(torch.where(is_first, torch.arange(len(pixel), device=pixel.device), 0), 0).values
    return exclusive - exclusive.index_select(0, first)


@torch.no_grad()
def _drawn_pairs(
    columns: list[Tensor], depths: Tensor, radii: Tensor, width: int, height: int, max_pairs: int
) -> tuple[Tensor, Tensor]:
    """The (Gaussian, pixel) pairs that gsplat's compositing adds to the image.

    Returns the flat Gaussian index into [C * N] and the flat pixel index into [C * H * W]
    of each pair, grouped by pixel and front to back within a pixel.
    """
    ranges = _pixel_ranges(*columns, radii, width, height)
    gauss_r, block_r = _block_rows(ranges, depths, width, height, max_pairs)
    n_rows = len(gauss_r)

    # Candidates on a [BLOCK (y), BLOCK (x), R] grid: the pixels of the block of each of the
    # R (Gaussian, block) rows. Rows are sorted by (block, depth), so flattening the grid
    # groups pairs by pixel, front to back.
    blocks_x, blocks_y = math.ceil(width / BLOCK), math.ceil(height / BLOCK)
    block_col, block_row = block_r % blocks_x * BLOCK, block_r // blocks_x % blocks_y * BLOCK
    slot = torch.arange(BLOCK, device=block_r.device)[:, None]
    col, row = block_col + slot, block_row + slot  # [BLOCK, R]
    x0, x1, y0, y1 = (t.index_select(0, gauss_r) for t in ranges)
    in_range = ((row >= y0) & (row < y1))[:, None] & ((col >= x0) & (col < x1))[None]
    mx, my, a, b, c, opacity = (t.index_select(0, gauss_r) for t in columns)
    dx = (mx - (col.to(mx.dtype) + 0.5))[None]
    dy = (my - (row.to(my.dtype) + 0.5))[:, None]
    sigma = _sigma(dx, dy, a, b, c)
    # alpha >= 1/255 needs sigma <= log(255 * opacity); the exact test follows on the survivors.
    candidate = in_range & (sigma >= 0) & (sigma <= torch.log(255.0 * opacity) + 1e-4)
    pair = candidate.flatten().nonzero().squeeze(1)

    r = pair % n_rows
    alpha = _alpha(opacity.index_select(0, r), sigma.flatten().index_select(0, pair))
    corner = (block_r // (blocks_x * blocks_y) * height + block_row) * width + block_col  # [R]
    pixel_grid = corner + (slot * width + slot.T)[..., None]  # [BLOCK, BLOCK, R] flat pixel index
    pixel = pixel_grid.flatten().index_select(0, pair)
    # Each pixel stops before the Gaussian that would take its transmittance to T_MIN.
    visible = alpha >= ALPHA_MIN
    log_keep = torch.where(visible, torch.log1p(-alpha.double()), 0.0)
    drawn = visible & (_log_transmittance_before(log_keep, pixel) + log_keep > math.log(T_MIN))
    drawn = drawn.nonzero().squeeze(1)
    return gauss_r.index_select(0, r.index_select(0, drawn)), pixel.index_select(0, drawn)


def _composite(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None,
    max_pairs: int,
    compiled: bool = False,
) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of the projected Gaussians into [C, H, W, D] and [C, H, W, 1]."""
    n_cams = radii.shape[0]
    n_pixels = n_cams * height * width
    if compiled:
        # compiled compositing, one camera at a time (same rules, several times faster)
        renders, alphas = [], []
        for cam in range(n_cams):
            columns = [*means2d[cam].unbind(-1), *conics[cam].unbind(-1), opacities[cam]]
            ranges = _pixel_ranges(*(t.detach() for t in columns), radii[cam], width, height)
            _check_pairs(ranges, width, height, max_pairs)
            render, alpha = raster_c.composite(columns, features[cam], ranges, depths[cam], width, height)
            renders.append(render)
            alphas.append(alpha)
        render, alpha_img = torch.stack(renders), torch.stack(alphas)
        if backgrounds is not None:
            render = render + (1.0 - alpha_img) * backgrounds[:, None, None, :]
        return render, alpha_img

    # Per (camera, Gaussian) columns, each [C * N]: mx, my, conic a, b, c, opacity.
    columns = [t.flatten() for t in (*means2d.unbind(-1), *conics.unbind(-1), opacities)]
    gauss, pixel = _drawn_pairs([t.detach() for t in columns], depths, radii, width, height, max_pairs)

    # Differentiable evaluation of the drawn pairs.
    px = (pixel % width).to(means2d.dtype) + 0.5
    py = (pixel // width % height).to(means2d.dtype) + 0.5
    mx, my, a, b, c, opacity = (t.index_select(0, gauss) for t in columns)
    alpha = _alpha(opacity, _sigma(mx - px, my - py, a, b, c))
    log_t = _log_transmittance_before(torch.log1p(-alpha.double()), pixel)
    weight = alpha * torch.exp(log_t).to(alpha.dtype)

    def splat(values: Tensor) -> Tensor:
        return values.new_zeros(n_pixels).index_add(0, pixel, values)

    channels = [splat(weight * f.flatten().index_select(0, gauss)) for f in features.unbind(-1)]
    render = torch.stack(channels, dim=-1).reshape(n_cams, height, width, -1)
    alpha_img = splat(weight).reshape(n_cams, height, width, 1)
    if backgrounds is not None:
        render = render + (1.0 - alpha_img) * backgrounds[:, None, None, :]
    return render, alpha_img


def rasterize_on_device(*, gsplat_options: dict | None = None, **kwargs):
    """gsplat's CUDA ``rasterization`` when the Gaussians are on a GPU, :func:`rasterize` on the CPU.

    ``kwargs`` are the arguments both take; ``gsplat_options`` (packed, absgrad,
    rasterize_mode, ...) go to gsplat only. Returns ``(render, alpha, info)``.
    """
    if kwargs["means"].is_cuda:
        from gsplat.rendering import rasterization

        return rasterization(**kwargs, **(gsplat_options or {}))
    return rasterize(**kwargs)
