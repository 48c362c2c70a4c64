"""``twinstudio export``: the twin in the formats render teams open (OpenUSD)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from twinstudio.cli import console, err_console

export_app = typer.Typer(help="Export a twin for render teams: an OpenUSD scene (splat, mesh, cameras, motion).",
                         no_args_is_help=True)


@export_app.command("usd")
def export_usd_cmd(
    source: Annotated[Path, typer.Argument(help="A session with a trained twin, a bundle folder or a bundle .tar.")],
    out: Annotated[Path, typer.Option("--out", help="The USD file: .usdz (one package), .usdc (binary) or .usda "
                                                    "(text).")],
    run: Annotated[str, typer.Option("--run", help="Training run of a session (<session>/train/<run>).")] = "twin",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Write the twin as one OpenUSD scene: the Gaussian splat (UsdVol.ParticleField3DGaussianSplat), the mesh
    with its colours, every rig camera and the motion tracks, with the consent terms and AI disclosure as layer
    metadata; then validate it (all UsdValidation validators and twinstudio's own checks)."""
    from train.usd import UsdExportError, export_usd

    if out.exists() and not force:
        raise UsdExportError(f"{out}: already exists; pass --force to replace it", path=str(out))
    r = export_usd(source, out, run=run)
    console.print(f"[bold]{escape(str(r.path))}[/]: {r.gaussians:,} Gaussians (SH degree {r.sh_degree}), "
                  f"{r.cameras} cameras, mesh {r.mesh_faces:,} faces, motion {r.motion_frames} frames, "
                  f"{r.bytes / 1e6:.1f} MB in {r.seconds:.1f} s", highlight=False)
    _report(r.problems)


@export_app.command("check")
def export_check_cmd(
    path: Annotated[Path, typer.Argument(help="A twin USD file (.usdz, .usdc, .usda).")],
) -> None:
    """Validate a twin USD file: every registered UsdValidation validator, then array lengths, extents,
    value ranges, stage units and each camera against its recorded OpenCV intrinsics."""
    from train.usd import check_usd

    _report(check_usd(path))


def _report(problems: list[str]) -> None:
    if problems:
        for p in problems:
            err_console.print(f"  [red]problem[/] {escape(p)}", highlight=False)
        raise typer.Exit(2)
    console.print("checks: [green]passed[/] (UsdValidation validators and twinstudio's own)")
