"""Usage-ledger benchmarks (issue 17: verify >= 100k entries/s). Prints one figure per line:

* append, one image per call (lock, catch-up, sign, write, fsync), over --single entries;
* append in batches of 1000 (one lock, write and fsync per batch) up to --entries (200k) entries;
* verify (the chain, and the signatures of the last line and of every 1024th): entries/s, best of 3,
  in-process, warm page cache; target >= 100,000;
* verify --full (every signature), over the first --full-entries entries: entries/s;
* images used per licence (the count a render makes before it renders): ms for the whole ledger;
* royalties of one month over the whole ledger (verify + aggregate, no files written): entries/s.

The ledger is synthetic: one licence, serials IMG-0000001..., a fresh Ed25519 key, under --tmp, deleted
at the end. fsync goes to whatever disk --tmp is on (on tmpfs it costs nothing: say so when quoting).

Usage: python benchmarks/ledger.py [--entries 200000] [--single 2000] [--full-entries 20000] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.handoff.integrity import key_id  # noqa: E402
from train.handoff.ledger import Ledger, images_used, verify_ledger  # noqa: E402
from train.handoff.licence import Licence, LicenceTerms, parse_rate  # noqa: E402
from train.handoff.royalties import royalties  # noqa: E402

TARGET = 100_000


def line(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:<52} {value:>12,.0f} {unit:<10} {note}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--single", type=int, default=2_000)
    ap.add_argument("--full-entries", type=int, default=20_000)
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    a = ap.parse_args()

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    lic = Licence.create(LicenceTerms(
        licensee="Brand X GmbH", purposes=("campaign",), markets=("EU",), valid_from=dt.date(2000, 1, 1),
        valid_until=dt.date(2099, 12, 31), max_images=10**9, rate=parse_rate("2.50 EUR/image"),
        bundle_manifest_sha256="b" * 64, subject_id="subj-007", consent_id="consent-1", agency="Nova Models",
        issuer=key_id(pub), issued_on=dt.date(2026, 1, 1)))
    work = Path(tempfile.mkdtemp(prefix="ledger-bench-", dir=a.tmp))
    try:
        path = work / "usage.jsonl"
        led = Ledger(path, key=key, trusted=pub)
        print(f"-- ledger benchmark: {a.entries} entries, {os.cpu_count()} CPUs, {work}", flush=True)

        def serials(lo: int, hi: int) -> list[tuple[str, str]]:
            return [(f"IMG-{i:07d}", hashlib.sha256(b"%d" % i).hexdigest()) for i in range(lo, hi)]

        todo = serials(0, a.single)
        t0 = time.perf_counter()
        for s, h in todo:
            led.record(lic, image=s, image_sha256=h)
        line("append, one per call (fsync each)", a.single / (time.perf_counter() - t0), "entries/s")

        t0 = time.perf_counter()
        done = a.single
        while done < a.entries:
            n = min(1000, a.entries - done)
            led.record_many(lic, serials(done, done + n))
            done += n
        dt_batch = time.perf_counter() - t0
        line("append, batches of 1000 (one fsync each)", (a.entries - a.single) / dt_batch, "entries/s")
        size = path.stat().st_size
        line("ledger size", size / a.entries, "bytes/entry", f"{size / 1e6:.1f} MB in all")

        best = None
        for _ in range(3):
            r = verify_ledger(path, pub)
            assert r.ok and r.entries == a.entries, r.problems[:3]
            best = r if best is None or r.seconds < best.seconds else best
        assert best is not None
        verdict = "OK" if best.rate >= TARGET else "BELOW TARGET"
        line("verify (chain + sampled signatures), best of 3", best.rate, "entries/s",
             f"target >= {TARGET:,}: {verdict}; {best.signatures_checked} signatures, {best.seconds:.2f} s")

        head = work / "head.jsonl"
        with open(path, "rb") as src, open(head, "wb") as dst:
            for i, raw in enumerate(src):
                if i >= a.full_entries:
                    break
                dst.write(raw)
        r = verify_ledger(head, pub, full=True)
        assert r.ok
        line(f"verify --full (every signature), {r.entries} entries", r.rate, "entries/s")

        t0 = time.perf_counter()
        assert images_used(lic.id, path) == a.entries
        line("images used of one licence (whole ledger)", (time.perf_counter() - t0) * 1e3, "ms")

        t0 = time.perf_counter()
        month = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m")
        rep = royalties(path, month, keys=pub, store=work / "licences", write=False)
        assert rep.images == a.entries
        line(f"royalties of {month} (verify + aggregate)", a.entries / (time.perf_counter() - t0), "entries/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
