"""Prepare the GPU comparison's dataset: virtual-ring-24 stills at 640x480, small enough to carry.

    .venv/bin/python benchmarks/train_gpu_prep.py [ROOT] [--out .data/ring24]

Exports ROOT (default: out/demo/session, or the render benchmarks/train_cpu.py
prepares) as a nerfstudio dataset, then writes a copy whose full-resolution
images are the 1/2 images (intrinsics scaled the nerfstudio way: pixel-centre
coordinates times 1/2), so twin-splat and stock splatfacto both read it with
downscale factor 1 and nothing else to set. benchmarks/train_gpu.sh runs on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def halve(src: Path, dst: Path) -> int:
    doc = json.loads((src / "transforms.json").read_text())
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    for f in doc["frames"]:
        img, mask = Path(f["file_path"]).name, Path(f["mask_path"]).name
        shutil.copy(src / "images_2" / img, dst / "images" / img)
        shutil.copy(src / "masks_2" / mask, dst / "masks" / mask)
        for k in ("fl_x", "fl_y", "cx", "cy"):  # cx, cy are already in pixel-centre (+0.5) coordinates
            f[k] = f[k] / 2
        f["w"], f["h"] = f["w"] // 2, f["h"] // 2
    doc["twinstudio"]["downscales"] = []
    shutil.copy(src / "sparse_pc.ply", dst / "sparse_pc.ply")
    (dst / "transforms.json").write_text(json.dumps(doc, indent=1))
    return len(doc["frames"])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", type=Path)
    ap.add_argument("--out", type=Path, default=Path(".data/ring24"))
    args = ap.parse_args(argv[1:])
    import importlib.util

    from train.dataset import export_dataset

    spec = importlib.util.spec_from_file_location("train_cpu", Path(__file__).with_name("train_cpu.py"))
    train_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cpu)
    ex = export_dataset(train_cpu.ready_root(args.root))
    n = halve(ex.out_dir, args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"frames {n}")
    print(f"dataset {args.out} {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
