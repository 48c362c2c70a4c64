"""C2PA content credentials: the studio's signing chain, signing an image, reading it back.

Every image the studio releases says, in a C2PA manifest signed with the
studio's certificate, that it was made by a trained model (``c2pa.created``
with IPTC digital source type ``trainedAlgorithmicMedia``), from which twin
bundle (an ingredient named by the bundle's manifest SHA-256, no file
needed), under which licence, its serial, and the disclosure text. The fields
that inspection needs are also in one custom assertion, ``org.twinstudio.twin``.

The chain (``init_c2pa_chain``) is made with ``cryptography`` and kept beside
the studio's Ed25519 key in ``$TWINSTUDIO_HOME/keys/``:

    c2pa-ca.pem        the studio CA (the trust anchor readers configure)
    c2pa-ca.key        its EC P-256 key (0600; only needed to issue a new signer)
    c2pa-signer.pem    the signer certificate followed by the CA certificate
    c2pa-signer.key    the signer's EC P-256 key (0600)

c2pa (c2pa-python 0.38) refuses a signer certificate without keyUsage
digitalSignature, an EKU it accepts (emailProtection here) and the Subject and
Authority Key Identifiers ("the certificate is invalid"). A studio with its
own certificate from a CA passes those files to :func:`load_c2pa_chain`
instead. No timestamp authority is used (none is reachable offline), so a
manifest's validity ends with the signer certificate's.

Reading uses c2pa's own Reader with a Context whose ``trust.trust_anchors`` is
the studio CA: ``trusted`` needs the anchor, without it c2pa reports
``signingCredential.untrusted``; a changed pixel gives ``assertion.dataHash.mismatch``.
Nothing here touches the network: remote manifests and OCSP are switched off.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rigs.errors import TwinstudioError
from rigs.fileio import fsync_dir

CA_CERT = "c2pa-ca.pem"
CA_KEY = "c2pa-ca.key"
SIGNER_CERT = "c2pa-signer.pem"
SIGNER_KEY = "c2pa-signer.key"

#: the IPTC digital source type of an image a trained model made
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
#: label of our own assertion (reverse-domain, as C2PA asks for custom labels)
TWIN_ASSERTION = "org.twinstudio.twin"
TWIN_ASSERTION_VERSION = 1

FORMATS = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}

#: what read_credentials reports (``state``), best first
TRUSTED, UNTRUSTED, TAMPERED, ABSENT = "trusted", "untrusted", "tampered", "absent"
CredentialState = Literal["trusted", "untrusted", "tampered", "absent"]

#: settings for every Context here: no network (remote manifests, OCSP), no thumbnail (time), and no
#: verification right after signing (read_credentials verifies; the tests check every signed image)
_BASE_SETTINGS = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False, "verify_after_sign": False},
    "builder": {"thumbnail": {"enabled": False}},
}


class CredentialsError(TwinstudioError):
    """A signing chain or key that cannot be used, or an image c2pa cannot sign; names the file."""

    exit_code = 2

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message, path=path)
        self.reason = message
        self.path = Path(path) if path is not None else None


@dataclass(frozen=True)
class C2paChain:
    """A signer: its certificate chain (signer first, PEM), its private key (PEM) and the trust anchor."""

    chain_pem: bytes
    key_pem: bytes
    anchor_pem: bytes
    """the CA certificate(s) a reader must trust"""
    source: str = ""


@dataclass(frozen=True)
class TwinCredentials:
    """The fields of our ``org.twinstudio.twin`` assertion."""

    bundle_sha256: str
    licence_id: str
    image_serial: int
    subject_id: str | None = None
    disclosure: str = ""


@dataclass(frozen=True)
class CredentialsReading:
    """What :func:`read_credentials` found.

    ``state``: ``trusted`` (valid, signed under the trust anchor), ``untrusted``
    (intact, but the signer does not chain to the anchor), ``tampered`` (the
    image or manifest is not what was signed) or ``absent`` (no manifest).
    """

    state: CredentialState
    validation_state: str | None = None
    """c2pa's own word: Trusted / Valid / Invalid"""
    failures: tuple[str, ...] = ()
    """c2pa's failure codes, e.g. signingCredential.untrusted, assertion.dataHash.mismatch"""
    twin: TwinCredentials | None = None
    digital_source_type: str | None = None
    signer: str | None = None
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def valid(self) -> bool:
        return self.state == TRUSTED


# ----------------------------------------------------------------------------- the chain


def init_c2pa_chain(key_dir: Path | str, *, organisation: str = "twinstudio studio",
                    overwrite: bool = False, ca_years: int = 10, signer_years: int = 2) -> C2paChain:
    """Create the studio CA and a signer it issues (EC P-256, as c2pa wants them) in ``key_dir``.

    Writes :data:`CA_CERT`, :data:`CA_KEY` (0600), :data:`SIGNER_CERT` (signer
    then CA) and :data:`SIGNER_KEY` (0600); ``key_dir`` is created 0700 if
    missing. Refuses to replace an existing file unless ``overwrite``.
    Returns the chain as :func:`load_c2pa_chain` would read it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from train.handoff.integrity import _write_new_file

    key_dir = Path(key_dir)
    paths = [key_dir / n for n in (CA_CERT, CA_KEY, SIGNER_CERT, SIGNER_KEY)]
    if not overwrite:
        for p in paths:
            if p.exists() or p.is_symlink():
                raise CredentialsError("exists; refusing to overwrite it (pass overwrite=True)", path=p)
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)])

    def usage(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                             crl_sign=cert_sign, encipher_only=False, decipher_only=False)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"{organisation} C2PA CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=365 * ca_years))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(sign=False, cert_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer = (x509.CertificateBuilder().subject_name(name(f"{organisation} content credentials"))
              .issuer_name(ca_name).public_key(signer_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(hours=1))
              .not_valid_after(now + dt.timedelta(days=365 * signer_years))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(usage(sign=True, cert_sign=False), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))

    def key_pem(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    chain_pem = signer.public_bytes(serialization.Encoding.PEM) + ca_pem
    for path, data, mode in zip(paths, (ca_pem, key_pem(ca_key), chain_pem, key_pem(signer_key)),
                                (0o644, 0o600, 0o644, 0o600)):
        if overwrite:
            path.unlink(missing_ok=True)
        _write_new_file(path, data, mode)
    fsync_dir(key_dir)
    return C2paChain(chain_pem, key_pem(signer_key), ca_pem, source=str(key_dir / SIGNER_CERT))


def load_c2pa_chain(key_dir: Path | str | None = None, *, chain: Path | str | None = None,
                    key: Path | str | None = None, anchor: Path | str | None = None) -> C2paChain:
    """The signing chain in ``key_dir`` (default ``$TWINSTUDIO_HOME/keys``), or a studio's own files.

    ``chain``, ``key`` and ``anchor`` override the files of ``key_dir`` one by
    one (e.g. a certificate from the studio's own CA). The private key file
    must not be readable by group or others.
    """
    if key_dir is None:
        from capture.consent import studio_home

        key_dir = studio_home() / "keys"
    key_dir = Path(key_dir)
    chain_path = Path(chain) if chain is not None else key_dir / SIGNER_CERT
    key_path = Path(key) if key is not None else key_dir / SIGNER_KEY
    anchor_path = Path(anchor) if anchor is not None else key_dir / CA_CERT

    def read(path: Path, what: str) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CredentialsError(f"{what} not found (twinstudio keys init creates one)", path=path) from None
        except OSError as e:
            raise CredentialsError(f"cannot read {what}: {e.strerror}", path=path) from None
        if b"-----BEGIN " not in data:
            raise CredentialsError(f"{what} is not PEM", path=path)
        return data

    if key_path.exists() and key_path.stat().st_mode & 0o077:
        raise CredentialsError("private key is readable by group or others: chmod 600 it", path=key_path)
    return C2paChain(read(chain_path, "signer certificate chain"), read(key_path, "signer key"),
                     read(anchor_path, "trust anchor"), source=str(chain_path))


def read_trust_anchor(path: Path | str) -> str:
    """The PEM text of a trust anchor file (one or more CA certificates), checked to parse."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialsError(f"cannot read trust anchor: {getattr(e, 'strerror', None) or e}", path=path) from None
    return check_trust_anchor(text, path)


def check_trust_anchor(pem: str | bytes, path: Path | str | None = None) -> str:
    """``pem`` as text when it holds one or more X.509 certificates; else a CredentialsError."""
    from cryptography import x509

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CredentialsError("trust anchor is not a PEM certificate (or a list of them)", path=path) from None
    return data.decode()


# ----------------------------------------------------------------------------- signing


def _mime(fmt: str) -> str:
    try:
        return FORMATS[fmt.lower().lstrip(".")]
    except KeyError:
        raise CredentialsError(f"format {fmt!r} is not one of {sorted(set(FORMATS))}") from None


def manifest_definition(*, bundle_sha256: str, licence_id: str, image_serial: int, disclosure: str,
                        subject_id: str | None = None, title: str = "twin render") -> dict:
    """The C2PA manifest definition (c2pa's JSON) of one released image."""
    from twinstudio import __version__

    ingredient_id = f"urn:twinstudio:bundle:sha256:{bundle_sha256}"
    twin = {"version": TWIN_ASSERTION_VERSION, "bundle_sha256": bundle_sha256, "licence_id": licence_id,
            "image_serial": int(image_serial), "disclosure": disclosure}
    if subject_id is not None:
        twin["subject_id"] = subject_id
    return {
        "claim_generator_info": [{"name": "twinstudio", "version": __version__}],
        "title": title,
        # the twin's handoff bundle, named by the SHA-256 of its MANIFEST.json: an ingredient without a file
        "ingredients": [{"title": "twin handoff bundle (MANIFEST.json)", "format": "application/json",
                         "relationship": "inputTo", "instance_id": ingredient_id,
                         "description": f"handoff bundle whose MANIFEST.json has SHA-256 {bundle_sha256}"}],
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "description": disclosure, "softwareAgent": {"name": "twinstudio", "version": __version__},
                "parameters": {"ingredientIds": [ingredient_id]}}]}},
            {"label": TWIN_ASSERTION, "data": twin},
        ],
    }


def sign_image(image_bytes: bytes, fmt: str, *, bundle_sha256: str, licence_id: str, image_serial: int,
               disclosure: str, chain: C2paChain, subject_id: str | None = None) -> bytes:
    """``image_bytes`` (JPEG or PNG) with an embedded C2PA manifest signed by ``chain`` (ES256)."""
    import c2pa

    mime = _mime(fmt)
    definition = manifest_definition(bundle_sha256=bundle_sha256, licence_id=licence_id,
                                     image_serial=image_serial, disclosure=disclosure, subject_id=subject_id)
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain.chain_pem, chain.key_pem, None))
        with signer, c2pa.Context.from_dict(_BASE_SETTINGS) as ctx, c2pa.Builder(definition, context=ctx) as b:
            out = io.BytesIO()
            b.sign(signer, mime, io.BytesIO(image_bytes), out)
    except c2pa.C2paError as e:
        raise CredentialsError(f"c2pa cannot sign with this chain: {e}", path=chain.source or None) from None
    return out.getvalue()


# ----------------------------------------------------------------------------- reading


def read_credentials(image_bytes: bytes, fmt: str | None = None,
                     trust_anchor_pem: str | bytes | None = None) -> CredentialsReading:
    """Validate an image's C2PA manifest with c2pa's Reader; see :class:`CredentialsReading`.

    ``trust_anchor_pem``: the CA certificate(s) to trust (the studio CA). Without
    one nothing is trusted, so an intact manifest reads ``untrusted``.
    ``fmt`` (jpeg/png) is a hint; c2pa detects the container itself.
    """
    import c2pa

    settings = json.loads(json.dumps(_BASE_SETTINGS))
    if trust_anchor_pem is not None:
        settings["trust"] = {"trust_anchors": check_trust_anchor(trust_anchor_pem)}
    mime = _mime(fmt) if fmt else None
    try:
        with c2pa.Context.from_dict(settings) as ctx:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(image_bytes), None, ctx)
            if reader is None:
                return CredentialsReading(ABSENT)
            with reader:
                state = reader.get_validation_state()
                results = reader.get_validation_results() or {}
                manifest = reader.get_active_manifest() or {}
    except c2pa.C2paError as e:
        # a manifest store that cannot even be parsed is damaged, not absent
        return CredentialsReading(TAMPERED, failures=(f"c2pa: {e}",))
    failures = tuple(f.get("code", "?") for f in (results.get("activeManifest") or {}).get("failure", []))
    if state == "Trusted" and not failures:
        verdict: CredentialState = TRUSTED
    elif state == "Valid" and set(failures) <= {"signingCredential.untrusted"}:
        verdict = UNTRUSTED
    else:
        verdict = TAMPERED
    return CredentialsReading(verdict, state, failures, _twin_fields(manifest), _source_type(manifest),
                              (manifest.get("signature_info") or {}).get("common_name"), manifest)


def _twin_fields(manifest: dict) -> TwinCredentials | None:
    for a in manifest.get("assertions", []):
        if a.get("label") == TWIN_ASSERTION:
            d = a.get("data") or {}
            try:
                return TwinCredentials(str(d["bundle_sha256"]), str(d["licence_id"]), int(d["image_serial"]),
                                       d.get("subject_id"), str(d.get("disclosure", "")))
            except (KeyError, TypeError, ValueError):
                return None
    return None


def _source_type(manifest: dict) -> str | None:
    for a in manifest.get("assertions", []):
        if a.get("label", "").startswith("c2pa.actions"):
            for act in (a.get("data") or {}).get("actions", []):
                if act.get("action") == "c2pa.created":
                    return act.get("digitalSourceType")
    return None
