"""The compiled CPU projection and compositing of :mod:`train.raster` (forward and backward).

``_raster_cpu.c`` is built on first use with the system's C compiler (``$CC``, else
``cc``) into ``$TWINSTUDIO_CACHE`` (default ``~/.cache/twinstudio``; a temporary folder
where that cannot be made), keyed by a hash of
the source and flags, so a changed source is rebuilt and concurrent first uses do not
collide. Where there is no compiler, :func:`available` is False and :mod:`train.raster`
projects and composites with torch ops (the same rules, about 10x slower); the reason is
logged once. ``TWINSTUDIO_RASTER=torch`` forces that path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_raster_cpu.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
TILE = 16  # pixels per tile side (gsplat's; 8 and 4 measured no faster on the preview's crops)

_lib: ctypes.CDLL | None = None
_why_not: str | None = None

_i32p = ctypes.POINTER(ctypes.c_int32)
_i64p = ctypes.POINTER(ctypes.c_int64)
_f64p = ctypes.POINTER(ctypes.c_double)


def cache_dir() -> Path:
    return Path(os.environ.get("TWINSTUDIO_CACHE") or Path.home() / ".cache" / "twinstudio")


def _build() -> Path:
    source = SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"raster-{key}.so"
    if lib.is_file():
        return lib
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: build where this user can write
        lib = Path(tempfile.gettempdir()) / f"twinstudio-{os.getuid()}" / lib.name
        if lib.is_file():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=lib.stem, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"{compiler} failed on {SOURCE.name}: {proc.stderr.strip()[-400:]}")
        os.replace(tmp, lib)  # atomic: another process building the same key gets a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    if os.environ.get("TWINSTUDIO_RASTER", "").lower() == "torch":
        _why_not = "TWINSTUDIO_RASTER=torch"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, FileNotFoundError) as e:
        _why_not = str(e)
        log.warning("CPU rasteriser: the compiled one is unavailable (%s); using torch ops (slower)", e)
        return None
    lib.ts_count.restype = ctypes.c_int64
    lib.ts_count.argtypes = [ctypes.c_int32, _i32p, _i32p, _i32p, _i32p, ctypes.c_int32, ctypes.c_int32,
                             ctypes.c_int32, _i64p]
    lib.ts_fill.restype = None
    lib.ts_fill.argtypes = [ctypes.c_int32, _i64p, _i32p, _i32p, _i32p, _i32p, ctypes.c_int32, ctypes.c_int32,
                            _i64p, _i64p, _i32p]
    common = [ctypes.c_int32] * 6 + [_i64p, _i32p] + [_f64p] * 6 + [_i32p] * 4 + [_f64p]
    lib.ts_forward.restype = ctypes.c_int
    lib.ts_forward.argtypes = common + [_f64p, _f64p, _i32p, ctypes.c_int32]
    lib.ts_backward.restype = ctypes.c_int
    lib.ts_backward.argtypes = [ctypes.c_int32] + common + [_f64p, _i32p, _f64p, _f64p, _f64p, _f64p,
                                                              ctypes.c_int32]
    proj = [ctypes.c_int32, _f64p, _f64p, _f64p, _f64p, _f64p, ctypes.c_int32, ctypes.c_int32, ctypes.c_double,
            ctypes.c_double, ctypes.c_double]
    lib.ts_project.restype = None
    lib.ts_project.argtypes = proj + [_f64p, _f64p, _f64p, _i32p, ctypes.c_int32]
    lib.ts_project_backward.restype = None
    lib.ts_project_backward.argtypes = proj + [_f64p, _f64p, _f64p, _f64p, _f64p, _f64p, ctypes.c_int32]
    _lib = lib
    return lib


def available() -> bool:
    """Whether the compiled rasteriser can be used (builds it on first call)."""
    return _load() is not None


def why_not() -> str | None:
    """Why the compiled rasteriser is not used, or None when it is."""
    _load()
    return _why_not


def _require() -> None:
    if _load() is None:
        raise RuntimeError(f"the compiled CPU rasteriser is unavailable ({_why_not})")


def _ptr(t: Tensor, kind):
    return ctypes.cast(t.data_ptr(), kind)


class _Bins:
    """Gaussians binned into TILE x TILE tiles, each tile's list front to back."""

    def __init__(self, ranges: tuple[Tensor, ...], depths: Tensor, width: int, height: int) -> None:
        lib = _load()
        self.tiles_x, self.tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
        self.ranges = [r.to(torch.int32).contiguous() for r in ranges]
        n = len(depths)
        counts = torch.zeros(self.tiles_x * self.tiles_y, dtype=torch.int64)
        total = lib.ts_count(n, *(_ptr(r, _i32p) for r in self.ranges), TILE, self.tiles_x, self.tiles_y,
                             _ptr(counts, _i64p))
        self.offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=self.offsets[1:])
        order = torch.argsort(depths, stable=True).contiguous()
        self.ids = torch.empty(int(total), dtype=torch.int32)
        cursor = torch.zeros_like(counts)
        lib.ts_fill(n, _ptr(order, _i64p), *(_ptr(r, _i32p) for r in self.ranges), TILE, self.tiles_x,
                    _ptr(self.offsets, _i64p), _ptr(cursor, _i64p), _ptr(self.ids, _i32p))

    def args(self, dim: int, width: int, height: int, params: list[Tensor], feat: Tensor) -> list:
        return [dim, width, height, TILE, self.tiles_x, self.tiles_y, _ptr(self.offsets, _i64p),
                _ptr(self.ids, _i32p), *(_ptr(p, _f64p) for p in params),
                *(_ptr(r, _i32p) for r in self.ranges), _ptr(feat, _f64p)]


class _Composite(torch.autograd.Function):
    """One camera: (mx, my, a, b, c, opacity [N], features [N, D]) -> render [H, W, D], alpha [H, W, 1]."""

    @staticmethod
    def forward(ctx, mx, my, a, b, c, opacity, features, ranges, depths, width, height):
        dtype = features.dtype
        params = [t.detach().double().contiguous() for t in (mx, my, a, b, c, opacity)]
        feat = features.detach().double().contiguous()
        n, dim = feat.shape
        bins = _Bins(ranges, depths.detach(), width, height)
        out = torch.empty(height * width * dim, dtype=torch.float64)
        t_final = torch.empty(height * width, dtype=torch.float64)
        last = torch.empty(height * width, dtype=torch.int32)
        if _lib.ts_forward(*bins.args(dim, width, height, params, feat), _ptr(out, _f64p), _ptr(t_final, _f64p),
                           _ptr(last, _i32p), torch.get_num_threads()) != 0:
            raise MemoryError("rasterize: out of memory for the compositing scratch buffers")
        ctx.bins, ctx.params, ctx.feat, ctx.size = bins, params, feat, (width, height)
        ctx.t_final, ctx.last, ctx.dtype = t_final, last, dtype
        return out.reshape(height, width, dim).to(dtype), (1.0 - t_final).reshape(height, width, 1).to(dtype)

    @staticmethod
    def backward(ctx, d_render, d_alpha):
        width, height = ctx.size
        n, dim = ctx.feat.shape
        bins = ctx.bins
        d_out = (torch.zeros(height, width, dim) if d_render is None else d_render).double().contiguous()
        d_a = (torch.zeros(height, width, 1) if d_alpha is None else d_alpha).double().contiguous()
        slots = torch.empty(len(bins.ids) * (6 + dim), dtype=torch.float64)
        grad = torch.empty(n * (6 + dim), dtype=torch.float64)
        if _lib.ts_backward(n, *bins.args(dim, width, height, ctx.params, ctx.feat), _ptr(ctx.t_final, _f64p),
                            _ptr(ctx.last, _i32p), _ptr(d_out, _f64p), _ptr(d_a, _f64p), _ptr(slots, _f64p),
                            _ptr(grad, _f64p), torch.get_num_threads()) != 0:
            raise MemoryError("rasterize: out of memory for the compositing scratch buffers")
        g = grad.reshape(n, 6 + dim).to(ctx.dtype)
        return (*g[:, :6].unbind(-1), g[:, 6:], None, None, None, None)


class _Project(torch.autograd.Function):
    """One camera: (means [N, 3], quats [N, 4], scales [N, 3]) -> radii [N] int32, means2d [N, 2], depths [N],
    conics [N, 3]; the camera (view [4, 4], K [3, 3]) is held fixed."""

    @staticmethod
    def forward(ctx, means, quats, scales, view, K, width, height, eps2d, near, far):
        dtype = means.dtype
        inputs = [t.detach().double().contiguous() for t in (means, quats, scales, view, K)]
        n = len(means)
        means2d = torch.empty(n, 2, dtype=torch.float64)
        depths = torch.empty(n, dtype=torch.float64)
        conics = torch.empty(n, 3, dtype=torch.float64)
        radii = torch.empty(n, dtype=torch.int32)
        setup = [n, *(_ptr(t, _f64p) for t in inputs), width, height, eps2d, near, far]
        _lib.ts_project(*setup, _ptr(means2d, _f64p), _ptr(depths, _f64p), _ptr(conics, _f64p), _ptr(radii, _i32p),
                        torch.get_num_threads())
        ctx.inputs, ctx.setup, ctx.dtype = inputs, setup, dtype
        ctx.mark_non_differentiable(radii)
        return radii, means2d.to(dtype), depths.to(dtype), conics.to(dtype)

    @staticmethod
    def backward(ctx, _d_radii, d_means2d, d_depths, d_conics):
        n = ctx.setup[0]

        def grad_in(d, shape):
            return (torch.zeros(shape) if d is None else d).double().contiguous()

        gm2, gd, gc = grad_in(d_means2d, (n, 2)), grad_in(d_depths, (n,)), grad_in(d_conics, (n, 3))
        g_means = torch.empty(n, 3, dtype=torch.float64)
        g_quats = torch.empty(n, 4, dtype=torch.float64)
        g_scales = torch.empty(n, 3, dtype=torch.float64)
        _lib.ts_project_backward(*ctx.setup, _ptr(gm2, _f64p), _ptr(gd, _f64p), _ptr(gc, _f64p),
                                 _ptr(g_means, _f64p), _ptr(g_quats, _f64p), _ptr(g_scales, _f64p),
                                 torch.get_num_threads())
        return (g_means.to(ctx.dtype), g_quats.to(ctx.dtype), g_scales.to(ctx.dtype),
                None, None, None, None, None, None, None)


def project(means: Tensor, quats: Tensor, scales: Tensor, view: Tensor, K: Tensor, width: int, height: int,
            eps2d: float, near: float, far: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Projects N Gaussians into one fixed camera (differentiable in means, quats and scales)."""
    _require()
    return _Project.apply(means, quats, scales, view, K, width, height, float(eps2d), float(near), float(far))


def composite(columns: list[Tensor], features: Tensor, ranges: tuple[Tensor, ...], depths: Tensor,
              width: int, height: int) -> tuple[Tensor, Tensor]:
    """Composites one camera's Gaussians; ``columns`` = (mx, my, conic a, b, c, opacity), each [N]."""
    _require()
    return _Composite.apply(*columns, features, ranges, depths, width, height)


__all__ = ["available", "cache_dir", "composite", "project", "why_not"]
