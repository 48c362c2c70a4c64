"""Trusted studio keys: the public keys a render team (or the studio itself) accepts as signers.

A signature only says *which* key signed a bundle; whether that key is the
studio's is a decision made once, when the key is pinned, like ssh's
``known_hosts``. The pinned keys live in one text file, by default
``$TWINSTUDIO_HOME/trusted_keys`` (``~/.twinstudio/trusted_keys``), one key a line::

    # twinstudio trusted keys: <key id> <name> <base64 raw Ed25519 public key>
    3f9c0a1b2c3d4e5f nova-studio Jq3m...43 more base64 characters...=

- ``key id``: the first 16 hex digits of sha256 of the 32 raw key bytes
  (:func:`train.handoff.integrity.key_id`), checked against the key on every read;
- ``name``: who the key belongs to, 1-64 characters of ``A-Z a-z 0-9 . _ @ + -``;
- the key: its 32 raw bytes in standard base64 (44 characters).

Blank lines and lines starting with ``#`` are ignored. A line that breaks these
rules makes the whole file unusable (:class:`TrustError` names the line): a trust
file is never read half. Several keys may share a name (a studio that rotated
its key); a key is pinned once. The file is rewritten atomically.

``twinstudio keys trust studio.pub --name NAME`` pins a key, ``keys trusted``
lists them, ``keys untrust ID`` removes one; ``keys init`` pins the studio's own
new key. ``verify --pubkey studio.pub`` trusts one key for one run instead.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rigs.errors import EXIT_INPUT, TwinstudioError
from rigs.fileio import atomic_write_bytes
from train.handoff.integrity import key_id, load_public_key, raw_public_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TRUSTED_KEYS_FILE = "trusted_keys"
HEADER = "# twinstudio trusted keys: <key id> <name> <base64 raw Ed25519 public key>\n"
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
_KID = re.compile(r"[0-9a-f]{16}")


class TrustError(TwinstudioError):
    """The trusted-keys file, or a key to pin, cannot be used (exit code 2); names the file and line."""

    exit_code = EXIT_INPUT


@dataclass(frozen=True)
class TrustedKey:
    """One pinned key."""

    key_id: str  #: 16 hex digits (see the module docstring)
    name: str  #: who it belongs to
    raw: bytes  #: the 32 raw Ed25519 public key bytes

    def line(self) -> str:
        return f"{self.key_id} {self.name} {base64.b64encode(self.raw).decode('ascii')}\n"

    def public_key(self) -> Ed25519PublicKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Ed25519PublicKey.from_public_bytes(self.raw)


def trusted_keys_path() -> Path:
    """``$TWINSTUDIO_HOME/trusted_keys`` (``~/.twinstudio/trusted_keys``)."""
    from capture.consent import studio_home

    return studio_home() / TRUSTED_KEYS_FILE


def check_name(name: str) -> str:
    """``name`` when it can name a trusted key (1-64 of ``A-Z a-z 0-9 . _ @ + -``), else TrustError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TrustError(f"invalid key name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ @ + -", name=name)
    return name


def trusted_key(public_key: Ed25519PublicKey, name: str) -> TrustedKey:
    """A :class:`TrustedKey` for ``public_key`` (the name is checked)."""
    return TrustedKey(key_id(public_key), check_name(name), raw_public_key(public_key))


def _parse_line(text: str, path: Path, lineno: int) -> TrustedKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    where = f"{path}:{lineno}"
    fields = text.split()
    if len(fields) != 3:
        raise TrustError(f"{where}: expected '<key id> <name> <base64 key>', found {len(fields)} field(s)",
                         path=str(path), line=lineno)
    kid, name, b64 = fields
    if not _KID.fullmatch(kid):
        raise TrustError(f"{where}: key id {kid!r} is not 16 lowercase hex digits", path=str(path), line=lineno)
    if not _NAME.fullmatch(name):
        raise TrustError(f"{where}: invalid name {name!r}", path=str(path), line=lineno)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise TrustError(f"{where}: the key is not a base64 Ed25519 public key (32 bytes)", path=str(path),
                         line=lineno)
    real = key_id(Ed25519PublicKey.from_public_bytes(raw))
    if real != kid:
        raise TrustError(f"{where}: key id {kid} is not the id of the key on that line ({real})", path=str(path),
                         line=lineno)
    return TrustedKey(kid, name, raw)


def load_trusted_keys(path: Path | str | None = None) -> list[TrustedKey]:
    """The pinned keys in ``path`` (default :func:`trusted_keys_path`), in file order; [] when it does not exist."""
    p = Path(path) if path is not None else trusted_keys_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise TrustError(f"{p}: cannot read the trusted keys: {e}", path=str(p)) from None
    keys: list[TrustedKey] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        k = _parse_line(line, p, lineno)
        if k.key_id in seen:
            raise TrustError(f"{p}:{lineno}: key {k.key_id} is pinned twice", path=str(p), line=lineno)
        seen.add(k.key_id)
        keys.append(k)
    return keys


def _save(path: Path, keys: list[TrustedKey]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (HEADER + "".join(k.line() for k in keys)).encode("utf-8"))


def trust_key(public_key: Ed25519PublicKey | Path | str, name: str, path: Path | str | None = None
              ) -> tuple[TrustedKey, bool]:
    """Pin a key (an Ed25519 key, or a ``studio.pub`` PEM file) under ``name``; returns (key, newly pinned).

    A key already pinned is left as it is (``False``), whatever name it has.
    """
    p = Path(path) if path is not None else trusted_keys_path()
    if isinstance(public_key, (str, os.PathLike)):
        public_key = load_public_key(public_key)
    new = trusted_key(public_key, name)
    keys = load_trusted_keys(p)
    for k in keys:
        if k.key_id == new.key_id:
            return k, False
    _save(p, [*keys, new])
    return new, True


def untrust_key(which: str, path: Path | str | None = None) -> list[TrustedKey]:
    """Unpin the key with id ``which`` (or every key named ``which``); returns those removed ([] if none)."""
    p = Path(path) if path is not None else trusted_keys_path()
    keys = load_trusted_keys(p)
    gone = [k for k in keys if which in (k.key_id, k.name)]
    if gone:
        _save(p, [k for k in keys if k not in gone])
    return gone


def trust_index(keys: list[TrustedKey]) -> dict[bytes, TrustedKey]:
    """``{raw key bytes: pinned key}``: what a signature's embedded key is looked up in."""
    return {k.raw: k for k in keys}


__all__ = ["TRUSTED_KEYS_FILE", "TrustError", "TrustedKey", "check_name", "load_trusted_keys", "trust_index",
           "trust_key", "trusted_key", "trusted_keys_path", "untrust_key"]
