"""Structure from motion on real photos with surveyed cameras: twinstudio against COLMAP's defaults.

For each Strecha set in ``../shared/data/strecha`` (Herz-Jesus-P25,
castle-P30: 3072x2048 photos, surveyed cameras), back to back on this
machine:

1. **COLMAP's defaults** through pycolmap, what ``colmap
   automatic_reconstructor`` does for a folder: SIFT extraction (one shared
   SIMPLE_RADIAL camera, no intrinsics given), exhaustive matching, the
   incremental mapper; the largest model is kept.
2. **twinstudio**: ``twinstudio reconstruct sfm FOLDER --out DIR`` (no rig,
   no intrinsics), run as a user runs it.

Both are scored the same way against the ground truth: median and max
camera-centre error after a similarity fit of the centres (metres, the
survey's unit), median relative-rotation error over all pairs of registered
images (degrees), images registered, wall time. Prints each figure and
twinstudio's ratio to COLMAP's (below 1 is better for errors and time).

Usage: python benchmarks/sfm_real.py [--data ../shared/data/strecha] [--sets Herz-Jesus-P25,castle-P30]
                                     [--work DIR] [--colmap-cache] [--json FILE]

``--colmap-cache`` reuses COLMAP's result from an earlier run in ``--work``
(for iterating; the published figures come from a run without it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "strecha"
SETS = ("Herz-Jesus-P25", "castle-P30")


def read_ground_truth(set_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{image stem: (K [3, 3], R_cw [3, 3] world-to-camera, C [3])}`` from ``gt_dense_cameras/*.camera``."""
    out = {}
    for f in sorted((set_dir / "gt_dense_cameras").glob("*.camera")):
        rows = [[float(x) for x in line.split()] for line in f.read_text().splitlines() if line.strip()]
        K = np.array(rows[0:3])
        R = np.array(rows[4:7])  # camera-to-world
        C = np.array(rows[7])
        out[f.name.split(".")[0]] = (K, R.T, C)
    return out


def score(poses: dict[str, tuple[np.ndarray, np.ndarray]], gt: dict) -> dict:
    """Errors of ``{stem: (R_cw, C)}`` against the ground truth: centres after a similarity fit, relative
    rotations over all pairs (a rotation error that no similarity can hide)."""
    from reconstruct.sfm import umeyama
    from rigs.geometry import rotation_angle_deg

    common = sorted(set(poses) & set(gt))
    out = {"registered": len(common), "images": len(gt)}
    if len(common) < 3:
        return out
    s, R, t = umeyama(np.array([poses[c][1] for c in common]), np.array([gt[c][2] for c in common]))
    pos = [float(np.linalg.norm(s * R @ poses[c][1] + t - gt[c][2])) for c in common]
    rel = [rotation_angle_deg(poses[b][0] @ poses[a][0].T, gt[b][1] @ gt[a][1].T) for a, b in combinations(common, 2)]
    out.update(median_position_m=float(np.median(pos)), max_position_m=float(np.max(pos)),
               median_relative_rotation_deg=float(np.median(rel)), max_relative_rotation_deg=float(np.max(rel)),
               worst=common[int(np.argmax(pos))])
    return out


def run_colmap_defaults(images: Path, work: Path) -> tuple[dict, float, dict]:
    """COLMAP's automatic reconstruction of a folder: poses ``{stem: (R_cw, C)}``, seconds, extra figures."""
    import pycolmap

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    db = work / "database.db"
    t0 = time.perf_counter()
    pycolmap.extract_features(db, images, camera_mode=pycolmap.CameraMode.SINGLE, device=pycolmap.Device.cpu)
    pycolmap.match_exhaustive(db, device=pycolmap.Device.cpu)
    recs = pycolmap.incremental_mapping(db, images, work / "sparse")
    seconds = time.perf_counter() - t0
    if not recs:
        return {}, seconds, {"models": 0}
    rec = max(recs.values(), key=lambda r: r.num_reg_images())
    poses = {}
    for img in rec.images.values():
        if img.has_pose:
            T = img.cam_from_world()
            R = T.rotation.matrix()
            poses[img.name.rsplit(".", 1)[0]] = (R, -R.T @ np.asarray(T.translation))
    cam = next(iter(rec.cameras.values()))
    return poses, seconds, {"models": len(recs), "points": rec.num_points3D(),
                            "reprojection_px": float(rec.compute_mean_reprojection_error()),
                            "camera": f"{cam.model.name} {np.round(np.asarray(cam.params), 2).tolist()}"}


def run_twinstudio(images: Path, out: Path) -> tuple[dict, float, dict]:
    """``twinstudio reconstruct sfm FOLDER --out DIR`` as a user runs it: poses, seconds, extra figures."""
    from reconstruct.inputs import read_cameras

    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "twinstudio", "reconstruct", "sfm", str(images), "--out", str(out), "--plain"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        return {}, seconds, {"exit": proc.returncode}
    cams = read_cameras(out / "cameras.json")
    poses = {c: (cam.pose.R, cam.pose.center) for c, cam in cams.items()}
    doc = json.loads((out / "cameras.json").read_text())
    summary = [line for line in proc.stdout.splitlines() if line.strip()]
    return poses, seconds, {"points": doc.get("points"), "reprojection_px": doc.get("mean_reprojection_error_px"),
                            "mapper": (doc.get("mapping") or {}).get("chosen"),
                            "left_out": doc.get("unregistered"), "summary": summary}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with the Strecha sets")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated set names")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "twinstudio-sfm-real")
    ap.add_argument("--colmap-cache", action="store_true", help="reuse COLMAP's result from --work (iterating)")
    ap.add_argument("--skip-colmap", action="store_true", help="twinstudio only")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)

    import pycolmap

    print(f"machine: {os.cpu_count()} CPU cores; pycolmap {pycolmap.__version__} (COLMAP {pycolmap.COLMAP_version})")
    report = {}
    for name in args.sets.split(","):
        set_dir = args.data / name
        if not (set_dir / "images").is_dir():
            print(f"{name}: not found under {args.data}; skipped")
            continue
        gt = read_ground_truth(set_dir)
        images = set_dir / "images"
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        row = {}
        cache = work / "colmap.json"
        if not args.skip_colmap:
            if args.colmap_cache and cache.is_file():
                row["colmap"] = json.loads(cache.read_text())
            else:
                poses, secs, extra = run_colmap_defaults(images, work / "colmap")
                row["colmap"] = {**score(poses, gt), "seconds": secs, **extra}
                cache.write_text(json.dumps(row["colmap"]))
        poses, secs, extra = run_twinstudio(images, work / "twinstudio")
        row["twinstudio"] = {**score(poses, gt), "seconds": secs, **extra}
        report[name] = row
        print(f"\n{name} ({len(gt)} images):")
        print(f"  {'':24} {'COLMAP':>10} {'twinstudio':>11} {'ratio':>7}")
        c, t = row.get("colmap", {}), row["twinstudio"]
        for key, label, fmt in (("registered", "registered", "{:.0f}"),
                                ("median_position_m", "median position (m)", "{:.4f}"),
                                ("max_position_m", "max position (m)", "{:.4f}"),
                                ("median_relative_rotation_deg", "median rel. rotation (deg)", "{:.4f}"),
                                ("seconds", "wall time (s)", "{:.1f}")):
            cv, tv = c.get(key), t.get(key)
            print(f"  {label:24} {fmt.format(cv) if cv is not None else '-':>10} "
                  f"{fmt.format(tv) if tv is not None else '-':>11} "
                  f"{_ratio(tv, cv) if key != 'registered' else '':>7}")
        for who, r in (("COLMAP", c), ("twinstudio", t)):
            if r:
                print(f"  {who}: {r.get('points')} points, reprojection {r.get('reprojection_px')} px"
                      + (f", worst camera {r['worst']}" if "worst" in r else "")
                      + (f", {r['camera']}" if r.get("camera") else "")
                      + (f", mapper {r['mapper']}" if r.get("mapper") else ""))
        for line in t.get("summary", [])[1:]:
            print(f"    | {line}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
