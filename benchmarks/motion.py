"""Accuracy and speed of motion tracking on virtual-ring-24's motion take.

Renders the motion take (all 24 cameras at 1280x960, 24 frames; skipped when
--render names a folder that already holds it), tracks it with the exact
ground-truth cameras and prints one figure per line:

* median and 90th percentile of the 3D error of every tracked point in every
  frame against its ground-truth trajectory (the issue's target: median <= 5 mm);
* the share of the first frame's tracks still tracked in the last frame;
* tracks, points per frame, views per point, reprojection RMS;
* wall time of the render and of the tracking.

Usage: python benchmarks/motion.py [--render DIR] [--frames 24] [--scale 1.0] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import numpy as np

    from reconstruct.motion import MotionOptions, run_motion
    from rigs.virtual.render import RenderOptions, run_render

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", type=Path, help="render folder to use (rendered there if it has no motion take)")
    ap.add_argument("--frames", type=int, default=24, help="motion frames")
    ap.add_argument("--scale", type=float, default=1.0, help="render scale (1.0: 1280x960)")
    ap.add_argument("--out", type=Path, help="output folder of the tracking (default: a temporary one)")
    args = ap.parse_args()

    render = args.render or Path(tempfile.mkdtemp(prefix="twinstudio-motion-")) / "render"
    if not (render / "takes" / "motion-001" / "gt" / "frames.json").is_file():
        t0 = time.perf_counter()
        run_render("virtual-ring-24", render, RenderOptions(takes=("motion",), frames=args.frames, scale=args.scale))
        print(f"render_wall: {time.perf_counter() - t0:.1f} s ({render})")
    out = args.out or Path(tempfile.mkdtemp(prefix="twinstudio-motion-out-"))
    options = MotionOptions() if args.scale == 1.0 else MotionOptions().scaled(args.scale)
    report = run_motion(render, render / "gt" / "cameras.json", out, options)
    s = report.score
    live = np.isfinite(report.points).all(axis=2)
    print(f"frames: {len(report.frames)}  cameras: {len(report.cameras_used)}")
    print(f"median_3d_error: {s.median_mm:.2f} mm")
    print(f"p90_3d_error: {s.p90_mm:.2f} mm")
    print(f"mean_3d_error: {s.mean_mm:.2f} mm")
    print(f"kept_fraction: {s.kept_fraction:.3f} (of {int(live[0].sum())} first-frame tracks)")
    print(f"tracks: {s.tracks}  points_per_frame: {int(live.sum(1).min())}..{int(live.sum(1).max())}")
    print(f"median_views: {np.median(report.views[live]):.0f}")
    print(f"median_rms_px: {np.median(report.rms_px[live]):.3f}")
    print(f"tracking_wall: {report.seconds:.1f} s ({report.seconds / len(report.frames):.2f} s/frame)")
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
