"""``twinstudio reconstruct ...``: thin layers over reconstruct/.

Exit codes: 0 when every stage asked for is done (or skipped because it does
not apply, e.g. no motion take); 7 when one produced nothing (the report,
written first, says why); 4 when the session's consent does not cover a
stage (nothing is written); 2 for input that cannot be used at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

reconstruct_app = typer.Typer(help="Reconstruction: calibrate, SfM, masks, mesh, motion, report.",
                              no_args_is_help=True)

RootArg = Annotated[Path, typer.Argument(help="Session folder (or virtual render folder).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <session>/recon).")]
PlainOpt = Annotated[bool, typer.Option("--plain", help="Log lines instead of progress bars.")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Worker processes (default: one per core).")]


def _console():
    from twinstudio.cli import console

    return console


class progress_events:
    """An on_event callback: stage lines, and a progress bar for events that carry done/total."""

    def __init__(self, plain: bool) -> None:
        self.plain = plain or not _console().is_terminal

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        self.bar = None if self.plain else Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=_console(), transient=True)
        if self.bar:
            self.bar.start()
        self.tasks: dict[str, int] = {}
        self.logged: dict[str, int] = {}
        return self.on_event

    def on_event(self, ev) -> None:
        from reconstruct.pipeline import StageEvent

        con = _console()
        if isinstance(ev, StageEvent):
            if ev.status == "start":
                con.print(f"[bold]{ev.stage}[/] …")
            elif ev.status == "done":
                con.print(f"[green]{ev.stage}[/] done in {ev.seconds:.1f} s"
                          + (f": {escape(ev.detail)}" if ev.detail else ""), highlight=False)
            elif ev.status == "failed":
                con.print(f"[red]{ev.stage}[/] failed: {escape(ev.detail)}", highlight=False)
            else:
                con.print(f"[yellow]{ev.stage}[/] skipped: {escape(ev.detail)}", highlight=False)
            return
        done, total = getattr(ev, "done", None), getattr(ev, "total", None)
        if done is None or not total:
            return
        label = getattr(ev, "stage", None) or type(ev).__name__.replace("Progress", "").lower()
        if self.bar is None:
            step = max(total // 5, 1)
            if done - self.logged.get(label, 0) >= step or done == total:
                self.logged[label] = done
                con.print(f"  {escape(label)}: {done}/{total}", highlight=False)
            return
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total)
        self.bar.update(self.tasks[label], completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()


def print_accuracy(report: dict, title: str = "Reconstruction accuracy") -> None:
    """The report's stages and its accuracy table against the targets."""
    con = _console()
    t = Table(title=f"Stages ({escape(str(report.get('root', '')))})")
    for col in ("stage", "status", "time", "result"):
        t.add_column(col)
    colour = {"done": "green", "failed": "red"}
    for name, s in report.get("stages", {}).items():
        st = str(s.get("status"))
        text = s.get("reason", "") if st == "failed" else (s.get("summary") or s.get("reason", ""))
        t.add_row(escape(name), f"[{colour.get(st, 'yellow')}]{escape(st)}[/]",
                  f"{s['seconds']:.1f} s" if isinstance(s.get("seconds"), (int, float)) else "-", escape(str(text)))
    con.print(t)
    rows = report.get("accuracy", [])
    if not rows:
        con.print("no figure with a target (accuracy is scored on virtual captures)")
        return
    a = Table(title=escape(title) + (" against the virtual studio's ground truth" if report.get("virtual") else ""))
    for col in ("figure", "value", "target", ""):
        a.add_column(col, justify="right" if col in ("value", "target") else "left")
    for r in rows:
        v = r["value"]
        text = f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
        a.add_row(r["figure"], f"{text} {r['unit']}".strip(), f"{r['target']} {r['unit']}".strip(),
                  "[green]ok[/]" if r["ok"] else "[red]missed[/]")
    con.print(a)


def print_left_out(stages: dict, limit: int = 10) -> None:
    """The frames each stage left out, with the reason (the first ``limit`` per stage)."""
    con = _console()
    for name, s in stages.items():
        left = s.get("left_out") or {}
        for path, why in list(left.items())[:limit]:
            con.print(f"[yellow]{escape(name)}[/]: left out {escape(str(path))}: {escape(str(why))}", highlight=False)
        if len(left) > limit:
            con.print(f"[yellow]{escape(name)}[/]: and {len(left) - limit} more frame(s) left out (see the report)")


def _run(root: Path, out: Optional[Path], plain: bool, **kw) -> dict:
    """Run stages, print the report; StageFailed (exit 7) when a stage asked for produced nothing."""
    from reconstruct.pipeline import ReconstructOptions, StageFailed, run_reconstruct

    with progress_events(plain) as on_event:
        rep = run_reconstruct(root, ReconstructOptions(**kw), out_dir=out, on_event=on_event)
    doc = json.loads(rep.path.read_text())
    print_accuracy(doc)
    print_left_out({k: v for k, v in doc.get("stages", {}).items() if k in rep.stages})
    _console().print(f"report: {escape(str(rep.path))}", highlight=False)
    if rep.failed:
        raise StageFailed(rep.failed, rep.path)
    return doc


@reconstruct_app.command("run")
def reconstruct_run(
    root: RootArg,
    out: OutOpt = None,
    stages: Annotated[Optional[str], typer.Option(
        help="Stages to run, comma-separated (default: cameras,masks,mesh,motion). Stages named here fail, "
             "rather than skip, where the capture has no take for them.")] = None,
    cameras_from: Annotated[str, typer.Option(
        help="auto (calibration take if any, else SfM), calibration, sfm, or existing (recon/cameras.json).")]
    = "auto",
    workers: WorkersOpt = None,
    plain: PlainOpt = False,
) -> None:
    """Reconstruct a session: cameras, masks, mesh and motion, then the report and accuracy table."""
    if cameras_from not in ("auto", "calibration", "sfm", "existing"):
        raise typer.BadParameter(f"{cameras_from!r}: use auto, calibration, sfm or existing",
                                 param_hint="--cameras-from")
    from reconstruct.pipeline import STAGES

    names = tuple(s.strip() for s in stages.split(",") if s.strip()) if stages is not None else STAGES
    _run(root, out, plain, stages=names, named=names if stages is not None else (), cameras_from=cameras_from,
         workers=workers)


@reconstruct_app.command("calibrate")
def reconstruct_calibrate(
    root: RootArg,
    out: OutOpt = None,
    take: Annotated[Optional[str], typer.Option(help="Calibration take (default: the latest).")] = None,
    workers: WorkersOpt = None,
    plain: PlainOpt = False,
) -> None:
    """Calibrate every camera from the ChArUco take: intrinsics, poses, RMS per camera."""
    from reconstruct.calibrate import CalibrationOptions, run_calibrate

    with progress_events(plain) as on_event:
        res = run_calibrate(root, CalibrationOptions(take=take, workers=workers), out_dir=out, on_event=on_event)
    gt = (res.ground_truth or {}).get("cameras", {})
    t = Table(title=f"Calibration of {escape(res.take)}: {len(res.cameras)} cameras, {res.views} board poses, "
                    f"RMS {res.rms_px:.3f} px, {res.rejected} corners rejected, {res.seconds:.1f} s")
    cols = ["camera", "views", "corners", "RMS px", "fx", "cx", "cy", "k1"]
    if gt:
        cols += ["position err mm", "rotation err deg", "focal err %"]
    for col in cols:
        t.add_column(col, justify="left" if col == "camera" else "right")
    for c, cc in res.cameras.items():
        i = cc.camera.intrinsics
        row = [c, str(cc.views), str(cc.corners), f"{cc.rms_px:.3f}", f"{i.fx:.2f}", f"{i.cx:.2f}", f"{i.cy:.2f}",
               f"{i.dist[0]:+.4f}"]
        if gt:
            g = gt[c]
            row += [f"{g['position_mm']:.2f}", f"{g['rotation_deg']:.4f}", f"{g['focal_pct']:.3f}"]
        t.add_row(*row)
    con = _console()
    con.print(t)
    for c, why in res.unreached.items():
        con.print(f"[yellow]{escape(c)}[/] not calibrated: {escape(why)}", highlight=False)
    for p, why in res.skipped_images.items():
        con.print(f"[yellow]left out[/] {escape(p)}: {escape(why)}", highlight=False)
    con.print(f"wrote {escape(str(res.out_dir / 'cameras.json'))} and {escape(str(res.out_dir / 'colmap'))}",
              highlight=False)


@reconstruct_app.command("sfm")
def reconstruct_sfm(
    source: Annotated[Path, typer.Argument(help="Session, render folder, or any folder of photos.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for cameras.json and the COLMAP model.")],
    rig: Annotated[Optional[Path], typer.Option(help="Rig file: known intrinsics and the frame to align to.")]
    = None,
    cameras: Annotated[Optional[Path], typer.Option(help="cameras.json with known intrinsics.")] = None,
    group: Annotated[str, typer.Option(
        help="Folder of photos: which photos share intrinsics. body (EXIF make, model, serial, lens, focal "
             "length and image size), one (all from one camera) or image (a camera per photo).")] = "body",
    camera_model: Annotated[str, typer.Option(
        help="Camera model when intrinsics are estimated: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, "
             "OPENCV or FULL_OPENCV.")] = "SIMPLE_RADIAL",
    principal_point: Annotated[str, typer.Option(
        help="Estimated intrinsics: auto (refine principal points and distortion where the photos constrain "
             "them), refine, or hold (at the image centre).")] = "auto",
    mapper: Annotated[str, typer.Option(
        help="auto (COLMAP's incremental and global mappers, the better model kept), incremental or global.")]
    = "auto",
    plain: PlainOpt = False,
) -> None:
    """Structure from motion (pycolmap) for captures without a calibration take, or any folder of photos."""
    from reconstruct.sfm import CAMERA_MODELS, SfmOptions, run_sfm

    for name, value, allowed in (("--group", group, ("body", "one", "image")),
                                 ("--camera-model", camera_model, CAMERA_MODELS),
                                 ("--principal-point", principal_point, ("auto", "refine", "hold")),
                                 ("--mapper", mapper, ("auto", "incremental", "global"))):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r}: use {', '.join(allowed)}", param_hint=name)
    if rig is None and (source / "rig.toml").is_file():
        rig = source / "rig.toml"
    options = SfmOptions(group=group, camera_model=camera_model, principal_point=principal_point, mapper=mapper)
    with progress_events(plain) as on_event:
        res = run_sfm(source, out, options, cameras_path=cameras, rig_path=rig, on_event=on_event)
    con = _console()
    reproj = f"{res.mean_reprojection_error_px:.3f} px" if res.mean_reprojection_error_px is not None else "-"
    con.print(f"registered {len(res.registered)} camera(s), {res.points} points, reprojection {reproj}, "
              f"{res.seconds:.1f} s ({'rig frame, metres' if res.frame == 'rig' else 'arbitrary frame and scale'})")
    if res.mapping:
        m = res.mapping
        cands = "; ".join(f"{k}: {c.get('registered', 0)} registered"
                          + (f", {c['reprojection_error_px']:.3f} px" if c.get("reprojection_error_px") else "")
                          + f", {c.get('seconds', 0):.0f} s" for k, c in m["candidates"].items())
        con.print(f"mapper kept: {m['chosen']} ({escape(cands)})", highlight=False)
    for bid, b in (res.bodies or {}).items():
        if "params" not in b:
            con.print(f"{bid} ({escape(b['label'])}, {len(b['images'])} photo(s)): not registered", highlight=False)
            continue
        pp = b.get("principal_point", "")
        off = b.get("principal_point_offset_px")
        pp_text = f"principal point refined ({off[0]:+.1f}, {off[1]:+.1f} px from the centre)" if off else pp
        con.print(f"{bid} ({escape(b['label'])}, {len(b['images'])} photo(s)): {b['model']} focal "
                  f"{b['params'][0]:.1f} px (start {b['focal_start_px']:.0f}: {escape(b['focal_source'])}); "
                  f"{escape(pp_text)}; distortion {escape(b.get('distortion', 'none in this model'))}",
                  highlight=False, soft_wrap=True)
    for cam, why in sorted(res.unregistered.items()):
        con.print(f"[yellow]{escape(cam)}[/] not registered: {escape(why)}", highlight=False)
    for name, why in res.skipped_images.items():
        con.print(f"[yellow]left out[/] {escape(name)}: {escape(why)}", highlight=False)
    for name, why in res.notes.items():
        con.print(f"note: {escape(name)}: {escape(why)}", highlight=False)
    if res.ground_truth:
        g = res.ground_truth
        con.print(f"against ground truth (similarity aligned): position {g['median_position_mm']:.2f} / "
                  f"{g['max_position_mm']:.2f} mm, "
                  f"rotation {g['median_rotation_deg']:.4f} / {g['max_rotation_deg']:.4f} deg (median / max)")
    con.print(f"wrote {escape(str(out / 'cameras.json'))}", highlight=False)


@reconstruct_app.command("import-colmap")
def reconstruct_import_colmap(
    model: Annotated[Path, typer.Argument(help="COLMAP model folder (cameras/images/points3D).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for cameras.json.")],
) -> None:
    """Import an existing COLMAP model as twinstudio cameras."""
    from reconstruct.sfm import import_colmap

    res = import_colmap(model, out)
    _console().print(f"imported {len(res.cameras)} camera(s) into {out / 'cameras.json'}")


def _stage_command(name: str, doc: str):
    def command(root: RootArg, out: OutOpt = None, plain: PlainOpt = False) -> None:
        _run(root, out, plain, stages=(name,), named=(name,), cameras_from="existing")

    command.__doc__ = doc
    reconstruct_app.command(name)(command)


_stage_command("masks", "Subject masks of the stills take (chroma key), scored on virtual captures.")
_stage_command("mesh", "The subject's watertight mesh (PLY, OBJ, GLB) from the masks and calibrated cameras.")
_stage_command("motion", "3D tracks of the motion take (npz + CSV) from the calibrated cameras.")


@reconstruct_app.command("report")
def reconstruct_report(root: RootArg, out: OutOpt = None) -> None:
    """Print the last reconstruction report and its accuracy table."""
    from reconstruct.inputs import ReconstructError

    path = (out or root / "recon") / "report.json"
    if not path.is_file():
        raise ReconstructError(f"{path}: no report yet; run 'twinstudio reconstruct run {root}'", path=str(path))
    print_accuracy(json.loads(path.read_text()))
