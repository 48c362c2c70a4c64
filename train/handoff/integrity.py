"""Integrity of a handoff bundle: keys, hashes, the signature, a deterministic tar, verification.

A bundle is a folder, or an uncompressed ``.tar`` of it::

    MANIFEST.json    every other file with its size and sha256 (plus consent terms and provenance)
    SIGNATURE.json   an Ed25519 signature over the exact bytes of MANIFEST.json
    <payload>/...    the files themselves

Bundles can be 10 GB, so nothing here holds a file in memory: files are read
in :data:`CHUNK`-sized pieces into one reused buffer per thread, and several
files are hashed at once on a thread pool (``hashlib`` releases the GIL on
large buffers, so hashing scales with cores). Memory grows with the number of
files (their names and hashes), never with their size.

Tampering is not an exception: :func:`verify_integrity` reports it in an
:class:`IntegrityReport` (``ok=False``) and the caller decides the exit code.
:class:`BundleError` is for input that cannot be used at all (no bundle, an
unreadable manifest, a bad key file). Whether the signer is trusted, the
consent and the revocation status are judged by :mod:`train.handoff.verify`.
:func:`sign_document` signs other documents (the revocation list) with the
same scheme as the manifest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from rigs.errors import TwinstudioError
from rigs.fileio import TMP_SUFFIX, fsync_dir

if TYPE_CHECKING:  # cryptography is imported where it is used
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST = "MANIFEST.json"
SIGNATURE = "SIGNATURE.json"
RESERVED = (MANIFEST, SIGNATURE)

SIGNATURE_SCHEMA = "twinstudio.bundle-signature"
SIGNATURE_VERSION = 1

#: bytes read per call when hashing or archiving; 1 MiB measured as fast as 4 and 8 MiB
#: (it stays in the CPU cache between the read and the hash)
CHUNK = 1 << 20
#: modification time of every tar member: 2000-01-01T00:00:00Z. Fixed so that the same
#: files give the same archive; not 0, which tar tools flag as an implausibly old date.
TAR_MTIME = 946684800
#: MANIFEST.json and SIGNATURE.json are read into memory: larger than this is refused
MAX_METADATA_BYTES = 256 << 20

ProgressFn = Callable[[int, int], None]
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BundleError(TwinstudioError):
    """A bundle, archive or key cannot be used at all; names the file (and the member or entry)."""

    exit_code = 2

    def __init__(self, message: str, *, path: Path | str | None = None, member: str | None = None) -> None:
        where = str(path) if path is not None else ""
        if member is not None:
            where = f"{where} [{member}]" if where else member
        super().__init__(f"{where}: {message}" if where else message, path=path, member=member)
        self.reason = message
        self.path = Path(path) if path is not None else None
        self.member = member


class SigningKeyError(BundleError):
    """A key file is missing, malformed, not Ed25519, or readable by others."""


# --------------------------------------------------------------------------- keys


def init_keys(key_dir: Path | str, *, name: str = "studio", overwrite: bool = False) -> tuple[Path, Path]:
    """Create an Ed25519 key pair; returns ``(private_path, public_path)``.

    ``<key_dir>/<name>.key`` is PKCS8 PEM, unencrypted, mode 0600 from its creation;
    ``<name>.pub`` is SubjectPublicKeyInfo PEM, mode 0644. ``key_dir`` is created
    with mode 0700 if missing. An existing key is kept unless ``overwrite``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_dir = Path(key_dir)
    if not name or "/" in name or name.startswith("."):
        raise SigningKeyError(f"invalid key name {name!r}", path=key_dir)
    private_path, public_path = key_dir / f"{name}.key", key_dir / f"{name}.pub"
    if not overwrite:
        for p in (private_path, public_path):
            if p.exists() or p.is_symlink():
                raise SigningKeyError("key file exists; refusing to overwrite it (pass overwrite=True)", path=p)
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new_file(private_path, private_pem, 0o600)
    _write_new_file(public_path, public_pem, 0o644)
    fsync_dir(key_dir)
    return private_path, public_path


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temp file created with ``mode`` (never chmod-ed later), then rename it."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if mode & 0o044:  # a public file: readable whatever the umask
            os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{what} not found", path=path) from None
    except OSError as e:
        raise SigningKeyError(f"cannot read {what}: {e.strerror}", path=path) from None


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PKCS8 PEM file.

    Refuses (like ssh) a file that group or others can access: ``chmod 600`` it.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    data = _read_key_file(path, "private key")
    mode = path.stat().st_mode & 0o777
    if os.name == "posix" and mode & 0o077:
        raise SigningKeyError(f"private key permissions {mode:04o} are too open (others can read it); "
                              f"chmod 600 it", path=path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted
        raise SigningKeyError("private key is encrypted; an unencrypted PKCS8 PEM key is expected",
                              path=path) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError("not a PEM private key", path=path) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{_key_kind(key)} key, not Ed25519", path=path)
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """The Ed25519 public key in a SubjectPublicKeyInfo PEM file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError("not a PEM public key", path=path) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{_key_kind(key)} key, not Ed25519", path=path)
    return key


def _key_kind(key: object) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "") or "other"


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short name of a public key: the first 16 hex digits of sha256 of its raw 32 bytes."""
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()[:16]


# --------------------------------------------------------------------------- hashing


@dataclass(frozen=True)
class FileEntry:
    """One payload file as MANIFEST.json lists it."""

    path: str  #: posix path relative to the bundle root
    size: int  #: bytes
    sha256: str  #: lowercase hex


def _hash_stream(f: IO[bytes], limit: int | None, buf: bytearray, progress: Callable[[int], None] | None
                 ) -> tuple[int, str]:
    """sha256 of the next ``limit`` bytes of ``f`` (to its end if None); returns (bytes read, hex).

    Fewer than ``limit`` bytes are read only if the file ends first.
    """
    h = hashlib.sha256()
    view = memoryview(buf)
    done = 0
    while limit is None or done < limit:
        want = len(buf) if limit is None else min(len(buf), limit - done)
        n = f.readinto(view[:want])
        if not n:
            break
        h.update(view[:n])
        done += n
        if progress is not None:
            progress(n)
    return done, h.hexdigest()


def hash_file(path: Path | str, *, chunk: int = CHUNK) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file, streamed ``chunk`` bytes at a time."""
    with open(path, "rb", buffering=0) as f:
        return _hash_stream(f, None, bytearray(chunk), None)


def _default_workers(workers: int | None) -> int:
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return workers
    return max(1, min(8, os.cpu_count() or 1))


class _Hasher:
    """Hashes byte ranges of files on a thread pool, each thread with its own reused buffer.

    ``submit`` blocks while ``2 * workers`` jobs are in flight, so a caller that
    walks an archive stays just ahead of the hashing. ``on_progress(done, total)``
    is called from the worker threads, under a lock: calls never overlap and
    ``done`` only grows.
    """

    def __init__(self, workers: int, total: int, on_progress: ProgressFn | None, chunk: int = CHUNK) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bundle-hash")
        self._slots = threading.Semaphore(2 * workers)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._chunk = chunk
        self._futures: list[tuple[str, Future]] = []
        self.total = total
        self.done = 0
        self._on_progress = on_progress

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _progress(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._on_progress is not None:
                self._on_progress(self.done, self.total)

    def _job(self, path: Path, offset: int, size: int | None) -> tuple[int, str]:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(self._chunk)
        with open(path, "rb", buffering=0) as f:
            if offset:
                f.seek(offset)
            return _hash_stream(f, size, buf, self._progress)

    def submit(self, key: str, path: Path, offset: int = 0, size: int | None = None) -> None:
        """Hash ``size`` bytes of ``path`` from ``offset`` (to its end if None), filed under ``key``."""
        self._slots.acquire()
        fut = self._pool.submit(self._job, path, offset, size)
        fut.add_done_callback(lambda _: self._slots.release())
        self._futures.append((key, fut))

    def results(self) -> Iterator[tuple[str, tuple[int, str] | OSError]]:
        """``(key, (bytes read, sha256))`` per job in submission order, or the OSError that stopped it."""
        for key, fut in self._futures:
            try:
                yield key, fut.result()
            except OSError as e:
                yield key, e

    def finish(self) -> None:
        if self._on_progress is not None:
            with self._lock:
                self._on_progress(max(self.done, self.total), self.total)


def _walk(root: Path, exclude: Iterable[str] = ()) -> tuple[dict[str, int], dict[str, str]]:
    """Regular files under ``root`` as {posix relative path: size}, sorted by path, and
    anything else found (symlinks, devices, FIFOs) as {path: what it is}.

    Names in ``exclude`` are skipped at the top level only; directories are
    descended into (never through a symlink) and not listed themselves.
    """
    exclude = set(exclude)
    files: dict[str, int] = {}
    odd: dict[str, str] = {}
    stack = [("", os.fspath(root))]
    while stack:
        prefix, folder = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError as e:
            if not prefix:
                raise BundleError(f"cannot list the folder: {e.strerror}", path=root) from None
            odd[prefix.rstrip("/")] = f"is a folder that cannot be listed ({e.strerror})"
            continue
        with it:
            for e in it:
                if not prefix and e.name in exclude:
                    continue
                rel = prefix + e.name
                if e.is_symlink():
                    odd[rel] = f"is a symbolic link (to {os.readlink(e.path)})"
                elif e.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", e.path))
                elif e.is_file(follow_symlinks=False):
                    files[rel] = e.stat(follow_symlinks=False).st_size
                else:
                    odd[rel] = "is not a regular file (a device, FIFO or socket)"
    return dict(sorted(files.items())), dict(sorted(odd.items()))


def hash_tree(root: Path | str, *, exclude: Iterable[str] = RESERVED, workers: int | None = None,
              on_progress: ProgressFn | None = None) -> list[FileEntry]:
    """Every regular file under ``root`` (recursively) with its size and sha256, sorted by path.

    Top-level names in ``exclude`` (MANIFEST.json and SIGNATURE.json) are left
    out. A symlink or other non-regular file is refused (BundleError naming it).
    ``on_progress(done_bytes, total_bytes)`` follows the hashing (from worker threads).
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError("not a folder", path=root)
    files, odd = _walk(root, exclude)
    for rel, what in odd.items():
        raise BundleError(f"{what}; a bundle holds regular files only", path=root, member=rel)
    entries: list[FileEntry] = []
    with _Hasher(_default_workers(workers), sum(files.values()), on_progress) as hasher:
        for rel in sorted(files, key=files.__getitem__, reverse=True):  # largest first: the pool ends together
            hasher.submit(rel, root / rel)
        for rel, result in hasher.results():
            if isinstance(result, OSError):
                raise BundleError(f"cannot read: {result.strerror}", path=root, member=rel)
            entries.append(FileEntry(rel, *result))
        hasher.finish()
    return sorted(entries, key=lambda e: e.path)


# --------------------------------------------------------------------------- signing


def _signature_doc(data: bytes, private_key: Ed25519PrivateKey, signed: str, sha_field: str) -> dict[str, Any]:
    public = private_key.public_key()
    return {
        "schema": SIGNATURE_SCHEMA,
        "version": SIGNATURE_VERSION,
        "algorithm": "ed25519",
        "key_id": key_id(public),
        "public_key": base64.b64encode(raw_public_key(public)).decode("ascii"),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
        "signed": signed,
        sha_field: hashlib.sha256(data).hexdigest(),
    }


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The SIGNATURE.json document: an Ed25519 signature over the exact bytes of MANIFEST.json."""
    return _signature_doc(manifest_bytes, private_key, MANIFEST, "manifest_sha256")


def sign_document(data: bytes, private_key: Ed25519PrivateKey, *, signed: str) -> dict[str, Any]:
    """The same signature document as SIGNATURE.json, over other bytes (``signed`` names them).

    The hash of the signed bytes is in ``sha256``. One scheme for everything the
    studio signs: the bundle's manifest and its revocation list.
    """
    if signed == MANIFEST:
        raise ValueError(f"sign {MANIFEST} with sign_manifest")
    return _signature_doc(data, private_key, signed, "sha256")


def _b64(value: object, n: int) -> bytes | None:
    """``n`` bytes decoded from a base64 string, or None."""
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == n else None


@dataclass(frozen=True)
class SignatureCheck:
    """What checking a signature document found."""

    valid: bool  #: well-formed, and the signature verifies with the embedded key
    key_id: str | None  #: id of the embedded key
    trusted: bool  #: a trusted key was given and it is the embedded key
    problems: list[str]
    public_key: bytes | None = None  #: the embedded raw Ed25519 public key (32 bytes)



def _check_signature(data: bytes, doc: object, trusted: Ed25519PublicKey | None, *, signed: str = MANIFEST,
                     where: str = SIGNATURE) -> SignatureCheck:
    """Check a signature document over ``data``; ``signed`` is what it must say it signs, ``where``
    names the document in the problems (SIGNATURE.json, or the file holding it)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(doc, dict):
        return SignatureCheck(False, None, False, [f"{where} is not a JSON object"])
    sha_field = "manifest_sha256" if signed == MANIFEST else "sha256"
    problems = []
    expected = {"schema": SIGNATURE_SCHEMA, "version": SIGNATURE_VERSION, "algorithm": "ed25519", "signed": signed}
    for name, want in expected.items():
        if doc.get(name) != want:
            problems.append(f"{where}: {name} is {doc.get(name)!r}, expected {want!r}")
    raw_key = _b64(doc.get("public_key"), 32)
    signature = _b64(doc.get("signature"), 64)
    if raw_key is None:
        problems.append(f"{where}: public_key is not a base64 Ed25519 public key (32 bytes)")
    if signature is None:
        problems.append(f"{where}: signature is not a base64 Ed25519 signature (64 bytes)")
    if raw_key is None or signature is None:
        return SignatureCheck(False, None, False, problems)

    public = Ed25519PublicKey.from_public_bytes(raw_key)
    kid = key_id(public)
    if doc.get("key_id") != kid:
        problems.append(f"{where}: key_id {doc.get('key_id')!r} is not the id of its public key ({kid})")
    sha = hashlib.sha256(data).hexdigest()
    try:
        public.verify(signature, data)
    except InvalidSignature:
        if doc.get(sha_field) != sha:
            problems.append(f"{signed} was changed after it was signed (its sha256 is {sha}, "
                            f"the signed one {doc.get(sha_field)})")
        else:
            problems.append(f"{where}: the signature does not verify with key {kid}")
    else:
        if doc.get(sha_field) != sha:
            problems.append(f"{where}: {sha_field} is not the sha256 of {signed} ({sha})")
    valid = not problems
    is_trusted = trusted is not None and raw_public_key(trusted) == raw_key
    if trusted is not None and not is_trusted:
        problems.append(f"signed by key {kid}, not the trusted key {key_id(trusted)}")
    return SignatureCheck(valid, kid, is_trusted and valid, problems, raw_key)


def check_document(data: bytes, doc: object, *, signed: str, where: str) -> SignatureCheck:
    """Check a :func:`sign_document` signature over ``data`` with the key embedded in it.

    Whether that key is trusted is the caller's to judge (``public_key`` is the raw key).
    """
    return _check_signature(data, doc, None, signed=signed, where=where)


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes that are signed: JSON, sorted keys, no spaces, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def signed_json(schema: str, version: int, member: str, body: dict[str, Any],
                private_key: Ed25519PrivateKey) -> bytes:
    """A signed JSON document: ``{schema, version, <member>: body, signature}``, the signature over
    :func:`canonical` of ``body`` (saying it signs ``member``); deterministic bytes."""
    doc = {"schema": schema, "version": version, member: body,
           "signature": sign_document(canonical(body), private_key, signed=member)}
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def open_signed_json(data: bytes, where: Path | str, *, schema: str, version: int, member: str, what: str,
                     error: type[Exception], signature_error: type[Exception],
                     schema_hint: Callable[[object], str] = lambda got: "") -> tuple[dict[str, Any], SignatureCheck]:
    """The body of a :func:`signed_json` document and its verified signature check.

    Raises ``error`` (naming ``where``) for anything malformed and ``signature_error``
    when the signature does not verify with the key embedded in it.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{where}: not {what} (not JSON: {e})", path=str(where)) from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        got = doc.get("schema") if isinstance(doc, dict) else None
        raise error(f"{where}: schema is {got!r}, not {schema!r}{schema_hint(got)}: not {what}", path=str(where))
    if doc.get("version") != version:
        raise error(f"{where}: version {doc.get('version')!r} is not {version}", path=str(where))
    body = doc.get(member)
    if not isinstance(body, dict):
        raise error(f"{where}: no \"{member}\" object", path=str(where))
    try:
        signed_bytes = canonical(body)
    except ValueError as e:
        raise error(f"{where}: the {member} holds values JSON cannot sign ({e})", path=str(where)) from None
    check = check_document(signed_bytes, doc.get("signature"), signed=member, where=f"{where} signature")
    if not check.valid or check.public_key is None:
        raise signature_error(f"{where}: the signature does not verify: " + "; ".join(check.problems),
                              path=str(where))
    return body, check


def read_bounded(path: Path, limit: int, what: str, error: type[Exception]) -> bytes:
    """The bytes of ``path``, a signed document of at most ``limit`` bytes; ``error`` names the file when it is
    missing, too large or unreadable."""
    try:
        if path.stat().st_size > limit:
            raise error(f"{path}: larger than {limit >> 20} MiB: not {what}", path=str(path))
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what.split(' ', 1)[1]}", path=str(path)) from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}", path=str(path)) from None


def check_signature(manifest_bytes: bytes, signature_doc: dict[str, Any],
                    trusted: Ed25519PublicKey | None) -> list[str]:
    """Problems with a SIGNATURE.json document for these manifest bytes; ``[]`` means good.

    The signature must verify with the key embedded in the document; with
    ``trusted`` given, that key must also be the trusted one.
    """
    return _check_signature(manifest_bytes, signature_doc, trusted).problems


# --------------------------------------------------------------------------- tar


class _Counting:
    """A file wrapper that reports the bytes read through it."""

    def __init__(self, f: IO[bytes], progress: Callable[[int], None]) -> None:
        self._f = f
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._progress(len(data))
        return data


def write_tar(src_dir: Path | str, out_path: Path | str, *, order: list[str] | None = None,
              on_progress: ProgressFn | None = None) -> int:
    """Archive every file under ``src_dir`` into an uncompressed tar; returns its size in bytes.

    Deterministic: the same files give a byte-identical archive. MANIFEST.json
    and SIGNATURE.json come first, then the rest sorted by path (or in
    ``order``, which must name each of them once); regular files only (no
    directory entries); mtime :data:`TAR_MTIME` (2000-01-01), uid=gid=0, empty
    user/group names, mode 0644; PAX format (plain ustar headers unless a
    name is long or non-ASCII or a file is over 8 GiB). Files are streamed from
    disk; the archive is written to ``<out>.partial``, fsynced and renamed.
    """
    src_dir, out_path = Path(src_dir), Path(out_path)
    if not src_dir.is_dir():
        raise BundleError("not a folder", path=src_dir)
    if out_path.resolve().is_relative_to(src_dir.resolve()):
        raise BundleError(f"the archive would be inside the folder it archives ({src_dir})", path=out_path)
    files, odd = _walk(src_dir)
    for rel, what in odd.items():
        raise BundleError(f"{what}; a bundle holds regular files only", path=src_dir, member=rel)
    head = [n for n in RESERVED if n in files]
    rest = [n for n in files if n not in RESERVED]
    if order is not None:
        wanted = [n for n in order if n not in RESERVED]
        if len(set(wanted)) != len(wanted) or set(wanted) != set(rest):
            unknown = sorted(set(wanted) - set(rest))
            absent = sorted(set(rest) - set(wanted))
            raise BundleError(f"order does not name each file once (not in the folder: {unknown[:5]}, "
                              f"left out: {absent[:5]})", path=src_dir)
        rest = wanted

    total = sum(files.values())
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    tmp = out_path.with_name(out_path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
                for rel in head + rest:
                    try:
                        f = open(src_dir / rel, "rb")  # closed by the with below
                    except OSError as e:
                        raise BundleError(f"cannot read: {e.strerror}", path=src_dir, member=rel) from None
                    with f:
                        info = tarfile.TarInfo(rel)
                        info.size = os.fstat(f.fileno()).st_size
                        info.mtime = TAR_MTIME
                        info.mode = 0o644
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        tar.addfile(info, _Counting(f, progress))
            raw.flush()
            os.fsync(raw.fileno())
            size = raw.tell()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_path.parent)
    return size


def _unsafe_name(m: tarfile.TarInfo) -> bool:
    """A member name that would land outside the folder it is extracted to."""
    p = PurePosixPath(m.name)
    return p.is_absolute() or ".." in p.parts or not p.parts


def _not_regular(m: tarfile.TarInfo) -> str | None:
    """What a tar member is when it is not a plain regular file, or None."""
    if m.issym():
        return f"is a symbolic link (to {m.linkname!r})"
    if m.islnk():
        return f"is a hard link (to {m.linkname!r})"
    if m.issparse():
        return "is a sparse file"
    if m.ischr() or m.isblk():
        return "is a device"
    if m.isfifo():
        return "is a FIFO"
    if not m.isreg():
        return f"is not a regular file (tar type {m.type!r})"
    return None


def _open_tar(path: Path) -> tuple[IO[bytes], tarfile.TarFile]:
    f = open(path, "rb")  # closed by the caller, with the TarFile
    try:
        return f, tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        f.close()
        raise BundleError(f"not an uncompressed tar archive ({e})", path=path) from None


def iter_tar(path: Path | str) -> Iterator[tuple[str, int, IO[bytes]]]:
    """``(name, size, file object)`` per regular file of a tar, streamed in archive order.

    Each file object is valid until the next item. Directory entries are
    skipped; a link, device or unsafe path ('..', absolute) raises BundleError.
    """
    path = Path(path)
    f, tar = _open_tar(path)
    with f, tar:
        members = iter(tar)
        while True:
            try:
                m = next(members)
            except StopIteration:
                return
            except tarfile.TarError as e:
                raise BundleError(f"the archive is damaged ({e})", path=path) from None
            if m.isdir():
                continue
            if _unsafe_name(m):
                raise BundleError("unsafe member path (absolute or with '..')", path=path, member=m.name)
            what = _not_regular(m)
            if what is not None:
                raise BundleError(what, path=path, member=m.name)
            member_file = tar.extractfile(m)
            assert member_file is not None  # a regular file
            yield PurePosixPath(m.name).as_posix(), m.size, member_file


# --------------------------------------------------------------------------- verification


@dataclass
class IntegrityReport:
    """What :func:`verify_integrity` found. ``problems`` says everything in words; ``changed``,
    ``missing`` and ``extra`` list the payload paths concerned."""

    ok: bool  #: signature good (and by the trusted key, when one was given) and every file as listed
    signature_ok: bool  #: SIGNATURE.json is well-formed and verifies with the key embedded in it
    key_id: str | None  #: id of that embedded key
    trusted: bool  #: a trusted key was given, it is the embedded key, and the signature verifies
    problems: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  #: listed, present, but other size or sha256 (or not a file)
    missing: list[str] = field(default_factory=list)  #: listed, not present
    extra: list[str] = field(default_factory=list)  #: present, not listed
    files: int = 0  #: payload files read and hashed
    bytes: int = 0  #: payload bytes read and hashed
    seconds: float = 0.0  #: wall time of the verification
    manifest: dict[str, Any] | None = None  #: MANIFEST.json as parsed
    public_key: bytes | None = None  #: the raw Ed25519 key embedded in SIGNATURE.json (when well-formed)


@dataclass
class _Scan:
    """What was found in a bundle, before the comparison with its manifest."""

    manifest_bytes: bytes = b""
    manifest: dict[str, Any] = field(default_factory=dict)
    entries: list[FileEntry] = field(default_factory=list)
    signature_bytes: bytes | None = None
    found: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # path -> (size, sha256 or None)
    odd: dict[str, str] = field(default_factory=dict)  # path -> why it is not a readable regular file
    problems: list[str] = field(default_factory=list)  # about the container (archive damage, ...)
    files: int = 0
    bytes: int = 0

    def add(self, rel: str, result: tuple[int, str]) -> None:
        self.found[rel] = result
        self.files += 1
        self.bytes += result[0]


def parse_manifest(data: bytes, *, path: Path | str | None = None) -> tuple[dict[str, Any], list[FileEntry]]:
    """MANIFEST.json parsed, with its ``files`` list checked: ``(document, entries)``.

    Each entry needs ``path`` (relative, normalised posix, not a reserved name),
    ``size`` (int >= 0) and ``sha256`` (64 lowercase hex); paths are unique.
    Raises BundleError naming the entry otherwise.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{MANIFEST} is not valid JSON ({e})", path=path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise BundleError(f'{MANIFEST} has no "files" list', path=path)
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(doc["files"]):
        where = f"files[{i}]"
        if not isinstance(item, dict):
            raise BundleError(f"{MANIFEST} {where} is not an object", path=path)
        p, size, sha = item.get("path"), item.get("size"), item.get("sha256")
        if (not isinstance(p, str) or not p or p.startswith("/") or PurePosixPath(p).as_posix() != p
                or ".." in PurePosixPath(p).parts or p in RESERVED):
            raise BundleError(f"{MANIFEST} {where}: path {p!r} is not a relative, normalised payload path",
                              path=path)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"{MANIFEST} {where} ({p}): size {size!r} is not a byte count", path=path)
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise BundleError(f"{MANIFEST} {where} ({p}): sha256 {sha!r} is not 64 lowercase hex digits",
                              path=path)
        if p in seen:
            raise BundleError(f"{MANIFEST} {where}: {p} is listed twice", path=path)
        seen.add(p)
        entries.append(FileEntry(p, size, sha))
    return doc, entries


def _read_small(path: Path, what: str) -> bytes | None:
    """A metadata file's bytes; None if absent."""
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise BundleError(f"{what} is larger than {MAX_METADATA_BYTES >> 20} MiB", path=path)
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BundleError(f"cannot read {what}: {e.strerror}", path=path) from None


def _scan_folder(root: Path, workers: int, on_progress: ProgressFn | None) -> _Scan:
    """Read the manifest of a bundle folder, then hash the files it lists."""
    manifest_bytes = _read_small(root / MANIFEST, MANIFEST)
    if manifest_bytes is None:
        raise BundleError(f"no {MANIFEST}: not a bundle", path=root)
    manifest, entries = parse_manifest(manifest_bytes, path=root / MANIFEST)
    scan = _Scan(manifest_bytes, manifest, entries, _read_small(root / SIGNATURE, SIGNATURE))
    files, scan.odd = _walk(root, RESERVED)
    scan.found = {rel: (size, None) for rel, size in files.items()}
    # only what is listed and has the listed size is hashed; anything else is already a finding
    todo = [e for e in entries if files.get(e.path) == e.size]
    with _Hasher(workers, sum(e.size for e in todo), on_progress) as hasher:
        for e in sorted(todo, key=lambda e: e.size, reverse=True):  # largest first: the threads end together
            hasher.submit(e.path, root / e.path)
        for rel, result in hasher.results():
            if isinstance(result, OSError):
                del scan.found[rel]
                scan.odd[rel] = f"cannot be read ({result.strerror})"
            else:
                scan.add(rel, result)
        hasher.finish()
    return scan


def _scan_tar(path: Path, workers: int, on_progress: ProgressFn | None) -> _Scan:
    """One pass over a bundle archive's members, in order, hashing each.

    Each regular member is hashed from its data offset on the thread pool (up to
    ``2 * workers`` members in flight, so memory stays flat), MANIFEST.json and
    SIGNATURE.json are read into memory when met; the comparison comes after.
    """
    metadata: dict[str, bytes] = {}
    scan = _Scan()
    seen: set[str] = set()
    archive_size = path.stat().st_size
    f, tar = _open_tar(path)
    with f, tar, _Hasher(workers, archive_size, on_progress) as hasher:
        last = "the first"
        try:
            for m in tar:
                last = repr(m.name)
                if m.isdir():
                    continue
                if _unsafe_name(m):
                    scan.problems.append(f"tar member {m.name!r} has an unsafe path (absolute or with '..')")
                    continue
                name = PurePosixPath(m.name).as_posix()
                if name in seen:
                    scan.problems.append(f"tar member {name!r} appears more than once")
                    continue
                seen.add(name)
                what = _not_regular(m)
                if what is not None:
                    scan.odd[name] = what
                elif name in RESERVED:
                    if m.size > MAX_METADATA_BYTES:
                        raise BundleError(f"larger than {MAX_METADATA_BYTES >> 20} MiB", path=path, member=name)
                    f.seek(m.offset_data)
                    metadata[name] = f.read(m.size)
                else:
                    hasher.submit(name, path, m.offset_data, m.size)
            end = tar.offset
        except tarfile.TarError as e:  # a damaged header after the first one: reported, like any tampering
            scan.problems.append(f"the archive is damaged after member {last} ({e})")
            end = archive_size
        for rel, result in hasher.results():
            if isinstance(result, OSError):
                raise BundleError(f"cannot read the archive: {result.strerror}", path=path, member=rel)
            scan.add(rel, result)
        hasher.finish()
        # past the end-of-archive blocks only zeros may follow: tar tools could read anything else
        f.seek(end)
        while block := f.read(CHUNK):
            if block.count(0) != len(block):
                scan.problems.append(f"the archive has data after its last readable member (from byte {end}): "
                                     f"a damaged header, or data appended")
                break
    if MANIFEST not in metadata:
        raise BundleError(f"no {MANIFEST} in the archive: not a bundle", path=path)
    scan.manifest_bytes, scan.signature_bytes = metadata[MANIFEST], metadata.get(SIGNATURE)
    scan.manifest, scan.entries = parse_manifest(scan.manifest_bytes, path=path)
    return scan


def verify_integrity(bundle: Path | str, *, trusted: Ed25519PublicKey | None = None, workers: int | None = None,
                     on_progress: ProgressFn | None = None) -> IntegrityReport:
    """Check a bundle folder or ``.tar`` against its signed manifest; returns what was found.

    The signature over MANIFEST.json must verify (and be by ``trusted`` when
    given; without it, ``ok`` means intact and signed by ``key_id``, whose trust
    is the caller's to judge); every listed file must be present with its size
    and sha256; no other file may be present (MANIFEST.json and SIGNATURE.json
    excepted; empty folders and tar directory entries are ignored). Streaming:
    memory does not grow with file size. ``on_progress(done_bytes, total_bytes)``
    is called from worker threads; for a tar, total is the archive's size.

    Raises BundleError only for unusable input (no bundle, no or malformed
    MANIFEST.json, not a tar); tampering is reported with ``ok=False``.
    """
    t0 = time.perf_counter()
    bundle = Path(bundle)
    n_workers = _default_workers(workers)
    if bundle.is_dir():
        scan = _scan_folder(bundle, n_workers, on_progress)
    elif bundle.is_file():
        scan = _scan_tar(bundle, n_workers, on_progress)
    else:
        raise BundleError("no such bundle (folder or .tar)", path=bundle)

    problems: list[str] = []
    sig = SignatureCheck(False, None, False, [])
    if scan.signature_bytes is None:
        problems.append(f"{SIGNATURE} is missing: the bundle is not signed")
    else:
        try:
            doc = json.loads(scan.signature_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            problems.append(f"{SIGNATURE} is not valid JSON")
        else:
            sig = _check_signature(scan.manifest_bytes, doc, trusted)
            problems += sig.problems
    problems += scan.problems

    changed, missing, extra = [], [], []
    for e in scan.entries:
        if e.path in scan.odd:
            changed.append(e.path)
            problems.append(f"{e.path}: {scan.odd[e.path]}, not the listed file")
        elif e.path not in scan.found:
            missing.append(e.path)
            problems.append(f"{e.path}: missing")
        else:
            size, sha = scan.found[e.path]
            if size != e.size:
                changed.append(e.path)
                problems.append(f"{e.path}: changed: expected {e.size} bytes, found {size} bytes")
            elif sha != e.sha256:
                changed.append(e.path)
                problems.append(f"{e.path}: changed: expected sha256 {e.sha256}, found {sha}")
    listed = {e.path for e in scan.entries}
    for rel in sorted(scan.found.keys() | scan.odd.keys()):
        if rel not in listed:
            extra.append(rel)
            what = f"; it {scan.odd[rel]}" if rel in scan.odd else ""
            problems.append(f"{rel}: not listed in {MANIFEST}{what}")

    return IntegrityReport(
        ok=sig.valid and not problems, signature_ok=sig.valid, key_id=sig.key_id, trusted=sig.trusted,
        problems=problems, changed=changed, missing=missing, extra=extra, files=scan.files, bytes=scan.bytes,
        seconds=time.perf_counter() - t0, manifest=scan.manifest, public_key=sig.public_key)
