"""Rendering speed and memory of the virtual studio on virtual-ring-24.

Prints one figure per line:

* frames/s at 640x480 and at 1920x1080 (the motion take under the `flat`
  preset, all 6 lights with shadows: the most expensive lighting), rendered
  in memory by one worker process per CPU core, each worker owning a share of
  the cameras (the way `twinstudio rig render` works);
* peak resident memory of the busiest worker and of all processes together;
* with --end-to-end, the wall time of the demo's render (24 cameras x 8
  lighting steps + 24 motion frames, written to disk with ground truth).

Usage: python benchmarks/render.py [--frames 24] [--workers N] [--end-to-end]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RIG = "virtual-ring-24"


def _camera_at(cam, width: int, height: int):
    """The rig camera re-sized to width x height (scaled, then centre-cropped)."""
    from rigs.geometry import Camera, Intrinsics

    intr = cam.intrinsics.scaled(width / cam.intrinsics.width)
    dy = (intr.height - height) / 2
    intr = Intrinsics(width, height, intr.fx, intr.fy, intr.cx, intr.cy - dy, intr.dist)
    return Camera(cam.id, intr, cam.pose)


def _worker(share: list[int], width: int, height: int, frames: int, out: mp.Queue) -> None:
    from rigs.rigfile import load_rig
    from rigs.virtual.motion import default_clip
    from rigs.virtual.studio import FrameState, VirtualStudio

    rig = load_rig(RIG)
    studio = VirtualStudio(rig)
    clip = default_clip(frames=frames, fps=rig.motion.fps)
    instants = [studio.frame(FrameState(studio.person.pose(clip.params(i)))) for i in range(frames)]
    step = rig.preset_steps(rig.motion_preset)[0]
    t_render = 0.0
    n = 0
    t0 = time.perf_counter()
    for ci in share:
        view = studio.view(_camera_at(rig.cameras[ci], width, height))
        for i, dyn in enumerate(instants):
            t = time.perf_counter()
            studio.render(view, dyn, step, noise_key=i)
            t_render += time.perf_counter() - t
            n += 1
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put((n, wall, t_render, rss_mb))


def measure(width: int, height: int, frames: int, workers: int, n_cameras: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    shares = [list(range(n_cameras))[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(s, width, height, frames, q)) for s in shares]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    total_wall = time.perf_counter() - t0
    images = sum(r[0] for r in results)
    busiest = max(r[1] for r in results)  # per-camera caches + rendering, after start-up
    return {
        "images": images,
        "fps": images / busiest,
        "fps_render_only": images / max(r[2] for r in results),
        "wall_incl_startup_s": total_wall,
        "peak_worker_mb": max(r[3] for r in results),
        "peak_total_mb": sum(r[3] for r in results)
        + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def end_to_end(workers: int) -> float:
    from rigs.virtual.render import RenderOptions, run_render

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run_render(RIG, Path(d), RenderOptions(workers=workers))
        dt = time.perf_counter() - t0
        print(f"demo_render_images: {res.images}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=24, help="motion frames per camera")
    ap.add_argument("--cameras", type=int, default=24, help="cameras of the rig to render")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--end-to-end", action="store_true", help="also time the demo's full render to disk")
    args = ap.parse_args()
    print(f"cpu_cores: {os.cpu_count()}  workers: {args.workers}")
    for w, h in [(640, 480), (1920, 1080)]:
        r = measure(w, h, args.frames, args.workers, args.cameras)
        print(f"render_fps_{w}x{h}: {r['fps']:.1f} frames/s ({r['images']} images, "
              f"{r['fps_render_only']:.1f}/s excluding per-camera set-up)")
        print(f"peak_rss_worker_{w}x{h}: {r['peak_worker_mb']:.0f} MB")
        print(f"peak_rss_total_{w}x{h}: {r['peak_total_mb']:.0f} MB")
        print(f"wall_incl_startup_{w}x{h}: {r['wall_incl_startup_s']:.1f} s")
    if args.end_to_end:
        print(f"demo_render_wall: {end_to_end(args.workers):.1f} s")


if __name__ == "__main__":
    main()
