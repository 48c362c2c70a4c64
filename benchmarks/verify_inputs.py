"""What verifying a stage's input frames costs, next to the stage itself (target: at most 10 %).

Renders (once, cached in --render) virtual-ring-24 at its full 1280x960: a
calibration take (24 board poses), the stills take (8 lighting steps) and 8
motion frames, then runs each reconstruction stage the way the pipeline does
and prints, one figure per line, the time spent verifying the frames it reads
(sha256 against the render's manifest, as a session's frames are checked
against ``session.json``), the time of the stage, and their ratio:

* calibration, masks, mesh (frame 0, no scoring), motion: frames checked
  against the manifest's sha256;
* SfM on a folder of photos (8 cameras, no manifest): every photo decoded by
  Pillow first (a truncated file or a decoder warning is corruption).

The verification time is part of each stage's measured time; the ratio is
verification / (stage - verification), the overhead it adds.

Usage: python benchmarks/verify_inputs.py [--render DIR] [--only calibration,masks,mesh,motion,sfm]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RIG = "virtual-ring-24"
PARTS = ("calibration", "masks", "mesh", "motion", "sfm")
POSES = 24
MOTION_FRAMES = 8


def line(name: str, value: float, unit: str = "", target: str = "") -> None:
    print(f"{name:<52} {value:>12.4f} {unit:<4} {('target ' + target) if target else ''}", flush=True)


def figures(stage: str, verify_s: float, stage_s: float, images: int) -> None:
    line(f"{stage}: verification time ({images} images)", verify_s, "s")
    line(f"{stage}: stage time (verification included)", stage_s, "s")
    line(f"{stage}: verification / rest of the stage", 100 * verify_s / max(stage_s - verify_s, 1e-9), "%",
         "<= 10 %")


def ensure_render(render: Path) -> Path:
    from rigs.rigfile import resolve_rig_path
    from rigs.virtual.render import RenderOptions, run_render

    if (render / "render.json").is_file():
        return render
    render.mkdir(parents=True, exist_ok=True)
    rig = render.parent / f"{render.name}-rig.toml"
    rig.write_text(resolve_rig_path(RIG).read_text().replace("poses = 96", f"poses = {POSES}"))
    t0 = time.perf_counter()
    res = run_render(rig, render, RenderOptions(takes=("calibration", "stills", "motion"), frames=MOTION_FRAMES))
    print(f"# rendered {res.images} images (1280x960) into {render} in {time.perf_counter() - t0:.0f} s", flush=True)
    return render


def bench_calibration(render: Path, out: Path) -> None:
    from reconstruct.calibrate import CalibrationOptions, run_calibrate

    t0 = time.perf_counter()
    res = run_calibrate(render, CalibrationOptions(), out_dir=out / "calib")
    total = time.perf_counter() - t0
    n = sum(cc.views for cc in res.cameras.values())
    print(f"# calibration: {len(res.cameras)} cameras, {res.views} board poses, {n} board views", flush=True)
    figures("calibration", res.verify_seconds, total, _count(render, res.take))


def bench_masks(render: Path, out: Path) -> None:
    from reconstruct.inputs import find_take, verified_images
    from reconstruct.masks import MaskOptions, run_masks
    from rigs.rigfile import load_rig

    take = find_take(render, "stills")
    t0 = time.perf_counter()
    checked = verified_images(render, take)
    images = [p for fr in checked.images.values() for p in fr.values()]
    run_masks(images, out / "masks", MaskOptions.for_rig(load_rig(render / "rig.toml")), root=render / "takes" / take)
    figures("masks", checked.seconds, time.perf_counter() - t0, len(images))


def bench_mesh(render: Path, out: Path) -> None:
    from reconstruct.inputs import find_take
    from reconstruct.mesh import run_mesh

    take = find_take(render, "stills")
    t0 = time.perf_counter()
    rep = run_mesh(render, render / "gt" / "cameras.json", out / "mesh", take=take, score_points=0)
    total = time.perf_counter() - t0
    import json

    doc = json.loads(rep.manifest_path.read_text())
    figures("mesh (frame 0)", doc["verify_seconds"], total, len(rep.cameras))


def bench_motion(render: Path, out: Path) -> None:
    from reconstruct.motion import run_motion

    t0 = time.perf_counter()
    rep = run_motion(render, render / "gt" / "cameras.json", out / "motion")
    total = time.perf_counter() - t0
    print(f"# motion: {rep.points.shape[1]} tracks over {len(rep.frames)} frames", flush=True)
    figures("motion", rep.verify_seconds, total, len(rep.frames) * len(rep.cameras_used))


def bench_sfm(render: Path, out: Path) -> None:
    from reconstruct.inputs import find_take
    from reconstruct.sfm import SfmOptions, run_sfm
    from rigs.rigfile import resolve_rig_path

    take = find_take(render, "stills")
    photos = out / "photos"
    photos.mkdir()
    for cam in ("cam01", "cam02", "cam03", "cam09", "cam10", "cam11", "cam17", "cam18"):
        shutil.copyfile(render / "takes" / take / cam / "000000.jpg", photos / f"{cam}.jpg")
    t0 = time.perf_counter()
    try:
        res = run_sfm(photos, out / "sfm", SfmOptions(), rig_path=resolve_rig_path(RIG))
    except Exception as e:  # noqa: BLE001 - the figure is the verification's cost, whatever SfM made of 8 photos
        print(f"# sfm: {e}", flush=True)
        return
    total = time.perf_counter() - t0
    print(f"# sfm: {len(res.registered)} of 8 photos registered", flush=True)
    figures("sfm (photo folder, decoded)", res.verify_seconds, total, 8)


def _count(render: Path, take: str) -> int:
    return sum(1 for _ in (render / "takes" / take).glob("*/*.jpg"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", type=Path, help="render folder to use or create (default: a temporary one)")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS))
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        render = ensure_render(args.render or Path(tmp) / "render")
        for part in parts:
            out = Path(tmp) / f"out-{part}"
            out.mkdir()
            {"calibration": bench_calibration, "masks": bench_masks, "mesh": bench_mesh,
             "motion": bench_motion, "sfm": bench_sfm}[part](render, out)


if __name__ == "__main__":
    main()
