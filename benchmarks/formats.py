"""File-format benchmarks for render teams. Prints one figure per line:

* the OpenUSD export of a 1M-Gaussian splat (SH degree 3) with a demo-size mesh,
  24 cameras and 24 motion frames: seconds to write ``twin.usdz`` and to check it
  (every UsdValidation validator plus our own checks), target <= 10 s for the export;
* the usdz's size against the splat PLY's, target within 10 %;
* the splat PLY written and read through plyfile (train/splat_ply.py);
* reading the splat back out of the usdz (``read_usd_splat``) and whether every value
  equals the PLY's (positions and SH bit for bit; scales and opacities after exp /
  sigmoid to float32 precision).

The splat is synthetic (fixed seed), written under a temporary folder that is
deleted at the end. ``--demo`` adds the same figures for the demo twin
(``out/demo/session``, made by ``make demo``) when it exists.

Usage: python benchmarks/formats.py [--gaussians 1000000] [--degree 3] [--demo]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rigs.rigfile import load_rig, resolve_rig_path  # noqa: E402
from train.splat_ply import SplatParams, read_splat_ply, write_splat_ply  # noqa: E402
from train.usd import TwinSources, check_usd, export_usd, read_usd_splat, write_usd  # noqa: E402


def synthetic_splat(n: int, degree: int, seed: int = 0) -> SplatParams:
    rng = np.random.default_rng(seed)
    k1 = (degree + 1) ** 2 - 1
    return SplatParams(means=(rng.normal(0, 0.25, (n, 3)) + [0, 0, 1.0]).astype(np.float32),
                       log_scales=rng.uniform(-7, -3, (n, 3)).astype(np.float32),
                       quats=rng.normal(size=(n, 4)).astype(np.float32),
                       opacity_logits=rng.normal(0, 2, n).astype(np.float32),
                       sh_dc=rng.normal(size=(n, 3)).astype(np.float32),
                       sh_rest=(rng.normal(size=(n, k1, 3)) * 0.1).astype(np.float32))


def _mesh(path: Path) -> None:
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=6, radius=0.3)  # 82k faces: the demo mesh has 148k
    m.apply_translation([0, 0, 1.0])
    m.visual.vertex_colors = np.tile([200, 160, 140, 255], (len(m.vertices), 1)).astype(np.uint8)
    m.export(path)


def _motion(path: Path, frames: int = 24, tracks: int = 1200) -> None:
    rng = np.random.default_rng(1)
    np.savez_compressed(path, points=rng.normal(0, 0.2, (frames, tracks, 3)) + [0, 0, 1.0],
                        times=np.arange(frames) / 30.0, frames=np.arange(frames), track_ids=np.arange(tracks))


def _compare(a: SplatParams, b: SplatParams) -> str:
    same = np.array_equal(a.means, b.means) and np.array_equal(a.sh_coeffs(), b.sh_coeffs())
    ds = float(np.abs(np.exp(a.log_scales) - np.exp(b.log_scales)).max())
    do = float(np.abs(1 / (1 + np.exp(-a.opacity_logits)) - 1 / (1 + np.exp(-b.opacity_logits))).max())
    return f"positions+SH bit-equal {same}; max |scale| diff {ds:.1e} m; max |opacity| diff {do:.1e}"


def bench(sources: TwinSources, label: str, tmp: Path, *, repeats: int = 3) -> None:
    ply_bytes = sources.splat.stat().st_size
    times = []
    for i in range(repeats):
        out = tmp / f"twin-{label}-{i}.usdz"
        t0 = time.perf_counter()
        r = write_usd(sources, out)
        times.append(time.perf_counter() - t0)
        if i:
            out.unlink()
    out = tmp / f"twin-{label}-0.usdz"
    t0 = time.perf_counter()
    problems = check_usd(out)
    t_check = time.perf_counter() - t0
    size = out.stat().st_size
    print(f"[{label}] {r.gaussians:,} Gaussians (SH degree {r.sh_degree}), {r.cameras} cameras, "
          f"mesh {r.mesh_faces:,} faces, motion {r.motion_frames} frames")
    print(f"[{label}] USD export (write usdz + checks), median of {repeats}: {sorted(times)[repeats // 2]:.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}); target <= 10 s")
    print(f"[{label}] checks alone: {t_check:.2f} s; problems: {len(problems)}")
    print(f"[{label}] usdz {size / 1e6:.1f} MB vs splat PLY {ply_bytes / 1e6:.1f} MB: {size / ply_bytes:.3f}x "
          f"(the usdz holds the mesh, cameras and tracks too); target within 10 %")
    t0 = time.perf_counter()
    back = read_usd_splat(out)
    t_read = time.perf_counter() - t0
    print(f"[{label}] read the splat back from the usdz: {t_read:.2f} s; "
          f"{_compare(read_splat_ply(sources.splat), back)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gaussians", type=int, default=1_000_000)
    ap.add_argument("--degree", type=int, default=3)
    ap.add_argument("--demo", action="store_true", help="also the demo twin (out/demo/session)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="twin-formats-"))
    try:
        params = synthetic_splat(args.gaussians, args.degree)
        t0 = time.perf_counter()
        write_splat_ply(tmp / "splat.ply", params)
        t_w = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_splat_ply(tmp / "splat.ply")
        t_r = time.perf_counter() - t0
        print(f"splat PLY {args.gaussians:,} Gaussians, SH degree {args.degree}: write {t_w:.2f} s, read {t_r:.2f} s "
              f"({(tmp / 'splat.ply').stat().st_size / 1e6:.1f} MB)")
        from reconstruct.inputs import write_cameras

        write_cameras(tmp / "cameras.json", load_rig(resolve_rig_path("virtual-ring-24")).cameras, method="rig")
        _mesh(tmp / "mesh.ply")
        _motion(tmp / "trajectories.npz")
        sources = TwinSources(splat=tmp / "splat.ply", cameras=tmp / "cameras.json", mesh=tmp / "mesh.ply",
                              motion=tmp / "trajectories.npz", subject_id="bench", consent={"consent_id": "bench"},
                              ai_disclosure={"label": "AI-generated digital twin"}, origin="benchmark")
        bench(sources, "1M synthetic" if args.gaussians == 1_000_000 else f"{args.gaussians} synthetic", tmp)
        demo = Path("out/demo/session")
        if args.demo and (demo / "train" / "twin" / "splat.ply").is_file():
            t0 = time.perf_counter()
            r = export_usd(demo, tmp / "demo.usdz")
            print(f"[demo twin] export_usd(out/demo/session): {time.perf_counter() - t0:.2f} s, {r.gaussians:,} "
                  f"Gaussians, {r.bytes / 1e6:.1f} MB, problems {len(r.problems)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
