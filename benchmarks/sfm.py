"""Structure from motion on a virtual stills take without calibration, scored against ground truth.

Renders ``virtual-ring-24``'s stills take (24 cameras, 1280x960, 8 lighting
steps) once into ``--render`` (reused when it is already there), runs
``reconstruct.sfm.run_sfm`` on it with the rig's lens data as known
intrinsics, and prints one figure per line: cameras registered, camera
position and rotation errors after a similarity fit to the exact cameras
(median and max), sparse points, mean reprojection error, seconds.

Usage: python benchmarks/sfm.py [--render /tmp/twinstudio-sfm-render] [--scale 1.0]
                                [--frames 0,1,...] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RIG = "virtual-ring-24"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", type=Path, default=Path(tempfile.gettempdir()) / "twinstudio-sfm-render",
                    help="render folder (rendered once, then reused)")
    ap.add_argument("--scale", type=float, default=1.0, help="render scale (1.0: 1280x960)")
    ap.add_argument("--frames", default="", help="lighting steps to use, e.g. 0,2,4 (default: all 8)")
    ap.add_argument("--threads", type=int, default=0, help="worker threads (default: one per core)")
    ap.add_argument("--out", type=Path, default=None, help="SfM output folder (default: a temporary one)")
    args = ap.parse_args(argv)

    from reconstruct.sfm import SfmOptions, run_sfm
    from rigs.rigfile import resolve_rig_path
    from rigs.virtual.render import RenderOptions, run_render

    render = args.render
    if not (render / "takes" / "stills-001").is_dir():
        t = time.perf_counter()
        run_render(resolve_rig_path(RIG), render, RenderOptions(takes=("stills",), scale=args.scale,
                                                                 ground_truth=False))
        print(f"render (once, into {render}): {time.perf_counter() - t:.1f} s")
    frames = tuple(int(f) for f in args.frames.split(",")) if args.frames else None
    options = SfmOptions(frames=frames, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "sfm"
        r = run_sfm(render, out, options)
    g = r.ground_truth or {}
    n = g.get("total", len(r.registered) + len(r.unregistered))
    print(f"registered: {len(r.registered)}/{n}" + (f" (not: {', '.join(r.unregistered)})" if r.unregistered else ""))
    if "median_position_mm" in g:
        print(f"position error mm: median {g['median_position_mm']:.2f}, max {g['max_position_mm']:.2f}")
        print(f"rotation error deg: median {g['median_rotation_deg']:.3f}, max {g['max_rotation_deg']:.3f}")
        worst = max(g["cameras"], key=lambda c: g["cameras"][c]["position_mm"])
        print(f"worst camera: {worst} ({g['cameras'][worst]['position_mm']:.2f} mm, "
              f"{g['cameras'][worst]['rotation_deg']:.3f} deg, {r.per_camera[worst]['observations']} observations)")
    print(f"sparse points: {r.points}")
    if r.mean_reprojection_error_px is not None:
        print(f"mean reprojection error px: {r.mean_reprojection_error_px:.3f}")
    print(f"sfm seconds: {r.seconds:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
