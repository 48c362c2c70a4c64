"""``twinstudio train ...``: thin layers over train/ (dataset export, training, evaluation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

train_app = typer.Typer(help="Train the twin: nerfstudio dataset, twin-splat training, evaluation, exports.",
                        no_args_is_help=True)

RootArg = Annotated[Path, typer.Argument(help="Session folder (or virtual render folder).")]
RunOpt = Annotated[str, typer.Option("--run", help="Run name: the run lives in <session>/train/<run>.")]
PlainOpt = Annotated[bool, typer.Option("--plain", help="Log lines instead of the live dashboard.")]


def _console():
    from twinstudio.cli import console

    return console


class TrainDashboard:
    """on_event consumer: a live panel (step, loss, PSNR, Gaussians, it/s, ETA) or plain log lines."""

    def __init__(self, plain: bool, title: str = "training the twin") -> None:
        self.con = _console()
        self.plain = plain or not self.con.is_terminal
        self.title = title
        self.last: dict = {}
        self.logged_step = 0
        self.progress: dict[str, tuple[int, int]] = {}
        self.t0 = time.perf_counter()

    def __enter__(self):
        if not self.plain:
            from rich.live import Live

            self.live = Live(self._panel(), console=self.con, refresh_per_second=4, transient=False)
            self.live.start()
        return self.on_event

    def _panel(self):
        from rich.panel import Panel

        t = Table.grid(padding=(0, 2))
        e = self.last
        if e:
            t.add_row("step", f"{e['step']}/{e['total']}", "loss", _f(e["loss"], 4),
                      "PSNR (train)", f"{_f(e['psnr'], 2)} dB")
            t.add_row("Gaussians", f"{e['gaussians']:,}", "speed", f"{e['it_s']:.2f} it/s",
                      "ETA", _duration(e["eta_s"]))
        for label, (done, total) in self.progress.items():
            t.add_row(label, f"{done}/{total}")
        return Panel(t, title=self.title, subtitle=f"{_duration(time.perf_counter() - self.t0)} elapsed")

    def on_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "train":
            self.last = ev
            if self.plain:
                step_every = max(ev["total"] // 10, 1)
                if ev["step"] - self.logged_step >= step_every or ev["step"] == ev["total"]:
                    self.logged_step = ev["step"]
                    self.con.print(f"  step {ev['step']}/{ev['total']}  loss {_f(ev['loss'], 4)}  "
                                   f"PSNR {_f(ev['psnr'], 2)} dB  {ev['gaussians']:,} Gaussians  "
                                   f"{ev['it_s']:.2f} it/s  ETA {_duration(ev['eta_s'])}", highlight=False)
        elif kind == "stage":
            if ev.get("status") == "running":
                extra = f" on {ev['device']}" if "device" in ev else ""
                extra += f" from step {ev['start_step']}" if ev.get("start_step") else ""
                self.con.print(f"[bold]{ev['stage']}[/]{extra} …")
        elif kind == "progress" and ev.get("total"):
            finished = self.progress.get(ev["stage"]) == (ev["total"], ev["total"])
            self.progress[ev["stage"]] = (ev["done"], ev["total"])
            if self.plain and ev["done"] == ev["total"] and not finished:
                self.con.print(f"  {ev['stage']}: {ev['total']} done")
        if not self.plain:
            self.live.update(self._panel())

    def __exit__(self, *exc) -> None:
        if not self.plain:
            self.live.stop()


def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def print_train_summary(metrics: dict, run_dir: Path) -> None:
    """The run's figures and the held-out evaluation per lighting preset."""
    con = _console()
    ips = metrics.get("iterations_per_s")
    con.print(f"[bold green]twin trained[/] ({escape(str(metrics['method']))}, {escape(str(metrics['device']))}): "
              f"{metrics['iterations']} iterations at {metrics['image_size'][0]}x{metrics['image_size'][1]}"
              + (f", {ips:.2f} it/s" if ips else "") + f", {metrics['gaussians']:,} Gaussians, "
              f"train {metrics['train_s']:.0f} s", highlight=False)
    ev = metrics.get("eval")
    if ev:
        print_likeness(ev, con)
        t = Table(title=escape(f"Held-out cameras ({', '.join(ev['cameras'])}): {ev['images']} images"
                               + (f", {ev['resolution']['text']}" if ev.get("resolution") else "")))
        cols = ("lighting", "images", "subject PSNR dB", "subject SSIM", "colour ΔE00", "rim twin", "rim truth",
                "PSNR dB", "SSIM", "LPIPS")
        for col in cols:
            t.add_column(col, justify="left" if col == "lighting" else "right")
        for name, m in [*((escape(k), v) for k, v in ev["per_lighting"].items()), ("[bold]all[/]", ev)]:
            t.add_row(name, str(m["images"]), _f(m.get("psnr_subject"), 2), _f(m.get("ssim_subject"), 3),
                      _f(m.get("delta_e"), 2), _f(_dn(m.get("rim_excess_render")), 1),
                      _f(_dn(m.get("rim_excess_gt")), 1), _f(m["psnr"], 2), _f(m["ssim"], 3), _f(m["lpips"], 3))
        con.print(t)
        con.print("  rim: the backdrop colour's excess (G - max(R, B), 8-bit levels) on the subject's outer pixels; "
                  "the twin's should match the unmixed truth's", highlight=False, markup=False)
        for what, why in (ev.get("undefined") or {}).items():
            con.print(f"  {what}: - ({why})", highlight=False, markup=False)
    ex = metrics.get("exports")
    if ex:
        chk = ex.get("ply_check") or {}
        same = ("identical to the model" if chk.get("identical") else
                f"{_f(chk.get('psnr_vs_model'), 2)} dB vs the model")
        con.print(f"  splat: {run_dir / ex['splat_ply']} ({ex['splat']['count']:,} Gaussians, "
                  f"{ex['lighting']} lighting baked in"
                  + (f"; re-rendered from the PLY: {same}" if chk else "") + ")",
                  highlight=False, markup=False)
        tt = ex.get("turntable") or {}
        if tt:
            con.print(f"  previews: {run_dir / tt['mp4']} and {tt['frames']} PNGs in {run_dir / tt['png_dir']} "
                      f"(labelled \"{tt['label']}\")", highlight=False, markup=False)
    con.print(f"  metrics: {run_dir / 'metrics.json'}", highlight=False, markup=False)


def print_likeness(ev: dict, con=None) -> None:
    """The figures that say whether the twin looks like the person: the subject and its likeness marks."""
    con = con or _console()
    res = (ev.get("resolution") or {}).get("text", "")
    con.print(f"[bold]Likeness[/] on held-out cameras ({escape(res)}): subject PSNR "
              f"{_f(ev.get('psnr_subject'), 2)} dB, SSIM {_f(ev.get('ssim_subject'), 3)}, colour ΔE00 "
              f"{_f(ev.get('delta_e'), 2)}, green rim {_f(_dn(ev.get('rim_excess_render')), 1)} "
              f"(truth {_f(_dn(ev.get('rim_excess_gt')), 1)})", highlight=False)
    marks = ev.get("marks") or {}
    if "undefined" in marks:
        con.print(f"  likeness marks: - ({marks['undefined']})", highlight=False, markup=False)
        return
    for mark, m in marks.items():
        if not m.get("views"):
            con.print(f"  {mark}: - ({m.get('undefined', 'not seen')})", highlight=False, markup=False)
            continue
        con.print(f"  {mark}: SSIM {_f(m.get('ssim'), 3)} (worst {_f(m.get('ssim_min'), 3)}), PSNR "
                  f"{_f(m.get('psnr'), 2)} dB over {m['views']} held-out view(s)", highlight=False, markup=False)


def _dn(v):
    """A [0, 1] figure in 8-bit levels."""
    return None if v is None else 255.0 * v


def _f(v, nd: int) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


@train_app.command("export")
def export_cmd(
    root: RootArg,
    out: Annotated[Optional[Path], typer.Option("--out", help="Dataset folder (default: <session>/train/dataset).")]
    = None,
    take: Annotated[Optional[str], typer.Option(help="Stills take (default: the latest).")] = None,
    motion_take: Annotated[Optional[str], typer.Option(help="Also export this motion take's frames, with time.")]
    = None,
    holdout: Annotated[Optional[str], typer.Option(help="Held-out cameras, comma-separated (default: every 6th).")]
    = None,
    cameras: Annotated[Optional[Path], typer.Option(help="cameras.json (default: <session>/recon/cameras.json).")]
    = None,
) -> None:
    """Export a session as a nerfstudio dataset (transforms.json, images, masks, seed points, held-out split):
    needs consent for 'train'."""
    from train.dataset import ExportOptions, export_dataset

    opts = ExportOptions(take=take, motion_take=motion_take,
                         holdout=tuple(c.strip() for c in holdout.split(",") if c.strip()) if holdout else None)
    r = export_dataset(root, out, opts, cameras_path=cameras)
    con = _console()
    con.print(f"[bold green]exported[/] {r.frames} frames to {escape(str(r.transforms))} in {r.seconds:.1f} s",
              highlight=False)
    con.print(f"  train cameras: {len(r.train_cameras)}; held out: {', '.join(r.holdout_cameras)}", markup=False)
    con.print(f"  lighting presets: {', '.join(r.presets)}; seed points: {r.seed_points:,}", markup=False)
    for what, why in r.skipped.items():
        con.print(f"  [yellow]skipped[/] {escape(what)}: {escape(why)}", highlight=False)


@train_app.command("run")
def run_cmd(
    root: RootArg,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cuda or cpu.")] = "auto",
    iterations: Annotated[Optional[int], typer.Option(help="Total iterations (default: 30000 GPU, 2000 CPU).")]
    = None,
    downscale: Annotated[Optional[int], typer.Option(help="Image downscale 1/2/4/8 (default: 1 GPU, 8 CPU).")]
    = None,
    run: RunOpt = "twin",
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming the run's checkpoint.")]
    = False,
    evaluate: Annotated[bool, typer.Option(help="Evaluate on the held-out cameras afterwards.")] = True,
    exports: Annotated[bool, typer.Option(help="Write the splat PLY and turntable previews afterwards.")] = True,
    plain: PlainOpt = False,
) -> None:
    """Train the twin (nerfstudio twin-splat): needs consent for 'train'; resumes from the last checkpoint."""
    from train.runner import TrainOptions, run_training

    opts = TrainOptions(device=device, iterations=iterations, downscale=downscale, run=run, resume=not fresh,
                        evaluate=evaluate, exports=exports)
    with TrainDashboard(plain) as on_event:
        result = run_training(root, opts, on_event=on_event)
    print_train_summary(result.metrics, result.run_dir)


@train_app.command("eval")
def eval_cmd(
    root: RootArg,
    run: RunOpt = "twin",
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    exports: Annotated[bool, typer.Option(help="Also rewrite the splat PLY and previews.")] = False,
    plain: PlainOpt = False,
) -> None:
    """Re-evaluate a trained run from its checkpoint (held-out PSNR/SSIM per lighting preset): needs consent
    for 'train'; reads the run folder without running code from it."""
    from train.evaluate import reevaluate_run

    with TrainDashboard(plain, "evaluating") as on_event:
        metrics = reevaluate_run(Path(root) / "train" / run, device=device, exports=exports, on_event=on_event)
    print_train_summary(metrics, Path(root) / "train" / run)


@train_app.command("report")
def report_cmd(root: RootArg, run: RunOpt = "twin") -> None:
    """Print a run's metrics.json: training figures and the held-out evaluation."""
    from train.runner import read_metrics

    run_dir = Path(root) / "train" / run
    print_train_summary(read_metrics(run_dir), run_dir)
