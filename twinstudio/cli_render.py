"""``twinstudio render`` and ``twinstudio inspect``: licensed images of a twin, and where a released image came from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from twinstudio.cli import console


def render_cmd(
    bundle: Annotated[Path, typer.Argument(help="The twin's bundle: a folder or a .tar.")],
    licence: Annotated[str, typer.Option("--licence", help="The licence: its file, or the id of one the studio "
                                                           "holds ('twinstudio licence list').")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images.")],
    purpose: Annotated[Optional[str], typer.Option(help="The purpose of this use (default: the licence's, when it "
                                                        "names one).")] = None,
    market: Annotated[Optional[str], typer.Option(help="The market of this use (default: the licence's, when it "
                                                       "names one).")] = None,
    views: Annotated[str, typer.Option(help="'orbit' (around the subject), 'rig' (the bundle's cameras) or a "
                                            "cameras.json file.")] = "orbit",
    count: Annotated[int, typer.Option(help="Images: orbit positions, or the first N rig/file cameras.", min=1)] = 4,
    cameras: Annotated[Optional[str], typer.Option(help="Rig camera ids, comma-separated (with --views rig).")]
    = None,
    size: Annotated[int, typer.Option(help="Image size in pixels (square). The watermark survives JPEG q75, a "
                                           "0.5x resize and a 10% crop at 1024; below 512 too little of it "
                                           "may survive.", min=16, max=8192)] = 1024,
    lighting: Annotated[Optional[str], typer.Option(help="A captured lighting preset (the bundle's "
                                                         "splat/lighting.npz; default: the one baked into "
                                                         "splat.ply).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jpeg or png.")] = "jpeg",
    label: Annotated[bool, typer.Option(help="The visible 'AI-generated digital twin' label.")] = True,
    device: Annotated[str, typer.Option(help="cpu (the project's rasteriser) or cuda (gsplat).")] = "cpu",
    ledger: Annotated[Optional[Path], typer.Option(help="Usage ledger (default: $TWINSTUDIO_HOME/ledger/usage.jsonl).")]
    = None,
    pubkey: Annotated[Optional[Path], typer.Option(help="Trust this studio public key for the bundle and licence "
                                                        "instead of the pinned keys.")] = None,
    revocations: Annotated[Optional[Path], typer.Option(help="A revocation list file to check the consent "
                                                             "against (default: the imported one).")] = None,
) -> None:
    """Render licensed images of the twin, each labelled, watermarked, C2PA-signed and metered.

    Refused outside the licence (licensee, purpose, market, dates, images left) or the consent's 'generate'
    scope, before anything is drawn. Every image carries the visible AI label, an invisible watermark and
    C2PA content credentials, and is recorded in the usage ledger."""
    from train.handoff.licence import read_licence
    from train.render import camera_file_views, load_bundle_twin, orbit_views, render_licensed, rig_views

    lic = read_licence(licence).licence
    purpose = purpose or (lic.purposes[0] if len(lic.purposes) == 1 else None)
    market = market or (lic.markets[0] if len(lic.markets) == 1 else None)
    if purpose is None or market is None:
        raise typer.BadParameter(f"licence {lic.id} names several purposes ({', '.join(lic.purposes)}) or markets "
                                 f"({', '.join(lic.markets)}): say which with --purpose and --market")
    twin = load_bundle_twin(bundle)
    twin.lit(lighting)  # an unknown preset is refused before the licence is checked
    if views == "orbit":
        chosen = orbit_views(twin.params, count, size)
    elif views == "rig":
        ids = [c.strip() for c in cameras.split(",")] if cameras else sorted(twin.cameras)[:count]
        chosen = rig_views(twin.cameras, size, ids)
    else:
        chosen = camera_file_views(Path(views), size)[:count]

    def shown(done: int, total: int, path: Path) -> None:
        console.print(f"  [{done}/{total}] {escape(str(path))}", highlight=False)

    r = render_licensed(bundle, licence, out, chosen, purpose=purpose, market=market, fmt=fmt, label=label,
                        device=device, lighting=lighting, ledger=ledger, pubkey=pubkey, revocations=revocations,
                        on_image=shown)
    console.print(f"rendered {len(r.files)} image(s) under licence {r.licence_id} in {r.seconds:.1f} s "
                  f"(serials {r.serials[0]}-{r.serials[-1]}); {r.images_left} image(s) left on the licence",
                  highlight=False)


def inspect_cmd(
    image: Annotated[Path, typer.Argument(help="A released image (JPEG or PNG).")],
    trust_anchor: Annotated[Optional[Path], typer.Option("--trust-anchor", help="CA certificate to trust "
                                                         "(default: $TWINSTUDIO_HOME/keys/c2pa-ca.pem).")] = None,
    licence: Annotated[Optional[list[str]], typer.Option("--licence", help="Licence id that may have made it "
                                                         "(repeatable; default: every licence the studio holds).")]
    = None,
) -> None:
    """Where a released image came from: its C2PA credentials, else its invisible watermark.

    The credentials are validated against the studio CA; without valid ones the watermark names the licence
    and image serial. Exit 0 credentials valid, 10 watermark only (credentials stripped, untrusted or
    tampered), 11 nothing found."""
    from train.handoff.licence import held_licences
    from train.marking.inspect import inspect_image

    ids = licence or [s.licence.id for s in held_licences()]
    r = inspect_image(image, trust_anchor, licences=ids or None)
    console.print(escape(r.summary()), highlight=False)
    raise typer.Exit(r.exit_code)


__all__ = ["inspect_cmd", "render_cmd"]
