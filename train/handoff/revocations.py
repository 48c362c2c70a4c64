"""The studio's signed revocation list, and the lists a render team holds.

Like a certificate revocation list: the studio signs, with its studio key, the
list of consents it has revoked, with a serial that grows on every issue, the
time it was issued and the time by which it will issue the next one. Render
teams import the published list and ``twinstudio verify`` checks bundles
against it; a list past its next update is *stale*, no list is *unknown*, and
neither counts as a plain "valid" (exit 6 unless the user accepts it).

File format (JSON, one file, published as it is)::

    {"schema": "twinstudio.revocation-list", "version": 1,
     "list": {"issuer": "<key id>", "serial": 4,
              "issued_at": "2026-05-01T09:00:00Z", "next_update": "2026-05-08T09:00:00Z",
              "revoked": [{"consent_id": "...", "subject_id": "...", "revoked_at": "<ISO 8601>",
                           "reason": "..."}]},
     "signature": {<the SIGNATURE.json document>, "signed": "list", "sha256": ...}}

The signature (:func:`train.handoff.integrity.sign_document`, the scheme that
signs bundle manifests) is over the canonical bytes of ``list``: JSON with
sorted keys, no spaces, UTF-8. ``issuer`` must be the id of the signing key.

Where lists are kept: ``$TWINSTUDIO_HOME/revocations/<issuer key id>.json``,
one per issuer, the exact signed file. The studio's own list is the one whose
issuer is its own key; lists of other studios are imported there after their
signature has been checked against the trusted keys, and an older serial
never replaces a newer one. Changes take a lock on the folder, so two
``consent revoke`` at once cannot issue the same serial. A studio that lost
its folder restores it by importing its last published list.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rigs.errors import EXIT_INPUT, EXIT_TAMPERED, EXIT_UNTRUSTED, TwinstudioError
from rigs.fileio import atomic_write_bytes
from train.handoff.integrity import canonical, key_id, open_signed_json, read_bounded, signed_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from train.handoff.trust import TrustedKey

LIST_SCHEMA = "twinstudio.revocation-list"
LIST_VERSION = 1
SIGNED = "list"  # what the signature document says it signs
#: days from an issue to its next update, unless told otherwise
DEFAULT_VALID_DAYS = 7
#: a list file larger than this is refused (it is read into memory)
MAX_LIST_BYTES = 64 << 20
#: the unsigned list of earlier versions ($TWINSTUDIO_HOME/revocations.json); folded into the first signed issue
LEGACY_FILE = "revocations.json"
LEGACY_SCHEMA = "twinstudio.revocations"

State = Literal["checked", "stale", "unknown"]


class RevocationError(TwinstudioError):
    """A revocation list cannot be used or issued (exit code 2): names the file."""

    exit_code = EXIT_INPUT


class RevocationSignatureError(RevocationError):
    """A revocation list's signature does not verify: it is not what its issuer signed (exit code 3)."""

    exit_code = EXIT_TAMPERED


class UntrustedIssuerError(RevocationError):
    """A revocation list is intact, but signed by a key that is not trusted (exit code 5)."""

    exit_code = EXIT_UNTRUSTED


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("must carry a time zone")
    return value.astimezone(dt.timezone.utc)


def _iso(value: dt.datetime) -> str:
    return _utc(value).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class RevokedEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    consent_id: str = Field(min_length=1, max_length=200)
    subject_id: str = Field(min_length=1, max_length=200)
    revoked_at: str = Field(min_length=1, max_length=64)  # ISO 8601, as the consent record holds it
    reason: str | None = Field(None, max_length=2000)


class RevocationList(BaseModel):
    """The signed part of a revocation list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(pattern=r"^[0-9a-f]{16}$")
    serial: int = Field(ge=1, strict=True)
    issued_at: dt.datetime
    next_update: dt.datetime
    revoked: list[RevokedEntry] = []

    @field_validator("issued_at", "next_update")
    @classmethod
    def _aware(cls, v: dt.datetime) -> dt.datetime:
        return _utc(v)

    @model_validator(mode="after")
    def _checks(self) -> RevocationList:
        if self.next_update <= self.issued_at:
            raise ValueError(f"next_update {self.next_update} is not after issued_at {self.issued_at}")
        ids = [r.consent_id for r in self.revoked]
        if len(set(ids)) != len(ids):
            raise ValueError("a consent is listed twice")
        return self

    def document(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "serial": self.serial, "issued_at": _iso(self.issued_at),
                "next_update": _iso(self.next_update),
                "revoked": [r.model_dump() for r in sorted(self.revoked, key=lambda r: r.consent_id)]}

    def revoked_map(self) -> dict[str, dict]:
        """``{consent_id: {consent_id, subject_id, revoked_at, reason}}``."""
        return {r.consent_id: r.model_dump() for r in self.revoked}

    def is_stale(self, now: dt.datetime) -> bool:
        return _utc(now) > self.next_update


@dataclass(frozen=True)
class SignedList:
    """A revocation list whose signature verified with the key embedded in it (trust is judged apart)."""

    list: RevocationList
    public_key: bytes  #: raw Ed25519 key that signed it (its id is ``list.issuer``)
    data: bytes  #: the file's bytes, as published
    path: Path | None = None  #: where it was read from

    @property
    def issuer(self) -> str:
        return self.list.issuer

    @property
    def serial(self) -> int:
        return self.list.serial


def sign_list(rl: RevocationList, private_key: Ed25519PrivateKey) -> SignedList:
    """Sign ``rl`` with the studio key (its issuer must be that key's id)."""
    from train.handoff.integrity import raw_public_key

    public = private_key.public_key()
    if rl.issuer != key_id(public):
        raise RevocationError(f"the list's issuer {rl.issuer} is not the signing key {key_id(public)}")
    data = signed_json(LIST_SCHEMA, LIST_VERSION, SIGNED, rl.document(), private_key)
    return SignedList(rl, raw_public_key(public), data)


def parse_list(data: bytes, where: Path | str = "<revocation list>") -> SignedList:
    """A revocation list file's bytes, checked: schema, fields, and the signature by its issuer's key.

    Raises RevocationError (exit 2) for anything malformed, RevocationSignatureError
    (exit 3) when the signature does not verify.
    """
    def hint(got: object) -> str:
        return (" (the unsigned list of an earlier twinstudio; issue a signed one with 'twinstudio revocations "
                "export')" if got == LEGACY_SCHEMA else "")

    body, check = open_signed_json(data, where, schema=LIST_SCHEMA, version=LIST_VERSION, member=SIGNED,
                                   what="a revocation list", error=RevocationError,
                                   signature_error=RevocationSignatureError, schema_hint=hint)
    try:
        rl = RevocationList.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        raise RevocationError(f"{where}: not a valid revocation list: {'.'.join(map(str, err['loc']))}: "
                              f"{err['msg']}", path=str(where)) from None
    if rl.issuer != check.key_id:
        raise RevocationSignatureError(f"{where}: names issuer {rl.issuer} but is signed by key {check.key_id}",
                                       path=str(where))
    return SignedList(rl, check.public_key, data, Path(where) if isinstance(where, Path) else None)


def read_list(path: Path | str) -> SignedList:
    """The revocation list in ``path`` (see :func:`parse_list`)."""
    p = Path(path)
    return parse_list(read_bounded(p, MAX_LIST_BYTES, "a revocation list", RevocationError), p)


# ----------------------------------------------------------------------------- the store


def store_dir() -> Path:
    """``$TWINSTUDIO_HOME/revocations``: the lists held, one file per issuer."""
    from capture.consent import studio_home

    return studio_home() / "revocations"


def held_path(issuer: str, store: Path | None = None) -> Path:
    if not re.fullmatch(r"[0-9a-f]{16}", issuer or ""):
        raise RevocationError(f"invalid issuer key id {issuer!r}")
    return (store or store_dir()) / f"{issuer}.json"


def held_list(issuer: str, store: Path | None = None) -> SignedList | None:
    """The list held from ``issuer`` (checked as :func:`read_list` does), or None."""
    p = held_path(issuer, store)
    if not p.exists():
        return None
    signed = read_list(p)
    if signed.issuer != issuer:  # another issuer's list under this one's name would hide this one's revocations
        raise RevocationError(f"{p}: holds the list of key {signed.issuer}, not of key {issuer}; import "
                              f"key {issuer}'s list again", path=str(p))
    return signed


def held_lists(store: Path | None = None) -> list[SignedList]:
    """Every list held, by issuer id."""
    d = store or store_dir()
    return [read_list(p) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    """An exclusive lock on the store (flock on ``.lock``): one change at a time."""
    import fcntl

    store.mkdir(parents=True, exist_ok=True)
    fd = os.open(store / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _store(signed: SignedList, store: Path) -> Path:
    p = held_path(signed.issuer, store)
    atomic_write_bytes(p, signed.data)
    return p


def _legacy_entries(store: Path) -> list[RevokedEntry]:
    """Entries of the unsigned list earlier versions kept beside the store (none if absent or unreadable)."""
    p = store.parent / LEGACY_FILE
    try:
        doc = json.loads(p.read_text())
        if doc.get("schema") != LEGACY_SCHEMA:
            return []
        return [RevokedEntry.model_validate({k: r.get(k) for k in ("consent_id", "subject_id", "revoked_at",
                                                                    "reason")}) for r in doc["revoked"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ValidationError):
        return []


def issue(private_key: Ed25519PrivateKey, add: Iterable[RevokedEntry] = (), *, valid_days: float = DEFAULT_VALID_DAYS,
          now: dt.datetime | None = None, store: Path | None = None) -> SignedList:
    """Issue the studio's list again: its entries plus ``add``, the next serial, issued ``now``,
    next update ``valid_days`` later; signed, stored, returned.

    The entries come from the list held for this key (checked first; a damaged
    one is refused rather than silently restarted at serial 1). An entry
    already listed keeps its first revocation.
    """
    from train.handoff.integrity import raw_public_key

    if not valid_days > 0:
        raise RevocationError(f"the next update must be after the issue: valid days {valid_days!r} is not > 0")
    store = store or store_dir()
    now = _utc(now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    kid = key_id(private_key.public_key())
    with _locked(store):
        current = held_list(kid, store)
        if current is not None and current.public_key != raw_public_key(private_key.public_key()):
            raise RevocationError(f"{held_path(kid, store)}: held list of key {kid} is signed by another key")
        entries = {r.consent_id: r for r in (current.list.revoked if current else _legacy_entries(store))}
        for r in add:
            entries.setdefault(r.consent_id, r)
        serial = current.serial + 1 if current else 1
        try:
            rl = RevocationList(issuer=kid, serial=serial, issued_at=now,
                                next_update=now + dt.timedelta(days=valid_days),
                                revoked=sorted(entries.values(), key=lambda r: r.consent_id))
        except (ValidationError, OverflowError) as e:
            raise RevocationError(f"cannot issue the revocation list: {e}") from None
        signed = sign_list(rl, private_key)
        return SignedList(signed.list, signed.public_key, signed.data, _store(signed, store))


@dataclass(frozen=True)
class Imported:
    list: SignedList
    previous_serial: int | None  #: serial held before, None when none was
    outcome: Literal["new", "updated", "unchanged"]
    issuer_name: str
    path: Path


def import_list(path: Path | str, trusted: dict[bytes, TrustedKey], *, store: Path | None = None) -> Imported:
    """Check a published list against the trusted keys and keep it (the render team's side).

    Refused: a malformed list (RevocationError, exit 2), a signature that does
    not verify (RevocationSignatureError, 3), an issuer not trusted
    (UntrustedIssuerError, 5), and a serial older than the one held, or the
    held serial with other contents (RevocationError, 2).
    """
    signed = read_list(path)
    who = trusted.get(signed.public_key)
    if who is None:
        raise UntrustedIssuerError(f"{path}: intact, but issued by key {signed.issuer}, which is not a trusted key; "
                                   f"pin the studio's key first: twinstudio keys trust studio.pub --name NAME",
                                   path=str(path), issuer=signed.issuer)
    store = store or store_dir()
    with _locked(store):
        try:
            held = held_list(signed.issuer, store)
        except RevocationError:
            held = None  # a damaged copy is replaced by a verified one
        if held is not None:
            if signed.serial < held.serial:
                raise RevocationError(f"{path}: serial {signed.serial} is older than the list held from key "
                                      f"{signed.issuer} (serial {held.serial}, issued {_iso(held.list.issued_at)}); "
                                      "an older list would bring back revoked consents", path=str(path))
            if signed.serial == held.serial:
                if held.list != signed.list:
                    raise RevocationError(f"{path}: serial {signed.serial} is the one held, with other contents: "
                                          "the issuer signed two lists with one serial", path=str(path))
                return Imported(held, held.serial, "unchanged", who.name, held_path(signed.issuer, store))
        p = _store(signed, store)
    return Imported(signed, held.serial if held else None, "updated" if held else "new", who.name, p)


# ----------------------------------------------------------------------------- the status verify reports


@dataclass
class RevocationStatus:
    """What is known about revocations of one issuer's consents at one time."""

    state: State
    issuer: str | None  #: key id whose list applies
    url: str | None = None  #: where the issuer publishes its list (from the bundle's manifest)
    serial: int | None = None
    issued_at: dt.datetime | None = None
    next_update: dt.datetime | None = None
    source: Path | None = None  #: the list file used
    reason: str | None = None  #: why the state is not "checked"
    revoked: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> str:
        """``checked (serial 4, issued 2026-05-01, next update 2026-05-08)``, ``stale (...)``, ``unknown: why``."""
        if self.serial is not None and self.issued_at is not None and self.next_update is not None:
            text = (f"{self.state} (serial {self.serial}, issued {self.issued_at.date()}, "
                    f"next update {self.next_update.date()})")
        else:
            text = self.state
        return text + (f": {self.reason}" if self.reason else "")


def revocation_status(issuer: str | None, trusted: dict[bytes, TrustedKey], *, list_path: Path | str | None = None,
                      url: str | None = None, now: dt.datetime | None = None,
                      store: Path | None = None) -> RevocationStatus:
    """The revocation status of consents issued under key ``issuer``.

    Uses the list held from ``issuer`` or ``list_path`` (a published list
    file), whichever has the higher serial: an older list hides nothing.
    "checked" when a list by ``issuer``, whose key is trusted, is there and
    current; "stale" when past its next update (its entries still count);
    "unknown" otherwise, with the reason. A given list that cannot be
    read or whose signature fails raises (:func:`read_list`).
    """
    now = _utc(now or dt.datetime.now(dt.timezone.utc))
    where = f"; the studio publishes it at {url}" if url else ""
    if issuer is None:
        return RevocationStatus("unknown", None, url, reason="the bundle names no signer whose list applies")
    held = held_list(issuer, store)
    signed, source = held, held_path(issuer, store)
    ignored = ""  # a given list of another issuer hides nothing either: the held one still counts
    if list_path is not None:
        given = read_list(list_path)
        if given.issuer != issuer:
            ignored = f"{list_path} (the list of key {given.issuer}, not of the signer {issuer}) was ignored"
        elif held is None or given.serial > held.serial:  # the newest list known counts: an old one hides nothing
            signed, source = given, Path(list_path)
    if signed is None:
        return RevocationStatus("unknown", issuer, url, source=Path(list_path) if ignored else None,
                                reason=f"no revocation list of key {issuer} is held; import the studio's "
                                       f"current one with 'twinstudio revocations import FILE'{where}"
                                       + (f"; {ignored}" if ignored else ""))
    rl = signed.list
    facts = dict(serial=rl.serial, issued_at=rl.issued_at, next_update=rl.next_update, source=source)
    if signed.public_key not in trusted:
        return RevocationStatus("unknown", issuer, url, **facts,
                                reason=f"the list's issuer, key {issuer}, is not trusted")
    if rl.is_stale(now):
        return RevocationStatus("stale", issuer, url, **facts, revoked=rl.revoked_map(),
                                reason=f"past its next update ({_iso(rl.next_update)}); fetch and import the "
                                       f"studio's current list{where}" + (f"; {ignored}" if ignored else ""))
    return RevocationStatus("checked", issuer, url, **facts, revoked=rl.revoked_map(), reason=ignored or None)


def entry_of(consent_id: str, subject_id: str, revoked_at: dt.datetime | None, reason: str | None) -> RevokedEntry:
    """A list entry for a revoked consent record."""
    when = revoked_at or dt.datetime.now(dt.timezone.utc)
    return RevokedEntry(consent_id=consent_id, subject_id=subject_id, revoked_at=when.isoformat(), reason=reason)


__all__ = ["DEFAULT_VALID_DAYS", "Imported", "LIST_SCHEMA", "RevocationError", "RevocationList",
           "RevocationSignatureError", "RevocationStatus", "RevokedEntry", "SignedList", "UntrustedIssuerError",
           "canonical", "entry_of", "held_list", "held_lists", "held_path", "import_list", "issue", "parse_list",
           "read_list", "revocation_status", "sign_list", "store_dir"]
