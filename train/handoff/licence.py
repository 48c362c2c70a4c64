"""Licences: the model, through the studio, licenses the twin in a bundle to a brand.

The twin belongs to its model. The studio holds the model's consent (in the
signed bundle's ``MANIFEST.json``) and, acting for the model, signs licences
with its studio key: one brand (the licensee), a set of purposes and markets,
a period, a cap on the number of images, and a rate per rendered image. A
licence names the bundle by the sha256 of its ``MANIFEST.json``, so it covers
that twin and no other.

A licence never exceeds the consent. :func:`issue_licence` first verifies the
bundle as ``twinstudio verify`` does (:func:`train.handoff.verify.verify_bundle`:
intact, signed by a trusted key, consent in force, the signer's current
revocation list checked), then refuses, each by name (:class:`Refusal`), a
purpose or market the consent does not list (the consent market ``worldwide``
covers every market), dates outside the consent's period, and a consent
without ``generate`` (rendering images of the twin is generation). A licence is
signed by the key that signed the bundle: the studio that holds the consent.

File format (JSON; the studio keeps the signed file in
``$TWINSTUDIO_HOME/licences/<id>.json`` and sends a copy to the brand)::

    {"schema": "twinstudio.licence", "version": 1,
     "licence": {"id": "lic-<16 hex>", "licensee": "Brand X", "purposes": ["campaign"], "markets": ["EU"],
                 "valid_from": "2026-12-01", "valid_until": "2027-02-28", "max_images": 500,
                 "rate": {"amount": "2.50", "currency": "EUR", "unit": "image"},
                 "bundle_manifest_sha256": "...", "subject_id": "subj-007", "consent_id": "...",
                 "agency": "Nova Models", "issuer": "<key id>", "issued_on": "2026-11-20", "notes": null},
     "signature": {<the SIGNATURE.json document>, "signed": "licence", "sha256": ...}}

The signature (:func:`train.handoff.integrity.sign_document`, the scheme of
bundle manifests and revocation lists) is over the canonical bytes of
``licence`` (JSON, sorted keys, no spaces, UTF-8). The id is ``lic-`` and the
first 16 hex digits of the sha256 of those bytes without the id, so a licence
is deterministic: the same terms issued on the same day by the same key give
the same file (issuing it again returns the one held; ``notes`` tells two
otherwise identical licences apart).

Money is :class:`decimal.Decimal` from strings, never a float: ``"2.50
EUR/image"`` is parsed strictly (:func:`parse_rate`). Currency codes are
checked against ISO 4217 where Babel is installed (its CLDR list), else by
shape only (three capital letters).

Before rendering, :func:`authorise_use` (or :func:`check_use` with the
facts in hand) says whether one more image may be made: the licensee, purpose,
market, date, images left, the consent in the bundle and that it is the
licensed bundle, each refusal by name. The usage ledger
(:mod:`train.handoff.ledger`) enforces the image cap again, under its lock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rigs.errors import EXIT_CONSENT, EXIT_INPUT, EXIT_TAMPERED, TwinstudioError
from rigs.fileio import atomic_write_bytes
from train.handoff.integrity import (MANIFEST, canonical, iter_tar, key_id, open_signed_json, parse_manifest,
                                     read_bounded, signed_json)
from train.handoff.revocations import revocation_status
from train.handoff.verify import CONSENT, REVOCATION, TAMPERED, UNTRUSTED, VALID, VerifyResult, verify_bundle
from train.handoff.verify import STATUS as BUNDLE_STATUS

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from train.handoff.revocations import RevocationStatus
    from train.handoff.trust import TrustedKey

LICENCE_SCHEMA = "twinstudio.licence"
LICENCE_VERSION = 1
SIGNED = "licence"  # what the signature document says it signs
UNIT = "image"
#: a consent market that covers every market
WORLDWIDE = "worldwide"
#: the generative use a licence grants: rendering images of the twin
GENERATE = "generate"
#: a licence file larger than this is refused (it is read into memory)
MAX_LICENCE_BYTES = 1 << 20
#: decimals a rate may have (sub-cent rates exist: 0.0125 USD/image)
MAX_RATE_DECIMALS = 6

_RATE = re.compile(r"(?P<amount>(?:0|[1-9][0-9]{0,11})(?:\.[0-9]+)?) (?P<currency>[A-Za-z]{3})/(?P<unit>\S+)")
_TEXT = re.compile(r"[^\x00-\x1f\x7f]+")
_TERM = re.compile(r"[^\x00-\x1f\x7f,]{1,64}")


class LicenceError(TwinstudioError):
    """A licence, a rate or a licence request cannot be used (exit code 2); names the file or field."""

    exit_code = EXIT_INPUT


class LicenceSignatureError(LicenceError):
    """A licence file's signature does not verify: it is not what the studio signed (exit code 3)."""

    exit_code = EXIT_TAMPERED


@dataclass(frozen=True)
class Refusal:
    """One reason a licence cannot be issued, or a use is not allowed."""

    field: str  #: licensee | purpose | market | dates | images | consent | bundle | issuer
    message: str  #: in words, naming both values
    requested: object = None  #: what was asked
    allowed: object = None  #: what the consent or licence allows


class LicenceRefused(LicenceError):
    """The licence, or the use, would exceed what the consent or licence allows (exit code 4).

    ``reasons`` lists every refusal, each by field name; the message joins them.
    """

    exit_code = EXIT_CONSENT

    def __init__(self, reasons: Sequence[Refusal], *, where: str | None = None, **facts: object) -> None:
        head = f"{where}: refused" if where else "refused"
        super().__init__(f"{head}: " + "; ".join(f"[{r.field}] {r.message}" for r in reasons),
                         fields=[r.field for r in reasons], **facts)
        self.reasons = list(reasons)

    @property
    def fields(self) -> list[str]:
        return [r.field for r in self.reasons]


class LicenceNotValid(LicenceError):
    """A licence (or its bundle) does not verify; the exit code is the verdict's (3, 4, 5 or 6)."""

    def __init__(self, message: str, *, exit_code: int, **facts: object) -> None:
        super().__init__(message, **facts)
        self.exit_code = exit_code


class BundleNotUsable(LicenceNotValid):
    """The bundle does not pass ``twinstudio verify``; the exit code is verify's (3, 4, 5 or 6)."""


# ----------------------------------------------------------------------------- the model


def _rate_amount(text: str, where: str) -> Decimal:
    if "." in text and len(text.split(".", 1)[1]) > MAX_RATE_DECIMALS:
        raise LicenceError(f"{where}: amount {text!r} has more than {MAX_RATE_DECIMALS} decimals")
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimal numbers
        raise LicenceError(f"{where}: amount {text!r} is not a decimal number") from None


def check_currency(code: str, where: str = "rate") -> str:
    """``code`` when it is an ISO 4217 currency code (Babel's CLDR list; shape only without Babel)."""
    if not re.fullmatch(r"[A-Z]{3}", code or ""):
        raise LicenceError(f"{where}: currency {code!r} is not an ISO 4217 code (three capital letters, e.g. EUR)")
    try:
        from babel.numbers import list_currencies
    except ImportError:  # the base install: the shape is all that can be checked
        return code
    if code not in list_currencies():
        raise LicenceError(f"{where}: currency {code!r} is not an ISO 4217 currency code")
    return code


class Rate(BaseModel):
    """A price per rendered image: an exact decimal amount in one currency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: Decimal  #: exact, >= 0, at most 6 decimals; from a string, never a float
    currency: str  #: ISO 4217 code, e.g. EUR
    unit: Literal["image"] = UNIT

    @field_validator("amount", mode="before")
    @classmethod
    def _amount(cls, v: object) -> Decimal:
        if isinstance(v, Decimal):
            text = format(v, "f") if v.is_finite() else str(v)
        elif isinstance(v, str):
            text = v
        else:  # a float already lost the cents: 0.1 + 0.2 is not 0.3
            raise ValueError(f"amount must be a decimal string such as \"2.50\", not {type(v).__name__} {v!r}")
        if not re.fullmatch(r"(?:0|[1-9][0-9]{0,11})(?:\.[0-9]+)?", text):
            raise ValueError(f"amount {text!r} is not a plain decimal number >= 0 (e.g. 2.50)")
        return _rate_amount(text, "rate")

    @field_validator("currency")
    @classmethod
    def _currency(cls, v: str) -> str:
        try:
            return check_currency(v)
        except LicenceError as e:
            raise ValueError(e.message) from None

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}/{self.unit}"

    def times(self, images: int) -> Decimal:
        """``images`` x the amount, exactly (an inexact product raises)."""
        return exact_product(self.amount, images)


def exact_product(amount: Decimal, n: int) -> Decimal:
    """``amount * n`` computed exactly (60 significant digits; decimal.Inexact is raised, never rounded)."""
    import decimal

    with decimal.localcontext(decimal.Context(prec=60, traps=[decimal.Inexact, decimal.InvalidOperation])):
        return amount * n


def parse_rate(text: str) -> Rate:
    """``"2.50 EUR/image"`` as a :class:`Rate`; strict: ``AMOUNT CURRENCY/image``, one space.

    The amount is a plain decimal (no sign, exponent, thousands separator or
    more than 6 decimals), the currency an ISO 4217 code, the unit ``image``.
    """
    where = f"rate {text!r}"
    m = _RATE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise LicenceError(f"{where} is not 'AMOUNT CURRENCY/image' (e.g. \"2.50 EUR/image\": a plain decimal "
                           "amount, an ISO 4217 currency code, per image)", rate=text)
    if m["unit"] != UNIT:
        raise LicenceError(f"{where}: unit {m['unit']!r} is not 'image' (royalties are paid per rendered image)",
                           rate=text)
    return Rate(amount=_rate_amount(m["amount"], where), currency=check_currency(m["currency"], where))


def _term(v: str, what: str) -> str:
    if not isinstance(v, str) or not _TERM.fullmatch(v) or v != v.strip():
        raise ValueError(f"{what} {v!r} must be 1-64 printable characters, no comma, no surrounding spaces")
    return v


class LicenceTerms(BaseModel):
    """What a licence grants, before it has an id (see the module docstring for the file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    licensee: str = Field(min_length=1, max_length=200)  #: the brand, as named in the contract
    purposes: tuple[str, ...] = Field(min_length=1)
    markets: tuple[str, ...] = Field(min_length=1)
    valid_from: dt.date  #: first day images may be made (inclusive)
    valid_until: dt.date  #: last day images may be made (inclusive)
    max_images: int = Field(ge=1, strict=True)
    rate: Rate
    bundle_manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  #: sha256 of the bundle's MANIFEST.json
    subject_id: str = Field(pattern=r"^[A-Za-z0-9._-]{3,64}$")  #: the model's pseudonymous id
    consent_id: str = Field(min_length=1, max_length=200)
    agency: str = Field(min_length=1, max_length=200)  #: the model's agency (from the consent)
    issuer: str = Field(pattern=r"^[0-9a-f]{16}$")  #: key id of the studio key that signs the licence
    issued_on: dt.date
    notes: str | None = Field(None, max_length=2000)

    @field_validator("licensee")
    @classmethod
    def _licensee(cls, v: str) -> str:
        if not _TEXT.fullmatch(v) or v != v.strip():
            raise ValueError(f"licensee {v!r} must be printable text without surrounding spaces")
        return v

    @field_validator("purposes", "markets")
    @classmethod
    def _terms(cls, v: tuple[str, ...], info) -> tuple[str, ...]:
        what = info.field_name[:-1]
        for t in v:
            _term(t, what)
        if len(set(v)) != len(v):
            raise ValueError(f"a {what} is listed twice: {list(v)}")
        return v

    @model_validator(mode="after")
    def _dates(self) -> LicenceTerms:
        if self.valid_until < self.valid_from:
            raise ValueError(f"valid_until {self.valid_until} is before valid_from {self.valid_from}")
        return self

    def terms(self) -> dict[str, Any]:
        """The terms as JSON (the signed object without ``id``); the rate's amount as a decimal string."""
        doc = self.model_dump(mode="json", exclude={"id"})
        doc["rate"] = {"amount": format(self.rate.amount, "f"), "currency": self.rate.currency, "unit": self.rate.unit}
        return doc


class Licence(LicenceTerms):
    """A licence: its terms and the id computed from them."""

    id: str = Field(pattern=r"^lic-[0-9a-f]{16}$")

    @model_validator(mode="after")
    def _id(self) -> Licence:
        want = licence_id(self.terms())
        if self.id != want:
            raise ValueError(f"id {self.id} is not the id of these terms ({want})")
        return self

    @classmethod
    def create(cls, terms: LicenceTerms) -> Licence:
        """The licence of ``terms``, with its id."""
        doc = terms.terms()
        return cls.model_validate({**doc, "id": licence_id(doc)})

    def body(self) -> dict[str, Any]:
        """The JSON object that is signed."""
        return {**self.terms(), "id": self.id}


def licence_id(terms: dict[str, Any]) -> str:
    """``lic-`` + the first 16 hex digits of sha256 of the canonical terms (the signed object without ``id``)."""
    return "lic-" + hashlib.sha256(canonical(terms)).hexdigest()[:16]


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "terms"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (value {value!r})"
    return f"{loc}: {err['msg'].removeprefix('Value error, ')}{shown}"


# ----------------------------------------------------------------------------- signed files


@dataclass(frozen=True)
class SignedLicence:
    """A licence whose signature verified with the key embedded in it (trust is judged apart)."""

    licence: Licence
    public_key: bytes  #: raw Ed25519 key that signed it (its id is ``licence.issuer``)
    data: bytes  #: the file's bytes, as sent to the brand
    path: Path | None = None  #: where it was read from or stored

    @property
    def key_id(self) -> str:
        return self.licence.issuer


def sign_licence(licence: Licence, private_key: Ed25519PrivateKey) -> SignedLicence:
    """Sign ``licence`` with the studio key (its issuer must be that key's id); deterministic bytes."""
    from train.handoff.integrity import raw_public_key

    public = private_key.public_key()
    if licence.issuer != key_id(public):
        raise LicenceError(f"licence {licence.id}: issuer {licence.issuer} is not the signing key {key_id(public)}")
    data = signed_json(LICENCE_SCHEMA, LICENCE_VERSION, SIGNED, licence.body(), private_key)
    return SignedLicence(licence, raw_public_key(public), data)


def parse_licence(data: bytes, where: Path | str = "<licence>") -> SignedLicence:
    """A licence file's bytes, checked: schema, terms, and the signature by its issuer's key.

    Raises LicenceError (exit 2) for anything malformed, LicenceSignatureError
    (exit 3) when the signature does not verify.
    """
    body, check = open_signed_json(data, where, schema=LICENCE_SCHEMA, version=LICENCE_VERSION, member=SIGNED,
                                   what="a licence", error=LicenceError, signature_error=LicenceSignatureError)
    try:
        lic = Licence.model_validate(body)
    except ValidationError as e:
        raise LicenceError(f"{where}: not a valid licence: {_validation_message(e)}", path=str(where)) from None
    if lic.issuer != check.key_id:
        raise LicenceSignatureError(f"{where}: names issuer {lic.issuer} but is signed by key {check.key_id}",
                                    path=str(where))
    return SignedLicence(lic, check.public_key, data, Path(where) if isinstance(where, Path) else None)


def read_licence(path: Path | str) -> SignedLicence:
    """The licence in ``path`` (a file, or the id of a licence held in the store); see :func:`parse_licence`."""
    p = find_licence(path)
    return parse_licence(read_bounded(p, MAX_LICENCE_BYTES, "a licence", LicenceError), p)


def store_dir() -> Path:
    """``$TWINSTUDIO_HOME/licences``: the studio's copy of every licence it issued, one file per id."""
    from capture.consent import studio_home

    return studio_home() / "licences"


def find_licence(ref: Path | str, store: Path | None = None) -> Path:
    """The file of a licence: ``ref`` itself when it is a file, else the held licence whose id it is."""
    p = Path(ref)
    if p.exists() or not re.fullmatch(r"lic-[0-9a-f]{16}", str(ref)):
        return p
    return (store or store_dir()) / f"{ref}.json"


def held_licences(store: Path | None = None) -> list[SignedLicence]:
    """Every licence held in the store, by id (each signature checked)."""
    d = store or store_dir()
    return [read_licence(p) for p in sorted(d.glob("lic-*.json"))] if d.is_dir() else []


def store_licence(signed: SignedLicence, store: Path | None = None) -> Path:
    """Keep a signed licence in the store (atomically); the same licence again is a no-op."""
    d = store or store_dir()
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{signed.licence.id}.json"
    if p.exists():
        if p.read_bytes() == signed.data:
            return p
        raise LicenceError(f"{p}: a licence with this id is held with other contents; it was changed after "
                           "it was issued (check it with 'twinstudio licence verify')", path=str(p))
    atomic_write_bytes(p, signed.data)
    return p


# ----------------------------------------------------------------------------- the bundle


@dataclass(frozen=True)
class BundleManifest:
    """A bundle's MANIFEST.json: its exact bytes, their sha256 (what a licence names), the parsed document."""

    data: bytes
    sha256: str
    doc: dict[str, Any]
    path: Path  #: the bundle

    @property
    def consent(self) -> dict[str, Any]:
        return self.doc["consent"]

    @property
    def subject_id(self) -> str:
        return self.doc["subject"]["id"]

    @property
    def where(self) -> str:
        return f"{self.path} [{MANIFEST}]"


def read_bundle_manifest(bundle: Path | str) -> BundleManifest:
    """The MANIFEST.json of a bundle folder or ``.tar`` (read, not verified: see :func:`verify_bundle`)."""
    from train.handoff.integrity import MAX_METADATA_BYTES, BundleError

    bundle = Path(bundle)
    data: bytes | None = None
    if bundle.is_dir():
        p = bundle / MANIFEST
        if p.is_file() and p.stat().st_size <= MAX_METADATA_BYTES:
            data = p.read_bytes()
    elif bundle.is_file():
        for name, size, f in iter_tar(bundle):  # the manifest is the archive's first member
            if name == MANIFEST and size <= MAX_METADATA_BYTES:
                data = f.read()
                break
    else:
        raise BundleError("no such bundle (folder or .tar)", path=bundle)
    if data is None:
        raise BundleError(f"no {MANIFEST} (or one over {MAX_METADATA_BYTES >> 20} MiB): not a bundle", path=bundle)
    doc, _ = parse_manifest(data, path=bundle)
    c, s = doc.get("consent"), doc.get("subject")
    if not isinstance(c, dict) or not isinstance(s, dict) or not isinstance(s.get("id"), str):
        raise LicenceError(f"{bundle} [{MANIFEST}]: holds no consent terms and subject id", path=str(bundle))
    return BundleManifest(data, hashlib.sha256(data).hexdigest(), doc, bundle)


def _consent_date(c: dict, name: str, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(c.get(name)))
    except ValueError:
        raise LicenceError(f"{where}: consent.{name} {c.get(name)!r} is not a date (YYYY-MM-DD)") from None


def _listed(c: dict, name: str, where: str) -> list[str]:
    v = c.get(name)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise LicenceError(f"{where}: consent.{name} {v!r} is not a list of names")
    return v


def consent_refusals(m: BundleManifest, *, purposes: Iterable[str], markets: Iterable[str], start: dt.date,
                     end: dt.date, dates_as: tuple[str, str] = ("valid_from", "valid_until")) -> list[Refusal]:
    """What of ``purposes``, ``markets`` and the days ``start``..``end`` the bundle's consent does not allow,
    and whether it lacks 'generate'; each refusal names the field and both values. ``dates_as`` names the
    requested dates in the messages."""
    c, where = m.consent, m.where
    cid = c.get("consent_id", "?")
    scopes, c_purposes, c_markets = (_listed(c, k, where) for k in ("scopes", "purposes", "markets"))
    c_from, c_until = _consent_date(c, "valid_from", where), _consent_date(c, "valid_until", where)
    out: list[Refusal] = []
    if GENERATE not in scopes:
        out.append(Refusal("consent", f"consent {cid} scopes are {scopes}: no {GENERATE!r}, and rendering images "
                                      f"of the twin is generation ({where})", GENERATE, scopes))
    for p in purposes:
        if p not in c_purposes:
            out.append(Refusal("purpose", f"purpose {p!r} is not among the consent's purposes {c_purposes} "
                                          f"(consent {cid}, {where})", p, c_purposes))
    worldwide = any(x.lower() == WORLDWIDE for x in c_markets)
    for mk in markets:
        if mk not in c_markets and not worldwide:
            out.append(Refusal("market", f"market {mk!r} is not among the consent's markets {c_markets} "
                                         f"(consent {cid}, {where})", mk, c_markets))
    if start < c_from:
        out.append(Refusal("dates", f"{dates_as[0]} {start} is before the consent's valid_from {c_from} "
                                    f"(consent {cid}, {where})", str(start), str(c_from)))
    if end > c_until:
        out.append(Refusal("dates", f"{dates_as[1]} {end} is after the consent's valid_until {c_until} "
                                    f"(consent {cid}, {where})", str(end), str(c_until)))
    return out


def _bundle_refusals(lic: Licence, m: BundleManifest) -> list[Refusal]:
    """Whether ``m`` is the bundle ``lic`` licenses (manifest hash, subject, consent)."""
    out = []
    if m.sha256 != lic.bundle_manifest_sha256:
        out.append(Refusal("bundle", f"licence {lic.id} is for the bundle whose {MANIFEST} has sha256 "
                                     f"{lic.bundle_manifest_sha256}; {m.path} has {m.sha256}",
                           m.sha256, lic.bundle_manifest_sha256))
    if m.subject_id != lic.subject_id:
        out.append(Refusal("bundle", f"licence {lic.id} is for subject {lic.subject_id!r}; {m.where} is of subject "
                                     f"{m.subject_id!r}", m.subject_id, lic.subject_id))
    if m.consent.get("consent_id") != lic.consent_id:
        out.append(Refusal("consent", f"licence {lic.id} rests on consent {lic.consent_id!r}; {m.where} holds "
                                      f"consent {m.consent.get('consent_id')!r}", m.consent.get("consent_id"),
                           lic.consent_id))
    return out


# ----------------------------------------------------------------------------- keys and trust


def trust_for(pubkey: Path | str | None = None, trusted_keys: Path | str | None = None
              ) -> tuple[dict[bytes, TrustedKey], str]:
    """The trusted keys as verify takes them: ``pubkey`` alone, else the pinned file; (index, where from)."""
    from train.handoff.integrity import load_public_key
    from train.handoff.trust import load_trusted_keys, trust_index, trusted_key, trusted_keys_path

    if pubkey is not None:
        return trust_index([trusted_key(load_public_key(pubkey), "pubkey")]), f"--pubkey {pubkey}"
    path = Path(trusted_keys) if trusted_keys is not None else trusted_keys_path()
    return trust_index(load_trusted_keys(path)), str(path)


def studio_key(key: Path | str | Ed25519PrivateKey | None) -> Ed25519PrivateKey:
    """The studio's private key: a key, a key file, or the default ``$TWINSTUDIO_HOME/keys/studio.key``."""
    from train.handoff.bundle import default_key_path
    from train.handoff.integrity import SigningKeyError, load_private_key

    if key is not None and not isinstance(key, (str, Path)):
        return key
    path = Path(key) if key is not None else default_key_path()
    if not path.exists():
        raise SigningKeyError("no studio signing key; create one with 'twinstudio keys init'", path=path)
    return load_private_key(path)


# ----------------------------------------------------------------------------- issue


def _date(v: dt.date | str, what: str) -> dt.date:
    if isinstance(v, dt.date):
        return v
    try:
        return dt.date.fromisoformat(v)
    except (TypeError, ValueError):
        raise LicenceError(f"{what} {v!r} is not a date (YYYY-MM-DD)", field=what) from None


def issue_licence(bundle: Path | str, *, licensee: str, purposes: Sequence[str], markets: Sequence[str],
                  valid_until: dt.date | str, max_images: int, rate: Rate | str,
                  valid_from: dt.date | str | None = None, notes: str | None = None,
                  key: Path | str | Ed25519PrivateKey | None = None, pubkey: Path | str | None = None,
                  trusted_keys: Path | str | None = None, revocations: Path | str | None = None,
                  accept_stale_revocations: bool = False, today: dt.date | None = None,
                  store: Path | None = None, out: Path | str | None = None,
                  workers: int | None = None) -> tuple[Path, Licence]:
    """Issue a signed licence of ``bundle`` to ``licensee``; returns (the file held in the store, the licence).

    The request is checked first (rate, dates, count: LicenceError, exit 2);
    then the bundle must pass :func:`train.handoff.verify.verify_bundle` with
    these trust and revocation options (else BundleNotUsable with verify's exit
    code) and be signed by ``key``; then every term must lie within the
    consent (else LicenceRefused, exit 4, listing each refusal by field).
    ``valid_from`` defaults to ``today``. The licence is kept in ``store``
    (default ``$TWINSTUDIO_HOME/licences``) and copied to ``out`` when given.
    """
    today = today or dt.date.today()
    bundle = Path(bundle)
    rate = parse_rate(rate) if isinstance(rate, str) else rate
    start = _date(valid_from, "valid_from") if valid_from is not None else today
    end = _date(valid_until, "valid_until")
    if end < start:
        raise LicenceError(f"valid_until {end} is before valid_from {start}", field="dates")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise LicenceError(f"max_images {max_images!r} is not a whole number >= 1", field="max_images")
    if not isinstance(licensee, str) or not _TEXT.fullmatch(licensee) or licensee != licensee.strip() \
            or len(licensee) > 200:
        raise LicenceError(f"licensee {licensee!r} must be 1-200 printable characters without surrounding spaces",
                           field="licensee")
    if notes is not None and (not isinstance(notes, str) or len(notes) > 2000):
        raise LicenceError(f"notes of {len(notes)} characters: at most 2000", field="notes")
    purposes, markets = list(purposes), list(markets)
    for what, items in (("purpose", purposes), ("market", markets)):
        if not items:
            raise LicenceError(f"no {what}: a licence names at least one", field=what)
        for x in items:
            try:
                _term(x, what)
            except ValueError as e:
                raise LicenceError(str(e), field=what) from None
    private = studio_key(key)
    issuer = key_id(private.public_key())

    m = read_bundle_manifest(bundle)
    vr = verify_bundle(bundle, pubkey=pubkey, trusted_keys=trusted_keys, revocations=revocations,
                       accept_stale_revocations=accept_stale_revocations, today=today, workers=workers)
    if vr.exit_code != VALID:
        raise BundleNotUsable(_verify_summary(vr, bundle) + "; no licence is issued", exit_code=vr.exit_code,
                              path=str(bundle))
    if vr.manifest != m.doc:
        raise LicenceError(f"{m.where}: changed while it was being verified; try again", path=str(bundle))

    reasons: list[Refusal] = []
    if vr.integrity.key_id != issuer:
        reasons.append(Refusal("issuer", f"{bundle} is signed by key {vr.integrity.key_id}, the licence would be "
                                         f"signed by key {issuer}: a studio licenses the twins it bundled (it "
                                         "holds their consent); sign with that key (--key)",
                               issuer, vr.integrity.key_id))
    reasons += consent_refusals(m, purposes=purposes, markets=markets, start=start, end=end)
    if end < today:
        reasons.append(Refusal("dates", f"valid_until {end} is before today ({today}): the licence would never "
                                        "be usable", str(end), str(today)))
    if reasons:
        raise LicenceRefused(reasons, where=f"licence of {bundle} to {licensee!r}", path=str(bundle))

    c = m.consent
    try:
        lic = Licence.create(LicenceTerms(
            licensee=licensee, purposes=tuple(purposes), markets=tuple(markets), valid_from=start, valid_until=end,
            max_images=max_images, rate=rate, bundle_manifest_sha256=m.sha256, subject_id=m.subject_id,
            consent_id=c.get("consent_id"), agency=c.get("agency"), issuer=issuer, issued_on=today, notes=notes))
    except ValidationError as e:
        raise LicenceError(f"licence of {bundle}: {_validation_message(e)}", path=str(bundle)) from None
    signed = sign_licence(lic, private)
    path = store_licence(signed, store)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, signed.data)
    return path, lic


def _verify_summary(vr: VerifyResult, bundle: Path) -> str:
    """One message for a bundle that does not verify: its status and every reason."""
    why = [*vr.integrity.problems, *vr.consent_problems]
    if vr.exit_code == UNTRUSTED:
        why.append(f"signer key {vr.integrity.key_id} is not in {vr.trust_source}; pin it with "
                   "'twinstudio keys trust studio.pub --name NAME'")
    if vr.exit_code == REVOCATION and vr.revocation is not None:
        why.append(vr.revocation.summary())
    return f"{bundle}: {vr.status}" + (": " + "; ".join(why[:8]) if why else "")


# ----------------------------------------------------------------------------- verify


NOT_IN_FORCE = CONSENT  # the exit codes of twinstudio verify, with the same meanings
STATUS = {**BUNDLE_STATUS, NOT_IN_FORCE: "not in force"}


@dataclass
class LicenceVerdict:
    """What :func:`verify_licence` found; ``exit_code`` is the first of 3, 4, 5, 6 that applies, else 0."""

    exit_code: int
    licence: Licence | None  #: None when the file's signature did not verify
    key_id: str | None = None  #: the key that signed the licence
    trusted: bool = False  #: that key is a trusted key
    signer_name: str | None = None  #: its name in the trusted keys
    trust_source: str = ""
    problems: list[str] = field(default_factory=list)  #: tampering, not in force, not this bundle, revoked
    revocation: RevocationStatus | None = None
    accepted_revocation_risk: bool = False
    bundle: VerifyResult | None = None  #: the bundle's verification, when a bundle was given
    manifest: BundleManifest | None = None

    @property
    def status(self) -> str:
        if self.exit_code == REVOCATION and self.revocation is not None:
            return f"intact and trusted, revocation status {self.revocation.state}"
        return STATUS[self.exit_code]

    def raise_for_status(self, where: str) -> None:
        """Raise the error of a verdict that is not valid (its exit code, its problems)."""
        if self.exit_code == VALID:
            return
        why = list(self.problems)
        if self.bundle is not None and self.bundle.exit_code != VALID:
            why.append(_verify_summary(self.bundle, self.bundle_path))
        if self.exit_code == UNTRUSTED and not self.trusted:
            why.append(f"licence signer key {self.key_id} is not in {self.trust_source}")
        if self.exit_code == REVOCATION and self.revocation is not None:
            why.append(self.revocation.summary())
        raise LicenceNotValid(f"{where}: {self.status}: " + "; ".join(why), exit_code=self.exit_code)

    @property
    def bundle_path(self) -> Path:
        return self.manifest.path if self.manifest is not None else Path("<bundle>")


def verify_licence(licence: Path | str, *, bundle: Path | str | None = None, pubkey: Path | str | None = None,
                   trusted_keys: Path | str | None = None, revocations: Path | str | None = None,
                   accept_stale_revocations: bool = False, today: dt.date | None = None,
                   now: dt.datetime | None = None, workers: int | None = None) -> LicenceVerdict:
    """Is this licence what a trusted studio signed, in force today, and (with ``bundle``) for that bundle?

    Exit codes, the first that applies: 3 the licence's signature (or the
    bundle) is not what was signed; 4 not in force (before ``valid_from``,
    after ``valid_until``, its consent revoked or the bundle's consent not in
    force) or ``bundle`` is not the licensed bundle; 5 signed by a key that is
    not trusted (``pubkey``, else the pinned ``trusted_keys``); 6 the
    revocation status of its consent is unknown or stale (0 with
    ``accept_stale_revocations``); 0 valid. Malformed input raises (exit 2).
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    today = today or dt.date.today()
    trusted, source = trust_for(pubkey, trusted_keys)
    try:
        signed = read_licence(licence)
    except LicenceSignatureError as e:
        return LicenceVerdict(TAMPERED, None, trust_source=source, problems=[str(e)])
    lic = signed.licence
    who = trusted.get(signed.public_key)
    v = LicenceVerdict(VALID, lic, lic.issuer, who is not None, who.name if who else None, source)
    if today < lic.valid_from:
        v.problems.append(f"licence {lic.id} is not in force yet: valid from {lic.valid_from}")
    if today > lic.valid_until:
        v.problems.append(f"licence {lic.id} expired on {lic.valid_until}")
    if bundle is not None:
        v.bundle = verify_bundle(bundle, pubkey=pubkey, trusted_keys=trusted_keys, revocations=revocations,
                                 accept_stale_revocations=accept_stale_revocations, now=now, today=today,
                                 workers=workers)
        v.manifest = read_bundle_manifest(bundle)
        v.problems += [r.message for r in _bundle_refusals(lic, v.manifest)]
        v.revocation = v.bundle.revocation
    else:
        v.revocation = revocation_status(lic.issuer, trusted, list_path=revocations, now=now)
    revoked = v.revocation.revoked.get(lic.consent_id) if v.revocation is not None else None
    if revoked is not None:
        v.problems.append(f"consent {lic.consent_id} was revoked on {revoked.get('revoked_at')}"
                          + (f": {revoked['reason']}" if revoked.get("reason") else ""))
    b = v.bundle.exit_code if v.bundle is not None else VALID
    if b == TAMPERED:
        v.exit_code = TAMPERED
    elif v.problems or b == NOT_IN_FORCE:
        v.exit_code = NOT_IN_FORCE
    elif not v.trusted or b == UNTRUSTED:
        v.exit_code = UNTRUSTED
    elif b == REVOCATION or (v.bundle is None and (v.revocation is None or v.revocation.state != "checked")):
        v.exit_code = VALID if accept_stale_revocations else REVOCATION
        v.accepted_revocation_risk = accept_stale_revocations
    else:
        v.accepted_revocation_risk = v.bundle is not None and v.bundle.accepted_revocation_risk
    return v


# ----------------------------------------------------------------------------- use


def use_refusals(lic: Licence, *, on: dt.date, purpose: str, market: str, images_used: int, n: int = 1,
                 licensee: str | None = None) -> list[Refusal]:
    """What the licence itself does not allow of ``n`` more images on day ``on`` (empty: allowed)."""
    out: list[Refusal] = []
    if licensee is not None and licensee != lic.licensee:
        out.append(Refusal("licensee", f"licence {lic.id} is granted to {lic.licensee!r}, not to {licensee!r}",
                           licensee, lic.licensee))
    if purpose not in lic.purposes:
        out.append(Refusal("purpose", f"purpose {purpose!r} is not among licence {lic.id}'s purposes "
                                      f"{list(lic.purposes)}", purpose, list(lic.purposes)))
    if market not in lic.markets:
        out.append(Refusal("market", f"market {market!r} is not among licence {lic.id}'s markets "
                                     f"{list(lic.markets)}", market, list(lic.markets)))
    if on < lic.valid_from:
        out.append(Refusal("dates", f"day {on} is before licence {lic.id}'s valid_from {lic.valid_from}",
                           str(on), str(lic.valid_from)))
    if on > lic.valid_until:
        out.append(Refusal("dates", f"day {on} is after licence {lic.id}'s valid_until {lic.valid_until}",
                           str(on), str(lic.valid_until)))
    if n < 1:
        raise LicenceError(f"images to make {n!r} is not >= 1")
    if images_used + n > lic.max_images:
        left = max(0, lic.max_images - images_used)
        out.append(Refusal("images", f"{n} more image(s) asked, {left} left of licence {lic.id}'s max_images "
                                     f"{lic.max_images} ({images_used} used)", images_used + n, lic.max_images))
    return out


def check_use(lic: Licence, manifest: BundleManifest, *, on: dt.date, purpose: str, market: str, images_used: int,
              n: int = 1, licensee: str | None = None) -> int:
    """May ``n`` more images of the twin be made under ``lic`` on day ``on``? Returns the images left after them.

    Raises LicenceRefused listing each reason by field: licensee, purpose,
    market, dates, images (left), consent (the bundle's consent lacks
    'generate', does not cover the day, purpose or market, or is not the
    licence's), bundle (not the licensed bundle or subject). ``manifest``
    comes from :func:`read_bundle_manifest`; ``images_used`` from the ledger
    (:func:`train.handoff.ledger.images_used`).
    """
    reasons = use_refusals(lic, on=on, purpose=purpose, market=market, images_used=images_used, n=n,
                           licensee=licensee)
    reasons += _bundle_refusals(lic, manifest)
    reasons += consent_refusals(manifest, purposes=[purpose], markets=[market], start=on, end=on,
                                dates_as=("day", "day"))
    if reasons:
        raise LicenceRefused(reasons, where=f"use of licence {lic.id}", licence=lic.id)
    return lic.max_images - images_used - n


@dataclass(frozen=True)
class Authorisation:
    """A use :func:`authorise_use` allowed."""

    licence: Licence
    manifest: BundleManifest
    images_used: int  #: recorded in the ledger before this use
    images_left: int  #: after this use


def authorise_use(licence: Path | str, bundle: Path | str, *, purpose: str, market: str, n: int = 1,
                  licensee: str | None = None, ledger: Path | str | None = None, pubkey: Path | str | None = None,
                  trusted_keys: Path | str | None = None, revocations: Path | str | None = None,
                  accept_stale_revocations: bool = False, today: dt.date | None = None,
                  workers: int | None = None) -> Authorisation:
    """Before rendering: verify the licence with the bundle (:func:`verify_licence`), count its images in the
    ledger, and :func:`check_use`; returns what was allowed, else raises (LicenceNotValid with the verdict's
    exit code, or LicenceRefused naming each reason). The ledger enforces the image cap again when the
    images are recorded (:meth:`train.handoff.ledger.Ledger.record`)."""
    from train.handoff.ledger import images_used

    today = today or dt.date.today()
    v = verify_licence(licence, bundle=bundle, pubkey=pubkey, trusted_keys=trusted_keys, revocations=revocations,
                       accept_stale_revocations=accept_stale_revocations, today=today, workers=workers)
    if v.licence is not None and v.manifest is not None and v.exit_code == NOT_IN_FORCE:
        # the reasons by name, as check_use gives them (dates, bundle, consent)
        used = images_used(v.licence.id, ledger)
        check_use(v.licence, v.manifest, on=today, purpose=purpose, market=market, images_used=used, n=n,
                  licensee=licensee)
    v.raise_for_status(f"licence {licence}")
    assert v.licence is not None and v.manifest is not None
    used = images_used(v.licence.id, ledger)
    left = check_use(v.licence, v.manifest, on=today, purpose=purpose, market=market, images_used=used, n=n,
                     licensee=licensee)
    return Authorisation(v.licence, v.manifest, used, left)


__all__ = ["Authorisation", "BundleManifest", "BundleNotUsable", "LICENCE_SCHEMA", "Licence", "LicenceError",
           "LicenceNotValid", "LicenceRefused", "LicenceSignatureError", "LicenceTerms", "LicenceVerdict", "Rate",
           "Refusal", "SignedLicence", "STATUS", "authorise_use", "check_currency", "check_use", "consent_refusals",
           "exact_product", "find_licence", "held_licences", "issue_licence", "licence_id", "parse_licence",
           "parse_rate", "read_bundle_manifest", "read_licence", "sign_licence", "store_dir", "store_licence",
           "studio_key", "trust_for", "use_refusals", "verify_licence"]
