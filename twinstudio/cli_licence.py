"""``twinstudio licence | ledger | royalties``: licensing a twin to brands, the usage ledger, the model's royalties
(thin layers over train/handoff/licence.py, ledger.py and royalties.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

licence_app = typer.Typer(help="Licences: the studio, for the model, licenses a twin to a brand for purposes, "
                               "markets, a period and a number of images, at a rate per image.",
                          no_args_is_help=True)
ledger_app = typer.Typer(help="The usage ledger: every rendered image, one signed line chained to the one before.",
                         no_args_is_help=True)

PrivateKeyOpt = Annotated[Optional[Path], typer.Option(
    "--key", help="The studio's private key that signs (default: $TWINSTUDIO_HOME/keys/studio.key).")]
PubkeyOpt = Annotated[Optional[Path], typer.Option(
    "--pubkey", help="Trust this one public key (studio.pub) for this run, instead of the trusted-keys file.")]
TrustedOpt = Annotated[Optional[Path], typer.Option(
    "--trusted-keys", help="Trusted-keys file (default: $TWINSTUDIO_HOME/trusted_keys).")]
RevocationsOpt = Annotated[Optional[Path], typer.Option(
    "--revocations", help="A revocation list file published by the studio (default: the list held from it, see "
                          "'twinstudio revocations import').")]
AcceptStaleOpt = Annotated[bool, typer.Option(
    "--accept-stale-revocations",
    help="Accept a revocation status that is unknown or stale (it is still reported).")]
LedgerOpt = Annotated[Optional[Path], typer.Option(
    "--ledger", help="The usage ledger (default: $TWINSTUDIO_HOME/ledger/usage.jsonl).")]
ExpectHeadOpt = Annotated[Optional[str], typer.Option(
    "--expect-head", help="SEQ:SHA256 of a chain head printed on an earlier royalty statement: it must still be "
                          "in the ledger (detects entries removed from its end).")]


def _console():
    from twinstudio.cli import console

    return console


def _parse_head(text: str | None) -> tuple[int, str] | None:
    import re

    from train.handoff.ledger import LedgerError

    if text is None:
        return None
    m = re.fullmatch(r"([1-9][0-9]*):([0-9a-f]{64})", text.strip())
    if m is None:
        raise LedgerError(f"--expect-head {text!r} is not SEQ:SHA256 (e.g. 1200:3fa4...; 64 lowercase hex digits)")
    return int(m[1]), m[2]


def _terms_table(lic, title: str, used: int | None = None) -> Table:
    t = Table(title=escape(title), show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    rows = [("licensee", lic.licensee), ("model", f"{lic.subject_id} (agency {lic.agency})"),
            ("purposes", ", ".join(lic.purposes)), ("markets", ", ".join(lic.markets)),
            ("valid", f"{lic.valid_from} to {lic.valid_until} (inclusive, UTC days)"),
            ("images", f"at most {lic.max_images}" + (f"; {used} used, {max(0, lic.max_images - used)} left"
                                                      if used is not None else "")),
            ("rate", str(lic.rate)),
            ("bundle", f"MANIFEST.json sha256 {lic.bundle_manifest_sha256}"),
            ("consent", lic.consent_id), ("issued", f"{lic.issued_on} by studio key {lic.issuer}")]
    if lic.notes:
        rows.append(("notes", lic.notes))
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    return t


# ----------------------------------------------------------------------------- licence


@licence_app.command("issue")
def licence_issue(
    bundle: Annotated[Path, typer.Argument(help="The signed bundle of the twin (folder or .tar).")],
    licensee: Annotated[str, typer.Option("--licensee", help="The brand the licence is granted to, as named in "
                                                             "the contract.")],
    purpose: Annotated[list[str], typer.Option("--purpose", help="A purpose the brand may use images for; repeat "
                                                                 "for several. Each must be in the consent.")],
    market: Annotated[list[str], typer.Option("--market", help="A market images may be published in; repeat for "
                                                               "several. Each must be in the consent.")],
    until: Annotated[str, typer.Option("--until", help="Last day images may be made, YYYY-MM-DD (inclusive); "
                                                       "not after the consent's valid_until.")],
    max_images: Annotated[int, typer.Option("--max-images", help="The most images the brand may render.")],
    rate: Annotated[str, typer.Option("--rate", help='Price per rendered image, e.g. "2.50 EUR/image" (a plain '
                                                     'decimal amount and an ISO 4217 currency code).')],
    valid_from: Annotated[Optional[str], typer.Option(
        "--from", help="First day images may be made, YYYY-MM-DD (default: today); not before the consent's "
                       "valid_from.")] = None,
    notes: Annotated[Optional[str], typer.Option("--notes", help="Free text kept in the signed licence (e.g. the "
                                                                 "contract reference).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the signed licence here (the copy to "
                                                              "send to the brand).")] = None,
    key: PrivateKeyOpt = None,
    pubkey: PubkeyOpt = None,
    trusted_keys: TrustedOpt = None,
    revocations: RevocationsOpt = None,
    accept_stale_revocations: AcceptStaleOpt = False,
) -> None:
    """Issue a licence of a twin to a brand, signed by the studio key for the model.

    The bundle must pass 'twinstudio verify' (else its exit code: 3 tampered, 4 consent not in force,
    5 signer not trusted, 6 revocation status unknown), and the licence may never exceed the consent:
    a purpose, market or date outside it, or a consent without 'generate', is refused by name (exit 4).
    The licence is kept in $TWINSTUDIO_HOME/licences/<id>.json.
    """
    from train.handoff.licence import issue_licence

    path, lic = issue_licence(bundle, licensee=licensee, purposes=purpose, markets=market, valid_until=until,
                              max_images=max_images, rate=rate, valid_from=valid_from, notes=notes, key=key,
                              pubkey=pubkey, trusted_keys=trusted_keys, revocations=revocations,
                              accept_stale_revocations=accept_stale_revocations, out=out)
    con = _console()
    con.print(f"[bold green]issued[/] licence {lic.id}: {escape(str(path))}", highlight=False)
    con.print(_terms_table(lic, f"Licence {lic.id}"))
    if out is not None:
        con.print(f"  send {escape(str(out))} to {escape(lic.licensee)}; they check it with: twinstudio licence "
                  f"verify {escape(out.name)} --bundle BUNDLE", highlight=False)


@licence_app.command("verify")
def licence_verify(
    licence: Annotated[str, typer.Argument(help="A licence file, or the id of a licence the studio holds.")],
    bundle: Annotated[Optional[Path], typer.Option("--bundle", help="Also verify this bundle and that it is the "
                                                                    "one the licence names.")] = None,
    pubkey: PubkeyOpt = None,
    trusted_keys: TrustedOpt = None,
    revocations: RevocationsOpt = None,
    accept_stale_revocations: AcceptStaleOpt = False,
) -> None:
    """Verify a licence: the studio's signature, a trusted signer, in force today, its consent not revoked.

    Exit codes (the first that applies):
    3  tampered: the licence (or the bundle) is not what was signed
    4  not in force: before its first or after its last day, its consent revoked or not in force, or
       --bundle is not the licensed bundle
    5  intact, but signed by a key that is not trusted (pin it: twinstudio keys trust studio.pub --name NAME)
    6  the revocation status of its consent is unknown or stale (0 with --accept-stale-revocations)
    0  valid
    2  unusable input: not a licence, a bad key, trusted-keys file or revocation list
    """
    from train.handoff.licence import VALID, verify_licence

    v = verify_licence(licence, bundle=bundle, pubkey=pubkey, trusted_keys=trusted_keys, revocations=revocations,
                       accept_stale_revocations=accept_stale_revocations)
    con = _console()
    colour = "green" if v.exit_code == VALID else "red" if v.exit_code in (3, 4) else "yellow"
    con.print(f"[bold {colour}]{escape(v.status)}[/]: licence {escape(str(licence))}", highlight=False)
    for p in v.problems:
        con.print(f"  [red]problem[/] {escape(p)}", highlight=False)
    if v.bundle is not None:
        b = v.bundle
        con.print(f"  bundle {escape(str(bundle))}: {escape(b.status)}", highlight=False)
        for p in [*b.integrity.problems, *b.consent_problems]:
            con.print(f"    {escape(p)}", highlight=False)
    if v.licence is not None:
        who = f"trusted ({escape(v.signer_name or '')})" if v.trusted else \
            f"[yellow]not trusted[/] (not in {escape(v.trust_source)})"
        con.print(f"  signed by key {v.key_id}: {who}", highlight=False)
    if v.revocation is not None:
        con.print(f"  revocation status: {escape(v.revocation.summary())}", highlight=False)
        if v.accepted_revocation_risk:
            con.print("    [yellow]accepted[/] (--accept-stale-revocations)", highlight=False)
    if v.licence is not None and v.exit_code == VALID:
        con.print(_terms_table(v.licence, f"Licence {v.licence.id}: valid"))
    raise typer.Exit(v.exit_code)


@licence_app.command("show")
def licence_show(
    licence: Annotated[str, typer.Argument(help="A licence file, or the id of a licence the studio holds.")],
    ledger: LedgerOpt = None,
) -> None:
    """Show a licence's terms and the images used and left under it (counted in the ledger)."""
    from train.handoff.ledger import images_used
    from train.handoff.licence import read_licence

    s = read_licence(licence)
    used = images_used(s.licence.id, ledger)
    _console().print(_terms_table(s.licence, f"Licence {s.licence.id} ({s.path})", used))


@licence_app.command("list")
def licence_list(ledger: LedgerOpt = None) -> None:
    """List the licences the studio holds, with the images used and left under each."""
    from train.handoff.ledger import usage_counts
    from train.handoff.licence import held_licences, store_dir

    held = held_licences()
    con = _console()
    if not held:
        con.print(f"no licences held in {escape(str(store_dir()))}; issue one with: twinstudio licence issue "
                  "BUNDLE ...", highlight=False)
        return
    counts = usage_counts(ledger)
    t = Table(title=f"Licences ({escape(str(store_dir()))})")
    for col in ("licence", "licensee", "model", "purposes", "markets", "valid", "used / max", "rate"):
        t.add_column(col)
    for s in held:
        lic = s.licence
        t.add_row(lic.id, escape(lic.licensee), escape(lic.subject_id), escape(", ".join(lic.purposes)),
                  escape(", ".join(lic.markets)), f"{lic.valid_from} to {lic.valid_until}",
                  f"{counts.get(lic.id, 0)} / {lic.max_images}", escape(str(lic.rate)))
    con.print(t)


# ----------------------------------------------------------------------------- ledger


@ledger_app.command("verify")
def ledger_verify(
    ledger: LedgerOpt = None,
    pubkey: PubkeyOpt = None,
    trusted_keys: TrustedOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Check every entry's signature (an audit; about 10k entries/s) "
                                                      "instead of the chain and sampled signatures.")] = False,
    expect_head: ExpectHeadOpt = None,
) -> None:
    """Verify the usage ledger: every line whole, chained to the one before, and signed by a trusted key.

    Names each edited, deleted, reordered, inserted or malformed line, and a torn last line.
    Exit codes: 0 intact; 3 not what the studio wrote (or torn); 2 no ledger, or a bad key file.
    """
    from rigs.errors import EXIT_OK, EXIT_TAMPERED
    from train.handoff.ledger import default_ledger_path, ledger_keys, verify_ledger

    keys, source = ledger_keys(pubkey, trusted_keys)
    r = verify_ledger(ledger or default_ledger_path(), keys, full=full, expect_head=_parse_head(expect_head))
    con = _console()
    verdict = "[bold green]intact[/]" if r.ok else "[bold red]tampered[/]"
    con.print(f"{verdict}: {escape(str(r.path))}: {r.entries} entries, {r.bytes / 1e6:.1f} MB in {r.seconds:.2f} s "
              f"({r.rate:,.0f} entries/s); {r.signatures_checked} signatures checked"
              + (" (all)" if full else " (the last, every 1024th, and around any break)"), highlight=False)
    for p in r.problems:
        con.print(f"  [red]{p.kind}[/] {escape(p.message)}", highlight=False)
    if r.problem_count > len(r.problems):
        con.print(f"  ... and {r.problem_count - len(r.problems)} more problems", highlight=False)
    if "untrusted" in r.kinds and not keys:
        con.print(f"  no trusted keys in {escape(source)}: pin the studio's key (twinstudio keys trust studio.pub "
                  "--name NAME) or pass --pubkey studio.pub", highlight=False)
    con.print(f"  chain head: seq {r.head_seq}, sha256 {r.head}" + (f", {r.head_time}" if r.head_time else ""),
              highlight=False)
    if r.signers:
        con.print(f"  signed by key(s) {', '.join(sorted(r.signers))} (trusted keys: {escape(source)})",
                  highlight=False)
    raise typer.Exit(EXIT_OK if r.ok else EXIT_TAMPERED)


@ledger_app.command("show")
def ledger_show(
    ledger: LedgerOpt = None,
    last: Annotated[int, typer.Option("--last", min=1, help="How many of the newest entries to show.")] = 20,
    licence: Annotated[Optional[str], typer.Option("--licence", help="Only the entries of this licence id.")]
    = None,
) -> None:
    """Show the newest entries of the ledger (as written; 'ledger verify' checks them)."""
    from train.handoff.ledger import default_ledger_path, read_entries

    path = ledger or default_ledger_path()
    entries = read_entries(path, licence=licence, last=last)
    t = Table(title=escape(f"Ledger {path}: the last {len(entries)} entries"
                           + (f" of licence {licence}" if licence else "")))
    for col in ("seq", "time (UTC)", "licence", "licensee", "model", "image", "purpose", "market", "rate"):
        t.add_column(col)
    for e in entries:
        t.add_row(str(e.seq), e.time, e.licence, escape(e.licensee), escape(e.subject), escape(e.image),
                  escape(e.purpose), escape(e.market), escape(e.rate))
    _console().print(t)


@ledger_app.command("repair")
def ledger_repair(ledger: LedgerOpt = None) -> None:
    """Move a torn last line (an append cut short by a crash) aside, so that recording can go on.

    Whole lines are never changed; the torn bytes are kept in <ledger>.torn-<offset>.
    """
    from train.handoff.ledger import repair_ledger

    r = repair_ledger(ledger)
    con = _console()
    if r.saved_to is None:
        con.print(f"nothing to repair: {escape(str(r.path))} ends with a whole line", highlight=False)
    else:
        con.print(f"[yellow]moved aside[/] a torn last line ({r.torn_bytes} bytes) of {escape(str(r.path))} to "
                  f"{escape(str(r.saved_to))}; run 'twinstudio ledger verify'", highlight=False)


# ----------------------------------------------------------------------------- royalties


def royalties_cmd(
    period: Annotated[str, typer.Option("--period", help="The month, YYYY-MM (UTC), e.g. 2026-12.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder for the CSV and the statements (default: $TWINSTUDIO_HOME/royalties/<period>).")]
    = None,
    ledger: LedgerOpt = None,
    pubkey: PubkeyOpt = None,
    trusted_keys: TrustedOpt = None,
    expect_head: ExpectHeadOpt = None,
) -> None:
    """Royalties of a month: images per licence x rate, per model; writes a CSV and one HTML statement per model.

    The ledger is verified first: one that fails gives no statement (exit 3). Amounts are exact; currencies
    are totalled separately, never added together.
    """
    from train.handoff.ledger import ledger_keys
    from train.handoff.royalties import royalties

    keys, _ = ledger_keys(pubkey, trusted_keys)
    r = royalties(ledger, period, keys=keys, out=out, expect_head=_parse_head(expect_head))
    con = _console()
    if r.provisional:
        con.print(f"[yellow]provisional[/]: {r.period} has not ended", highlight=False)
    if not r.statements:
        con.print(f"no images recorded and no licence in force in {r.period}", highlight=False)
    for st in r.statements:
        t = Table(title=escape(f"{r.period.name}: model {st.subject} (agency {st.agency or 'not named'})"))
        for col in ("licence", "licensee", "purposes", "markets", "images", "rate", "amount"):
            t.add_column(col, justify="right" if col in ("images", "rate", "amount") else "left")
        for ln in st.lines:
            t.add_row(ln.licence, escape(ln.licensee), escape(", ".join(ln.purposes)), escape(", ".join(ln.markets)),
                      str(ln.images), f"{ln.rate.amount} {ln.currency}", f"{ln.amount} {ln.currency}")
        for cur, amount in st.totals.items():
            t.add_row(f"total {cur}", "", "", "", str(sum(ln.images for ln in st.lines if ln.currency == cur)), "",
                      f"{amount} {cur}", style="bold")
        con.print(t)
    led = r.ledger
    con.print(f"ledger verified: {led.entries} entries, chain head seq {led.head_seq} sha256 {led.head}",
              highlight=False)
    for p in r.files:
        con.print(f"  wrote {escape(str(p))}", highlight=False)
