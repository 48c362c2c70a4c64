"""``twinstudio keys | bundle | verify | revocations``: the signed handoff bundle (thin layers over train/handoff)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

keys_app = typer.Typer(help="Studio keys: the studio's own signing key, and the studio keys this machine trusts.",
                       no_args_is_help=True)
revocations_app = typer.Typer(help="Signed revocation lists: the studio issues and exports its own; render teams "
                                   "import them; verify checks bundles against them.", no_args_is_help=True)

KeyDirOpt = Annotated[Optional[Path], typer.Option("--dir", help="Key folder (default: $TWINSTUDIO_HOME/keys, "
                                                                 "i.e. ~/.twinstudio/keys).")]
TrustedOpt = Annotated[Optional[Path], typer.Option(
    "--trusted-keys", help="Trusted-keys file (default: $TWINSTUDIO_HOME/trusted_keys).")]
PrivateKeyOpt = Annotated[Optional[Path], typer.Option(
    "--key", help="The studio's private key (default: $TWINSTUDIO_HOME/keys/studio.key).")]
ValidDaysOpt = Annotated[float, typer.Option(
    "--valid-days", help="Days until the list's next update: render teams call it stale after that.")]


def _console():
    from twinstudio.cli import console

    return console


def _key_dir(d: Path | None) -> Path:
    from train.handoff.bundle import default_key_path

    return d if d is not None else default_key_path().parent


# ----------------------------------------------------------------------------- keys


@keys_app.command("init")
def keys_init(key_dir: KeyDirOpt = None,
              force: Annotated[bool, typer.Option("--force", help="Replace an existing key (old bundles then "
                                                                  "verify only with the old public key).")]
              = False,
              name: Annotated[str, typer.Option("--name", help="Name the new key is pinned under in the trusted "
                                                               "keys.")] = "this-studio",
              trusted_keys: TrustedOpt = None) -> None:
    """Create the studio's signing key pair (studio.key private, mode 0600; studio.pub) and trust it here."""
    from train.handoff.integrity import init_keys, load_public_key
    from train.handoff.trust import check_name, trust_key

    check_name(name)  # before the key exists: a bad name must not leave an unpinned key behind
    priv, pub = init_keys(_key_dir(key_dir), overwrite=force)
    con = _console()
    con.print(f"[bold green]created[/] {escape(str(priv))} (private, keep it secret) and {escape(str(pub))} "
              "(public, give it to render teams)", highlight=False)
    k, _ = trust_key(load_public_key(pub), name, trusted_keys)
    con.print(f"  key id: {k.key_id}, trusted here as {escape(k.name)}", highlight=False)
    if force or not (_key_dir(key_dir) / "c2pa-ca.pem").exists():
        _c2pa_init(_key_dir(key_dir), force)


def _c2pa_init(key_dir: Path, force: bool) -> None:
    from train.marking.credentials import CA_CERT, SIGNER_CERT, init_c2pa_chain

    init_c2pa_chain(key_dir, overwrite=force)
    _console().print(f"[bold green]created[/] the C2PA signing chain for renders: {escape(str(key_dir / CA_CERT))} "
                     f"(the studio CA: give it to whoever checks images, as their trust anchor) and "
                     f"{escape(str(key_dir / SIGNER_CERT))}", highlight=False)


@keys_app.command("c2pa-init")
def keys_c2pa_init(key_dir: KeyDirOpt = None,
                   force: Annotated[bool, typer.Option("--force", help="Replace an existing chain (images "
                                                                       "signed before then need the old CA).")]
                   = False) -> None:
    """Create the studio's C2PA chain (a studio CA and a signer it issues, EC P-256) for a studio whose
    Ed25519 key already exists; renders are signed with it."""
    _c2pa_init(_key_dir(key_dir), force)


@keys_app.command("show")
def keys_show(key_dir: KeyDirOpt = None) -> None:
    """Print the studio's public key file and key id."""
    from train.handoff.integrity import key_id, load_public_key

    pub = _key_dir(key_dir) / "studio.pub"
    _console().print(f"{escape(str(pub))}: key id {key_id(load_public_key(pub))}", highlight=False)


@keys_app.command("trust")
def keys_trust(pubfile: Annotated[Path, typer.Argument(help="The studio's public key (studio.pub, PEM).")],
               name: Annotated[str, typer.Option("--name", help="Who the key belongs to (e.g. nova-studio).")],
               trusted_keys: TrustedOpt = None) -> None:
    """Pin a studio's public key: bundles and revocation lists it signs are then trusted here."""
    from train.handoff.trust import trust_key, trusted_keys_path

    k, new = trust_key(pubfile, name, trusted_keys)
    where = escape(str(trusted_keys or trusted_keys_path()))
    if new:
        _console().print(f"[green]trusted[/] key {k.key_id} as {escape(k.name)} in {where}", highlight=False)
    else:
        _console().print(f"key {k.key_id} is already trusted, as {escape(k.name)} ({where})", highlight=False)


@keys_app.command("trusted")
def keys_trusted(trusted_keys: TrustedOpt = None) -> None:
    """List the trusted studio keys."""
    from train.handoff.trust import load_trusted_keys, trusted_keys_path

    path = trusted_keys or trusted_keys_path()
    keys = load_trusted_keys(path)
    if not keys:
        _console().print(f"no trusted keys in {escape(str(path))}; pin one with: twinstudio keys trust studio.pub "
                         "--name NAME", highlight=False)
        return
    t = Table(title=f"Trusted keys ({escape(str(path))})")
    t.add_column("key id")
    t.add_column("name")
    for k in keys:
        t.add_row(k.key_id, escape(k.name))
    _console().print(t)


@keys_app.command("untrust")
def keys_untrust(which: Annotated[str, typer.Argument(help="Key id, or the name of the key(s) to remove.")],
                 trusted_keys: TrustedOpt = None) -> None:
    """Remove a trusted key (by id, or every key of a name). Exits 2 when none matches."""
    from rigs.errors import EXIT_INPUT
    from train.handoff.trust import untrust_key

    gone = untrust_key(which, trusted_keys)
    for k in gone:
        _console().print(f"[yellow]untrusted[/] key {k.key_id} ({escape(k.name)})", highlight=False)
    if not gone:
        _console().print(f"no trusted key has the id or name {escape(which)!r}", highlight=False)
        raise typer.Exit(EXIT_INPUT)


# ----------------------------------------------------------------------------- bundle


def bundle_cmd(
    session: Annotated[Path, typer.Argument(help="Session folder with a trained twin.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder, or an archive when it ends in .tar.")],
    run: Annotated[str, typer.Option("--run", help="Training run to ship (<session>/train/<run>).")] = "twin",
    key: Annotated[Optional[Path], typer.Option(help="Private key (default: $TWINSTUDIO_HOME/keys/studio.key).")]
    = None,
    generation_kit: Annotated[bool, typer.Option(help="Include the generation kit (1024x1024 crops, captions); "
                                                      "only when the consent covers 'generate'.")] = True,
    revocations_url: Annotated[Optional[str], typer.Option(
        "--revocations-url", envvar="TWINSTUDIO_REVOCATIONS_URL",
        help="Where the studio publishes its signed revocation list (written into the manifest).")] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Log lines instead of progress bars.")] = False,
) -> None:
    """Package a session's twin as a signed handoff bundle (needs consent for 'share' in force)."""
    from train.handoff.bundle import BundleOptions, build_bundle
    from twinstudio.cli_train import TrainDashboard

    with TrainDashboard(plain, "bundling") as on_event:
        r = build_bundle(session, out, BundleOptions(run=run, key=key, generation_kit=generation_kit,
                                                     revocations_url=revocations_url), on_event=on_event)
    print_bundle_summary(r.manifest, r.path, r.files, r.bytes, r.key_id)
    for what, why in r.omitted.items():
        _console().print(f"  [yellow]omitted[/] {escape(what)}: {escape(why)}", highlight=False)


def print_bundle_summary(manifest: dict, path: Path, files: int, size: int, kid: str | None,
                         status: str | None = None) -> None:
    con = _console()
    c = manifest["consent"]
    t = Table(title=escape(f"Bundle {path}" + (f": {status}" if status else "")), show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    groups: dict[str, int] = {}
    for f in manifest["files"]:
        top = f["path"].split("/")[0] if "/" in f["path"] else f["path"]
        groups[top] = groups.get(top, 0) + 1
    rows = [("files", f"{files} ({size / 2**20:.1f} MiB): " + ", ".join(f"{k} {v}" for k, v in groups.items())),
            ("signature", f"Ed25519, studio key {kid}"),
            ("subject", manifest["subject"]["id"]),
            ("consent", f"{c['consent_id']}: {', '.join(c['scopes'])}; purposes {', '.join(c['purposes'])}; "
                        f"markets {', '.join(c['markets'])}"),
            ("valid", f"{c['valid_from']} to {c['valid_until']}; compensation {c['compensation_ref']}"),
            ("AI disclosure", manifest["ai_disclosure"]["label"])]
    pub = manifest.get("revocations")
    if isinstance(pub, dict) and pub.get("url"):
        rows.append(("revocation list", str(pub["url"])))
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    con.print(t)


# ----------------------------------------------------------------------------- verify


def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder or .tar archive.")],
    pubkey: Annotated[Optional[Path], typer.Option(
        help="Trust this one public key (studio.pub) for this run, instead of the trusted-keys file.")] = None,
    trusted_keys: TrustedOpt = None,
    revocations: Annotated[Optional[Path], typer.Option(
        help="A revocation list file published by the bundle's signer (default: the list held from it, "
             "see 'twinstudio revocations import').")] = None,
    accept_stale_revocations: Annotated[bool, typer.Option(
        "--accept-stale-revocations",
        help="Accept a revocation status that is unknown or stale (exit 0 instead of 6; it is still reported).")]
    = False,
) -> None:
    """Verify a bundle: signature, files, a trusted signer, consent in force, the signer's revocation list.

    Exit codes (the first that applies):
    3  tampered: the signature or a file is not what was signed, or a file is missing or extra
    4  consent not in force: expired, not yet valid, or revoked on a revocation list held
    5  intact, but the signer is not a trusted key (pin it: twinstudio keys trust studio.pub --name NAME)
    6  intact and trusted, but the revocation status is unknown (no list of the signer held) or stale
       (past its next update); 0 with --accept-stale-revocations
    0  valid: the revocation status was checked (serial, issue date and next update are printed)
    2  unusable input: no bundle, a bad key, trusted-keys file or revocation list
    """
    from train.handoff.verify import verify_bundle

    r = verify_bundle(bundle, pubkey=pubkey, trusted_keys=trusted_keys, revocations=revocations,
                      accept_stale_revocations=accept_stale_revocations)
    print_verify_result(r, bundle)
    raise typer.Exit(r.exit_code)


def print_verify_result(r, bundle: Path) -> None:
    """What verify found: the verdict, each problem, the signer and its trust, the revocation status, the summary."""
    from train.handoff.verify import VALID

    con = _console()
    rep = r.integrity
    colour = "green" if r.exit_code == VALID else "red" if r.exit_code in (3, 4) else "yellow"
    con.print(f"[bold {colour}]{escape(r.status)}[/]: {escape(str(bundle))} ({rep.files} files, "
              f"{rep.bytes / 2**20:.1f} MiB hashed in {rep.seconds:.1f} s)", highlight=False)
    for p in rep.problems:
        con.print(f"  [red]tampered[/] {escape(p)}", highlight=False)
    for p in r.consent_problems:
        con.print(f"  [red]consent[/] {escape(p)}", highlight=False)
    if rep.signature_ok:
        if r.trusted:
            who = "given with --pubkey" if r.trust_source.startswith("--pubkey") else f"{r.signer.name!r}"
            con.print(f"  signed by key {rep.key_id}: trusted ({escape(who)})", highlight=False)
        else:
            con.print(f"  signed by key {rep.key_id}: [yellow]not trusted[/] (not in {escape(r.trust_source)}); "
                      "if it is the studio's key, pin it: twinstudio keys trust studio.pub --name STUDIO",
                      highlight=False)
    rev = r.revocation
    if rev is not None:
        state = {"checked": "green", "stale": "yellow", "unknown": "yellow"}[rev.state]
        tail = rev.summary()[len(rev.state):]
        con.print(f"  revocation status: [{state}]{rev.state}[/]{escape(tail)}", highlight=False)
        if rev.source is not None and rev.state != "unknown":
            con.print(f"    list: {escape(str(rev.source))}", highlight=False)
        if r.accepted_revocation_risk:
            con.print("    [yellow]accepted[/] (--accept-stale-revocations): a consent revoked since is not seen",
                      highlight=False)
    if r.exit_code == VALID and rep.manifest:
        print_bundle_summary(rep.manifest, bundle, rep.files + 2, rep.bytes, rep.key_id, r.status)


# ----------------------------------------------------------------------------- revocations


def studio_signing_key(key: Path | None):
    """The studio's private key: ``key``, else the default one; (key or None, path). None only for a
    missing default key (a given ``key`` that is missing is an error)."""
    from train.handoff.bundle import default_key_path
    from train.handoff.integrity import load_private_key

    path = key if key is not None else default_key_path()
    if key is None and not path.exists():
        return None, path
    return load_private_key(path), path


def add_to_studio_list(records, private, path: Path, valid_days: float) -> None:
    """Put revoked consent records on the studio's signed list (for ``consent revoke``).

    ``private``/``path``: the studio key as :func:`studio_signing_key` found it.
    Without it nothing can be signed: that is said, and no error raised (no
    bundle was ever signed without the default key, so no render team waits
    for its list).
    """
    from train.handoff.revocations import entry_of, issue

    con = _console()
    if private is None:
        con.print(f"[yellow]not on a signed revocation list[/]: no studio key at {escape(str(path))}. The consent is "
                  "revoked in consent.json (the studio makes no further takes, training or bundles from it); "
                  "bundles signed with another key: run this again with --key KEY to list it there.",
                  highlight=False)
        return
    signed = issue(private, [entry_of(r.consent_id, r.subject_id, r.revoked_at, r.revocation_reason)
                             for r in records], valid_days=valid_days)
    rl = signed.list
    con.print(f"studio revocation list: serial {rl.serial}, {len(rl.revoked)} revoked, next update "
              f"{rl.next_update.date()} ({escape(str(signed.path))}); publish it: twinstudio revocations export "
              "--out FILE", highlight=False)


@revocations_app.command("export")
def revocations_export(
    out: Annotated[Path, typer.Option("--out", help="File to write the signed list to (the copy to publish).")],
    key: PrivateKeyOpt = None,
    valid_days: ValidDaysOpt = 7.0,
) -> None:
    """Issue the studio's revocation list again (next serial, issued now, next update in --valid-days) and
    write it for publishing. Run it before each next update, also when nothing was revoked."""
    from rigs.fileio import atomic_write_bytes
    from train.handoff.integrity import SigningKeyError
    from train.handoff.revocations import issue

    private, path = studio_signing_key(key)
    if private is None:
        raise SigningKeyError("no studio signing key; create one with 'twinstudio keys init'", path=path)
    signed = issue(private, valid_days=valid_days)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, signed.data)
    rl = signed.list
    _console().print(f"[green]issued[/] revocation list of key {rl.issuer}: serial {rl.serial}, {len(rl.revoked)} "
                     f"revoked, issued {rl.issued_at.isoformat()}, next update {rl.next_update.isoformat()}; "
                     f"wrote {escape(str(out))}", highlight=False)


@revocations_app.command("import")
def revocations_import(
    file: Annotated[Path, typer.Argument(help="A revocation list a studio published.")],
    trusted_keys: TrustedOpt = None,
    pubkey: Annotated[Optional[Path], typer.Option(
        help="Trust this one public key for this import, instead of the trusted-keys file.")] = None,
) -> None:
    """Check a studio's published revocation list and keep it for verify (one per studio key).

    Exit codes: 0 kept (or already held); 2 not a revocation list, or older than the one held; 3 its
    signature does not verify; 5 intact but not signed by a trusted key.
    """
    from train.handoff.integrity import load_public_key
    from train.handoff.revocations import import_list
    from train.handoff.trust import load_trusted_keys, trust_index, trusted_key

    keys = [trusted_key(load_public_key(pubkey), "pubkey")] if pubkey is not None else load_trusted_keys(trusted_keys)
    r = import_list(file, trust_index(keys))
    rl = r.list.list
    what = {"new": "[green]imported[/]", "updated": f"[green]updated[/] (was serial {r.previous_serial})",
            "unchanged": "already held"}[r.outcome]
    _console().print(f"{what}: revocation list of key {rl.issuer} ({escape(r.issuer_name)}), serial {rl.serial}, "
                     f"{len(rl.revoked)} revoked, issued {rl.issued_at.isoformat()}, next update "
                     f"{rl.next_update.isoformat()}", highlight=False)


@revocations_app.command("show")
def revocations_show(
    file: Annotated[Optional[Path], typer.Argument(help="A list file to show (default: every list held).")]
    = None,
    trusted_keys: TrustedOpt = None,
) -> None:
    """Show revocation lists: issuer, serial, dates, whether current, the consents revoked."""
    import datetime as dt

    from train.handoff.revocations import held_lists, read_list
    from train.handoff.trust import load_trusted_keys, trust_index

    con = _console()
    names = trust_index(load_trusted_keys(trusted_keys))
    lists = [read_list(file)] if file is not None else held_lists()
    if not lists:
        con.print("no revocation lists held; import one with: twinstudio revocations import FILE")
        return
    now = dt.datetime.now(dt.timezone.utc)
    for s in lists:
        rl = s.list
        who = names.get(s.public_key)
        t = Table(title=escape(f"Revocation list of key {rl.issuer} "
                               f"({who.name if who else 'not a trusted key'}), serial {rl.serial}: "
                               f"{'stale' if rl.is_stale(now) else 'current'}; issued {rl.issued_at.isoformat()}, "
                               f"next update {rl.next_update.isoformat()}"))
        for col in ("consent", "subject", "revoked at", "reason"):
            t.add_column(col)
        for e in rl.revoked:
            t.add_row(escape(e.consent_id), escape(e.subject_id), escape(e.revoked_at), escape(e.reason or ""))
        con.print(t)
