"""A capture session on disk: manifest, journal and frame files.

Layout of a session folder::

    session.json                          manifest (schema twinstudio.session/1), derived from the journal
    journal.jsonl                         every state change, appended and fsynced before it is applied
    rig.toml                              the rig file the session was started with
    consent.json                          the subject's consent records (capture.consent)
    takes/<take>/<camera>/<frame:06d>.<ext>   captured files, written once (temp, fsync, rename) and hashed

    session.lock                          the writer lock (holder's pid, host, command)

The journal is the source of truth: ``session.json`` is rewritten from it at
the end of every take and by ``resume``; after a crash, :func:`recover`
rebuilds the manifest from the journal and the files, discards half-written
files and adopts complete files the journal had not yet recorded.

Every journal line carries its own checksum (``"crc"``, CRC-32 of the line
without it), so a line torn by a power cut is told from a complete one. A torn
or garbled *final* line is what a crash mid-append leaves: readers ignore it,
and the next writer cuts it off (keeping its bytes in
``journal.jsonl.torn-<time>``) before appending. A bad line anywhere else is
damage no crash explains: opening the session fails naming the file and line,
and :func:`repair_journal` (``twinstudio capture repair``) cuts the journal
there after a backup.

One process writes a session at a time: :meth:`Session.writing` holds an OS
lock on ``session.lock`` (a POSIX record lock, released by the kernel when
the holder dies, never inherited by its worker processes); a second writer
gets :class:`SessionLocked` naming the holder. Readers take no lock.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import shutil
import socket
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rigs.errors import TwinstudioError
from rigs.fileio import TMP_SUFFIX, atomic_write_json, fsync_dir, sha256_file
from rigs.rigfile import Rig, load_rig, resolve_rig_path

SESSION_SCHEMA = "twinstudio.session"
SESSION_VERSION = 1
#: journal format: 2 = every line carries a CRC-32 (``"crc"``); 1 = plain JSON lines (older sessions)
JOURNAL_FORMAT = 2
LOCK_FILE = "session.lock"
TAKE_PREFIX = {"calibration": "calib", "plates": "plates", "stills": "stills", "motion": "motion"}
_FRAME_NAME = re.compile(r"^(\d{6})\.[a-z0-9]+$")


class SessionError(TwinstudioError):
    """The session folder is missing, damaged or used wrongly (exit code 2)."""

    exit_code = 2


class SessionLocked(SessionError):
    """Another process is writing the session: names it (pid, host, command, since when)."""


class JournalCorrupt(SessionError):
    """A journal line other than the last is damaged: names the file and the line."""


class FrameRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # relative to the session folder
    sha256: str
    size: int
    trigger_time: float | None = None
    exposure_s: float | None = None
    download_s: float | None = None
    attempts: int = 1
    qa: dict[str, Any] | None = None
    adopted: bool = False  # found on disk after a crash, not reported by its worker


class FramePlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    step: str = ""
    clip_frame: int | None = None
    board_index: int | None = None
    time: float = 0.0  # scheduled time from the take's start, seconds


class TakeRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    kind: str
    status: str = "open"  # open | complete | incomplete
    cameras: list[str]
    frames: list[FramePlan]
    started_at: float
    ended_at: float | None = None
    captured: dict[str, dict[int, FrameRecord]] = Field(default_factory=dict)  # camera -> frame -> record
    failures: dict[str, dict[int, str]] = Field(default_factory=dict)  # camera -> frame -> last error
    skew_s: float | None = None
    qa_flags: list[str] = Field(default_factory=list)
    hosts: dict[str, str] = Field(default_factory=dict)  # camera -> capture host (multi-host rigs only)
    # multi-host rigs: frame -> host -> {"ms": head send to agent receipt, "at": agent's receipt,
    # "fired": when the agent fired its cameras (the frame's scheduled fire time, or later), time.time()}
    dispatch: dict[int, dict[str, dict[str, float]]] = Field(default_factory=dict)

    def dispatch_spread_ms(self) -> dict[int, float]:
        """Per frame fired on two or more hosts: the spread of the hosts' trigger times (when each agent
        fired its cameras; where not recorded, when it received the command), ms."""
        def t(d: dict) -> float:
            return d.get("fired", d["at"])

        return {i: (max(t(d) for d in hs.values()) - min(t(d) for d in hs.values())) * 1000.0
                for i, hs in self.dispatch.items() if len(hs) >= 2}

    def missing(self) -> list[tuple[str, int]]:
        """(camera, frame) pairs of the plan without a file on record."""
        return [(c, f.index) for c in self.cameras for f in self.frames
                if f.index not in self.captured.get(c, {})]

    def trigger_skew(self) -> float | None:
        """Worst spread of trigger times across cameras over the take's frames, seconds."""
        worst = None
        for f in self.frames:
            ts = [r[f.index].trigger_time for r in self.captured.values()
                  if f.index in r and r[f.index].trigger_time is not None]
            if len(ts) >= 2:
                worst = max(worst or 0.0, max(ts) - min(ts))
        return worst


class SessionManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: str = Field(SESSION_SCHEMA, alias="schema")
    version: int = SESSION_VERSION
    subject_id: str
    rig: str
    rig_sha256: str
    created_at: float
    takes: dict[str, TakeRecord] = Field(default_factory=dict)
    settings: dict[str, dict[str, str]] = Field(default_factory=dict)  # camera -> last read-back


_CRC_SUFFIX = re.compile(rb',"crc":"([0-9a-f]{8})"\}$')


def _encode_line(event: dict) -> bytes:
    body = json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return body[:-1] + b',"crc":"%08x"}\n' % zlib.crc32(body)


def _decode_line(line: bytes, checksummed: bool) -> dict:
    """The event of one journal line (without its newline); ValueError saying why it is bad."""
    m = _CRC_SUFFIX.search(line)
    if m is None:
        if checksummed:
            raise ValueError("no checksum (torn or edited)")
        body = line
    else:
        body = line[: m.start()] + b"}"
        if int(m.group(1), 16) != zlib.crc32(body):
            raise ValueError("checksum mismatch")
    try:
        ev = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(ev, dict) or "ev" not in ev:
        raise ValueError("not a journal event")
    return ev


@dataclass
class JournalScan:
    """What a journal holds: its sound events, and where (if anywhere) it is damaged."""

    events: list[dict]
    good_bytes: int                      # length of the sound prefix (every event above)
    size: int                            # the file's length when read
    torn: bytes = b""                    # a torn or garbled final line (a crash mid-append)
    bad_line: int | None = None          # 1-based number of a damaged line that is not the last
    bad_reason: str = ""
    needs_newline: bool = False          # the last event is complete but its newline never landed


class Journal:
    """Append-only JSON lines, each with its checksum; every append is flushed and fsynced before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, events: list[dict]) -> None:
        if not events:
            return
        data = b"".join(_encode_line(e) for e in events)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def scan(self) -> JournalScan:
        """Read every line and classify it; never changes the file."""
        data = self.path.read_bytes() if self.path.exists() else b""
        lines = data.split(b"\n")
        # the last element is what follows the final newline: b"" when the file ends cleanly
        last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
        checksummed = True
        events: list[dict] = []
        offset = 0
        for i, raw in enumerate(lines):
            end = offset + len(raw) + (1 if i < len(lines) - 1 else 0)
            if raw.strip():
                try:
                    if i == 0:  # the session line says which format the rest is in (damaged, it still says)
                        checksummed = b'"crc":' in raw
                    events.append(_decode_line(raw, checksummed))
                except ValueError as e:
                    if i == last:
                        return JournalScan(events, offset, len(data), torn=data[offset:])
                    return JournalScan(events, offset, len(data), bad_line=i + 1, bad_reason=str(e))
            offset = end
        needs_nl = bool(data) and not data.endswith(b"\n")
        return JournalScan(events, len(data), len(data), needs_newline=needs_nl)

    def read(self) -> list[dict]:
        """Every sound event; a torn final line (a crash mid-append) is ignored, any other bad line raises."""
        return self.sound(self.scan()).events

    def sound(self, scan: JournalScan) -> JournalScan:
        """``scan`` itself, or JournalCorrupt naming the damaged line that is not the last."""
        if scan.bad_line is not None:
            raise JournalCorrupt(f"{self.path}:{scan.bad_line}: corrupt journal line ({scan.bad_reason}); "
                                 f"'twinstudio capture repair --session {self.path.parent}' cuts the journal "
                                 "there after a backup and recovers from the files on disk",
                                 path=str(self.path), line=scan.bad_line)
        return scan

    def cut_torn_tail(self) -> Path | None:
        """Writers only: cut a torn final line off (its bytes kept beside the journal); returns that file."""
        scan = self.sound(self.scan())
        if scan.needs_newline:
            with open(self.path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            return None
        if not scan.torn:
            return None
        aside = self.path.with_name(f"{self.path.name}.torn-{_stamp()}")
        from rigs.fileio import atomic_write_bytes

        atomic_write_bytes(aside, scan.torn)
        self.truncate(scan.good_bytes)
        return aside

    def truncate(self, size: int) -> None:
        """Cut the journal to its first ``size`` bytes, durably (writers only, after keeping the rest)."""
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


# ----------------------------------------------------------------------------- the writer lock

_held_locks: dict[str, list] = {}  # realpath of a session -> [fd, depth, holder]: this process's locks


def lock_holder(session_dir: Path | str) -> dict | None:
    """Who holds (or last held) a session's writer lock, as recorded in ``session.lock``; None if unknown."""
    held = _held_locks.get(os.path.realpath(session_dir))
    if held is not None:  # never open the file we hold a POSIX lock on: closing it would drop the lock
        return dict(held[2])
    p = Path(session_dir) / LOCK_FILE
    try:
        doc = json.loads(p.read_text() or "null")
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


@contextmanager
def writer_lock(session_dir: Path | str, command: str | None = None) -> Iterator[None]:
    """Hold the session's exclusive writer lock (re-entrant within a process).

    A POSIX record lock on ``session.lock``: the kernel releases it when the
    holder exits or dies, and worker processes forked by the holder do not
    inherit it. The holder's pid, host, command and start time are written
    into the file for whoever is refused.
    """
    key = os.path.realpath(session_dir)
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    import fcntl

    path = Path(session_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        h = lock_holder(session_dir) or {}
        who = (f"pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}: "
               f"{h.get('command', '?')}")
        raise SessionLocked(f"session {session_dir} is being written by another process ({who}); wait for it to "
                            "finish or stop it. Reading (capture status) works meanwhile.",
                            path=str(session_dir), holder=h or None) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _held_locks[key] = [fd, 1, holder]
    try:
        yield
    finally:
        _held_locks[key][1] -= 1
        if _held_locks[key][1] == 0:
            del _held_locks[key]
            os.close(fd)  # releases the lock; the holder record stays, for the curious


def current_writer(session_dir: Path | str) -> dict | None:
    """The process writing the session now (its recorded pid, host, command, since), or None when none is."""
    import fcntl

    p = Path(session_dir) / LOCK_FILE
    if holds_lock(session_dir):
        return lock_holder(session_dir)
    if not p.exists():
        return None
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:  # a shared lock for a moment: refused while a writer holds the exclusive one
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return lock_holder(session_dir) or {}
        return None
    finally:
        os.close(fd)


def holds_lock(session_dir: Path | str) -> bool:
    """Whether this process holds the session's writer lock."""
    return os.path.realpath(session_dir) in _held_locks


def read_manifest(session_dir: Path | str) -> SessionManifest:
    """Read and validate ``session.json`` (for later stages, which read sessions but never write them)."""
    p = Path(session_dir) / "session.json"
    try:
        m = SessionManifest.model_validate(json.loads(p.read_text()))
    except FileNotFoundError:
        raise SessionError(f"{p} does not exist: not a capture session", path=str(p)) from None
    except (ValueError, ValidationError, RecursionError) as e:
        raise SessionError(f"{p}: not a valid session manifest: {type(e).__name__}: {str(e)[:300]}",
                           path=str(p)) from e
    if m.schema_ != SESSION_SCHEMA or m.version != SESSION_VERSION:
        raise SessionError(f"{p}: schema {m.schema_}/{m.version} is not {SESSION_SCHEMA}/{SESSION_VERSION}",
                           path=str(p))
    return m


def apply_event(m: SessionManifest | None, ev: dict) -> SessionManifest:
    """The manifest after one journal event (the one place the manifest changes)."""
    kind = ev["ev"]
    if kind == "session":
        return SessionManifest(subject_id=ev["subject_id"], rig=ev["rig"], rig_sha256=ev["rig_sha256"],
                               created_at=ev["t"])
    if m is None:
        raise SessionError(f"journal starts with {kind!r}, not with the session record")
    if kind == "take_start":
        m.takes[ev["take"]] = TakeRecord(id=ev["take"], kind=ev["kind"], cameras=ev["cameras"],
                                         frames=[FramePlan(**f) for f in ev["frames"]], started_at=ev["t"],
                                         hosts=ev.get("hosts", {}))
    elif kind == "dispatch":  # a frame's trigger reaching each capture host's agent
        m.takes[ev["take"]].dispatch.setdefault(int(ev["frame"]), {}).update(ev["hosts"])
    elif kind == "frame":
        take = m.takes[ev["take"]]
        take.captured.setdefault(ev["camera"], {})[int(ev["frame"])] = FrameRecord(**ev["record"])
        take.failures.get(ev["camera"], {}).pop(int(ev["frame"]), None)
    elif kind == "frame_failed":
        m.takes[ev["take"]].failures.setdefault(ev["camera"], {})[int(ev["frame"])] = ev["error"]
    elif kind == "frame_lost":
        m.takes[ev["take"]].captured.get(ev["camera"], {}).pop(int(ev["frame"]), None)
    elif kind == "take_end":
        take = m.takes[ev["take"]]
        take.status, take.ended_at = ev["status"], ev["t"]
        take.skew_s = ev.get("skew_s")
        take.qa_flags = ev.get("qa_flags", [])
    elif kind == "take_reopen":
        m.takes[ev["take"]].status = "open"
    elif kind == "settings":
        m.settings[ev["camera"]] = ev["readback"]
    elif kind in ("discarded", "note"):
        pass
    else:
        raise SessionError(f"unknown journal event {kind!r}")
    return m


def _replay(journal: Journal) -> tuple[SessionManifest, bool]:
    """The manifest the journal's sound events build, and whether a torn final line was left out."""
    scan = journal.sound(journal.scan())
    m = None
    try:
        for ev in scan.events:
            m = apply_event(m, ev)
    except (KeyError, TypeError, ValidationError) as e:
        raise SessionError(f"{journal.path}: cannot replay the journal: {e}", path=str(journal.path)) from e
    if m is None:
        raise SessionError(f"{journal.path} is empty" + (" but for a torn line" if scan.torn else ""),
                           path=str(journal.path))
    return m, bool(scan.torn)


class Session:
    """An open session folder. Library code; not thread-safe.

    Opening replays the journal and changes nothing, so readers can open a
    session while another process captures into it. Changes (:meth:`record`)
    need the writer lock: hold it with ``with session.writing(): ...``.
    """

    def __init__(self, path: Path, manifest: SessionManifest, torn_tail: bool = False) -> None:
        self.path = path
        self.manifest = manifest
        self.journal = Journal(path / "journal.jsonl")
        self.torn_tail = torn_tail  # the journal ends in a torn line (a crash, or a write in progress)
        self.torn_aside: Path | None = None  # where a writer kept the torn line it cut off

    # ------------------------------------------------------------- creating and opening

    @classmethod
    def create(cls, path: Path | str, rig_file: Path | str, subject_id: str) -> Session:
        """Start a new session for one subject with a rig (copied into the session)."""
        path = Path(path)
        rig_path = resolve_rig_path(rig_file)
        rig = load_rig(rig_path)  # validate before writing anything
        if (path / "journal.jsonl").exists():
            raise SessionError(f"{path} already holds a session; use it, or pick another folder", path=str(path))
        path.mkdir(parents=True, exist_ok=True)
        with writer_lock(path):
            if (path / "journal.jsonl").exists():  # another process created it meanwhile
                raise SessionError(f"{path} already holds a session; use it, or pick another folder",
                                   path=str(path))
            shutil.copyfile(rig_path, path / "rig.toml")
            (path / "takes").mkdir(exist_ok=True)
            fsync_dir(path)
            s = cls(path, None)  # type: ignore[arg-type]
            s.record([{"ev": "session", "journal": JOURNAL_FORMAT, "subject_id": subject_id, "rig": rig.name,
                       "rig_sha256": sha256_file(path / "rig.toml"), "t": _now()}])
            s.save()
        return s

    @classmethod
    def open(cls, path: Path | str) -> Session:
        """Open a session by replaying its journal (session.json is only a view of it); writes nothing."""
        path = Path(path)
        journal = Journal(path / "journal.jsonl")
        if not journal.path.exists():
            raise SessionError(f"{path} is not a session (no journal.jsonl); start one with "
                               f"'twinstudio capture start --session {path} ...'", path=str(path))
        m, torn = _replay(journal)
        return cls(path, m, torn)

    @contextmanager
    def writing(self, command: str | None = None) -> Iterator[Session]:
        """Hold the writer lock; on taking it, a torn final journal line is cut off (kept aside) and the
        manifest replayed again, since another writer may have changed the session since it was opened."""
        fresh = not holds_lock(self.path)
        with writer_lock(self.path, command):
            if fresh:
                aside = self.journal.cut_torn_tail()
                self.manifest, self.torn_tail = _replay(self.journal)
                self._torn_cut(aside)
            yield self

    def _torn_cut(self, aside: Path | None) -> None:
        """Journal that a torn final line was cut off into ``aside`` (None: there was none)."""
        if aside is not None:
            self.torn_aside = aside
            self.record([{"ev": "note", "t": _now(),
                          "text": f"torn final journal line cut off; its bytes are in {aside.name}"}])

    @property
    def rig(self) -> Rig:
        return load_rig(self.path / "rig.toml")

    @property
    def subject_id(self) -> str:
        return self.manifest.subject_id

    # ------------------------------------------------------------- state changes

    def record(self, events: list[dict]) -> None:
        """Journal the events (fsynced), then apply them to the manifest. Needs the writer lock."""
        if not holds_lock(self.path):
            raise SessionError(f"{self.path}: changing a session needs its writer lock (Session.writing())",
                               path=str(self.path))
        self.journal.append(events)
        for ev in events:
            self.manifest = apply_event(self.manifest, ev)

    def save(self) -> Path:
        """Rewrite session.json from the manifest (atomically)."""
        doc = self.manifest.model_dump(mode="json", by_alias=True)
        p = self.path / "session.json"
        atomic_write_json(p, doc)
        return p

    def next_take_id(self, kind: str) -> str:
        return f"{TAKE_PREFIX[kind]}-{len(self.manifest.takes) + 1:03d}"

    def take(self, take_id: str) -> TakeRecord:
        try:
            return self.manifest.takes[take_id]
        except KeyError:
            known = ", ".join(self.manifest.takes) or "none yet"
            raise SessionError(f"no take {take_id!r} in {self.path} (takes: {known})", take=take_id) from None

    def frame_stem(self, take_id: str, camera: str, frame: int) -> Path:
        """Path of a frame file without its extension."""
        return self.path / "takes" / take_id / camera / f"{frame:06d}"


def recover(session: Session) -> dict[str, int]:
    """Make the manifest agree with the files after a crash; returns counts of what was done.

    * ``*.partial`` files (a write that never completed) are deleted;
    * a complete frame file the journal does not list is hashed and adopted;
    * a recorded frame whose file is gone or whose hash differs is marked lost (to be reshot).
    """
    with session.writing():
        return _recover(session)


def _recover(session: Session) -> dict[str, int]:
    counts = {"discarded": 0, "adopted": 0, "lost": 0, "unlisted": 0}
    events: list[dict] = []
    takes_dir = session.path / "takes"
    known = set(session.manifest.takes)
    for tdir in sorted(takes_dir.iterdir()) if takes_dir.is_dir() else []:
        if tdir.is_dir() and tdir.name not in known:  # e.g. its take_start was cut off by a repair: kept, listed
            n = sum(1 for f in tdir.rglob("*") if f.is_file() and _FRAME_NAME.match(f.name))
            if n:
                counts["unlisted"] += n
                events.append({"ev": "note", "t": _now(), "text": f"takes/{tdir.name}: {n} frame file(s) of a "
                               "take the journal does not know; kept on disk, not in the manifest"})
    for take in session.manifest.takes.values():
        tdir = takes_dir / take.id
        for cam in take.cameras:
            cdir = tdir / cam
            if not cdir.is_dir():
                continue
            for f in sorted(cdir.iterdir()):
                if f.name.endswith(TMP_SUFFIX):
                    f.unlink()
                    counts["discarded"] += 1
                    events.append({"ev": "discarded", "path": f.relative_to(session.path).as_posix(), "t": _now()})
                    continue
                m = _FRAME_NAME.match(f.name)
                if not m:
                    continue
                idx = int(m.group(1))
                if idx in take.captured.get(cam, {}) or idx not in {p.index for p in take.frames}:
                    continue
                rel = f.relative_to(session.path).as_posix()
                events.append({"ev": "frame", "take": take.id, "camera": cam, "frame": idx,
                               "record": {"path": rel, "sha256": sha256_file(f), "size": f.stat().st_size,
                                          "adopted": True}, "t": _now()})
                counts["adopted"] += 1
        for cam, frames in take.captured.items():
            for idx, rec in frames.items():
                p = session.path / rec.path
                if p.exists() and sha256_file(p) == rec.sha256:
                    continue
                reason = "missing"
                if p.exists():  # never rewrite captured pixels in place: set the damaged file aside
                    reason = "hash mismatch"
                    p.rename(p.with_name(p.name + ".corrupt"))
                events.append({"ev": "frame_lost", "take": take.id, "camera": cam, "frame": idx,
                               "reason": reason, "t": _now()})
                counts["lost"] += 1
    session.record(events)
    session.save()
    return counts


def repair_journal(session_dir: Path | str, command: str | None = None) -> dict:
    """Cut a damaged journal at its first bad line, after a backup, then recover from the files on disk.

    The whole journal is first copied to ``journal.jsonl.bak-<time>``; the
    lines from the bad one to the end are also kept in
    ``journal.jsonl.cut-<time>``. Returns what was done: ``bad_line`` (None
    when the journal was sound), ``backup``, ``cut`` (file names), ``torn``
    (a torn final line set aside) and recover()'s counts.
    """
    from rigs.fileio import atomic_write_bytes

    path = Path(session_dir)
    journal = Journal(path / "journal.jsonl")
    if not journal.path.exists():
        raise SessionError(f"{path} is not a session (no journal.jsonl)", path=str(path))
    with writer_lock(path, command):
        scan = journal.scan()
        out: dict[str, Any] = {"bad_line": scan.bad_line, "reason": scan.bad_reason, "backup": None, "cut": None,
                               "cut_events": 0}
        if scan.bad_line == 1:
            raise JournalCorrupt(f"{journal.path}:1: the session record itself is damaged ({scan.bad_reason}); "
                                 "nothing before it to keep: restore the journal from a backup",
                                 path=str(journal.path), line=1)
        if scan.bad_line is not None:
            stamp = _stamp()
            data = journal.path.read_bytes()
            backup = journal.path.with_name(f"{journal.path.name}.bak-{stamp}")
            cut = journal.path.with_name(f"{journal.path.name}.cut-{stamp}")
            atomic_write_bytes(backup, data)
            atomic_write_bytes(cut, data[scan.good_bytes:])
            journal.truncate(scan.good_bytes)
            out.update(backup=backup.name, cut=cut.name, cut_events=data[scan.good_bytes:].count(b"\n"))
        aside = journal.cut_torn_tail()  # a torn final line is no damage: set aside, as every writer does
        session = Session.open(path)
        with session.writing(command):
            session._torn_cut(aside)
            out["torn"] = aside.name if aside else None
            if scan.bad_line is not None:
                session.record([{"ev": "note", "t": _now(), "text": f"journal cut at line {scan.bad_line} "
                                 f"({scan.bad_reason}) by repair; backup {out['backup']}, cut lines {out['cut']}"}])
            out.update(recover(session))
            session.save()
    return out


def _now() -> float:
    return dt.datetime.now(dt.timezone.utc).timestamp()
