"""The ``twinstudio`` command line: a thin layer over the stage functions.

Library code raises :class:`rigs.errors.TwinstudioError`; this module is the
only place that turns errors into messages and exit codes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rigs.errors import TwinstudioError

app = typer.Typer(help="twinstudio: run a digital-twin capture studio from the terminal.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
rig_app = typer.Typer(help="Rig files: list, check and render the virtual studio.", no_args_is_help=True)
app.add_typer(rig_app, name="rig")

def _console(stderr: bool = False) -> Console:
    # logs and CI are not terminals: give tables room instead of rich's 80 columns
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 140
    return Console(stderr=stderr, width=width)


console = _console()
err_console = _console(stderr=True)

from twinstudio.cli_capture import capture_app, consent_app  # noqa: E402 - needs the consoles above

from twinstudio.cli_reconstruct import reconstruct_app  # noqa: E402
from twinstudio.cli_train import train_app  # noqa: E402
from twinstudio.cli_handoff import bundle_cmd, keys_app, revocations_app, verify_cmd  # noqa: E402
from twinstudio.cli_batch import batch_cmd, cluster_app  # noqa: E402
from twinstudio.cli_export import export_app  # noqa: E402
from twinstudio.cli_view import view_cmd  # noqa: E402
from twinstudio.cli_licence import ledger_app, licence_app, royalties_cmd  # noqa: E402
from twinstudio.cli_render import inspect_cmd, render_cmd  # noqa: E402

app.add_typer(consent_app, name="consent")
app.add_typer(capture_app, name="capture")
app.add_typer(reconstruct_app, name="reconstruct")
app.add_typer(train_app, name="train")
app.add_typer(keys_app, name="keys")
app.add_typer(revocations_app, name="revocations")
app.command("bundle")(bundle_cmd)
app.command("verify")(verify_cmd)
app.command("batch")(batch_cmd)
app.add_typer(cluster_app, name="cluster")
app.add_typer(export_app, name="export")
app.command("view")(view_cmd)
app.add_typer(licence_app, name="licence")
app.add_typer(ledger_app, name="ledger")
app.command("royalties")(royalties_cmd)
app.command("render")(render_cmd)
app.command("inspect")(inspect_cmd)

DEFAULT_RIG = "virtual-ring-24"


@rig_app.command("list")
def rig_list() -> None:
    """List the rig files shipped in rigs/library."""
    from rigs.rigfile import library_rigs, load_rig

    table = Table(title="Library rigs")
    for col in ("name", "cameras", "drivers", "lights", "presets", "description"):
        table.add_column(col, no_wrap=col == "name")
    for path in library_rigs():
        rig = load_rig(path)
        drivers = ", ".join(sorted({c.driver for c in rig.camera_specs}))
        table.add_row(rig.name, str(len(rig.camera_specs)), drivers, str(len(rig.lights)),
                      ", ".join(rig.presets) or "-", escape(rig.model.rig.description))
    console.print(table)


@rig_app.command("check")
def rig_check(
    rig_file: Annotated[str, typer.Argument(help="Rig file (TOML), or the name of a library rig.")],
    min_views: Annotated[int, typer.Option(help="Warn about volume cells seen by fewer cameras.")] = 3,
) -> None:
    """Validate a rig file, then show its cameras, lights, presets and volume coverage.

    Exits 2, naming the file, key and line, when the rig is invalid.
    """
    from rigs.coverage import coverage_warnings, volume_coverage
    from rigs.rigfile import load_rig

    rig = load_rig(rig_file)
    console.print(f"[bold green]ok[/] {escape(str(rig.path))}: rig [bold]{escape(rig.name)}[/] — "
                  f"{len(rig.camera_specs)} cameras, {len(rig.lights)} lights, {len(rig.presets)} presets")
    cams = Table(title="Cameras")
    for col in ("id", "driver", "address / serial", "resolution", "focal px", "position m", "distance m"):
        cams.add_column(col, no_wrap=True)
    focus = rig.volume.focus
    for spec, cam in zip(rig.camera_specs, rig.cameras):
        addr = spec.serial or (str(spec.address) if spec.address is not None else "-")
        pos = cam.pose.center
        cams.add_row(spec.id, spec.driver, addr, f"{spec.resolution[0]}x{spec.resolution[1]}",
                     f"{cam.intrinsics.fx:.0f}", " ".join(f"{x:+.2f}" for x in pos),
                     f"{((pos - focus) ** 2).sum() ** 0.5:.2f}")
    console.print(cams)
    if rig.lights:
        lights = Table(title="Lights")
        for col in ("id", "driver", "kind", "DMX", "position m", "power"):
            lights.add_column(col, no_wrap=True)
        for light in rig.lights:
            dmx = (f"u{light.universe} ch{light.channel}" + (f"-{light.channel + light.channels - 1}"
                                                             if light.channels > 1 else "")
                   if light.universe else "-")
            lights.add_row(light.id, light.driver, light.kind, dmx,
                           " ".join(f"{x:+.2f}" for x in light.position), f"{light.power:g}")
        console.print(lights)
    if rig.presets:
        presets = Table(title="Lighting presets")
        for col in ("preset", "steps", "levels"):
            presets.add_column(col)
        for name in rig.presets:
            steps = rig.preset_steps(name)
            shown = "; ".join(", ".join(f"{k}={v:g}" for k, v in s.levels.items() if v > 0) for s in steps[:1])
            if len(steps) > 1:
                shown = "one light at a time: " + ", ".join(s.name.removeprefix(name + "-") for s in steps)
            presets.add_row(name, str(len(steps)), shown)
        console.print(presets)
    cov = volume_coverage(rig)
    table = Table(title="Cameras seeing each part of the capture volume (height band x azimuth sector)")
    table.add_column("height m", no_wrap=True)
    for a0, a1 in zip(cov.sector_edges_deg[:-1], cov.sector_edges_deg[1:]):
        table.add_column(f"{a0:.0f}-{a1:.0f}°", justify="right", no_wrap=True)
    for i in reversed(range(cov.counts.shape[0])):
        z0, z1 = cov.band_edges_m[i], cov.band_edges_m[i + 1]
        cells = [(f"[red]{n}[/]" if n < min_views else str(n)) for n in cov.counts[i]]
        table.add_row(f"{z0:.1f}-{z1:.1f}", *cells)
    console.print(table)
    for w in coverage_warnings(cov, min_views=min_views):
        console.print(f"[yellow]warning[/] {escape(w)}")


@rig_app.command("render")
def rig_render(
    rig_file: Annotated[str, typer.Argument(help="Rig file (TOML), or the name of a library rig.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the takes into.")],
    frames: Annotated[Optional[int], typer.Option(help="Frames of the motion take (default: the rig's).")] = None,
    takes: Annotated[str, typer.Option(help="Comma-separated takes: calibration, plates (clean plates of the empty studio), stills, motion.")]
    = "stills,motion",
    scale: Annotated[float, typer.Option(help="Resolution scale (0.5 = half width and height).")] = 1.0,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: CPU cores).")] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Log lines instead of a live progress bar.")] = False,
) -> None:
    """Render the virtual studio of a rig: images plus depth, masks, meshes and joints."""
    _render(rig_file, out, frames=frames, takes=takes, scale=scale, workers=workers, plain=plain)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's output.")] = Path("out/demo"),
    rig: Annotated[str, typer.Option(help="Rig to run the demo on.")] = DEFAULT_RIG,
    scale: Annotated[float, typer.Option(help="Virtual studio resolution scale (1 = the rig's).")] = 1.0,
    frames: Annotated[Optional[int], typer.Option(help="Motion frames (default: the rig's).")] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Log lines instead of the live dashboard.")] = False,
    reconstruct: Annotated[bool, typer.Option(help="Reconstruct the session after capturing it.")] = True,
    train: Annotated[bool, typer.Option(help="Train a preview twin after reconstructing (GPU when present).")]
    = True,
) -> None:
    """Run the pipeline on the virtual studio, no hardware needed.

    A whole virtual session: the subject's consent, calibration (the studio
    places the ChArUco board), stills under every lighting preset and a motion
    take, each rendered by the virtual studio (with ground truth) and captured
    through the same orchestrator, journal and QA as real cameras. Then the
    reconstruction: calibrated cameras, masks, the mesh and 3D motion, with
    their accuracy against the ground truth. Then the twin: a CPU preview (or a
    short GPU run), evaluated on held-out cameras, exported as a splat PLY and a
    labelled turntable. Last, the signed handoff bundle (out/bundle-<subject>.tar,
    signed with a demo key in out/keys), verified.
    """
    from twinstudio.pipeline import run_demo

    run_demo(out, rig, scale=scale, frames=frames, plain=plain, console=console, reconstruct=reconstruct,
             train=train)


def _render(rig_file: str, out: Path, *, frames, takes: str, scale: float, workers, plain: bool) -> None:
    from rigs.virtual.render import RenderOptions, run_render

    kinds = tuple(t.strip() for t in takes.split(",") if t.strip())
    bad = [k for k in kinds if k not in ("calibration", "plates", "stills", "motion")]
    if bad or not kinds:
        raise typer.BadParameter(f"unknown take kind(s) {', '.join(bad) or '(none)'}; "
                                 "use calibration, plates, stills, motion", param_hint="--takes")
    options = RenderOptions(takes=kinds, frames=frames, scale=scale, workers=workers)  # type: ignore[arg-type]
    with _progress(plain, "rendering") as on_event:
        result = run_render(rig_file, out, options, on_event=on_event)
    rate = result.images / result.seconds if result.seconds else 0.0
    console.print(f"[bold green]rendered[/] {result.images} images in {result.seconds:.1f} s "
                  f"({rate:.1f} images/s)")
    for take in result.takes:
        console.print(f"  {take}: {out / 'takes' / take}", markup=False)
    console.print(f"  ground truth: {out}/takes/<take>/gt, cameras: {out / 'gt' / 'cameras.json'}", markup=False)
    console.print(f"  manifest: {result.manifest_path}", markup=False)


class _progress:
    """Context manager yielding an on_event callback that drives a rich progress bar (or log lines)."""

    def __init__(self, plain: bool, label: str) -> None:
        self.plain = plain or not console.is_terminal
        self.label = label

    def __enter__(self):
        if self.plain:
            last = [0]

            def log(ev) -> None:
                step = max(ev.total // 10, 1)
                if ev.done - last[0] >= step or ev.done == ev.total:
                    last[0] = ev.done
                    console.print(f"{self.label}: {ev.done}/{ev.total} ({ev.take}, {ev.camera})", markup=False)
            return log
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=None)

        def update(ev) -> None:
            self.bar.update(self.task, total=ev.total, completed=ev.done,
                            description=f"{self.label} {ev.take} {ev.camera}")
        return update

    def __exit__(self, *exc) -> None:
        if not self.plain:
            self.bar.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        rv = app(args=argv, standalone_mode=False)
        if isinstance(rv, int):  # typer.Exit(code) without standalone mode comes back as the return value
            return rv
    except TwinstudioError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return e.exit_code
    except RecursionError:  # a file nested thousands of levels deep that no reader names
        err_console.print("[bold red]error:[/] input nested too deeply to read (a JSON or TOML file with "
                          "thousands of nested levels)", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 1
    except typer.TyperException as e:  # usage errors (typer's click): message and usage on stderr
        show = getattr(e, "show", None)
        if show is None:
            raise
        show()
        return int(getattr(e, "exit_code", 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
