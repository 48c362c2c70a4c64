"""``twinstudio consent ...`` and ``twinstudio capture ...``: thin layers over capture/."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

consent_app = typer.Typer(help="The subject's consent: record, show, revoke.", no_args_is_help=True)
capture_app = typer.Typer(help="Capture sessions: start, takes, status, resume, reshoot.", no_args_is_help=True)

SessionOpt = Annotated[Path, typer.Option("--session", help="Session folder.")]
PlainOpt = Annotated[bool, typer.Option("--plain", help="Log lines instead of the live dashboard.")]
RigOpt = Annotated[Optional[str], typer.Option("--rig", help="Rig file or library name (must match the session's).")]
FramesOpt = Annotated[Optional[int], typer.Option(help="Frames of a motion take (default: the rig's).")]
AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster (HOST:PORT) whose nodes are the rig's capture hosts ([[hosts]] in the rig "
                      "file). Omitted: an embedded local Ray with every host on this machine.")]


def _console():
    from twinstudio.cli import console

    return console


@consent_app.command("add")
def consent_add(
    session: SessionOpt,
    subject: Annotated[str, typer.Option(help="Pseudonymous subject id (no real names).")],
    agency: Annotated[str, typer.Option(help="The subject's agency.")],
    scope: Annotated[list[str], typer.Option(help="Scope granted: capture, train, generate, share (repeat).")],
    purpose: Annotated[list[str], typer.Option(help="Purpose, e.g. e-commerce (repeat).")],
    market: Annotated[list[str], typer.Option(help="Market, e.g. EU (repeat).")],
    valid_until: Annotated[dt.datetime, typer.Option(formats=["%Y-%m-%d"], help="Last day in force.")],
    compensation: Annotated[str, typer.Option(help="Compensation reference (contract/invoice).")],
    document: Annotated[Optional[Path], typer.Option(help="The signed consent document (its sha256 is kept).")]
    = None,
    document_sha256: Annotated[Optional[str], typer.Option(help="sha256 of the signed document instead.")] = None,
    valid_from: Annotated[Optional[dt.datetime], typer.Option(formats=["%Y-%m-%d"], help="First day (default today).")]
    = None,
) -> None:
    """Record the subject's consent for this session."""
    from pydantic import ValidationError

    from capture.consent import ConsentInputError, ConsentRecord, add_consent, sha256_of_document

    if (document is None) == (document_sha256 is None):
        raise typer.BadParameter("give exactly one of --document or --document-sha256", param_hint="--document")
    sha = sha256_of_document(document) if document else document_sha256
    try:
        rec = ConsentRecord(subject_id=subject, agency=agency, scopes=scope, purposes=purpose, markets=market,
                            valid_from=(valid_from or dt.datetime.now()).date(), valid_until=valid_until.date(),
                            compensation_ref=compensation, document_sha256=sha)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConsentInputError(f"invalid consent: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    add_consent(session, rec)
    _console().print(f"[green]recorded[/] consent {rec.consent_id} for {escape(rec.subject_id)}: "
                     f"{', '.join(rec.scopes)} until {rec.valid_until}", highlight=False)


@consent_app.command("show")
def consent_show(session: SessionOpt) -> None:
    """Show the session's consent records and whether each is in force today."""
    from capture.consent import load_consents, session_subject

    records = load_consents(session)
    if not records:
        _console().print(f"no consent recorded in {escape(str(session))}")
        raise typer.Exit(1)
    t = Table(title=f"Consent ({escape(str(session))})")
    for col in ("id", "subject", "agency", "scopes", "purposes", "markets", "valid", "compensation", "status"):
        t.add_column(col)
    today = dt.date.today()
    subject = session_subject(session)
    for r in records:
        status = ("[red]another subject[/]" if subject is not None and r.subject_id != subject else
                  "revoked" if r.revoked_at else ("expired" if today > r.valid_until else
                                                  "not yet" if today < r.valid_from else "in force"))
        t.add_row(*(escape(x) for x in (r.consent_id, r.subject_id, r.agency, ", ".join(r.scopes),
                                        ", ".join(r.purposes), ", ".join(r.markets),
                                        f"{r.valid_from} – {r.valid_until}", r.compensation_ref)), status)
    _console().print(t)


@consent_app.command("revoke")
def consent_revoke(
    session: SessionOpt,
    reason: Annotated[str, typer.Option(help="Why (kept with the record).")],
    consent_id: Annotated[Optional[str], typer.Option("--id", help="Only this record (default: all).")] = None,
    key: Annotated[Optional[Path], typer.Option(
        "--key", help="Studio private key that signs the revocation list (default: "
                      "$TWINSTUDIO_HOME/keys/studio.key).")] = None,
    valid_days: Annotated[float, typer.Option(
        "--valid-days", help="Days until the list's next update.")] = 7.0,
) -> None:
    """Revoke consent: no further takes, training or bundles; the studio's signed revocation list gets it.

    The records are marked revoked in consent.json, then added to the studio's signed revocation list
    (publish it with 'twinstudio revocations export'), so bundles already out fail 'twinstudio verify'
    (exit 4) wherever that list is imported. Exit 0 also when there is no default studio key (then no
    bundle was ever signed with it; this is said); 2 when --key names a missing key. Run again after a
    revocation that reached consent.json only: records revoked but not yet listed are listed.
    """
    from rich.markup import escape

    from capture.consent import load_consents, revoke_consent
    from twinstudio.cli_handoff import add_to_studio_list, studio_signing_key

    private, key_path = studio_signing_key(key)  # a --key that cannot be used stops here, before any change
    in_force = [r for r in load_consents(session)
                if r.revoked_at is None and (consent_id is None or r.consent_id == consent_id)]
    if in_force:
        hit = revoke_consent(session, reason, consent_id)
    else:  # nothing left to revoke: list what was revoked here but is not on the signed list yet
        from train.handoff.integrity import key_id
        from train.handoff.revocations import held_list

        held = held_list(key_id(private.public_key())) if private is not None else None
        listed = {e.consent_id for e in held.list.revoked} if held is not None else set()
        hit = [r for r in load_consents(session) if r.revoked_at is not None and r.consent_id not in listed
               and (consent_id is None or r.consent_id == consent_id)]
        if not hit or private is None:
            revoke_consent(session, reason, consent_id)  # raises: no consent in force to revoke
    for r in hit:
        what = "revoked" if in_force else f"listing (revoked on {r.revoked_at.date()})"
        _console().print(f"[yellow]{what}[/] consent {escape(r.consent_id)} of {escape(r.subject_id)}",
                         highlight=False)
    add_to_studio_list(hit, private, key_path, valid_days)


def _options(frames, sim_latency, sim_jitter, sim_failure_rate, sim_disconnect_after, virtual_source,
             render_scale):
    from capture.orchestrator import CaptureOptions

    return CaptureOptions(latency_s=sim_latency, jitter_s=sim_jitter, failure_rate=sim_failure_rate,
                          disconnect_after=sim_disconnect_after, source=virtual_source, frames=frames,
                          render_scale=render_scale, prompt=_prompt)


def _prompt(text: str) -> None:
    typer.prompt(f"{text} [Enter]", default="", show_default=False)


class _events:
    """The live dashboard, or plain log lines when asked or when not on a terminal."""

    def __init__(self, plain: bool, session: Path) -> None:
        self.plain = plain or not _console().is_terminal
        self.session = session

    def __enter__(self):
        from twinstudio.capture_dashboard import LiveDashboard, PlainLog

        if self.plain:
            return PlainLog(console=_console())
        self.dash = LiveDashboard(console=_console(), session=str(self.session))
        return self.dash.__enter__()

    def __exit__(self, *exc):
        if not self.plain:
            self.dash.__exit__(*exc)


def _open(session: Path, rig: str | None):
    from capture.session import Session, SessionError
    from rigs.fileio import sha256_file
    from rigs.rigfile import resolve_rig_path

    s = Session.open(session)
    if rig is not None and sha256_file(resolve_rig_path(rig)) != s.manifest.rig_sha256:
        raise SessionError(f"rig {rig} differs from the rig session {session} was started with "
                           f"({s.manifest.rig}); takes use {session / 'rig.toml'}", session=str(session))
    return s


SimLatency = Annotated[float, typer.Option(help="Virtual cameras: added latency per shot, s.", hidden=True)]
SimJitter = Annotated[float, typer.Option(help="Virtual cameras: latency jitter, s.", hidden=True)]
SimFail = Annotated[float, typer.Option(help="Virtual cameras: failure probability per shot.", hidden=True)]
SimDisc = Annotated[Optional[int], typer.Option(help="Virtual cameras: disconnect after N shots.", hidden=True)]
VSource = Annotated[str, typer.Option(help="Virtual cameras: render (the virtual studio) or pattern.",
                                      hidden=True)]
RScale = Annotated[float, typer.Option(help="Virtual studio render scale.", hidden=True)]


def _command() -> str:
    """This command line, as the writer lock records it for whoever is refused."""
    import sys

    return " ".join(["twinstudio", *sys.argv[1:]])


def _writing(s):
    """The session's writer lock for this whole command (a second writer exits 2 naming this one)."""
    return s.writing(command=_command())


def _ray(s, address: str | None):
    """Ray for a rig over several capture hosts (a cluster's address, or an embedded Ray on this machine
    with every host's resource); nothing for a single-host rig unless an address is given."""
    import contextlib

    hosts = s.rig.hosts
    if not hosts and address is None:
        return contextlib.nullcontext()
    from capture.hosts import host_resource
    from twinstudio.cluster import connect

    return connect(address, resources={host_resource(h): 1 for h in hosts} if address is None else None)


def _agents(s):
    """Host agents kept for every take of this command (a rig with [[hosts]]), ended at its end."""
    import contextlib

    if not s.rig.hosts:
        return contextlib.nullcontext()
    from capture.hosts import HostAgents

    return HostAgents()


def _take(kind: str, session: Path, rig, frames, plain, address, *sim) -> None:
    from capture.orchestrator import run_take

    s = _open(session, rig)
    with _writing(s), _ray(s, address), _events(plain, session) as on_event:
        rec = run_take(s, kind, _options(frames, *sim), on_event=on_event)
    _summary(rec)


def _summary(rec) -> None:
    missing = rec.missing()
    skew = f"{rec.skew_s * 1000:.1f} ms" if rec.skew_s is not None else "-"
    style = "green" if rec.status == "complete" else "yellow"
    frames = sum(len(v) for v in rec.captured.values())
    _console().print(f"[{style}]{escape(rec.id)}[/]: {rec.status}, {frames} frames, {len(missing)} missing, "
                     f"skew {skew}")
    for flag in rec.qa_flags:
        _console().print(f"  [yellow]qa[/] {escape(flag)}", highlight=False)
    if missing:
        _console().print(f"  fill the gaps with: twinstudio capture reshoot {rec.id} --session <session>")


@capture_app.command("start")
def capture_start(
    session: SessionOpt,
    rig: Annotated[str, typer.Option("--rig", help="Rig file or library name.")],
    subject: Annotated[str, typer.Option(help="Pseudonymous subject id.")],
) -> None:
    """Create a session folder for one subject on a rig."""
    from capture.session import Session

    s = Session.create(session, rig, subject)
    _console().print(f"[green]session[/] {escape(str(s.path))} for {escape(subject)} on rig "
                     f"{escape(s.manifest.rig)}; record consent next: twinstudio consent add --session "
                     f"{escape(str(s.path))} ...", highlight=False)


@capture_app.command("calibrate")
def capture_calibrate(session: SessionOpt, rig: RigOpt = None, address: AddressOpt = None, plain: PlainOpt = False,
                      sim_latency: SimLatency = 0.0, sim_jitter: SimJitter = 0.0, sim_failure_rate: SimFail = 0.0,
                      sim_disconnect_after: SimDisc = None, virtual_source: VSource = "render",
                      render_scale: RScale = 1.0) -> None:
    """Shoot the ChArUco board at the rig's calibration poses (virtual: placed by the studio)."""
    _take("calibration", session, rig, None, plain, address, sim_latency, sim_jitter, sim_failure_rate,
          sim_disconnect_after, virtual_source, render_scale)


@capture_app.command("plates")
def capture_plates(session: SessionOpt, rig: RigOpt = None, address: AddressOpt = None, plain: PlainOpt = False,
                   sim_latency: SimLatency = 0.0, sim_jitter: SimJitter = 0.0, sim_failure_rate: SimFail = 0.0,
                   sim_disconnect_after: SimDisc = None, virtual_source: VSource = "render",
                   render_scale: RScale = 1.0) -> None:
    """Shoot clean plates: the empty studio from every camera under each lighting step of the stills.

    Clear the stage first (a hardware rig asks for it before the first frame); the plates let
    the subject's edges be separated from the backdrop later.
    """
    _take("plates", session, rig, None, plain, address, sim_latency, sim_jitter, sim_failure_rate,
          sim_disconnect_after, virtual_source, render_scale)


@capture_app.command("stills")
def capture_stills(session: SessionOpt, rig: RigOpt = None, address: AddressOpt = None, plain: PlainOpt = False,
                   sim_latency: SimLatency = 0.0, sim_jitter: SimJitter = 0.0, sim_failure_rate: SimFail = 0.0,
                   sim_disconnect_after: SimDisc = None, virtual_source: VSource = "render",
                   render_scale: RScale = 1.0) -> None:
    """Shoot every camera under every lighting preset step."""
    _take("stills", session, rig, None, plain, address, sim_latency, sim_jitter, sim_failure_rate,
          sim_disconnect_after, virtual_source, render_scale)


@capture_app.command("motion")
def capture_motion(session: SessionOpt, rig: RigOpt = None, address: AddressOpt = None, frames: FramesOpt = None,
                   plain: PlainOpt = False, sim_latency: SimLatency = 0.0, sim_jitter: SimJitter = 0.0,
                   sim_failure_rate: SimFail = 0.0, sim_disconnect_after: SimDisc = None,
                   virtual_source: VSource = "render", render_scale: RScale = 1.0) -> None:
    """Shoot synchronised frames at the rig's fps."""
    _take("motion", session, rig, frames, plain, address, sim_latency, sim_jitter, sim_failure_rate,
          sim_disconnect_after, virtual_source, render_scale)


@capture_app.command("run")
def capture_run(session: SessionOpt, rig: RigOpt = None, address: AddressOpt = None, frames: FramesOpt = None,
                plain: PlainOpt = False, sim_latency: SimLatency = 0.0, sim_jitter: SimJitter = 0.0,
                sim_failure_rate: SimFail = 0.0, sim_disconnect_after: SimDisc = None,
                virtual_source: VSource = "render", render_scale: RScale = 1.0) -> None:
    """The scripted session: calibrate, clean plates of the empty studio, stills, motion."""
    from capture.orchestrator import prepare_virtual_studio, run_take

    s = _open(session, rig)
    opts = _options(frames, sim_latency, sim_jitter, sim_failure_rate, sim_disconnect_after, virtual_source,
                    render_scale)
    recs = []
    kinds = ("calibration", "plates", "stills", "motion")
    with _writing(s), _ray(s, address), _events(plain, session) as on_event, _agents(s) as agents:
        if s.rig.is_virtual and virtual_source == "render":
            prepare_virtual_studio(s, kinds, opts, on_event)
        opts = dataclasses.replace(opts, agents=agents)  # a rig over hosts: one agent per host for all takes
        for kind in kinds:
            recs.append(run_take(s, kind, opts, on_event=on_event))
    for rec in recs:
        _summary(rec)


@capture_app.command("status")
def capture_status(session: SessionOpt) -> None:
    """The session's takes: status, frames, missing cameras, skew, QA flags."""
    from capture.consent import load_consents
    from capture.session import Session, current_writer

    s = Session.open(session)
    m = s.manifest
    c = _console()
    c.print(f"session {s.path}: subject {m.subject_id}, rig {m.rig}, "
            f"{len(load_consents(session))} consent record(s)", markup=False, highlight=False)
    t = Table(title="Takes")
    for col in ("take", "kind", "status", "frames", "missing", "skew ms", "QA"):
        t.add_column(col)
    for take in m.takes.values():
        qa_frames = sum(1 for frames in take.captured.values() for r in frames.values() if r.qa and r.qa["flags"])
        flags = "; ".join(take.qa_flags) or "-"
        if qa_frames:
            flags += f" ({qa_frames} frame(s) flagged)"
        t.add_row(take.id, take.kind, take.status, str(sum(len(v) for v in take.captured.values())),
                  str(len(take.missing())), f"{take.skew_s * 1000:.1f}" if take.skew_s is not None else "-",
                  escape(flags))
    c.print(t)
    if s.torn_tail:
        c.print("[yellow]journal[/]: ends in a torn line (a write in progress, or a crash mid-write); the next "
                "writer ('capture resume') cuts it off and keeps it aside")
    h = current_writer(session)
    if h is not None:
        c.print(f"[yellow]in use[/]: being written by pid {h.get('pid')} on {escape(str(h.get('host')))} since "
                f"{h.get('since')}: {escape(str(h.get('command')))}", highlight=False)


@capture_app.command("resume")
def capture_resume(session: SessionOpt, plain: PlainOpt = False, address: AddressOpt = None,
                   virtual_source: VSource = "render", render_scale: RScale = 1.0) -> None:
    """After a crash: rebuild the manifest from journal and files, then finish interrupted takes."""
    from capture.orchestrator import resume

    s = _open(session, None)
    with _writing(s), _ray(s, address), _events(plain, session) as on_event:
        out = resume(s, _options(None, 0.0, 0.0, 0.0, None, virtual_source, render_scale), on_event=on_event)
    _console().print(f"resumed {escape(str(session))}: {out['adopted']} adopted, {out['discarded']} discarded, "
                     f"{out['lost']} lost; completed takes: {', '.join(out['completed']) or 'none'}"
                     + (f"; torn journal line kept in {out['torn']}" if out["torn"] else ""))


@capture_app.command("repair")
def capture_repair(session: SessionOpt) -> None:
    """Cut a damaged journal at its first bad line (after a backup), then recover from the files on disk.

    For the error "corrupt journal line": the whole journal is copied to
    journal.jsonl.bak-<time> and the lines from the bad one on to
    journal.jsonl.cut-<time>; frames on disk that the cut lines recorded are
    adopted again. Finish interrupted takes afterwards with 'capture resume'.
    """
    from capture.session import repair_journal

    out = repair_journal(session, command=_command())
    con = _console()
    if out["bad_line"] is None:
        con.print(f"[green]journal sound[/]: {escape(str(session / 'journal.jsonl'))}"
                  + (f" (a torn final line was cut off, kept in {escape(out['torn'])})" if out["torn"] else ""))
    else:
        con.print(f"[yellow]journal cut[/] at line {out['bad_line']} ({escape(out['reason'])}): "
                  f"{out['cut_events']} line(s) moved to {escape(out['cut'])}; backup {escape(out['backup'])}")
    con.print(f"recovered from disk: {out['adopted']} frame(s) adopted, {out['lost']} lost, "
              f"{out['discarded']} half-written discarded, {out['unlisted']} in unknown take folders (kept); "
              f"then: twinstudio capture resume --session {escape(str(session))}")


@capture_app.command("reshoot")
def capture_reshoot(take: Annotated[str, typer.Argument(help="Take id, e.g. stills-002.")], session: SessionOpt,
                    plain: PlainOpt = False, address: AddressOpt = None, sim_latency: SimLatency = 0.0,
                    sim_failure_rate: SimFail = 0.0,
                    virtual_source: VSource = "render", render_scale: RScale = 1.0) -> None:
    """Fire only the cameras (and frames) a take is missing."""
    from capture.orchestrator import reshoot

    s = _open(session, None)
    with _writing(s), _ray(s, address), _events(plain, session) as on_event:
        rec = reshoot(s, take, _options(None, sim_latency, 0.0, sim_failure_rate, None, virtual_source,
                                        render_scale), on_event=on_event)
    _summary(rec)
