"""``twinstudio keys | bundle | verify``: the signed handoff bundle (thin layers over train/handoff)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

keys_app = typer.Typer(help="The studio's Ed25519 signing key: create it, show it.", no_args_is_help=True)

KeyDirOpt = Annotated[Optional[Path], typer.Option("--dir", help="Key folder (default: $TWINSTUDIO_HOME/keys, "
                                                                 "i.e. ~/.twinstudio/keys).")]


def _console():
    from twinstudio.cli import console

    return console


def _key_dir(d: Path | None) -> Path:
    from train.handoff.bundle import default_key_path

    return d if d is not None else default_key_path().parent


@keys_app.command("init")
def keys_init(key_dir: KeyDirOpt = None,
              force: Annotated[bool, typer.Option("--force", help="Replace an existing key (old bundles then "
                                                                  "verify only with the old public key).")]
              = False) -> None:
    """Create the studio's signing key pair: studio.key (private, mode 0600) and studio.pub."""
    from train.handoff.integrity import init_keys, key_id, load_public_key

    priv, pub = init_keys(_key_dir(key_dir), overwrite=force)
    con = _console()
    con.print(f"[bold green]created[/] {priv} (private, keep it secret) and {pub} (public, give it to "
              "render teams)", highlight=False)
    con.print(f"  key id: {key_id(load_public_key(pub))}")


@keys_app.command("show")
def keys_show(key_dir: KeyDirOpt = None) -> None:
    """Print the studio's public key file and key id."""
    from train.handoff.integrity import key_id, load_public_key

    pub = _key_dir(key_dir) / "studio.pub"
    _console().print(f"{pub}: key id {key_id(load_public_key(pub))}", highlight=False)


def bundle_cmd(
    session: Annotated[Path, typer.Argument(help="Session folder with a trained twin.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder, or an archive when it ends in .tar.")],
    run: Annotated[str, typer.Option("--run", help="Training run to ship (<session>/train/<run>).")] = "twin",
    key: Annotated[Optional[Path], typer.Option(help="Private key (default: $TWINSTUDIO_HOME/keys/studio.key).")]
    = None,
    generation_kit: Annotated[bool, typer.Option(help="Include the generation kit (1024x1024 crops, captions).")]
    = True,
    plain: Annotated[bool, typer.Option("--plain", help="Log lines instead of progress bars.")] = False,
) -> None:
    """Package a session's twin as a signed handoff bundle (needs consent for 'share' in force)."""
    from train.handoff.bundle import BundleOptions, build_bundle
    from twinstudio.cli_train import TrainDashboard

    with TrainDashboard(plain, "bundling") as on_event:
        r = build_bundle(session, out, BundleOptions(run=run, key=key, generation_kit=generation_kit),
                         on_event=on_event)
    print_bundle_summary(r.manifest, r.path, r.files, r.bytes, r.key_id)
    for what, why in r.omitted.items():
        _console().print(f"  [yellow]omitted[/] {what}: {why}", highlight=False)


def print_bundle_summary(manifest: dict, path: Path, files: int, size: int, kid: str | None,
                         status: str | None = None) -> None:
    con = _console()
    c = manifest["consent"]
    t = Table(title=f"Bundle {path}" + (f": {status}" if status else ""), show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    groups: dict[str, int] = {}
    for f in manifest["files"]:
        top = f["path"].split("/")[0] if "/" in f["path"] else f["path"]
        groups[top] = groups.get(top, 0) + 1
    t.add_row("files", f"{files} ({size / 2**20:.1f} MiB): " + ", ".join(f"{k} {v}" for k, v in groups.items()))
    t.add_row("signature", f"Ed25519, studio key {kid}")
    t.add_row("subject", manifest["subject"]["id"])
    t.add_row("consent", f"{c['consent_id']}: {', '.join(c['scopes'])}; purposes {', '.join(c['purposes'])}; "
                         f"markets {', '.join(c['markets'])}")
    t.add_row("valid", f"{c['valid_from']} to {c['valid_until']}; compensation {c['compensation_ref']}")
    t.add_row("AI disclosure", manifest["ai_disclosure"]["label"])
    con.print(t)


def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder or .tar archive.")],
    pubkey: Annotated[Optional[Path], typer.Option(help="The studio's public key to trust (studio.pub).")] = None,
    revocations: Annotated[Optional[Path], typer.Option(
        help="Revocation list (default: $TWINSTUDIO_HOME/revocations.json).")] = None,
) -> None:
    """Verify a bundle: signature, every file's size and hash, nothing missing or extra, consent in force.

    Exit codes: 0 valid, 3 tampered, 4 consent not in force (expired or revoked), 2 unusable input.
    """
    from train.handoff.verify import verify_bundle

    r = verify_bundle(bundle, pubkey=pubkey, revocations=revocations)
    print_verify_result(r, bundle)
    raise typer.Exit(r.exit_code)


def print_verify_result(r, bundle: Path) -> None:
    """What verify found: the verdict, each problem, the signer, the revocation list, the summary."""
    from train.handoff.verify import VALID

    con = _console()
    rep = r.integrity
    colour = "green" if r.exit_code == VALID else "red"
    con.print(f"[bold {colour}]{r.status}[/]: {bundle} ({rep.files} files, {rep.bytes / 2**20:.1f} MiB hashed "
              f"in {rep.seconds:.1f} s)", highlight=False)
    for p in rep.problems:
        con.print(f"  [red]tampered[/] {p}", highlight=False)
    for p in r.consent_problems:
        con.print(f"  [red]consent[/] {p}", highlight=False)
    if rep.signature_ok:
        con.print(f"  signed by key {rep.key_id}" + (" (the trusted key)" if rep.trusted else
                                                      " [yellow](no --pubkey given: signer not checked)[/]"))
    con.print(f"  revocation list: {r.revocations_checked or 'none found'}", highlight=False)
    if r.exit_code == VALID and rep.manifest:
        print_bundle_summary(rep.manifest, bundle, rep.files + 2, rep.bytes, rep.key_id, r.status)
