"""A capture session on disk: manifest, journal and frame files.

Layout of a session folder::

    session.json                          manifest (schema twinstudio.session/1), derived from the journal
    journal.jsonl                         every state change, appended and fsynced before it is applied
    rig.toml                              the rig file the session was started with
    consent.json                          the subject's consent records (capture.consent)
    takes/<take>/<camera>/<frame:06d>.<ext>   captured files, written once (temp, fsync, rename) and hashed

The journal is the source of truth: ``session.json`` is rewritten from it at
the end of every take and by ``resume``; after a crash, :func:`recover`
rebuilds the manifest from the journal and the files, discards half-written
files and adopts complete files the journal had not yet recorded.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rigs.errors import TwinstudioError
from rigs.fileio import TMP_SUFFIX, atomic_write_json, fsync_dir, sha256_file
from rigs.rigfile import Rig, load_rig, resolve_rig_path

SESSION_SCHEMA = "twinstudio.session"
SESSION_VERSION = 1
TAKE_PREFIX = {"calibration": "calib", "stills": "stills", "motion": "motion"}
_FRAME_NAME = re.compile(r"^(\d{6})\.[a-z0-9]+$")


class SessionError(TwinstudioError):
    """The session folder is missing, damaged or used wrongly (exit code 2)."""

    exit_code = 2


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


class Journal:
    """Append-only JSON lines; every append is flushed and fsynced before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, events: list[dict]) -> None:
        if not events:
            return
        data = "".join(json.dumps(e, separators=(",", ":"), allow_nan=False) + "\n" for e in events)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[dict]:
        """Every complete event; a torn last line (a crash mid-append) is ignored."""
        if not self.path.exists():
            return []
        events = []
        lines = self.path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:  # torn tail: the write never completed
                    break
                raise SessionError(f"{self.path}:{i + 1}: corrupt journal line: {e}", path=str(self.path)) from e
        return events


def read_manifest(session_dir: Path | str) -> SessionManifest:
    """Read and validate ``session.json`` (for later stages, which read sessions but never write them)."""
    p = Path(session_dir) / "session.json"
    try:
        m = SessionManifest.model_validate(json.loads(p.read_text()))
    except FileNotFoundError:
        raise SessionError(f"{p} does not exist: not a capture session", path=str(p)) from None
    except (ValueError, ValidationError) as e:
        raise SessionError(f"{p}: not a valid session manifest: {e}", path=str(p)) from e
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
                                         frames=[FramePlan(**f) for f in ev["frames"]], started_at=ev["t"])
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


class Session:
    """An open session folder. Library code; not thread-safe."""

    def __init__(self, path: Path, manifest: SessionManifest) -> None:
        self.path = path
        self.manifest = manifest
        self.journal = Journal(path / "journal.jsonl")

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
        shutil.copyfile(rig_path, path / "rig.toml")
        (path / "takes").mkdir(exist_ok=True)
        fsync_dir(path)
        s = cls(path, None)  # type: ignore[arg-type]
        s.record([{"ev": "session", "subject_id": subject_id, "rig": rig.name,
                   "rig_sha256": sha256_file(path / "rig.toml"), "t": _now()}])
        s.save()
        return s

    @classmethod
    def open(cls, path: Path | str) -> Session:
        """Open a session by replaying its journal (session.json is only a view of it)."""
        path = Path(path)
        journal = Journal(path / "journal.jsonl")
        if not journal.path.exists():
            raise SessionError(f"{path} is not a session (no journal.jsonl); start one with "
                               f"'twinstudio capture start --session {path} ...'", path=str(path))
        m = None
        try:
            for ev in journal.read():
                m = apply_event(m, ev)
        except (KeyError, ValidationError) as e:
            raise SessionError(f"{journal.path}: cannot replay the journal: {e}", path=str(journal.path)) from e
        if m is None:
            raise SessionError(f"{journal.path} is empty", path=str(journal.path))
        return cls(path, m)

    @property
    def rig(self) -> Rig:
        return load_rig(self.path / "rig.toml")

    @property
    def subject_id(self) -> str:
        return self.manifest.subject_id

    # ------------------------------------------------------------- state changes

    def record(self, events: list[dict]) -> None:
        """Journal the events (fsynced), then apply them to the manifest."""
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
    counts = {"discarded": 0, "adopted": 0, "lost": 0}
    events: list[dict] = []
    takes_dir = session.path / "takes"
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


def _now() -> float:
    return dt.datetime.now(dt.timezone.utc).timestamp()
