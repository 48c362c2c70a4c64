"""The usage ledger: every rendered image of a twin, one signed line, each chained to the one before.

One ledger per studio, append-only JSON lines (default
``$TWINSTUDIO_HOME/ledger/usage.jsonl``). Each line is one image::

    {"bundle": "<MANIFEST.json sha256>", "image": "<serial>", "image_sha256": "<hex>", "key": "<key id>",
     "licence": "lic-...", "licensee": "Brand X", "market": "EU", "prev": "<sha256 of the previous line>",
     "purpose": "campaign", "rate": "2.50 EUR/image", "seq": 42, "subject": "subj-007",
     "time": "2026-12-01T09:30:00.123456Z", "v": 1, "sig": "<base64 Ed25519>"}

- ``seq`` counts from 1, one more on each line; ``time`` is UTC, never
  earlier than the line before (a clock stepping back is clamped);
- ``prev`` is the sha256 (hex) of the previous line's bytes, without its
  newline; the first line's is 64 zeros (:data:`GENESIS`);
- ``sig`` is the studio key's Ed25519 signature over the line's canonical
  bytes without ``sig`` (the other keys sorted, no spaces, UTF-8: what
  :func:`train.handoff.revocations.canonical` gives), and the line is exactly
  those bytes with ``,"sig":"..."`` put before the closing brace.

Appending (:class:`Ledger`) takes an exclusive ``flock`` on the file, takes in
what other processes appended since (the last line, and the image counts of
the licences it records under), refuses a torn last line (a crash mid-write; ``twinstudio ledger repair`` moves it
aside), checks the last line's signature, enforces the licence's terms and
image cap under the lock, writes the new lines with one ``write`` on an
``O_APPEND`` descriptor (cut back if short) and fsyncs before returning. So
concurrent appenders form one chain, and an entry that was returned is on disk.

**Signing scheme, and why verification is fast.** Every line is signed, so any
entry (a brand's excerpt) can be checked on its own. But checking an Ed25519
signature costs about 60-130 µs in ``cryptography`` (measured on this 2-core
machine under load: 131 µs), which caps verification of every signature at
8-15k entries/s, far from the 100k/s asked. Verification therefore rests on
the chain: :func:`verify_ledger` hashes every line and checks that each
``prev`` is the hash of the line before and that ``seq`` counts up by one, and
checks the signature of the **last** line, every line whose seq is a multiple of
:data:`SAMPLE_EVERY` (1024), and every line near an anomaly. This is complete:
the last signature covers the last line's ``prev``, which is the hash of the
line before, whose bytes hold its own ``prev``, and so on to the first line;
changing any byte of any line changes a hash that a later ``prev`` or the last
signature pins, and without the studio key nobody can re-sign. It holds
because an appender only ever chains onto a last line whose signature it has
checked with a trusted key (so no unsigned line can be sealed into the chain
by a later, genuine entry). The samples only say *where* a rewrite starts:
when a signature fails, a second pass checks every signature of the window
before it and names the first bad line. ``full=True`` checks every signature
(an audit: about 7-9k entries/s here). The lines that continue the chain are
not parsed as JSON: ``seq`` and ``prev`` are read in place (json.loads alone
would cap the pass near 190k lines/s); any line that does not continue it is
parsed and diagnosed. ``benchmarks/ledger.py`` on this machine, 200k entries
(115 MB), warm cache, with a demo running on both cores: 240-375k entries/s.

What a chain cannot show alone is the removal of the newest lines (the file
cut back at a line boundary looks like a shorter ledger). Every royalty
statement prints the head it was computed on (seq and hash);
``verify_ledger(expect_head=(seq, hash))`` (``twinstudio ledger verify
--expect-head SEQ:SHA256``) proves that head is still in the chain.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rigs.errors import EXIT_INPUT, EXIT_TAMPERED, TwinstudioError
from rigs.fileio import atomic_write_bytes, fsync_dir
from train.handoff.integrity import key_id
from train.handoff.licence import Licence, LicenceRefused, studio_key, trust_for, use_refusals
from train.handoff.integrity import canonical

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

LEDGER_VERSION = 1
GENESIS = "0" * 64
#: every line with a seq divisible by this has its signature checked by a default verification
SAMPLE_EVERY = 1024
#: bytes read per call when scanning the ledger
CHUNK = 8 << 20
#: the keys of every entry
KEYS = frozenset({"v", "seq", "time", "licence", "licensee", "subject", "bundle", "image", "image_sha256",
                  "purpose", "market", "rate", "key", "prev", "sig"})
#: problems listed at most (the count goes on)
MAX_PROBLEMS = 50
#: missing seqs followed one by one (to tell a deletion from a reordering); a larger gap is reported at once
MAX_MISSING = 100_000

_SERIAL = re.compile(r"[A-Za-z0-9._:/+-]{1,128}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_LICENCE_FIELD = re.compile(rb'"licence":"(lic-[0-9a-f]{16})"')  # once per line: quotes inside values are escaped


class LedgerError(TwinstudioError):
    """The ledger cannot be used, or an entry cannot be written (exit code 2); names the file."""

    exit_code = EXIT_INPUT


class TornLedgerError(LedgerError):
    """The ledger's last line is incomplete (a crash mid-append); nothing is appended until it is repaired."""


class LedgerTampered(LedgerError):
    """The ledger is not what the studio wrote (a signature fails, or it shrank); exit code 3."""

    exit_code = EXIT_TAMPERED


def default_ledger_path() -> Path:
    """``$TWINSTUDIO_HOME/ledger/usage.jsonl``."""
    from capture.consent import studio_home

    return studio_home() / "ledger" / "usage.jsonl"


def utc_text(t: dt.datetime) -> str:
    """``2026-12-01T09:30:00.123456Z``: the ledger's time format (fixed width, so text order is time order)."""
    if t.tzinfo is None:
        raise LedgerError(f"time {t!r} carries no time zone")
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LedgerEntry:
    """One line of the ledger."""

    seq: int
    time: str  #: UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``
    licence: str
    licensee: str
    subject: str  #: the model's pseudonymous id
    bundle: str  #: sha256 of the bundle's MANIFEST.json
    image: str  #: the image's serial
    image_sha256: str
    purpose: str
    market: str
    rate: str  #: ``2.50 EUR/image``
    key: str  #: id of the key that signed it
    prev: str
    sig: str
    line: bytes = field(repr=False, default=b"")  #: the line's bytes, without the newline

    @classmethod
    def from_doc(cls, d: dict[str, Any], line: bytes = b"") -> LedgerEntry:
        return cls(**{k: d[k] for k in KEYS if k != "v"}, line=line)

    @property
    def sha256(self) -> str:
        """The hash the next line's ``prev`` holds."""
        return hashlib.sha256(self.line).hexdigest()


# ----------------------------------------------------------------------------- keys


KeyIndex = Mapping[str, "Ed25519PublicKey"]


def key_index(keys: object) -> dict[str, Ed25519PublicKey]:
    """``{key id: public key}`` from one public key, several, trusted keys (``{raw: TrustedKey}`` or a list), or a
    mapping already by id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from train.handoff.trust import TrustedKey

    if isinstance(keys, Ed25519PublicKey):
        return {key_id(keys): keys}
    if isinstance(keys, Mapping):
        items = list(keys.items())
        if all(isinstance(k, str) for k, _ in items):
            return dict(items)
        keys = [v for _, v in items]
    out: dict[str, Ed25519PublicKey] = {}
    for k in keys:  # type: ignore[union-attr]
        pk = k.public_key() if isinstance(k, TrustedKey) else k
        out[key_id(pk)] = pk
    return out


def ledger_keys(pubkey: Path | str | None = None, trusted_keys: Path | str | None = None
                ) -> tuple[dict[str, Ed25519PublicKey], str]:
    """The keys a ledger is verified with, as ``twinstudio verify`` takes them; (index by id, where from)."""
    index, source = trust_for(pubkey, trusted_keys)
    return key_index(index), source


def _signed_bytes(d: dict[str, Any]) -> bytes:
    body = {k: v for k, v in d.items() if k != "sig"}
    return canonical(body)


def _line_of(body: bytes, sig: str) -> bytes:
    return body[:-1] + b',"sig":"' + sig.encode("ascii") + b'"}'


def signature_problem(line: bytes, d: dict[str, Any], keys: KeyIndex) -> str | None:
    """Why the signature of this entry does not hold (None when it does): an untrusted key, a line not in its
    canonical form, or a signature that does not verify."""
    from cryptography.exceptions import InvalidSignature

    kid, sig = d.get("key"), d.get("sig")
    pk = keys.get(kid) if isinstance(kid, str) else None
    if pk is None:
        return f"signed by key {kid!r}, which is not a trusted key"
    if not isinstance(sig, str):
        return "has no signature"
    try:
        body = _signed_bytes(d)
    except ValueError:
        return "holds values JSON cannot sign"
    if _line_of(body, sig) != line:
        return "is not in the form the studio writes (its bytes were edited)"
    try:
        raw = base64.b64decode(sig, validate=True)
        pk.verify(raw, body)
    except (binascii.Error, ValueError, InvalidSignature):
        return f"signature does not verify with key {kid}"
    return None


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _open_snapshot(path: Path) -> Iterator[tuple[Any, int]]:
    """The ledger open for reading, and its size while no appender was writing (a shared flock, held briefly):
    what lies within that size is whole lines, or a line torn by a crash."""
    import fcntl

    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise LedgerError(f"{path}: no ledger (nothing has been recorded yet)", path=str(path)) from None
    except OSError as e:
        raise LedgerError(f"{path}: cannot read the ledger: {e.strerror}", path=str(path)) from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            size = os.fstat(f.fileno()).st_size
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        yield f, size


class _Lines:
    """The whole lines of ``f``'s first ``size`` bytes (without newlines), a chunk's worth at a time;
    ``tail`` is what follows the last newline (a torn line), known once iterated."""

    def __init__(self, f: Any, size: int, start: int = 0) -> None:
        self.f, self.size, self.start = f, size, start
        self.tail = b""

    def chunks(self) -> Iterator[list[bytes]]:
        pos, rest = self.start, b""
        while pos < self.size:
            data = os.pread(self.f.fileno(), min(CHUNK, self.size - pos), pos)
            if not data:
                break
            pos += len(data)
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            yield lines
        self.tail = rest

    def __iter__(self) -> Iterator[bytes]:
        for lines in self.chunks():
            yield from lines


def read_entries(ledger: Path | str | None = None, *, licence: str | None = None, last: int | None = None
                 ) -> list[LedgerEntry]:
    """Entries of the ledger (all, or of one ``licence``; the ``last`` N), as written: not verified
    (:func:`verify_ledger` does that). Lines that are not entries are skipped."""
    path = Path(ledger) if ledger is not None else default_ledger_path()
    out: collections.deque[LedgerEntry] = collections.deque(maxlen=last if last else None)
    needle = f'"licence":"{licence}"'.encode() if licence else None
    with _open_snapshot(path) as (f, size):
        for line in _Lines(f, size):
            if needle is not None and needle not in line:
                continue
            try:
                d = json.loads(line)
                out.append(LedgerEntry.from_doc(d, line))
            except (ValueError, TypeError, KeyError, RecursionError):
                continue
    return list(out)


def usage_counts(ledger: Path | str | None = None) -> collections.Counter[str]:
    """Images recorded per licence id (as written; not verified)."""
    path = Path(ledger) if ledger is not None else default_ledger_path()
    counts: collections.Counter[str] = collections.Counter()
    if not path.exists():
        return counts
    with _open_snapshot(path) as (f, size):
        for lines in _Lines(f, size).chunks():
            counts.update(_LICENCE_FIELD.findall(b"\n".join(lines)))
    return collections.Counter({k.decode(): v for k, v in counts.items()})


def _needle(licence_id: str) -> bytes:
    return b'"licence":"' + licence_id.encode() + b'"'


def _count(fd: int, needle: bytes, start: int, end: int) -> int:
    """Occurrences of ``needle`` in bytes ``start``..``end`` of ``fd``, read a chunk at a time (a match across
    two chunks is counted once: the bytes carried over are shorter than the needle)."""
    n, pos, carry = 0, start, b""
    while pos < end:
        data = os.pread(fd, min(CHUNK, end - pos), pos)
        if not data:
            break
        pos += len(data)
        buf = carry + data
        n += buf.count(needle)
        carry = buf[-(len(needle) - 1):]
    return n


def images_used(licence_id: str, ledger: Path | str | None = None) -> int:
    """Images recorded under ``licence_id`` (0 when there is no ledger yet), as written: not verified.

    Counts the licence's ``"licence":"<id>"`` field, which stands once in each of its lines (a quote
    inside a value is escaped, so the text cannot occur inside another field): 10x faster than parsing.
    """
    path = Path(ledger) if ledger is not None else default_ledger_path()
    if not path.exists():
        return 0
    with _open_snapshot(path) as (f, size):
        return _count(f.fileno(), _needle(licence_id), 0, size)


# ----------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class LedgerProblem:
    """One finding of :func:`verify_ledger`."""

    kind: str  #: edited | deleted | reordered | inserted | malformed | untrusted | torn | head
    line: int | None  #: 1-based line number
    seq: int | None
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class LedgerReport:
    """What :func:`verify_ledger` found."""

    path: Path
    ok: bool = True
    entries: int = 0  #: lines that are entries
    lines: int = 0  #: whole lines read
    head_seq: int = 0  #: seq of the last line (0: empty)
    head: str = GENESIS  #: sha256 of the last line: the chain head a statement records
    head_time: str | None = None
    problems: list[LedgerProblem] = field(default_factory=list)
    problem_count: int = 0  #: problems found (more than listed when over MAX_PROBLEMS)
    signatures_checked: int = 0
    signers: set[str] = field(default_factory=set)  #: key ids whose signatures were checked and held
    bytes: int = 0
    seconds: float = 0.0
    full: bool = False

    @property
    def rate(self) -> float:
        """Entries verified per second."""
        return self.entries / self.seconds if self.seconds > 0 else float("inf")

    @property
    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def add(self, kind: str, line: int | None, seq: int | None, message: str) -> None:
        self.ok = False
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            where = f"line {line}" + (f" (seq {seq})" if seq is not None else "") if line is not None else ""
            self.problems.append(LedgerProblem(kind, line, seq, f"{where}: {message}" if where else message))


_BLAME = {"edited": ": the line was changed after it was signed",
          "inserted": ": a forged line was inserted"}


class _Verifier:
    """The state of one pass over the ledger (see :func:`verify_ledger`)."""

    def __init__(self, report: LedgerReport, keys: KeyIndex, sample: int, full: bool) -> None:
        self.r, self.keys, self.sample, self.full = report, keys, sample, full
        self.max_seq = 0
        self.missing: dict[int, int] = {}  # seq -> line after which it should have stood
        self.known: dict[int, str] = {}  # seq -> hash, of the lines around anomalies
        self.sig_failed: int | None = None  # line of the first sampled signature that failed
        self.reported: set[int] = set()  # lines whose signature failed and was reported

    def check_sig(self, lineno: int, line: bytes, d: dict, *, kind: str = "edited") -> bool:
        """Check one line's signature; a failure is reported once, as ``kind`` (or untrusted)."""
        if lineno in self.reported:
            return False
        self.r.signatures_checked += 1
        why = signature_problem(line, d, self.keys)
        if why is None:
            self.r.signers.add(d["key"])
            return True
        self.reported.add(lineno)
        if "not a trusted key" in why:
            self.r.add("untrusted", lineno, d.get("seq"), f"{why}: not an entry the studio wrote")
        else:
            self.r.add(kind, lineno, d.get("seq"), why + _BLAME[kind])
        return False

    def sampled(self, lineno: int, line: bytes, d: dict) -> None:
        """A signature checked where the chain holds (a sample, or the last line)."""
        if self.full:
            self.check_sig(lineno, line, d)
            return
        self.r.signatures_checked += 1
        if signature_problem(line, d, self.keys) is None:
            self.r.signers.add(d["key"])
        elif self.sig_failed is None:
            self.sig_failed = lineno  # where the rewrite starts is found after the pass (_locate_rewrite)

    def anomaly(self, lineno: int, line: bytes, d: dict, h: str, prev_line: bytes | None, prev_d: dict | None,
                prev_hash: str) -> None:
        """Line ``lineno`` does not follow the line before: say what happened, checking the signatures near it."""
        seq, r = d["seq"], self.r
        prev_seq = prev_d.get("seq") if prev_d is not None else None
        self.known[seq] = h
        if seq > self.max_seq + 1:  # a gap: deleted, unless the seqs turn up later (reordered)
            room = MAX_MISSING - len(self.missing)
            if seq - self.max_seq - 1 > room:  # too many to follow one by one (a forged seq, or a mass deletion)
                r.add("deleted", lineno, seq, f"seq jumps from {self.max_seq} to {seq}: entries deleted, or the seq "
                                              "forged")
            else:
                for s in range(self.max_seq + 1, seq):
                    self.missing[s] = lineno - 1
            self.max_seq = seq
            if d["prev"] == prev_hash:
                r.add("inserted", lineno, seq, f"seq {seq} follows seq {prev_seq} and chains to it: seqs were "
                                               "skipped by a forged line")
            self.check_sig(lineno, line, d)
        elif seq == self.max_seq + 1:  # in order, but not chained to the line before
            self.max_seq = seq
            if self.known.get(seq - 1) == d["prev"]:
                return  # chains to its predecessor, which stands elsewhere (reported as reordered)
            if prev_line is not None and prev_d is None:
                return  # the line before is not an entry (reported as malformed)
            before_ok = True
            if prev_line is not None and prev_d is not None and isinstance(prev_d.get("seq"), int):
                before_ok = self.check_sig(lineno - 1, prev_line, prev_d, kind="edited")
            here_ok = self.check_sig(lineno, line, d, kind="edited")
            if before_ok and here_ok:
                r.add("edited", lineno, seq, f"prev {d['prev'][:16]}... is not the sha256 of line {lineno - 1} "
                                             f"({prev_hash[:16]}...): a line before it was changed or removed")
        elif seq in self.missing:
            del self.missing[seq]
            r.add("reordered", lineno, seq, f"seq {seq} stands after seq {prev_seq}: lines were reordered")
        elif prev_seq is not None and seq == prev_seq + 1 and d["prev"] == prev_hash:
            return  # continues, in order and chained, a run whose start was reported
        else:  # a seq seen before: a forged line stands before this one, or this is a copy
            if prev_line is not None and prev_d is not None and prev_seq == seq:
                if not self.check_sig(lineno - 1, prev_line, prev_d, kind="inserted"):
                    return
            if self.check_sig(lineno, line, d, kind="inserted"):
                r.add("inserted", lineno, seq, f"seq {seq} appears again (after seq {prev_seq}): a copied line "
                                               "was inserted")

    def finish(self) -> None:
        for first, last in _ranges(sorted(self.missing)):
            after = self.missing[first]
            what = f"seq {first} is" if first == last else f"seqs {first}..{last} are"
            self.r.add("deleted", after + 1, None, f"{what} missing: deleted from before this line")


def _ranges(seqs: list[int]) -> Iterator[tuple[int, int]]:
    start = prev = None
    for s in seqs:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            yield start, prev
            start = prev = s
    if start is not None:
        yield start, prev


def _parse(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """A line as an entry, or (None, why it is not one)."""
    try:
        d = json.loads(line)
    except (ValueError, RecursionError) as e:
        return None, ("is empty" if not line else f"is not JSON ({e})")
    why = _entry_problem(d)
    return (None, why) if why is not None else (d, "")


def _entry_problem(d: object) -> str | None:
    """Why a parsed line is not an entry (None when it is one, as far as the chain needs)."""
    if not isinstance(d, dict):
        return "is not a JSON object"
    if d.keys() != KEYS:
        missing, extra = sorted(KEYS - d.keys()), sorted(d.keys() - KEYS)
        return f"is not a ledger entry (missing keys {missing}, unknown keys {extra})"
    if type(d["seq"]) is not int or d["seq"] < 1:
        return f"seq {d['seq']!r} is not a whole number >= 1"
    if not isinstance(d["prev"], str):
        return f"prev {d['prev']!r} is not a sha256"
    return None


def verify_ledger(ledger: Path | str | None = None, keys: object = None, *, full: bool = False,
                  expect_head: tuple[int, str] | None = None, sample_every: int = SAMPLE_EVERY,
                  on_entry: Callable[[dict[str, Any]], None] | None = None) -> LedgerReport:
    """Check the ledger: every line whole and an entry, seqs 1, 2, 3..., each ``prev`` the sha256 of the line
    before, and the signatures of the last line, of every ``sample_every``-th seq and of the lines around any
    break (every line with ``full``) by ``keys`` (default: the pinned trusted keys). See the module docstring
    for why that detects any change.

    Reports each edited, deleted, reordered, inserted or malformed line and a torn last line by line and seq;
    with ``expect_head=(seq, sha256)`` (from an earlier statement) also that this head is still in the chain.
    ``on_entry(entry dict)`` is called for each entry in order (royalties aggregate through it; they use
    the entries only when the report is ok). Raises LedgerError only when there is no ledger to read.
    """
    t0 = time.perf_counter()
    path = Path(ledger) if ledger is not None else default_ledger_path()
    index = key_index(keys) if keys is not None else ledger_keys()[0]
    if sample_every < 1:
        raise ValueError(f"sample_every must be >= 1, got {sample_every}")
    r = LedgerReport(path, full=full)
    v = _Verifier(r, index, sample_every, full)
    sha256, find = hashlib.sha256, bytes.find
    prev_hash, prev_b, prev_line = GENESIS, GENESIS.encode(), None
    max_seq, lineno, entries, found_head = 0, 0, 0, None
    check_every = 1 if full else sample_every
    want_seq = expect_head[0] if expect_head is not None else None
    fast = on_entry is None and not full
    with _open_snapshot(path) as (f, size):
        r.bytes = size
        lines = _Lines(f, size)
        for line in lines:
            lineno += 1
            h = sha256(line).hexdigest()
            if fast:  # seq and prev read in place: json.loads alone would cap the rate near 190k lines/s
                i, j = find(line, b'"prev":"'), find(line, b'"seq":')
                if i > 0 and j > 0:
                    try:
                        seq = int(line[j + 6:find(line, b",", j)])
                    except ValueError:
                        seq = -1
                    # in order and chained, and not a sample (those are parsed below, to check the signature)
                    if seq == max_seq + 1 and line[i + 8:i + 72] == prev_b and seq % check_every:
                        entries += 1
                        max_seq = seq
                        if seq == want_seq:
                            found_head = h
                        prev_hash, prev_b, prev_line = h, h.encode(), line
                        continue
            d, why = _parse(line)
            if d is None:
                r.add("malformed", lineno, None, why)
                prev_hash, prev_b, prev_line = h, h.encode(), line
                continue
            entries += 1
            seq = d["seq"]
            if seq == max_seq + 1 and d["prev"] == prev_hash:
                max_seq = seq
                if seq % check_every == 0:
                    v.sampled(lineno, line, d)
            else:
                prev_d = _parse(prev_line)[0] if prev_line is not None else None
                v.max_seq = max_seq
                if prev_d is not None:
                    v.known.setdefault(prev_d["seq"], prev_hash)
                v.anomaly(lineno, line, d, h, prev_line, prev_d, prev_hash)
                max_seq = v.max_seq
            if seq == want_seq:
                found_head = h
            if on_entry is not None:
                on_entry(d)
            prev_hash, prev_b, prev_line = h, h.encode(), line
        r.lines, r.entries = lineno, entries
        if lines.tail:
            r.add("torn", lineno + 1, None, f"the last line is incomplete ({len(lines.tail)} bytes, no newline): "
                                            "an append was cut short (a crash); 'twinstudio ledger repair' moves "
                                            "it aside")
        r.head = prev_hash
        last = _parse(prev_line)[0] if prev_line is not None else None
        if last is not None:
            r.head_seq, r.head_time = last["seq"], last.get("time")
            if last["seq"] % check_every:
                v.sampled(lineno, prev_line, last)
        v.max_seq = max_seq
        v.finish()
        if v.sig_failed is not None:
            _locate_rewrite(f, size, r, index, v.sig_failed, check_every)
    if expect_head is not None:
        seq, want = expect_head
        if found_head != want:
            got = f"line with seq {seq} hashes to {found_head}" if found_head else f"no entry has seq {seq}"
            r.add("head", None, seq, f"the head recorded earlier (seq {seq}, sha256 {want}) is not in the chain "
                                     f"({got}): entries were removed or rewritten since")
    r.seconds = time.perf_counter() - t0
    return r


def _locate_rewrite(f: Any, size: int, r: LedgerReport, keys: KeyIndex, failed_line: int, step: int) -> None:
    """A sampled signature failed where the chain holds: the chain was recomputed over a change (or the last
    line was edited or forged). Check every signature of the window up to ``failed_line`` and name the first
    line that is not the studio's: from there on, nothing is."""
    lo = max(1, failed_line - step + 1)
    for lineno, line in enumerate(_Lines(f, size), 1):
        if lineno < lo:
            continue
        if lineno > failed_line:
            break
        try:
            d = json.loads(line)
        except ValueError:
            continue
        why = signature_problem(line, d, keys) if _entry_problem(d) is None else None
        if why is None:
            continue
        kind = "untrusted" if "not a trusted key" in why else "edited"
        if lineno < failed_line:
            why += ("; from this line on, no line is what the studio signed (the hash chain was recomputed over "
                    "a change)")
        else:
            why += _BLAME.get(kind, ": not an entry the studio wrote")
        r.add(kind, lineno, d.get("seq"), why)
        return


# ----------------------------------------------------------------------------- append


@dataclass
class _Tail:
    """What an appender knows of the file: up to ``offset`` bytes, as of its last look."""

    dev_ino: tuple[int, int]
    offset: int = 0
    seq: int = 0
    head: str = GENESIS
    time: str = ""
    counts: dict[str, int] = field(default_factory=dict)  #: images per licence, of the licences asked about


class Ledger:
    """A studio's ledger, opened for recording uses: ``Ledger().record(licence, image=..., image_sha256=...)``.

    ``key`` signs the entries (default: the studio key); ``trusted`` are the
    keys a last line written by someone else may be signed by (default: this
    key and the pinned trusted keys). Holds no lock and no open file between
    calls; several processes may record into one ledger at once.
    """

    def __init__(self, path: Path | str | None = None, *, key: Path | str | Ed25519PrivateKey | None = None,
                 trusted: object = None) -> None:
        self.path = Path(path) if path is not None else default_ledger_path()
        self._key_arg = key
        self._key: Ed25519PrivateKey | None = None
        self._trusted_arg = trusted
        self._trusted: dict[str, Ed25519PublicKey] | None = None
        self._tail: _Tail | None = None

    def _signing(self) -> tuple[Ed25519PrivateKey, str, dict[str, Ed25519PublicKey]]:
        if self._key is None:
            self._key = studio_key(self._key_arg)
            own = self._key.public_key()
            pinned = key_index(self._trusted_arg) if self._trusted_arg is not None else ledger_keys()[0]
            self._trusted = {**pinned, key_id(own): own}
        assert self._trusted is not None
        return self._key, key_id(self._key.public_key()), self._trusted

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        import fcntl

        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise LedgerError(f"{self.path}: cannot open the ledger: {e.strerror}", path=str(self.path)) from None
        try:
            if new:
                fsync_dir(self.path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _catch_up(self, fd: int, trusted: KeyIndex) -> _Tail:
        """Take in what was appended since the last look: the counts of the licences asked about, and the
        last line, which must be whole and signed by a trusted key (else nothing is chained onto it)."""
        st = os.fstat(fd)
        tail = self._tail
        if tail is None or tail.dev_ino != (st.st_dev, st.st_ino):
            tail = _Tail((st.st_dev, st.st_ino))
        self._tail = tail
        if st.st_size < tail.offset:
            raise LedgerTampered(f"{self.path}: the ledger is {st.st_size} bytes, {tail.offset} were read before: "
                                 "entries were removed; run 'twinstudio ledger verify'", path=str(self.path))
        if st.st_size == tail.offset:
            return tail
        last = _last_line(fd, st.st_size, self.path)
        try:
            d = json.loads(last)
            why = _entry_problem(d) or signature_problem(last, d, trusted)
        except ValueError as e:
            d, why = None, f"is not JSON ({e})"
        if why is not None:
            raise LedgerTampered(f"{self.path}: the last line {why}; nothing is chained onto it. Run 'twinstudio "
                                 "ledger verify'", path=str(self.path))
        assert d is not None
        for lid in tail.counts:
            tail.counts[lid] += _count(fd, _needle(lid), tail.offset, st.st_size)
        tail.offset, tail.seq, tail.head, tail.time = st.st_size, d["seq"], hashlib.sha256(last).hexdigest(), d["time"]
        return tail

    def _used(self, fd: int, tail: _Tail, licence_id: str) -> int:
        if licence_id not in tail.counts:
            tail.counts[licence_id] = _count(fd, _needle(licence_id), 0, tail.offset)
        return tail.counts[licence_id]

    def images_used(self, licence_id: str) -> int:
        """Images recorded under ``licence_id`` (reads what was appended since the last look)."""
        _, _, trusted = self._signing()
        with self._locked() as fd:
            return self._used(fd, self._catch_up(fd, trusted), licence_id)

    def record(self, licence: Licence, *, image: str, image_sha256: str, purpose: str | None = None,
               market: str | None = None, now: dt.datetime | None = None) -> LedgerEntry:
        """Record one rendered image under ``licence``; returns the entry, on disk (fsynced).

        Refused (LicenceRefused, naming each reason) when the licence does not
        allow it at that time: purpose, market, its dates (the entry's UTC day),
        or its images left, counted under the ledger's lock. ``purpose`` and
        ``market`` may be left out when the licence names only one.
        """
        return self.record_many(licence, [(image, image_sha256)], purpose=purpose, market=market, now=now)[0]

    def record_many(self, licence: Licence, images: Sequence[tuple[str, str]], *, purpose: str | None = None,
                    market: str | None = None, now: dt.datetime | None = None) -> list[LedgerEntry]:
        """Record several images ``[(serial, sha256), ...]`` under one lock, one write and one fsync; all or none."""
        purpose = _one(purpose, licence.purposes, "purpose", licence.id)
        market = _one(market, licence.markets, "market", licence.id)
        if not images:
            return []
        for serial, sha in images:
            if not isinstance(serial, str) or not _SERIAL.fullmatch(serial):
                raise LedgerError(f"image serial {serial!r} is not 1-128 of A-Z a-z 0-9 . _ : / + -", image=serial)
            if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
                raise LedgerError(f"image {serial}: image_sha256 {sha!r} is not 64 lowercase hex digits",
                                  image=serial)
        private, kid, trusted = self._signing()
        with self._locked() as fd:
            tail = self._catch_up(fd, trusted)
            when = max(utc_text(now or dt.datetime.now(dt.timezone.utc)), tail.time)
            used = self._used(fd, tail, licence.id)
            reasons = use_refusals(licence, on=dt.date.fromisoformat(when[:10]), purpose=purpose, market=market,
                                   images_used=used, n=len(images))
            if reasons:
                raise LicenceRefused(reasons, where=f"{self.path}: recording under licence {licence.id}",
                                     licence=licence.id)
            seq, prev = tail.seq, tail.head
            entries, out = [], []
            for serial, sha in images:
                seq += 1
                d = {"v": LEDGER_VERSION, "seq": seq, "time": when, "licence": licence.id,
                     "licensee": licence.licensee, "subject": licence.subject_id,
                     "bundle": licence.bundle_manifest_sha256, "image": serial, "image_sha256": sha,
                     "purpose": purpose, "market": market, "rate": str(licence.rate), "key": kid, "prev": prev}
                body = canonical(d)
                d["sig"] = base64.b64encode(private.sign(body)).decode("ascii")
                line = _line_of(body, d["sig"])
                entries.append(LedgerEntry.from_doc(d, line))
                out.append(line)
                prev = hashlib.sha256(line).hexdigest()
            data = b"\n".join(out) + b"\n"
            _append(fd, data, tail.offset, self.path)
            tail.offset += len(data)
            tail.seq, tail.head, tail.time = seq, prev, when
            tail.counts[licence.id] = used + len(images)
        return entries


#: the longest line the appender reads back (an entry is under 2 KB: a longer last line is no entry)
MAX_LINE = 1 << 20


def _last_line(fd: int, size: int, path: Path) -> bytes:
    """The last line of a file of ``size`` bytes that must end with a newline (TornLedgerError otherwise)."""
    want = 1 << 12
    while True:
        n = min(size, want)
        block = os.pread(fd, n, size - n)
        end = block.rfind(b"\n")
        if end != len(block) - 1 and (end >= 0 or n == size):
            torn = len(block) - end - 1
            raise TornLedgerError(f"{path}: the last line is incomplete ({torn} bytes after byte {size - torn}): an "
                                  "append was cut short; nothing is recorded until 'twinstudio ledger repair' moves "
                                  "it aside", path=str(path))
        start = block.rfind(b"\n", 0, len(block) - 1)
        if start >= 0 or n == size:
            return block[start + 1:-1]
        if want >= MAX_LINE:
            raise LedgerTampered(f"{path}: the last line is longer than {MAX_LINE >> 20} MiB: not a ledger entry",
                                 path=str(path))
        want *= 16


def _append(fd: int, data: bytes, size: int, path: Path) -> None:
    """Write ``data`` at the end with one write and fsync it; a short or failed write is cut back to ``size``."""
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise OSError(28, f"short write ({n} of {len(data)} bytes)")
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
            os.fsync(fd)
        raise LedgerError(f"{path}: cannot append to the ledger: {e.strerror or e}; nothing was recorded",
                          path=str(path)) from None


def _one(value: str | None, allowed: tuple[str, ...], what: str, lid: str) -> str:
    if value is not None:
        return value
    if len(allowed) == 1:
        return allowed[0]
    raise LedgerError(f"licence {lid} names several {what}s {list(allowed)}: say which one this use is for",
                      licence=lid)


# ----------------------------------------------------------------------------- repair


@dataclass(frozen=True)
class Repair:
    """What :func:`repair_ledger` did."""

    path: Path
    torn_bytes: int  #: bytes moved aside (0: nothing to repair)
    saved_to: Path | None  #: where they were saved


def repair_ledger(ledger: Path | str | None = None) -> Repair:
    """Move a torn last line (a crash mid-append) aside to ``<ledger>.torn-<offset>`` and cut the ledger back to
    its last whole line, under the appenders' lock. Whole lines are never touched; nothing else is repaired
    (a tampered ledger stays as it is, for :func:`verify_ledger` to report)."""
    import fcntl

    path = Path(ledger) if ledger is not None else default_ledger_path()
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise LedgerError(f"{path}: no ledger", path=str(path)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        keep, back = size, 0
        while keep > 0:  # find the last newline, reading backwards
            back = min(keep, 1 << 16)
            block = os.pread(fd, back, keep - back)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = keep - back + i + 1
                break
            keep -= back
        if keep == size:
            return Repair(path, 0, None)
        torn = os.pread(fd, size - keep, keep)
        saved = path.with_name(f"{path.name}.torn-{keep}")
        atomic_write_bytes(saved, torn)
        os.ftruncate(fd, keep)
        os.fsync(fd)
        return Repair(path, len(torn), saved)
    finally:
        os.close(fd)


__all__ = ["GENESIS", "KEYS", "Ledger", "LedgerEntry", "LedgerError", "LedgerProblem", "LedgerReport",
           "LedgerTampered", "Repair", "SAMPLE_EVERY", "TornLedgerError", "default_ledger_path", "images_used",
           "key_index", "ledger_keys", "read_entries", "repair_ledger", "signature_problem", "usage_counts",
           "utc_text", "verify_ledger"]
