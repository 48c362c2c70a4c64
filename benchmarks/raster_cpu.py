"""The CPU rasteriser: compiled (train/_raster_cpu.c) against torch ops, one training step's render.

    .venv/bin/python benchmarks/raster_cpu.py [--gaussians N] [--size WxH] [--threads T]

A person-sized cloud of Gaussians (default 60k, what the CPU preview holds at its end) seen
from 3 m in a subject crop of the preview's size (default 160x296), SH degree 0 colours:
prints milliseconds per forward and forward+backward for both compositing paths, their
ratio, and how far apart their images and gradients are (in float64).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scene(n: int, width: int, height: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # a 0.5 x 1.8 m body, 3 m in front of the camera, its surface covered by 5-15 mm Gaussians
    u = torch.rand(n, generator=g) * 2 * torch.pi
    h = torch.rand(n, generator=g) * 1.8 - 0.9
    means = torch.stack([0.25 * torch.cos(u), h, 3.0 + 0.15 * torch.sin(u)], dim=-1)
    params = {
        "means": means,
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.log(0.005 + 0.01 * torch.rand(n, 3, generator=g)),
        "opacities": torch.logit(0.2 + 0.75 * torch.rand(n, generator=g)),
        "colors": torch.rand(n, 3, generator=g),
    }
    f = 1.5 * height  # 1.8 m at 3 m fills 90 % of the crop's height
    K = torch.tensor([[[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]])
    return {k: v.requires_grad_() for k, v in params.items()}, torch.eye(4)[None], K


def step(params, view, K, width, height, backend, backward):
    import torch

    from train.raster import rasterize

    render, alpha, _ = rasterize(params["means"], params["quats"], torch.exp(params["scales"]),
                                 torch.sigmoid(params["opacities"]), params["colors"], view, K, width, height,
                                 backend=backend)
    if backward:
        (render.sum() + alpha.sum()).backward()
    return render.detach(), alpha.detach()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and the first build of the compiled library)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gaussians", type=int, default=60_000)
    ap.add_argument("--size", default="160x296", help="crop size WxH (default: the CPU preview's median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv[1:])
    import torch

    from train import raster_c

    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    params, view, K = scene(args.gaussians, width, height)
    print(f"scene {args.gaussians} Gaussians, {width}x{height}, {torch.get_num_threads()} threads")
    if not raster_c.available():
        print(f"compiled rasteriser unavailable: {raster_c.why_not()}")
        return 1
    figures = {}
    for backend in ("c", "torch"):
        fwd = timed(lambda: step(params, view, K, width, height, backend, False), args.repeats)
        both = timed(lambda: step(params, view, K, width, height, backend, True), args.repeats)
        figures[backend] = (fwd, both)
        print(f"{backend:5s} forward {fwd:7.1f} ms   forward+backward {both:7.1f} ms")
    print(f"speed-up forward {figures['torch'][0] / figures['c'][0]:.1f}x, "
          f"forward+backward {figures['torch'][1] / figures['c'][1]:.1f}x")

    # agreement in float64 (in float32 the torch ops round differently and a pixel near the transmittance
    # cut-off can stop one Gaussian earlier or later)
    p64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    grads = {}
    images = {}
    for backend in ("c", "torch"):
        for p in p64.values():
            p.grad = None
        images[backend] = step(p64, view.double(), K.double(), width, height, backend, True)
        grads[backend] = {k: p.grad.clone() for k, p in p64.items()}
    print(f"coverage {(images['c'][1] > 0.5).float().mean():.2f} of the crop; float64 image max |c - torch| "
          f"{(images['c'][0] - images['torch'][0]).abs().max():.2e}")
    for k in p64:
        a, b = grads["c"][k], grads["torch"][k]
        print(f"float64 gradient {k:9s} max |c - torch| / max |torch| {(a - b).abs().max() / b.abs().max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
