"""``twinstudio inspect IMAGE``: where a released image came from, from its credentials or its watermark.

Credentials first: c2pa validates the manifest against the trust anchor (the
studio CA). When they are valid they name the twin's bundle, the licence and
the image serial. When they are missing (stripped by a website), untrusted or
tampered with, the watermark is read from the pixels: it gives the licence's
24-bit tag and the serial; a list of licence ids (the usage ledger's, or
``--licence``) resolves the tag to a licence.

Exit codes (beside the project's 0-7 and 130; see README "exit codes"):

    0   CREDENTIALS_VALID  valid credentials, signed under the trust anchor
    10  WATERMARK_ONLY     no valid credentials (stripped, untrusted or tampered), but the watermark
    11  NOTHING_FOUND      neither
    2   the file cannot be read or decoded as an image (an InspectError)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rigs.errors import TwinstudioError
from train.marking.credentials import ABSENT, TRUSTED, CredentialsReading
from train.marking.watermark import DEFAULT_KEY, WatermarkReading

CREDENTIALS_VALID = 0
WATERMARK_ONLY = 10
NOTHING_FOUND = 11


class InspectError(TwinstudioError):
    """The file cannot be read, or its bytes are no image OpenCV can decode."""

    exit_code = 2

    def __init__(self, message: str, *, path: Path | str) -> None:
        super().__init__(f"{path}: {message}", path=path)
        self.reason = message
        self.path = Path(path)


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_image` found; ``exit_code`` is one of the three constants above."""

    path: Path
    exit_code: int
    credentials: CredentialsReading
    watermark: WatermarkReading | None
    trust_anchor: str | None
    """where the trust anchor came from (a path), or None: nothing was trusted"""
    licence_id: str | None
    """the licence, from valid credentials or resolved from the watermark's tag"""
    twin: str | None
    """the twin (bundle / subject) as the credentials or the licence list name it"""
    image_serial: int | None

    @property
    def verdict(self) -> str:
        return {CREDENTIALS_VALID: "credentials valid", WATERMARK_ONLY: "watermark only",
                NOTHING_FOUND: "nothing found"}[self.exit_code]

    def summary(self) -> str:
        """A few readable lines: the verdict, then what each mark says."""
        c, w = self.credentials, self.watermark
        lines = [f"{self.path}: {self.verdict}"]
        anchor = f"trust anchor {self.trust_anchor}" if self.trust_anchor else "no trust anchor"
        if c.state == ABSENT:
            lines.append("  credentials: none (no C2PA manifest)")
        else:
            codes = f" ({', '.join(c.failures)})" if c.failures else ""
            lines.append(f"  credentials: {c.state}{codes}; {anchor}; signer {c.signer or '?'}")
            if c.twin is not None:
                word = "" if c.state == TRUSTED else " [not valid: claims only]"
                lines.append(f"    twin bundle sha256 {c.twin.bundle_sha256}, licence {c.twin.licence_id}, "
                             f"image serial {c.twin.image_serial}"
                             + (f", subject {c.twin.subject_id}" if c.twin.subject_id else "") + word)
                if c.twin.disclosure:
                    lines.append(f"    disclosure: {c.twin.disclosure}")
            if c.digital_source_type:
                lines.append(f"    digital source type: {c.digital_source_type.rsplit('/', 1)[-1]}")
        if w is None:
            lines.append("  watermark: not read (the credentials are valid)")
        elif w.found:
            p = w.payload
            who = f"licence {self.licence_id}" if self.licence_id else \
                f"licence tag {p.licence_tag:06x} (not in the licence list given)"
            lines.append(f"  watermark: {who}, image serial {p.image_serial} (sync z {w.z:.1f}, "
                         f"scale {w.scale[0]:.3f}, {w.corrected_bits} bit(s) corrected)")
        else:
            lines.append(f"  watermark: {w.reason}")
        if self.twin and (w is not None and w.found):
            lines.append(f"    twin: {self.twin}")
        return "\n".join(lines)


def _anchor(trust_anchor: Path | str | bytes | None) -> tuple[str | None, str | None]:
    """(PEM text, where it came from) of the trust anchor; the studio CA when none is given and it exists."""
    from train.marking.credentials import CA_CERT, check_trust_anchor, read_trust_anchor

    if isinstance(trust_anchor, bytes):
        return check_trust_anchor(trust_anchor), "(given)"
    if trust_anchor is None:
        from capture.consent import studio_home

        default = studio_home() / "keys" / CA_CERT
        if not default.exists():
            return None, None
        trust_anchor = default
    return read_trust_anchor(trust_anchor), str(trust_anchor)


def inspect_image(path: Path | str, trust_anchor: Path | str | bytes | None = None, *,
                  licences: Mapping[str, str | None] | Iterable[str] | None = None,
                  key: bytes = DEFAULT_KEY, read_watermark_when_valid: bool = False) -> Inspection:
    """Inspect one image file (JPEG or PNG); see :class:`Inspection`.

    ``trust_anchor``: a CA certificate file (or its PEM bytes); by default the
    studio's own ``$TWINSTUDIO_HOME/keys/c2pa-ca.pem`` when it exists.
    ``licences``: licence ids (or a mapping licence id -> twin description) to
    resolve the watermark's licence tag. The watermark is read only when the
    credentials are not valid, unless ``read_watermark_when_valid``.
    """
    import cv2
    import numpy as np

    from train.marking.credentials import read_credentials
    from train.marking.watermark import extract_watermark

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InspectError(f"cannot read: {e.strerror}", path=path) from None
    anchor_pem, anchor_src = _anchor(trust_anchor)
    cred = read_credentials(data, None, anchor_pem)
    valid = cred.state == TRUSTED
    wm = None
    if not valid or read_watermark_when_valid:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InspectError("not an image OpenCV can decode", path=path)
        wm = extract_watermark(np.ascontiguousarray(bgr[..., ::-1]), key=key)

    known = dict(licences) if isinstance(licences, Mapping) else {lid: None for lid in (licences or ())}
    if valid and cred.twin is not None:
        t = cred.twin
        twin = f"bundle {t.bundle_sha256}" + (f", subject {t.subject_id}" if t.subject_id else "")
        return Inspection(path, CREDENTIALS_VALID, cred, wm, anchor_src, t.licence_id, twin, t.image_serial)
    if valid:  # valid, but not one of ours: no twin assertion
        return Inspection(path, CREDENTIALS_VALID, cred, wm, anchor_src, None, None, None)
    if wm is not None and wm.found:
        matches = [lid for lid in known if wm.payload.matches(lid)]
        lid = matches[0] if len(matches) == 1 else None
        twin = known.get(lid) if lid else None
        return Inspection(path, WATERMARK_ONLY, cred, wm, anchor_src, lid, twin, wm.payload.image_serial)
    return Inspection(path, NOTHING_FOUND, cred, wm, anchor_src, None, None, None)
