"""Consent records: the subject's written permission, and the checks every stage makes.

A twin exists only with its subject's consent: which scopes (capture, train,
generate, share), for which purposes and markets, from when until when, under
which compensation reference, evidenced by the sha256 of the signed document.
Records live in ``<session>/consent.json`` (schema twinstudio.consent/1),
written atomically; revoking marks a record revoked (it is never deleted) and
blocks every later take, training run and bundle.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rigs.errors import EXIT_CONSENT, EXIT_INPUT, TwinstudioError
from rigs.fileio import atomic_write_json

CONSENT_SCHEMA = "twinstudio.consent"
CONSENT_VERSION = 1
CONSENT_FILE = "consent.json"
Scope = Literal["capture", "train", "generate", "share"]
SCOPES: tuple[str, ...] = ("capture", "train", "generate", "share")


class ConsentError(TwinstudioError):
    """No consent record in force covers what was asked (exit code 4)."""

    exit_code = EXIT_CONSENT


class ConsentInputError(ConsentError):
    """A consent file or record cannot be used, or a record does not belong here (exit code 2)."""

    exit_code = EXIT_INPUT


class ConsentRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    consent_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    subject_id: str = Field(pattern=r"^[A-Za-z0-9._-]{3,64}$", description="pseudonymous subject id")
    agency: str = Field(min_length=1)
    scopes: list[Scope] = Field(min_length=1)
    purposes: list[str] = Field(min_length=1)
    markets: list[str] = Field(min_length=1)
    valid_from: dt.date
    valid_until: dt.date
    compensation_ref: str = Field(min_length=1)
    document_sha256: str
    recorded_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None

    @field_validator("document_sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("document_sha256 must be 64 lowercase hex digits")
        return v

    @model_validator(mode="after")
    def _dates(self) -> ConsentRecord:
        if self.valid_until < self.valid_from:
            raise ValueError(f"valid_until {self.valid_until} is before valid_from {self.valid_from}")
        return self

    def problem(self, scope: str, on: dt.date) -> str | None:
        """Why this record does not allow ``scope`` on day ``on``, or None when it does."""
        if self.revoked_at is not None:
            return (f"consent {self.consent_id} was revoked on {self.revoked_at.date()}"
                    + (f": {self.revocation_reason}" if self.revocation_reason else ""))
        if scope not in self.scopes:
            return f"consent {self.consent_id} does not cover {scope!r} (scopes: {', '.join(self.scopes)})"
        if on < self.valid_from:
            return f"consent {self.consent_id} is valid only from {self.valid_from}"
        if on > self.valid_until:
            return f"consent {self.consent_id} expired on {self.valid_until}"
        return None


class ConsentFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(CONSENT_SCHEMA, alias="schema")
    version: int = CONSENT_VERSION
    records: list[ConsentRecord] = []


def load_consents(session_dir: Path | str) -> list[ConsentRecord]:
    """The session's consent records (empty when none were recorded)."""
    path = Path(session_dir) / CONSENT_FILE
    if not path.exists():
        return []
    try:
        f = ConsentFile.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError, RecursionError) as e:
        raise ConsentInputError(f"{path}: not a valid consent file: {type(e).__name__}: {str(e)[:300]}",
                                path=str(path)) from e
    if f.schema_ != CONSENT_SCHEMA or f.version != CONSENT_VERSION:
        raise ConsentInputError(f"{path}: schema {f.schema_}/{f.version} is not {CONSENT_SCHEMA}/{CONSENT_VERSION}")
    return f.records


def _save(session_dir: Path, records: list[ConsentRecord]) -> None:
    doc = ConsentFile(records=records).model_dump(mode="json", by_alias=True)
    atomic_write_json(Path(session_dir) / CONSENT_FILE, doc)


def session_subject(session_dir: Path | str) -> str | None:
    """The subject a session was started for (from ``session.json``), or None when the folder is no session."""
    p = Path(session_dir) / "session.json"
    if not p.is_file():
        return None
    try:
        subject = json.loads(p.read_text()).get("subject_id")
    except (OSError, ValueError, RecursionError, AttributeError) as e:
        raise ConsentInputError(f"{p}: cannot read the session's subject: {e}", path=str(p)) from e
    if not isinstance(subject, str) or not subject:
        raise ConsentInputError(f"{p}: names no subject_id", path=str(p))
    return subject


def add_consent(session_dir: Path | str, record: ConsentRecord) -> ConsentRecord:
    """Append a consent record to the session (the folder is created if needed).

    A record belongs to one person: it is refused when the session was
    started for another subject, or already holds consent of another subject.
    """
    session_dir = Path(session_dir)
    subject = session_subject(session_dir)
    if subject is not None and record.subject_id != subject:
        raise ConsentInputError(f"session {session_dir} is for subject {subject!r}; a consent record of "
                           f"{record.subject_id!r} cannot be added to it", subject=record.subject_id,
                           session_subject=subject)
    records = load_consents(session_dir)
    if any(r.subject_id != record.subject_id for r in records):
        raise ConsentInputError(f"session {session_dir} holds consent for subject {records[0].subject_id!r}, "
                           f"not {record.subject_id!r}", subject=record.subject_id)
    session_dir.mkdir(parents=True, exist_ok=True)
    _save(session_dir, [*records, record])
    return record


def revoke_consent(session_dir: Path | str, reason: str, consent_id: str | None = None,
                   when: dt.datetime | None = None) -> list[ConsentRecord]:
    """Mark the session's records (or one) revoked in ``consent.json``; returns the records revoked.

    This blocks the studio's own later takes, training runs and bundles. Bundles
    already delivered learn of it through the studio's signed revocation list
    (``train.handoff.revocations``), which ``twinstudio consent revoke`` updates
    after calling this: capture does not reach into train.
    """
    records = load_consents(session_dir)
    when = when or dt.datetime.now(dt.timezone.utc)
    hit = [r for r in records if r.revoked_at is None and (consent_id is None or r.consent_id == consent_id)]
    if not hit:
        raise ConsentInputError(f"no consent in force to revoke in {session_dir}"
                           + (f" with id {consent_id}" if consent_id else ""))
    for r in hit:
        r.revoked_at = when
        r.revocation_reason = reason
    _save(Path(session_dir), records)
    return hit


# ----------------------------------------------------------------------------- the studio's home


def studio_home() -> Path:
    """The studio's own folder (keys, trusted keys, revocation lists): ``$TWINSTUDIO_HOME`` or ``~/.twinstudio``."""
    return Path(os.environ.get("TWINSTUDIO_HOME") or Path.home() / ".twinstudio")


def require_consent(session_dir: Path | str, scope: str, on: dt.date | None = None,
                    subject: str | None = None) -> ConsentRecord:
    """The record that allows ``scope`` today (or on ``on``); raises ConsentError saying why not.

    Only records of the session's subject count (``subject``, default the
    subject named in ``session.json``): a record of anybody else is listed
    as a problem, never used.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown consent scope {scope!r}")
    on = on or dt.date.today()
    subject = subject or session_subject(session_dir)
    records = load_consents(session_dir)
    if not records:
        raise ConsentError(f"no consent recorded for session {session_dir}: record it first with "
                           f"'twinstudio consent add --session {session_dir} ...'", scope=scope)
    problems = []
    for r in records:
        p = (f"consent {r.consent_id} is for subject {r.subject_id!r}, not this session's {subject!r}"
             if subject is not None and r.subject_id != subject else r.problem(scope, on))
        if p is None:
            return r
        problems.append(p)
    raise ConsentError(f"no consent in force covers {scope!r} on {on}: " + "; ".join(problems), scope=scope)


def is_virtual_render(root: Path | str) -> bool:
    """Whether ``root`` is a virtual-studio render folder (a synthetic person, no consent to check)."""
    r = Path(root)
    return (not (r / "session.json").exists() and (r / "render.json").is_file()
            and (r / "gt" / "cameras.json").is_file())


def require_session_consent(root: Path | str, scope: str, *, photos_ok: bool = False) -> ConsentRecord | None:
    """The gate of every command that reads or writes a subject's imagery.

    For a capture session: the record of the session's subject that allows
    ``scope`` today (ConsentError saying why when none does). For a virtual
    render folder (a synthetic person): None. For any other folder: None when
    ``photos_ok`` (a folder of photos that names no subject, e.g. for SfM),
    else ConsentInputError (exit 2), since no consent can be checked.
    """
    root = Path(root)
    if (root / "session.json").is_file():
        return require_consent(root, scope)
    if (root / "journal.jsonl").exists() or (root / CONSENT_FILE).exists():  # a session, its manifest gone
        raise ConsentInputError(f"{root}: a session without its session.json, so its subject is unknown; "
                                f"'twinstudio capture resume --session {root}' rebuilds it", path=str(root))
    if is_virtual_render(root) or photos_ok:
        return None
    raise ConsentInputError(f"{root}: not a capture session (no session.json), so no consent can be checked for "
                       f"{scope!r}", path=str(root), scope=scope)


def sha256_of_document(path: Path | str) -> str:
    """sha256 of the signed consent document (PDF, scan, ...)."""
    from rigs.fileio import sha256_file

    p = Path(path)
    if not p.is_file():
        raise ConsentInputError(f"consent document {p} does not exist", path=str(p))
    return sha256_file(p)
