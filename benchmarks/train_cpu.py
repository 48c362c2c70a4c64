"""The twin's CPU preview: speed, memory and held-out quality on virtual-ring-24.

    .venv/bin/python benchmarks/train_cpu.py [ROOT] [--iterations N] [--downscale D]

ROOT is a session or virtual render folder with ``recon/cameras.json``,
``recon/masks`` and a mesh (default: ``out/demo/session`` after ``make demo``).
Without one, the clean plates and the stills take are rendered into
/tmp/twinstudio-train-bench and prepared from the studio's exact cameras,
keyed masks and the ground-truth mesh as seed surface. Prints one line per
figure, the likeness first (issue 14's targets beside them): on the held-out
cameras at half the cameras' resolution, the subject's PSNR and SSIM, its
colour cast (mean CIEDE2000), the green rim of twin and truth, each likeness
mark's SSIM and PSNR, per lighting preset; then export seconds, iterations/s,
training seconds (target <= 180 s on 2 cores), whole-run seconds, Gaussians,
whole-crop PSNR and SSIM, peak RSS, and how closely the exported PLY
re-renders the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TAKE = "stills-002"  # after the clean plates (plates-001)


def prepare(root: Path) -> Path:
    """Render the clean plates and the stills take; give it recon/cameras.json, recon/masks and a seed mesh."""
    from reconstruct.inputs import GroundTruth, take_images, write_cameras
    from reconstruct.masks import run_masks
    from rigs.virtual.render import RenderOptions, run_render

    if not (root / "render.json").is_file():
        t = time.perf_counter()
        run_render("virtual-ring-24", root, RenderOptions(takes=("plates", "stills")))
        print(f"render_seconds {time.perf_counter() - t:.1f}")
    gt = GroundTruth.find(root)
    write_cameras(root / "recon" / "cameras.json", gt.cameras().values(), method="ground-truth")
    images = [p for frames in take_images(root, TAKE).values() for p in frames.values()]
    run_masks(images, root / "recon" / "masks", root=root / "takes")
    mesh = root / "recon" / "mesh" / TAKE / "mesh.ply"
    mesh.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(gt.mesh_path(TAKE, 0), mesh)
    return root


def ready_root(root: Path | None) -> Path:
    """``root``, or the demo session, or the benchmark render (prepared when missing)."""
    if root is None:
        demo = Path("out/demo/session")
        root = demo if (demo / "recon" / "cameras.json").is_file() else Path(tempfile.gettempdir()) / \
            "twinstudio-train-bench"
    if not (root / "recon" / "cameras.json").is_file():
        prepare(root)
    return root


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", type=Path)
    ap.add_argument("--iterations", type=int, default=None, help="default: the CPU preview's (train.runner)")
    ap.add_argument("--downscale", type=int, default=None, help="default: the CPU preview's (train.runner)")
    ap.add_argument("--sh-degree", type=int, default=None, help="default: the CPU preview's (train.runner)")
    ap.add_argument("--geometry-lr-scale", type=float, default=None, help="default: the CPU preview's (train.runner)")
    ap.add_argument("--colour-lr-scale", type=float, default=None, help="default: the CPU preview's (train.runner)")
    ap.add_argument("--settle", type=float, default=None, help="default: the CPU preview's (train.runner)")
    ap.add_argument("--settle-shape", action="store_true", help="decay the scales' and rotations' rates too")
    ap.add_argument("--reuse-dataset", action="store_true",
                    help="train on the dataset already exported under ROOT/train/dataset (for comparing settings)")
    ap.add_argument("--run", default="bench-cpu", help="run folder under ROOT/train (default: bench-cpu)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a twin-splat model setting (repeatable), e.g. --set densify_grad_thresh=0.0001")
    args = ap.parse_args(argv[1:])
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = json.loads(value) if value not in ("", "None") else None
    from train.dataset import export_dataset
    from train.runner import TrainOptions, run_training

    root = ready_root(args.root)
    t = time.perf_counter()
    if args.reuse_dataset and (root / "train" / "dataset" / "transforms.json").is_file():
        print("export_seconds - (--reuse-dataset: the dataset already under ROOT/train/dataset)")
    else:
        ex = export_dataset(root)
        print(f"export_seconds {time.perf_counter() - t:.1f}")
        print(f"frames {ex.frames} (held out: {', '.join(ex.holdout_cameras)})")
    t = time.perf_counter()
    r = run_training(root, TrainOptions(device="cpu", iterations=args.iterations, downscale=args.downscale,
                                        sh_degree=args.sh_degree, geometry_lr_scale=args.geometry_lr_scale,
                                        settle=args.settle, settle_shape=args.settle_shape,
                                        colour_lr_scale=args.colour_lr_scale,
                                        run=args.run, resume=False,
                                        model_overrides=overrides))
    total = time.perf_counter() - t
    m = r.metrics
    ev = m["eval"]
    # the figures that could embarrass us first: does the twin look like the person?
    print(f"resolution {ev['resolution']['text']}")
    print(f"heldout_subject_psnr_db {ev['psnr_subject']:.2f}   (target >= 27)")
    print(f"heldout_subject_ssim {ev['ssim_subject']:.4f}   (target >= 0.90)")
    print(f"heldout_subject_delta_e00 {ev['delta_e']:.2f}   (target <= 3)")
    print(f"heldout_green_rim_levels twin {255 * ev['rim_excess_render']:.2f} truth {255 * ev['rim_excess_gt']:.2f}")
    for mark, mk in ev["marks"].items():
        if mark == "undefined":
            print(f"marks - ({mk})")
        elif mk.get("views"):
            print(f"mark_ssim[{mark}] {mk['ssim']:.4f} (worst {mk['ssim_min']:.4f}, {mk['views']} views; "
                  f"target >= 0.80) psnr {mk['psnr']:.2f}")
        else:
            print(f"mark_ssim[{mark}] - ({mk.get('undefined')})")
    for name, p in ev["per_lighting"].items():
        print(f"heldout_subject_psnr_db[{name}] {p['psnr_subject']:.2f} ssim {p['ssim_subject']:.4f}")
    print(f"image_size {m['image_size'][0]}x{m['image_size'][1]} (median crop)")
    print(f"iterations {m['iterations']}")
    print(f"iterations_per_s {m['iterations_per_s']:.2f}")
    print(f"train_seconds {m['train_s']:.1f}   (target <= 180 on 2 cores)")
    print(f"run_seconds {total:.1f} (setup, training, evaluation, PLY, 36-frame turntable)")
    print(f"gaussians {m['gaussians']}")
    print(f"heldout_psnr_db {ev['psnr']:.2f} (whole crop, subject and margin)")
    print(f"heldout_ssim {ev['ssim']:.4f}")
    print(f"peak_rss_mb {m['peak_rss_mb']:.0f}")
    print(f"ply_rerender_psnr_db {m['exports']['ply_check']['psnr_vs_model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
