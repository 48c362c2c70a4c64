"""``twinstudio verify``: is this bundle what a trusted studio signed, and may it still be used today?

The answers and their exit codes (``rigs.errors``), the first that applies wins:

- **tampered** (3): the signature does not verify with the key embedded in
  SIGNATURE.json, or a listed file is missing or changed, or a file is there
  that is not listed (the files concerned are named);
- **consent not in force** (4): intact, but the consent has expired, has not
  started, or is revoked on a revocation list held (even a stale one);
- **intact, signer not trusted** (5): intact, but the signing key is not one
  of the trusted keys (the pinned ``trusted_keys`` file, see
  :mod:`train.handoff.trust`, or the one ``--pubkey``);
- **revocation status unknown or stale** (6): intact and trusted, but no
  current revocation list of the signer is held (:mod:`train.handoff.revocations`):
  none at all (unknown) or one past its next update (stale). Accepting that
  is an explicit choice (``accept_stale_revocations``), never the default;
- **valid** (0): intact, signed by a trusted key, consent in force, and the
  signer's current revocation list checked (serial and dates are reported).

Unusable input (no bundle, no manifest, an unreadable key, trust file or
revocation list) is exit 2, like every other input error.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rigs.errors import EXIT_CONSENT, EXIT_OK, EXIT_REVOCATION, EXIT_TAMPERED, EXIT_UNTRUSTED
from train.handoff.integrity import IntegrityReport, load_public_key, verify_integrity
from train.handoff.revocations import RevocationError, RevocationStatus, revocation_status
from train.handoff.trust import TrustedKey, load_trusted_keys, trust_index, trusted_key, trusted_keys_path

VALID, TAMPERED, CONSENT, UNTRUSTED, REVOCATION = (EXIT_OK, EXIT_TAMPERED, EXIT_CONSENT, EXIT_UNTRUSTED,
                                                   EXIT_REVOCATION)
STATUS = {VALID: "valid", TAMPERED: "tampered", CONSENT: "consent not in force",
          UNTRUSTED: "intact, signer not trusted", REVOCATION: "intact and trusted, revocation status unknown"}


@dataclass
class VerifyResult:
    exit_code: int
    integrity: IntegrityReport
    consent_problems: list[str] = field(default_factory=list)
    trusted: bool = False  #: the signer is one of the trusted keys
    signer: TrustedKey | None = None  #: the trusted key that signed it, when it is one
    trust_source: str = ""  #: where the trusted keys came from (a file, or "--pubkey FILE")
    revocation: RevocationStatus | None = None
    accepted_revocation_risk: bool = False  #: stale/unknown, accepted by the caller

    @property
    def status(self) -> str:
        if self.exit_code == REVOCATION and self.revocation is not None:
            return f"intact and trusted, revocation status {self.revocation.state}"
        return STATUS[self.exit_code]

    @property
    def manifest(self) -> dict | None:
        return self.integrity.manifest


def consent_problems(manifest: dict, today: dt.date, revoked: dict[str, dict]) -> list[str]:
    """Why the bundle's consent does not allow sharing today (empty when it does).

    The manifest's terms become a :class:`capture.consent.ConsentRecord`, revoked
    when the revocation list names it, so a bundle is judged by the same rule
    as the session it came from.
    """
    from pydantic import ValidationError

    from capture.consent import ConsentRecord

    c, subject = manifest.get("consent"), manifest.get("subject")
    if not isinstance(c, dict) or not isinstance(subject, dict) or not isinstance(c.get("consent_id", ""), str):
        return ["the manifest holds no usable consent terms (consent and subject must be objects)"]
    r = revoked.get(c.get("consent_id", ""))
    try:
        rec = ConsentRecord.model_validate({**c, "subject_id": subject.get("id"),
                                            "revoked_at": r.get("revoked_at") if r else None,
                                            "revocation_reason": r.get("reason") if r else None})
    except ValidationError as e:
        return [f"the manifest's consent {c.get('consent_id', '?')} is not a valid consent record: "
                f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']}"]
    problem = rec.problem("share", today)
    return [problem] if problem else []


def _publication(manifest: dict | None) -> tuple[str | None, str | None]:
    """(issuer key id, URL) of the revocation list the manifest names, each None when absent or malformed."""
    pub = (manifest or {}).get("revocations")
    if not isinstance(pub, dict):
        return None, None
    issuer, url = pub.get("issuer"), pub.get("url")
    return (issuer if isinstance(issuer, str) else None), (url if isinstance(url, str) else None)


def verify_bundle(bundle: Path | str, *, pubkey: Path | str | None = None, trusted_keys: Path | str | None = None,
                  revocations: Path | str | None = None, accept_stale_revocations: bool = False,
                  now: dt.datetime | None = None, today: dt.date | None = None, workers: int | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Check a bundle folder or ``.tar``: signature, files, trust in the signer, consent dates, revocations.

    Trusted keys: ``pubkey`` (one key, for this call only) or else the pinned
    keys in ``trusted_keys`` (default ``$TWINSTUDIO_HOME/trusted_keys``).
    Revocations: the list file ``revocations`` when given (it must be signed
    by the bundle's signer), else the list held from the signer
    (``$TWINSTUDIO_HOME/revocations/<key id>.json``). ``now`` (aware) is the
    time lists are judged at, ``today`` the day consent dates are.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    if pubkey is not None:
        keys = [trusted_key(load_public_key(pubkey), "pubkey")]
        source = f"--pubkey {pubkey}"
    else:
        path = Path(trusted_keys) if trusted_keys is not None else trusted_keys_path()
        keys, source = load_trusted_keys(path), str(path)
    trusted = trust_index(keys)
    report = verify_integrity(bundle, trusted=None, workers=workers, on_progress=on_progress)
    signer = trusted.get(report.public_key) if report.signature_ok and report.public_key is not None else None

    issuer, url = _publication(report.manifest)
    rev: RevocationStatus | None = None
    problems: list[str] = []
    if report.ok:
        try:
            rev = revocation_status(report.key_id, trusted, list_path=revocations, url=url, now=now)
        except RevocationError as e:  # a list that cannot be used is unusable input, whatever is wrong with it
            raise RevocationError(f"cannot use the revocation list: {e}", path=e.facts.get("path")) from e
        if issuer is not None and issuer != report.key_id:  # the signer's revocations still count
            rev = replace(rev, state="unknown", reason=f"the manifest names key {issuer} as the "
                                      f"revocation list's issuer, but the bundle is signed by key {report.key_id}")
        # consent dates are days where the user is, as the studio's own gates judge them
        problems = consent_problems(report.manifest or {}, today or dt.date.today(), rev.revoked)
    accepted = False
    if not report.ok:
        code = TAMPERED
    elif problems:
        code = CONSENT
    elif signer is None:
        code = UNTRUSTED
    elif rev is not None and rev.state != "checked":
        code = VALID if accept_stale_revocations else REVOCATION
        accepted = accept_stale_revocations
    else:
        code = VALID
    return VerifyResult(code, report, problems, signer is not None, signer, source, rev, accepted)


__all__ = ["CONSENT", "REVOCATION", "STATUS", "TAMPERED", "UNTRUSTED", "VALID", "VerifyResult", "consent_problems",
           "verify_bundle"]
