"""``twinstudio view``: open a handoff bundle's viewer in the browser (a thin layer over train/handoff/viewer.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape


def view_cmd(
    bundle: Annotated[Path, typer.Argument(help="The bundle: its folder, or its .tar archive.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free one).", min=0, max=65535)] = 0,
    no_open: Annotated[bool, typer.Option("--no-open", help="Print the address only; do not start a browser.")]
    = False,
) -> None:
    """Serve a bundle on 127.0.0.1 only and open its viewer: the twin's splat and mesh, every rig camera.

    The page and everything it loads come from the bundle (and, for bundles made
    before the viewer, this installation's copy of it); nothing is fetched from
    elsewhere. The AI-disclosure label is always shown. Stops on Ctrl-C.
    """
    import threading
    import webbrowser

    from train.handoff.viewer import serve_bundle
    from twinstudio.cli import console

    with serve_bundle(bundle, port=port) as server:
        console.print(f"serving {escape(str(bundle))} on 127.0.0.1 only", highlight=False)
        if not server.own_viewer:
            console.print("  (the bundle has no viewer/: this installation's viewer is served)", highlight=False)
        console.print(f"viewer: {server.url}", markup=False, highlight=False, soft_wrap=True)
        console.print("press Ctrl-C to stop", style="dim")
        console.file.flush()
        if not no_open:
            webbrowser.open(server.url)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            console.print("stopped")


__all__ = ["view_cmd"]
