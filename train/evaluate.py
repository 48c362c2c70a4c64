"""Evaluate a trained twin on the cameras it never saw: PSNR, SSIM (LPIPS where available), per lighting preset.

Ground truth and render are both composited onto the same background with the
subject mask as alpha, so the figure measures the person, not the backdrop the
twin was never meant to learn. A few side-by-side images (ground truth |
render | error) are written to ``<run>/eval/`` for people to look at.

A figure that is undefined (LPIPS without its weights, a PSNR of identical
images) is None in ``eval.json``, with the reason under ``undefined``, never NaN.
Re-evaluating a run (:func:`reevaluate_run`) reads the session's held-out
images, so it asks the consent gate for ``train`` first, and reads the run
folder without running code (:func:`train.config.read_run_config`,
:func:`train.config.load_checkpoint`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rigs.fileio import atomic_write_bytes, atomic_write_json
from rigs.pngio import encode_png
from train.dataset import TrainError, finite_or_none, json_safe, read_dataset
from train.likeness import subject_figures


def evaluate_pipeline(pipeline, run_dir: Path | str, *, side_by_side: int = 4,
                      on_event: Callable[[dict], None] | None = None) -> dict:
    """Score every held-out image; writes ``<run>/eval/eval.json`` and side-by-side PNGs; returns the summary.

    The images are the subject's: the consent of the session the pipeline's dataset came from must
    allow ``train`` today (checked before anything is written).
    """
    import torch

    from train.dataset import require_dataset_consent

    dm = pipeline.datamanager
    doc = read_dataset(dm.config.dataparser.data)
    require_dataset_consent(doc)
    emit = on_event or (lambda ev: None)
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    model = pipeline.model
    dataset = dm.eval_dataset
    cached = dm.cached_eval
    names = [Path(p).stem for p in dataset.image_filenames]
    was_training = model.training
    model.eval()
    rows = []
    shown: set[str] = set()
    marks_shown: set[str] = set()
    truth = _LikenessTruth(doc)
    try:
        for i in range(len(dataset)):
            emit({"event": "progress", "stage": "evaluate", "done": i, "total": len(dataset)})
            camera = dataset.cameras[i: i + 1].to(model.device)
            batch = {k: (v.to(model.device) if torch.is_tensor(v) else v) for k, v in cached[i].items()}
            with torch.no_grad():
                outputs = model.get_outputs_for_camera(camera)
                metrics, images = model.get_image_metrics_and_images(outputs, batch)
            lighting = model.lighting_of(camera)
            cam = names[i].split("_")[0]
            row = {"image": names[i], "camera": cam, "lighting": model.presets[lighting],
                   **{k: _figure(v) for k, v in metrics.items()}}
            gt, pred = (images[k].detach().cpu().numpy().astype(np.float64) for k in ("gt", "rgb"))
            if "alpha" in images:
                alpha = images["alpha"].detach().cpu().numpy()
                row.update({k: (_figure(v) if isinstance(v, float) else v)
                            for k, v in subject_figures(gt, pred, alpha).items()})
            save = out / "marks" / names[i] if cam not in marks_shown else None
            marks = truth.marks(names[i], dataset.cameras[i], gt, pred, save)
            if marks is not None:
                row["marks"] = marks
                if any(m.get("visible") for m in marks.values()):
                    marks_shown.add(cam)
            rows.append(row)
            if len(shown) < side_by_side and cam not in shown:
                shown.add(cam)
                row["side_by_side"] = _write_side_by_side(out / f"{names[i]}.png", images["img"], row)
    finally:
        model.train(was_training)
    emit({"event": "progress", "stage": "evaluate", "done": len(dataset), "total": len(dataset)})
    summary = {"images": len(rows), "cameras": sorted({r["camera"] for r in rows}),
               "resolution": _resolution(dm, dataset, truth.doc),
               **_means(rows), "marks": _mark_summary(rows, truth.why_not), "per_lighting": {}, "per_camera": {}}
    by_l, by_c = defaultdict(list), defaultdict(list)
    for r in rows:
        by_l[r["lighting"]].append(r)
        by_c[r["camera"]].append(r)
    summary["per_lighting"] = {k: {"images": len(v), **_means(v)} for k, v in by_l.items()}
    summary["per_camera"] = {k: {"images": len(v), **_means(v)} for k, v in sorted(by_c.items())}
    summary["side_by_side"] = [r["side_by_side"] for r in rows if "side_by_side" in r]
    undefined = _why_undefined(summary, rows, model)
    if undefined:
        summary["undefined"] = undefined
    summary = json_safe(summary)
    atomic_write_json(out / "eval.json", json_safe({"summary": summary, "images": rows}))
    return summary


def _figure(v) -> float | None:
    """A metric as a rounded float, None when undefined (NaN: not computed; inf: identical images)."""
    f = finite_or_none(v)
    return None if f is None else round(f, 5)


def _why_undefined(summary: dict, rows: list[dict], model) -> dict[str, str]:
    """Why each of the summary's figures that is None is so (the files hold None, never NaN)."""
    why = {}
    for key in MEAN_KEYS:
        if summary.get(key) is not None:
            continue
        if not rows:
            why[key] = "no held-out image to evaluate"
        elif key == "lpips" and not getattr(getattr(model, "lpips", None), "available", True):
            why[key] = "not computed: LPIPS's AlexNet weights are not on this machine (never downloaded)"
        else:
            why[key] = "undefined on every held-out image (not computed, or identical images)"
    return why


#: the figures averaged over images, in the order the report shows them (the subject's first)
MEAN_KEYS = ("psnr_subject", "ssim_subject", "delta_e", "rim_excess_render", "rim_excess_gt", "psnr", "ssim",
             "lpips")


def _means(rows: list[dict]) -> dict:
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if finite_or_none(r.get(key)) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    return {k: mean(k) for k in MEAN_KEYS}


def _mark_summary(rows: list[dict], why_not: str | None) -> dict:
    """Per likeness mark: the views it was seen in, mean and worst SSIM, mean PSNR, its side by sides."""
    from train.likeness import MARKS

    if why_not is not None:
        return {"undefined": why_not}
    out = {}
    for mark in MARKS:
        seen = [r["marks"][mark] for r in rows if r.get("marks", {}).get(mark, {}).get("visible")]
        ssim = [m["ssim"] for m in seen if m.get("ssim") is not None]
        psnr = [m["psnr"] for m in seen if m.get("psnr") is not None]
        out[mark] = {"views": len(seen),
                     "ssim": round(float(np.mean(ssim)), 4) if ssim else None,
                     "ssim_min": round(float(np.min(ssim)), 4) if ssim else None,
                     "psnr": round(float(np.mean(psnr)), 3) if psnr else None,
                     "side_by_side": [m["side_by_side"] for m in seen if "side_by_side" in m]}
        if not seen:
            out[mark]["undefined"] = "not visible in any held-out image"
    return out


def _resolution(dm, dataset, doc: dict) -> dict:
    """What the figures were measured on: the evaluated images' sizes and the cameras' full size."""
    w = [int(x) for x in dataset.cameras.width.flatten().tolist()]
    h = [int(x) for x in dataset.cameras.height.flatten().tolist()]
    full = sorted({tuple(f["source_size"]) for f in doc["frames"] if "source_size" in f}
                  or {(int(f["w"]), int(f["h"])) for f in doc["frames"]})
    d = int(dm.config.dataparser.downscale_factor or 1)
    crops = bool(doc["twinstudio"].get("cropped"))
    return {"downscale": d, "cameras": [list(s) for s in full], "cropped": crops,
            "median_image": [int(np.median(w)) if w else 0, int(np.median(h)) if h else 0],
            "text": (f"1/{d} of the cameras' {'/'.join(f'{a}x{b}' for a, b in full)}"
                     + (f", subject crops (median {int(np.median(w)) if w else 0}x{int(np.median(h)) if h else 0} px)"
                        if crops else ""))}


class _LikenessTruth:
    """The virtual studio's ground truth for the likeness marks of a dataset's held-out images."""

    def __init__(self, doc: dict) -> None:
        from reconstruct.inputs import GroundTruth

        self.doc = doc
        self.frames = {Path(f["file_path"]).stem: f for f in doc["frames"]}
        src = doc["twinstudio"].get("source")
        self.gt = GroundTruth.find(src) if src and Path(src).is_dir() else None
        self.why_not = None if self.gt is not None else ("no ground-truth landmarks: not a virtual-studio "
                                                         "capture (or its ground truth is gone)")
        self._landmarks: dict[tuple[str, int], dict] = {}
        self._cameras = self.gt.cameras() if self.gt is not None else {}

    def marks(self, name: str, camera, gt: np.ndarray, pred: np.ndarray, save: Path | None) -> dict | None:
        """Each mark's figures in one held-out image, or None without ground truth."""
        import cv2

        from rigs.virtual.render import depth_from_png
        from train.likeness import mark_views, score_marks
        from train.method import _viewmat

        f = self.frames.get(name)
        if self.gt is None or f is None or f["camera"] not in self._cameras:
            return None
        key = (f["take"], int(f["frame"]))
        if key not in self._landmarks:
            entry = next((e for e in self.gt.frames(f["take"])["frames"] if e["index"] == key[1]), {})
            self._landmarks[key] = entry.get("landmarks") or {}
        depth_png = self.gt.take_dir(f["take"]) / f["camera"] / f"{int(f['frame']):06d}.depth.png"
        raw = cv2.imread(str(depth_png), cv2.IMREAD_UNCHANGED) if depth_png.is_file() else None
        if raw is None or not self._landmarks[key]:
            return None
        K = camera.get_intrinsics_matrices().reshape(3, 3).cpu().numpy().astype(np.float64)
        viewmat = _viewmat(camera.camera_to_worlds.reshape(1, 3, 4).cpu())[0].numpy().astype(np.float64)
        views = mark_views(self._landmarks[key], self._cameras[f["camera"]], depth_from_png(raw), K, viewmat,
                           gt.shape[1], gt.shape[0])
        return score_marks(gt, pred, views, save_prefix=save)


def _write_side_by_side(path: Path, img, row: dict) -> str:
    """``img`` is [H, 3W, 3] in [0, 1] (ground truth | render | error); labels are drawn on top."""
    import cv2

    a = np.ascontiguousarray((img.detach().cpu().numpy().clip(0, 1) * 255).round().astype(np.uint8))  # RGB
    h, w3 = a.shape[:2]
    if h < 240:  # small previews: enlarge so the labels stay legible
        s = int(math.ceil(240 / h))
        a = cv2.resize(a, (w3 * s, h * s), interpolation=cv2.INTER_NEAREST)
        h, w3 = a.shape[:2]
    w = w3 // 3
    scale = max(h / 600, 0.4)
    psnr = f"{row['psnr']:.1f} dB" if row.get("psnr") is not None else "PSNR undefined"
    for k, text in enumerate(("ground truth", f"render  {psnr}", "error")):
        org = (k * w + 8, int(24 * scale) + 8)
        cv2.putText(a, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(int(4 * scale), 2), cv2.LINE_AA)
        cv2.putText(a, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(int(2 * scale), 1),
                    cv2.LINE_AA)
    atomic_write_bytes(path, encode_png(a), fsync=False)
    return path.name



def load_run(run_dir: Path | str, device: str = "auto", *, config=None):
    """A trained run's nerfstudio pipeline (config.yml + latest checkpoint), ready to render; -> (config, pipeline).

    Runs no code from the folder: the config is read by :func:`train.config.read_run_config` (unless
    ``config`` is that, already read) and the checkpoint by :func:`train.config.load_checkpoint`
    (``weights_only=True``), both before the pipeline (and its dataset) is set up; a crafted file
    raises TrainError (exit 2).
    """
    from train.config import load_checkpoint, read_run_config
    from train.runner import latest_checkpoint, resolve_device

    run_dir = Path(run_dir)
    cfg = config if config is not None else read_run_config(run_dir / "config.yml")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise TrainError(f"{run_dir / 'nerfstudio_models'}: no checkpoint to evaluate", path=str(run_dir))
    state = load_checkpoint(ckpt)
    dev = resolve_device(device)
    cfg.machine.device_type = dev
    pipeline = cfg.pipeline.setup(device=dev, test_mode="val")
    pipeline.load_pipeline(state["pipeline"], state["step"])
    pipeline.eval()
    return cfg, pipeline


def run_session(run_dir: Path | str) -> Path:
    """The session a run folder belongs to: ``<session>/train/<run>`` -> ``<session>``."""
    run_dir = Path(run_dir)
    if run_dir.resolve().parent.name != "train":
        raise TrainError(f"{run_dir}: not a run folder of a session (<session>/train/<run>), so no consent can "
                         "be checked", path=str(run_dir))
    return run_dir.resolve().parent.parent


def reevaluate_run(run_dir: Path | str, *, device: str = "auto", exports: bool = False,
                   on_event: Callable[[dict], None] | None = None) -> dict:
    """Evaluate a run again from its checkpoint and update its ``metrics.json``; returns the metrics.

    Consent first: the session's consent (and that of the session the run's dataset came from) must
    allow ``train`` today; nothing is read or written otherwise.
    """
    from train.config import read_run_config
    from train.dataset import read_dataset, require_dataset_consent, require_train_consent
    from train.runner import read_metrics

    run_dir = Path(run_dir)
    session = run_session(run_dir)
    require_train_consent(session)
    cfg = read_run_config(run_dir / "config.yml")
    dm = cfg.pipeline.datamanager
    data = dm.data or getattr(getattr(dm, "dataparser", None), "data", None)  # what the data manager reads
    if data is None:
        raise TrainError(f"{run_dir / 'config.yml'}: names no dataset", path=str(run_dir / "config.yml"))
    doc = read_dataset(data)
    require_dataset_consent(doc, session)  # held-out images of another session need its consent too
    metrics = read_metrics(run_dir)
    cfg, pipeline = load_run(run_dir, device, config=cfg)
    metrics["eval"] = evaluate_pipeline(pipeline, run_dir, on_event=on_event)
    if exports:
        from train.exports import export_run

        cams = pipeline.datamanager.eval_dataset.cameras
        metrics["exports"] = export_run(pipeline.model, run_dir, doc,
                                        check_camera=cams[0:1] if len(cams) else None, on_event=on_event)
    metrics = json_safe(metrics)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


__all__ = ["evaluate_pipeline", "load_run", "reevaluate_run", "run_session"]
