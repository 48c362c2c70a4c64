"""The bundle viewer in headless Chromium on this machine's CPUs: time to a ready image, and parity.

Opens ``viewer/index.html?camera=<id>`` (train/handoff/viewer/) for the demo
twin (``out/demo/session/train/twin/splat.ply``, about 62k Gaussians, and the
calibrated cameras of ``out/demo/session/recon/cameras.json``; the first
held-out camera, 1280x960) in Debian's Chromium (``--headless=new``, WebGL 2
through SwiftShader), served from 127.0.0.1 inside a network namespace that has
only ``lo`` (tests/browser.py: needs root). Prints one figure per line:

* the Gaussians and the image size;
* seconds from navigation to ready (the viewer's read-back image the same for
  2 frames in a row once the splat is loaded and sorted), each of ``--repeats`` fresh
  tabs and their median, on the page's clock (``performance.now()``, which
  starts at navigation) and on ours (from the navigate command to the ready
  promise); the median's steps (modules, files, splat parsed, sorted);
* PSNR of the viewer's image against the project's rasteriser
  (:func:`train.exports.render_splat`, CPU) for that camera: the whole image
  and the subject (pixels where our render's alpha is over 0.5);
* the requests: how many, and that each came from 127.0.0.1 for a file of the
  bundle. Target (the issue): ready in <= 10 s on 2 cores.

Without the demo twin (``make demo`` makes it) a synthetic person-sized cloud
of ``--gaussians`` Gaussians and one 1280x960 camera 3 m away stand in.

Usage: python benchmarks/viewer.py [--splat PLY --cameras JSON --camera ID] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "out" / "demo" / "session"
BACKGROUND = (0.85, 0.85, 0.85)


def line(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:<44} {value:>10.2f} {unit:<5} {note}", flush=True)


def synthetic(folder: Path, n: int) -> tuple[Path, Path, str]:
    """A person-sized cloud of ``n`` Gaussians (1.8 m tall, studio frame, z up) and one camera 3 m away."""
    from rigs.geometry import Camera, Intrinsics, Pose
    from reconstruct.inputs import write_cameras
    from train.splat_ply import SplatParams, write_splat_ply

    rng = np.random.default_rng(0)
    u = rng.uniform(0, 2 * np.pi, n)
    z = rng.uniform(0.0, 1.8, n)
    r = 0.12 + 0.1 * np.sin(np.pi * z / 1.8)
    means = np.stack([r * np.cos(u), 0.6 * r * np.sin(u), z], axis=1)
    ply = write_splat_ply(folder / "splat.ply", SplatParams(
        means=means, log_scales=np.log(rng.uniform(0.004, 0.012, (n, 3))), quats=rng.normal(size=(n, 4)),
        opacity_logits=rng.normal(1.0, 1.0, n), sh_dc=rng.normal(0, 0.8, (n, 3)), sh_rest=np.zeros((n, 0, 3))))
    # looking along +y from y = -3 m at 0.9 m height: x_cam = x, y_cam = -z, z_cam = y
    R = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    cam = Camera("synthetic", Intrinsics(1280, 960, 1100.0, 1100.0, 639.5, 479.5, (0.0,) * 5),
                 Pose(R, -R @ np.array([0.0, -3.0, 0.9])))
    return ply, write_cameras(folder / "cameras.json", [cam], method="synthetic"), cam.id


def bundle_folder(root: Path, ply: Path, cameras: Path, holdout: list[str]) -> Path:
    """What the viewer reads, laid out as in a handoff bundle."""
    from train.handoff.viewer import write_viewer

    b = root / "bundle"
    write_viewer(b / "viewer")
    (b / "splat").mkdir(parents=True)
    shutil.copy(ply, b / "splat" / "splat.ply")
    (b / "cameras").mkdir()
    shutil.copy(cameras, b / "cameras" / "cameras.json")
    (b / "cameras" / "transforms.json").write_text(json.dumps({"twinstudio": {"holdout": holdout}}))
    (b / "MANIFEST.json").write_text(json.dumps({"subject": {"id": "benchmark"},
                                                 "ai_disclosure": {"label": "AI-generated digital twin"}}))
    return b


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    mse = float(np.mean((d if where is None else d[where]) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splat", type=Path, default=DEMO / "train" / "twin" / "splat.ply")
    ap.add_argument("--cameras", type=Path, default=DEMO / "recon" / "cameras.json")
    ap.add_argument("--camera", default=None, help="camera id (default: the demo's first held-out camera)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gaussians", type=int, default=62_000, help="synthetic cloud's size (no demo twin)")
    args = ap.parse_args(argv[1:])

    from rigs.geometry import Camera
    from tests.browser import Browser, data_url_png, find_chromium
    from train.exports import render_splat
    from train.splat_ply import read_splat_ply

    if find_chromium() is None:
        print("Chromium is not installed (Debian: apt-get install chromium)")
        return 1
    with tempfile.TemporaryDirectory(prefix="twinstudio-viewer-bench-") as tmp:
        tmp = Path(tmp)
        if args.splat.is_file() and args.cameras.is_file():
            ply, cameras, cam_id = args.splat, args.cameras, args.camera
            source = str(ply.relative_to(ROOT) if ply.is_relative_to(ROOT) else ply)
            ds = args.splat.parents[1] / "dataset" / "transforms.json"
            held = json.loads(ds.read_text())["twinstudio"]["holdout"] if ds.is_file() else []
            if cam_id is None:
                cam_id = held[0] if held else json.loads(cameras.read_text())["cameras"][0]["id"]
        else:
            ply, cameras, cam_id = synthetic(tmp, args.gaussians)
            held = [cam_id]
            source = f"synthetic (no {args.splat})"
        doc = json.loads(cameras.read_text())
        cam = Camera.from_dict(next(c for c in doc["cameras"] if c["id"] == cam_id))
        w, h = cam.intrinsics.width, cam.intrinsics.height
        bundle = bundle_folder(tmp / "served", ply, cameras, held)
        params = read_splat_ply(bundle / "splat" / "splat.ply")
        print(f"splat {source}: {params.means.shape[0]} Gaussians, SH degree {params.sh_degree}; "
              f"camera {cam_id} {w}x{h}")

        runs = []
        with Browser(bundle.parent, width=w, height=h) as browser:
            print(f"{browser.version}, network namespace with {browser.interfaces} only")
            url = f"{browser.server.url}/bundle/viewer/index.html?camera={cam_id}&background=0.85,0.85,0.85"
            for i in range(args.repeats):
                page = browser.page()
                t0 = time.perf_counter()
                page.navigate(url, timeout=60)
                info = page.evaluate("twinViewer.ready.then(v => ({frames: v.frames, splats: v.splats, "
                                     "readyMs: v.readyMs, timings: v.timings}))", timeout=120)
                wall = time.perf_counter() - t0
                if i == args.repeats - 1:
                    got = data_url_png(page.evaluate("twinViewer.snapshot()"))
                    tried = page.requests
                page.close()
                runs.append((info["readyMs"] / 1e3, wall, info))
                line(f"ready, tab {i + 1} (page clock / ours)", info["readyMs"] / 1e3, "s",
                     f"{wall:.2f} s; {info['frames']} frames; {info['splats']} Gaussians")
            log = list(browser.server.log)
            base = browser.server.url

        page_s = statistics.median(r[0] for r in runs)
        wall_s = statistics.median(r[1] for r in runs)
        med = sorted(runs, key=lambda r: r[0])[len(runs) // 2][2]["timings"]
        line("ready, median of tabs (page clock)", page_s, "s", "target <= 10 s")
        line("ready, median of tabs (navigate to ready)", wall_s, "s")
        print("  median tab's steps (s since navigation): " +
              ", ".join(f"{k} {v / 1e3:.2f}" for k, v in med.items()), flush=True)

        i = cam.intrinsics
        K = np.array([[i.fx, 0, i.cx + 0.5], [0, i.fy, i.cy + 0.5], [0, 0, 1]])
        t0 = time.perf_counter()
        ref = render_splat(params, cam.pose.matrix, K, w, h, background=BACKGROUND)
        cpu_s = time.perf_counter() - t0
        alpha = 1.0 - (render_splat(params, cam.pose.matrix, K, w, h, background=(1.0, 1.0, 1.0))
                       - render_splat(params, cam.pose.matrix, K, w, h, background=(0.0, 0.0, 0.0))).mean(axis=2)
        ref8 = np.round(ref * 255).astype(np.uint8)
        subject = alpha > 0.5
        line("parity PSNR, whole image", psnr(got, ref8), "dB", f"vs train.exports.render_splat ({cpu_s:.1f} s)")
        line("parity PSNR, subject (alpha > 0.5)", psnr(got, ref8, subject), "dB",
             f"{int(subject.sum())} px, {subject.mean():.1%} of the image")
        off = [u for u in tried if not u.startswith((f"{base}/bundle/", f"blob:{base}/", "data:"))]
        ok = all(r.client == "127.0.0.1" and r.status == 200 and r.path.startswith("/bundle/") for r in log)
        print(f"requests: {len(log)} served, all from 127.0.0.1 for bundle files: {ok}; "
              f"page URLs outside the bundle: {len(off)}", flush=True)
        return 0 if ok and not off else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
