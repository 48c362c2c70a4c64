"""Score every checkpoint of the GPU comparison on the held-out cameras (run by benchmarks/train_gpu.sh).

    python3 benchmarks/train_gpu_eval.py RUNS/ring24 RESULTS

Both methods are scored the same way, whatever their own metrics do, and as
train.evaluate scores the CPU preview: the ground truth (the export's unmixed
subject) is composited with its alpha onto the render's background (``psnr``),
and the subject is scored alone (``psnr_subject``, ``ssim_subject``, colour
cast ``delta_e``, green rim) through train.likeness.
Prints per method and checkpoint the mean figures, then the minutes to reach
30 dB (training wall time from RESULTS/summary.txt, pro rata to the step).
Runs on the GPU machine with only nerfstudio's dependencies (no twinstudio set-up).
Runs are read without running code from them (no TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD):
config.yml through train.config.read_run_config, checkpoints through
train.config.load_checkpoint (weights_only=True).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch

# the plugin's packages come from the repository (benchmarks/reconstruct.py would shadow reconstruct/)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score(pipeline) -> dict:
    """Mean held-out figures, as train.evaluate scores them: the ground truth composited with its alpha
    (the unmixed subject's, or the mask) onto the render's background; the subject's figures from
    train.likeness (PSNR, SSIM, CIEDE2000, green rim)."""
    from train.likeness import subject_figures

    dm, model = pipeline.datamanager, pipeline.model
    rows = []
    for i in range(len(dm.eval_dataset)):
        cam = dm.eval_dataset.cameras[i: i + 1].to(model.device)
        data = dm.cached_eval[i]
        with torch.no_grad():
            out = model.get_outputs_for_camera(cam)
        pred = out["rgb"]
        img = data["image"].to(model.device)
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img
        gt = img[..., :3]
        mask = img[..., 3:4] if img.shape[-1] == 4 else data["mask"].to(model.device).float()
        bg = out["background"]
        gt_c = gt * mask + bg * (1 - mask)
        fig = subject_figures(gt_c.cpu().numpy(), pred.cpu().numpy(), mask[..., 0].cpu().numpy())
        fig["psnr"] = float(-10 * torch.log10(((gt_c - pred) ** 2).mean()))
        rows.append(fig)
    keys = ("psnr", "psnr_subject", "ssim_subject", "delta_e", "rim_excess_render")
    return {**{k: sum(r[k] for r in rows if r[k] is not None) / max(sum(r[k] is not None for r in rows), 1)
               for k in keys}, "images": len(rows)}


def load(cfg_path: Path, step: int):
    """nerfstudio's eval_setup at a checkpoint, with the run read by train.config's safe readers."""
    from nerfstudio.configs.method_configs import all_methods

    from train.config import load_checkpoint, read_run_config

    config = read_run_config(cfg_path)
    config.pipeline.datamanager._target = all_methods[config.method_name].pipeline.datamanager._target
    config.load_dir = config.get_checkpoint_dir()
    state = load_checkpoint(config.load_dir / f"step-{step:09d}.ckpt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = config.pipeline.setup(device=device, test_mode="test")
    pipeline.eval()
    pipeline.load_pipeline(state["pipeline"], state["step"])
    return pipeline


def main(argv: list[str]) -> int:
    runs, results = Path(argv[1]), Path(argv[2])
    walls = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in re.finditer(
        r"^(\S+) train_wall_s ([\d.]+) iterations (\d+)", (results / "summary.txt").read_text(), re.M)}
    report = {}
    for method_dir in sorted(p for p in runs.iterdir() if (p / "run" / "config.yml").is_file()):
        method = method_dir.name
        cfg_path = method_dir / "run" / "config.yml"
        steps = sorted(int(p.stem.split("-")[1]) for p in (method_dir / "run" / "nerfstudio_models").glob("*.ckpt"))
        rows = []
        for step in steps:
            pipeline = load(cfg_path, step)
            s = score(pipeline)
            s["step"] = step
            s["gaussians"] = int(pipeline.model.num_points)
            rows.append(s)
            print(f"{method} step {step} heldout_psnr_db {s['psnr']:.2f} heldout_psnr_subject_db "
                  f"{s['psnr_subject']:.2f} ssim_subject {s['ssim_subject']:.4f} delta_e {s['delta_e']:.2f} "
                  f"gaussians {s['gaussians']}", flush=True)
            del pipeline
            torch.cuda.empty_cache()
        wall, iters = walls.get(method, (math.nan, 1))
        hit = next((r["step"] for r in rows if r["psnr"] >= 30.0), None)
        minutes = wall / iters * hit / 60 if hit is not None else None
        report[method] = {"checkpoints": rows, "train_wall_s": wall, "iterations": iters,
                          "iterations_per_s": iters / wall if wall else None, "minutes_to_30db": minutes}
        print(f"{method} iterations_per_s {iters / wall:.1f} minutes_to_30db "
              f"{'not reached' if minutes is None else f'{minutes:.2f}'}")
    (results / "eval.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
