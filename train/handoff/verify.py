"""``twinstudio verify``: is this bundle what the studio signed, and may it still be used today?

Three answers, three exit codes:

- **valid** (0): the signature verifies (by the trusted studio key when one is
  given), every listed file is present with its size and sha256, nothing else
  is there, and the consent is in force today and not on the revocation list;
- **tampered** (3): any of the first three fails (the files concerned are named);
- **consent not in force** (4): the bundle is intact, but its consent has
  expired, has not started, or was revoked.

Unusable input (no bundle, no manifest, unreadable key) is exit 2, like every
other input error.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from train.handoff.integrity import IntegrityReport, load_public_key, verify_integrity

VALID, TAMPERED, CONSENT = 0, 3, 4
STATUS = {VALID: "valid", TAMPERED: "tampered", CONSENT: "consent not in force"}


@dataclass
class VerifyResult:
    exit_code: int
    integrity: IntegrityReport
    consent_problems: list[str] = field(default_factory=list)
    revocations_checked: str | None = None

    @property
    def status(self) -> str:
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

    c = dict(manifest.get("consent") or {})
    r = revoked.get(c.get("consent_id", ""))
    try:
        rec = ConsentRecord.model_validate({**c, "subject_id": (manifest.get("subject") or {}).get("id"),
                                            "revoked_at": r.get("revoked_at") if r else None,
                                            "revocation_reason": r.get("reason") if r else None})
    except ValidationError as e:
        return [f"the manifest's consent {c.get('consent_id', '?')} is not a valid consent record: "
                f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']}"]
    problem = rec.problem("share", today)
    return [problem] if problem else []


def verify_bundle(bundle: Path | str, *, pubkey: Path | str | None = None, revocations: Path | str | None = None,
                  today: dt.date | None = None, workers: int | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Check a bundle folder or ``.tar``: signature, files, consent dates and the revocation list."""
    from capture.consent import load_revocations, revocation_list_path

    trusted = load_public_key(pubkey) if pubkey is not None else None
    report = verify_integrity(bundle, trusted=trusted, workers=workers, on_progress=on_progress)
    rev_path = Path(revocations) if revocations is not None else revocation_list_path()
    revoked = load_revocations(rev_path)
    problems = consent_problems(report.manifest or {}, today or dt.date.today(), revoked)
    code = TAMPERED if not report.ok else (CONSENT if problems else VALID)
    return VerifyResult(code, report, problems, str(rev_path) if rev_path.exists() else None)


__all__ = ["CONSENT", "STATUS", "TAMPERED", "VALID", "VerifyResult", "consent_problems", "verify_bundle"]
