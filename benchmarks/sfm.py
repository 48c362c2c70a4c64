"""Structure from motion on a virtual stills take without calibration, scored against ground truth.

Renders ``virtual-ring-24``'s stills take (24 cameras, 1280x960, 8 lighting
steps) once per sensor-noise seed into ``--render``-seedN (reused when it is
already there), runs ``reconstruct.sfm.run_sfm`` on each with the rig's lens
data as known intrinsics, and prints per seed: cameras registered, camera
position and rotation errors after a similarity fit to the exact cameras
(median and max), seconds, and whether the result was refused; then the worst
median over the seeds.

The virtual studio renders from exactly the rig file's nominal poses, so SfM
is given a *nudged* copy of the rig file (``--nudge-mm``, ``--nudge-deg``:
every camera moved and turned by a seeded random amount of about that size,
as a real rig looks after bodies get nudged). Its lens data are exact (known
intrinsics, as for a calibrated lens); its positions only start the rig
frame (and the priors, if SfM uses them). ``--nudge-mm 0`` passes the exact
rig file.

Usage: python benchmarks/sfm.py [--render /tmp/twinstudio-sfm-render] [--seeds 0,1,2] [--scale 1.0]
                                [--frames 0,1,...] [--threads N] [--out DIR]
                                [--nudge-mm 30] [--nudge-deg 0.75] [--nudge-seed 0]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RIG = "virtual-ring-24"
TARGET = (2.0, 0.1)  # mm, deg: calibration accuracy


def _vec(v) -> str:
    return "[" + ", ".join(f"{x:.6f}" for x in v) + "]"


def nudged_rig(rig_path: Path, out_path: Path, position_mm: float, rotation_deg: float, seed: int) -> dict:
    """Write a copy of a rig file with every camera moved by ``position_mm`` (a random direction) and
    turned by ``rotation_deg`` (a random axis), seeded; returns the nudge per camera (mm, deg)."""
    from rigs.geometry import look_at, rotation_angle_deg
    from rigs.rigfile import load_rig

    rig = load_rig(rig_path)
    text = rig_path.read_text()
    rng = np.random.default_rng(seed)
    blocks = re.split(r"(?m)^(?=\[\[cameras\]\])", text)
    head, blocks = blocks[0], blocks[1:]
    by_id = {c.id: c for c in rig.cameras}
    nudge = {}
    out_blocks = []
    for b in blocks:
        cid = re.search(r'(?m)^id\s*=\s*"([^"]+)"', b).group(1)
        if re.search(r"(?m)^(look_at|roll_deg)\s*=", b):
            raise ValueError(f"{rig_path}: camera {cid} has look_at/roll_deg; nudging those is not written")
        cam = by_id[cid]
        d = rng.standard_normal(3)
        c = cam.pose.center + position_mm / 1000 * d / np.linalg.norm(d)
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        a = np.radians(rotation_deg)
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        dR = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
        R = cam.pose.R @ dR  # turned about an axis in world coordinates
        target = c + 3.0 * R[2]
        base = look_at(c, target).R
        roll = np.degrees(np.arctan2((R @ base.T)[1, 0], (R @ base.T)[0, 0]))
        b = re.sub(r"(?m)^position\s*=.*$",
                   f"position = {_vec(c)}\nlook_at = {_vec(target)}\nroll_deg = {roll:.6f}",
                   b, count=1)
        out_blocks.append(b)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(head + "".join(out_blocks))
    nudged = {c.id: c for c in load_rig(out_path).cameras}
    for cid, cam in by_id.items():
        nudge[cid] = (1000 * float(np.linalg.norm(nudged[cid].pose.center - cam.pose.center)),
                      rotation_angle_deg(nudged[cid].pose.R, cam.pose.R))
    return nudge


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", type=Path, default=Path(tempfile.gettempdir()) / "twinstudio-sfm-render",
                    help="render folder prefix: one folder per noise seed, PREFIX-seedN (rendered once, reused)")
    ap.add_argument("--seeds", default="0,1,2", help="sensor-noise seeds of the renders")
    ap.add_argument("--scale", type=float, default=1.0, help="render scale (1.0: 1280x960)")
    ap.add_argument("--frames", default="", help="lighting steps to use, e.g. 0,2,4 (default: all 8)")
    ap.add_argument("--threads", type=int, default=0, help="worker threads (default: one per core)")
    ap.add_argument("--out", type=Path, default=None, help="SfM output folder, one sub-folder per seed "
                                                            "(default: a temporary one)")
    ap.add_argument("--nudge-mm", type=float, default=30.0, help="rig file given to SfM: cameras moved this far")
    ap.add_argument("--nudge-deg", type=float, default=0.75, help="... and turned this much")
    ap.add_argument("--nudge-seed", type=int, default=0)
    args = ap.parse_args(argv)

    from reconstruct.sfm import SfmError, SfmOptions, run_sfm
    from rigs.rigfile import resolve_rig_path
    from rigs.virtual.render import RenderOptions, run_render

    seeds = [int(s) for s in args.seeds.split(",")]
    frames = tuple(int(f) for f in args.frames.split(",")) if args.frames else None
    options = SfmOptions(frames=frames, threads=args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rig_path = resolve_rig_path(RIG)
        if args.nudge_mm > 0 or args.nudge_deg > 0:
            sfm_rig = Path(tmp) / "nudged-rig.toml"
            nudge = nudged_rig(rig_path, sfm_rig, args.nudge_mm, args.nudge_deg, args.nudge_seed)
            print(f"rig file given to SfM: nominal poses nudged by {args.nudge_mm:g} mm and {args.nudge_deg:g} deg "
                  f"(seed {args.nudge_seed}; measured max {max(n[0] for n in nudge.values()):.1f} mm, "
                  f"{max(n[1] for n in nudge.values()):.2f} deg); lens data exact")
        else:
            sfm_rig = rig_path
            print("rig file given to SfM: the exact one (nominal poses = rendered poses)")
        for seed in seeds:
            render = Path(f"{args.render}-seed{seed}")
            if not (render / "render.json").is_file():
                t = time.perf_counter()
                run_render(rig_path, render, RenderOptions(takes=("stills",), scale=args.scale, ground_truth=False,
                                                           noise_seed=seed))
                print(f"render (noise seed {seed}, once, into {render}): {time.perf_counter() - t:.1f} s")
            out = (args.out or Path(tmp)) / f"seed{seed}"
            t = time.perf_counter()
            try:
                r = run_sfm(render, out, options, rig_path=sfm_rig)
                refused = ""
            except SfmError as e:
                r, refused = None, str(e)
            seconds = time.perf_counter() - t
            if r is None:
                print(f"seed {seed}: REFUSED after {seconds:.0f} s: {refused}")
                rows.append((seed, None))
                continue
            g = r.ground_truth or {}
            n = g.get("total", len(r.registered) + len(r.unregistered))
            line = f"seed {seed}: registered {len(r.registered)}/{n}"
            if "median_position_mm" in g:
                worst = max(g["cameras"], key=lambda c: g["cameras"][c]["position_mm"])
                line += (f", position mm median {g['median_position_mm']:.2f} max {g['max_position_mm']:.2f} "
                         f"({worst}), rotation deg median {g['median_rotation_deg']:.3f} "
                         f"max {g['max_rotation_deg']:.3f}")
            line += f", {r.points} points"
            if r.mean_reprojection_error_px is not None:
                line += f", {r.mean_reprojection_error_px:.3f} px"
            line += f", {seconds:.0f} s, not refused"
            if r.unregistered:
                line += f" (not registered: {', '.join(r.unregistered)})"
            print(line, flush=True)
            rows.append((seed, g if len(r.registered) == n else None))
    ok = [g for _, g in rows if g is not None and "median_position_mm" in g]
    if len(ok) < len(rows):
        print(f"worst: {len(rows) - len(ok)} of {len(rows)} seed(s) refused or incomplete")
        return 1
    mm = max(g["median_position_mm"] for g in ok)
    deg = max(g["median_rotation_deg"] for g in ok)
    met = mm <= TARGET[0] and deg <= TARGET[1]
    print(f"worst median over {len(ok)} seeds: {mm:.2f} mm, {deg:.3f} deg "
          f"(target {TARGET[0]:g} mm / {TARGET[1]:g} deg: {'met' if met else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
