"""Train the twin from Python: consent, dataset, nerfstudio's trainer, checkpoints, metrics.

``run_training(root, TrainOptions(...), on_event=...)`` is the whole stage:

1. the session's consent must cover ``train`` and be in force (a virtual render
   folder, whose subject is synthetic, needs none): checked before anything is
   read or written, through :func:`capture.consent.require_session_consent`;
2. the nerfstudio dataset is exported when missing (:mod:`train.dataset`);
3. nerfstudio's ``Trainer`` runs the ``twin-splat`` method on CUDA when there is
   a GPU, else on the CPU with preview defaults (the subject's crops at half size, a few
   hundred iterations, plain gradients for densification);
4. every ``save_every`` steps a checkpoint lands in ``<root>/train/<run>/
   nerfstudio_models``; a later run with the same name resumes from the latest;
5. held-out evaluation, the splat PLY and the turntable previews follow
   (:mod:`train.evaluate`, :mod:`train.exports`), and ``metrics.json`` records it all.

Resuming loads the checkpoint through :func:`train.config.load_checkpoint`
(``weights_only=True``): a run folder from elsewhere cannot run code. Figures
that are undefined (no PSNR reported, a diverged loss) are None in the files,
with the reason under ``undefined``, never NaN.

Progress is reported as events (``{"event": "train", "step", "total", "loss",
"psnr", "gaussians", "eta_s", ...}``); the CLI's dashboard consumes them.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rigs.fileio import atomic_write_json
from train.dataset import (TrainError, default_dataset_dir, export_dataset, finite_or_none, json_safe,
                           read_dataset, require_dataset_consent, require_train_consent)

METRICS_SCHEMA = "twinstudio.train-metrics"
METRICS_VERSION = 1
#: CPU previews: the subject's crops at half the cameras' resolution, as many iterations as fit in 3 minutes
#: on 2 cores with the compiled rasteriser (ring-24: 2000 in ~160 s); SH degree 0 (view-independent colour:
#: on 20 training views degree 1 scored no better on held-out cameras and cost 15 % more time); Gaussians
#: are split and cloned over the first 35 % (they cost time in every later step; 40 % scored the same, 8 s slower)
CPU_DEFAULTS = {"iterations": 2000, "downscale": 2, "sh_degree": 0}
CPU_REFINE_FRACTION = 0.35
GPU_DEFAULTS = {"iterations": 30000, "downscale": 1}
#: learning rates of runs below SHORT_RUN steps (measured on ring-24, 1600 CPU steps: geometry x3 took the held-out
#: subject from 26.9 to 27.3 dB; with densification at 0.0003 the Gaussians stayed at ~55k, 149 -> 136 s)
SHORT_RUN = 3000
COLOUR_LR_SCALE_SHORT = 12.0  # 2000 CPU steps, settling: x4 27.8 dB / SSIM 0.892, x8 28.0 / 0.895, x12 28.0 / 0.896
GEOMETRY_LR_SCALE_SHORT = 3.0
#: ... and their colour, appearance and opacity rates decay to this fraction by the last step (2000 CPU steps:
#: 27.5 -> 27.8 dB, SSIM 0.884 -> 0.892, CIEDE2000 3.77 -> 3.42)
SETTLE_SHORT = 0.1
CPU_DENSIFY_GRAD = 0.0003


@dataclass(frozen=True)
class TrainOptions:
    device: str = "auto"             # auto | cuda | cpu
    iterations: int | None = None    # total steps (default: 30000 on a GPU, 2000 on the CPU)
    downscale: int | None = None     # image downscale (default: 1 on a GPU, 2 on the CPU)
    run: str = "twin"                # run folder: <root>/train/<run>
    resume: bool = True              # continue from the run's latest checkpoint
    save_every: int | None = None    # checkpoint period (default: iterations / 5)
    sh_degree: int | None = None     # default 3 on a GPU, 0 on the CPU
    seed: int = 42
    lpips: str = "auto"
    evaluate: bool = True
    exports: bool = True
    turntable_frames: int = 36
    cpu_threads: int | None = None   # torch threads for CPU training (default: torch's, one per core)
    colour_lr_scale: float | None = None  # colour/appearance learning rates x this (default: x12 below 3000 steps)
    geometry_lr_scale: float | None = None  # means x this, scales x its root (default: x3 below 3000 steps)
    settle: float | None = None      # colour/opacity rates decay to this fraction (default: 0.1 below 3000 steps)
    settle_shape: bool = False       # ... and the scales' and rotations' rates too
    model_overrides: dict = field(default_factory=dict)  # any TwinSplatModelConfig field

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise TrainError(f"device must be auto, cuda or cpu, not {self.device!r}")
        if self.iterations is not None and self.iterations < 1:
            raise TrainError(f"iterations must be >= 1, not {self.iterations}")
        if self.downscale is not None and self.downscale not in (1, 2, 4, 8):
            raise TrainError(f"downscale must be 1, 2, 4 or 8, not {self.downscale}")
        if not self.run or "/" in self.run or self.run in ("dataset", ".", ".."):
            raise TrainError(f"run name {self.run!r} is not usable (a plain folder name, not 'dataset')")


@dataclass
class TrainResult:
    run_dir: Path
    device: str
    iterations: int
    start_step: int
    seconds: float
    metrics: dict


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is available here (use --device cpu for a preview)")
    return device


def check_train_consent(root: Path) -> dict | None:
    """The consent terms that allow training, or None for a virtual render (synthetic subject).

    The shared gate (:func:`capture.consent.require_session_consent` with scope ``train``): ConsentError
    (exit 4) when no record of the session's subject allows training today, ConsentInputError (exit 2)
    for a folder that is neither a session nor a virtual render.
    """
    return require_train_consent(root)


def build_config(dataset: Path, run_dir: Path, device: str, options: TrainOptions, iterations: int,
                 downscale: int):
    """The nerfstudio TrainerConfig of a run (twin-splat, sized for the device)."""
    from train.config import optimizers, twin_splat_config

    cfg = twin_splat_config(max_steps=iterations)
    cfg.run_dir = run_dir
    cfg.output_dir = run_dir.parent
    cfg.experiment_name = run_dir.name
    cfg.data = dataset
    cfg.vis = "tensorboard"
    cfg.logging.local_writer.enable = False
    cfg.logging.steps_per_log = max(iterations, 1) * 10  # our dashboard reports; the writer only at step 0
    cfg.machine.device_type = device
    cfg.machine.seed = options.seed
    cfg.steps_per_save = options.save_every or max(iterations // 5, 50)
    cfg.save_only_latest_checkpoint = True
    short = iterations < SHORT_RUN
    cfg.optimizers = optimizers(iterations,
                                colour_lr_scale=options.colour_lr_scale or (COLOUR_LR_SCALE_SHORT if short else 1.0),
                                geometry_lr_scale=options.geometry_lr_scale or (GEOMETRY_LR_SCALE_SHORT if short else 1.0),
                                settle=options.settle or (SETTLE_SHORT if short else None),
                                settle_shape=options.settle_shape)
    dm = cfg.pipeline.datamanager
    dm.data = dataset
    dm.dataparser.data = dataset
    dm.dataparser.downscale_factor = downscale
    dm.cache_images = "gpu"  # i.e. on the training device; "cpu" pins memory, which needs CUDA
    m = cfg.pipeline.model
    m.lpips = options.lpips
    if device == "cpu":
        # a preview: full resolution of the (downscaled) images from the start, plain gradients
        m.num_downscales = 0
        m.use_absgrad = False
        m.densify_grad_thresh = CPU_DENSIFY_GRAD
        m.sh_degree = CPU_DEFAULTS["sh_degree"] if options.sh_degree is None else options.sh_degree
    elif options.sh_degree is not None:
        m.sh_degree = options.sh_degree
    # refinement and SH schedules follow the run's length (splatfacto's are for 30k steps)
    f = iterations / 30000
    m.warmup_length = max(int(500 * f), 20)
    m.refine_every = max(int(100 * f), 10)
    m.stop_split_at = max(int(15000 * f), m.warmup_length + m.refine_every)
    m.stop_screen_size_at = max(int(4000 * f), m.warmup_length)
    m.sh_degree_interval = max(int(1000 * f), 10)
    m.resolution_schedule = max(int(3000 * f), 10)
    if device == "cpu":
        # measured on ring-24 (2 cores, 700 steps): a coarse first phase at a quarter size saved time but cost
        # 0.8 dB on the held-out subject; fewer refinements cost less
        m.stop_split_at = max(int(CPU_REFINE_FRACTION * iterations), m.warmup_length + m.refine_every)
    if short:
        # a preview: no opacity resets (the run is too short to recover from one), so no pause after them
        m.reset_alpha_every = iterations // m.refine_every + 1
        m.refine_pause_after_reset = 0
    for k, v in options.model_overrides.items():
        if not hasattr(m, k):
            raise TrainError(f"unknown twin-splat model setting {k!r}")
        setattr(m, k, v)
    return cfg


def _trainer_class():
    from nerfstudio.engine.trainer import Trainer

    class TwinTrainer(Trainer):
        """nerfstudio's Trainer reporting every step as an event."""

        on_event: Callable[[dict], None] = staticmethod(lambda ev: None)
        total: int = 0
        history: list = []
        resume_state: dict | None = None  # the checkpoint to resume from, already read by load_checkpoint

        def _load_checkpoint(self) -> None:
            """nerfstudio's resume, with the checkpoint read by :func:`train.config.load_checkpoint`
            (``weights_only=True``) instead of ``torch.load``'s defaults."""
            from train.config import load_checkpoint

            state = self.resume_state
            if state is None:
                if self.config.load_checkpoint is not None:
                    path = Path(self.config.load_checkpoint)
                elif self.config.load_dir is not None:
                    path = latest_checkpoint(Path(self.config.load_dir), self.config.load_step)
                    if path is None:
                        raise TrainError(f"{self.config.load_dir}: no checkpoint to resume from",
                                         path=str(self.config.load_dir))
                else:
                    return
                state = load_checkpoint(path)
            self.resume_state = None
            self._start_step = int(state["step"]) + 1
            self.pipeline.load_pipeline(state["pipeline"], state["step"])
            # loading resizes the Gaussians to the checkpoint's count as new Parameters; the optimizers
            # (and the densification callbacks holding them) still point at the old ones: re-point them
            # in place, else the first step after a resume past a densification fails on a size mismatch
            for name, params in self.pipeline.get_param_groups().items():
                if name in self.optimizers.optimizers:
                    self.optimizers.optimizers[name].param_groups[0]["params"] = list(params)
                    self.optimizers.parameters[name] = list(params)
            self.optimizers.load_optimizers(state["optimizers"])
            if "schedulers" in state and self.config.load_scheduler:
                self.optimizers.load_schedulers(state["schedulers"])
            self.grad_scaler.load_state_dict(state["scalers"])

        def train_iteration(self, step: int):
            if not hasattr(self, "_t0"):
                self._t0, self._s0 = time.perf_counter(), step
            loss, loss_dict, metrics = super().train_iteration(step)
            done = step - self._s0 + 1
            el = time.perf_counter() - self._t0
            psnr = metrics.get("psnr")
            rec = {"step": step + 1, "loss": finite_or_none(loss.detach()),
                   "psnr": finite_or_none(psnr) if psnr is not None else None,
                   "gaussians": int(metrics.get("gaussian_count", 0))}
            self.history.append(rec)
            self.on_event({"event": "train", **rec, "total": self.total, "elapsed_s": el,
                           "it_s": done / max(el, 1e-9), "eta_s": el / done * (self.total - step - 1)})
            return loss, loss_dict, metrics

    return TwinTrainer


@contextmanager
def quiet_nerfstudio():
    """nerfstudio's own console output off (twinstudio reports progress through events)."""
    from nerfstudio.utils.rich_utils import CONSOLE

    was = CONSOLE.quiet
    CONSOLE.quiet = True
    try:
        yield
    finally:
        CONSOLE.quiet = was


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rasteriser(device: str) -> str:
    if device == "cuda":
        return "gsplat (CUDA)"
    from train import raster_c

    return "train.raster, compiled" if raster_c.available() else \
        f"train.raster, torch ops ({raster_c.why_not()})"


def latest_checkpoint(ckpt_dir: Path, step: int | None = None) -> Path | None:
    """The checkpoint of ``step`` (default: the latest) in a run folder or its ``nerfstudio_models``."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.name != "nerfstudio_models":
        ckpt_dir = ckpt_dir / "nerfstudio_models"
    if step is not None:
        p = ckpt_dir / f"step-{step:09d}.ckpt"
        return p if p.is_file() else None
    ckpts = sorted(ckpt_dir.glob("step-*.ckpt"))
    return ckpts[-1] if ckpts else None


def _mean(values: list, what: str, undefined: dict) -> float | None:
    """Mean of the finite values, or None with the reason recorded in ``undefined[what]``."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        undefined[what] = ("no step ran in this run" if not values else
                           f"undefined on all of the last {len(values)} steps (not reported or not finite)")
        return None
    return float(np.mean(vals))


def run_training(root: Path | str, options: TrainOptions = TrainOptions(), *,
                 dataset: Path | str | None = None,
                 on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) the twin of a session; writes ``<root>/train/<run>/metrics.json``.

    Consent first: nothing is read or written unless the session's consent allows ``train`` today
    (and, for a ``dataset`` exported from another session, that session's too).
    """
    root = Path(root)
    consent = check_train_consent(root)
    ds = (Path(dataset) if dataset is not None else default_dataset_dir(root)).resolve()
    if (ds / "transforms.json").is_file():
        require_dataset_consent(read_dataset(ds), root)
    import torch

    emit = on_event or (lambda ev: None)
    device = resolve_device(options.device)
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    iterations = options.iterations or defaults["iterations"]
    downscale = options.downscale or defaults["downscale"]
    if not (ds / "transforms.json").is_file():
        emit({"event": "stage", "stage": "export", "status": "running"})
        export_dataset(root, ds, on_event=emit)
    doc = read_dataset(ds)
    if downscale > 1 and downscale not in doc["twinstudio"].get("downscales", []):
        raise TrainError(f"{ds}: no images_{downscale}/ (exported downscales: {doc['twinstudio'].get('downscales')})",
                         path=str(ds))
    run_dir = (root / "train" / options.run).resolve()
    cfg = build_config(ds, run_dir, device, options, iterations, downscale)
    ckpt = latest_checkpoint(run_dir) if options.resume else None
    state = None
    if ckpt is not None:  # read (safely) before anything is written: a crafted one stops the run here
        from train.config import load_checkpoint

        state = load_checkpoint(ckpt)
        cfg.load_dir = ckpt.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    _seed(options.seed)
    emit({"event": "stage", "stage": "setup", "status": "running", "device": device})
    cfg.save_config()
    Trainer = _trainer_class()
    trainer = Trainer(cfg)
    trainer.on_event = emit
    trainer.history = []
    trainer.resume_state = state  # the trainer drops it once loaded: not held in memory while training
    del state
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter()
    with quiet_nerfstudio():
        trainer.setup()
    start = trainer._start_step
    remaining = max(iterations - start, 0)
    trainer.config.max_num_iterations = remaining
    trainer.total = iterations
    setup_s = time.perf_counter() - t_setup
    emit({"event": "stage", "stage": "train", "status": "running", "start_step": start, "total": iterations})
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if device == "cpu":
        # on the subject's crops at half size torch's threads pay (2 cores: 0.37 -> 0.27 s a step); on tiny
        # images they only wait for each other (1/8 whole images: 9.6 -> 13.6 it/s with one)
        torch.set_num_threads(options.cpu_threads or threads)
    try:
        if remaining:
            with quiet_nerfstudio():
                trainer.train()
    finally:
        torch.set_num_threads(threads)
    train_s = time.perf_counter() - t0
    model = trainer.pipeline.model
    hist = trainer.history
    last = hist[-10:]
    undefined: dict[str, str] = {}
    ips = round(len(hist) / train_s, 3) if hist and train_s > 0 else None
    if ips is None:
        undefined["iterations_per_s"] = "no step ran in this run"
    metrics = {
        "schema": METRICS_SCHEMA, "version": METRICS_VERSION, "method": "twin-splat", "run": options.run,
        "device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "iterations": iterations, "start_step": start, "steps_this_run": len(hist),
        "downscale": downscale, "image_size": _median_size(trainer.pipeline.datamanager.train_dataset.cameras),
        "setup_s": round(setup_s, 2), "train_s": round(train_s, 2),
        "iterations_per_s": ips,
        "loss_first": _mean([h["loss"] for h in hist[:1]], "loss_first", undefined),
        "loss_last": _mean([h["loss"] for h in last], "loss_last", undefined),
        "train_psnr_last": _mean([h["psnr"] for h in last], "train_psnr_last", undefined),
        "gaussians": int(model.num_points),
        "sh_degree": int(model.config.sh_degree),
        "rasteriser": _rasteriser(device),
        "presets": list(model.presets),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "dataset": str(ds.resolve()), "consent": consent,
        "options": asdict(options),
        "history": hist[:: max(len(hist) // 50, 1)],
    }
    if options.evaluate:
        from train.evaluate import evaluate_pipeline

        emit({"event": "stage", "stage": "evaluate", "status": "running"})
        with quiet_nerfstudio():
            metrics["eval"] = evaluate_pipeline(trainer.pipeline, run_dir, on_event=emit)
    if options.exports:
        from train.exports import export_run

        emit({"event": "stage", "stage": "exports", "status": "running"})
        eval_cams = trainer.pipeline.datamanager.eval_dataset.cameras
        metrics["exports"] = export_run(model, run_dir, doc, frames=options.turntable_frames,
                                        check_camera=eval_cams[0:1] if len(eval_cams) else None, on_event=emit)
    if undefined:
        metrics["undefined"] = undefined
    metrics = json_safe(metrics)
    atomic_write_json(run_dir / "metrics.json", metrics)
    emit({"event": "stage", "stage": "done", "status": "ok", "metrics": str(run_dir / "metrics.json")})
    return TrainResult(run_dir, device, iterations, start, round(train_s, 2), metrics)


def _median_size(cameras) -> list[int]:
    """The training images' median (width, height): subject crops differ in size from image to image."""
    return [int(cameras.width.flatten().float().median()), int(cameras.height.flatten().float().median())]


def read_metrics(run_dir: Path | str) -> dict:
    """A run's ``metrics.json`` (TrainError, exit 2, when it is missing or not a JSON object)."""
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        raise TrainError(f"{p} does not exist: train first ('twinstudio train run')", path=str(p))
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TrainError(f"{p}: not readable JSON: {e}", path=str(p)) from e
    if not isinstance(doc, dict):
        raise TrainError(f"{p}: not a metrics object", path=str(p))
    return doc


__all__ = ["TrainOptions", "TrainResult", "build_config", "check_train_consent", "latest_checkpoint",
           "read_metrics", "resolve_device", "run_training"]
