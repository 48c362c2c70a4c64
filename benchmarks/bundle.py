"""Handoff-bundle integrity benchmarks. Prints one figure per line, for a 0.5 GB bundle and a --gb one:

* hash_tree (building the manifest) in MB/s;
* write_tar (the deterministic archive, fsynced) in MB/s;
* verify_integrity on the folder and on the .tar in MB/s (payload bytes hashed
  / wall time); target >= 400 MB/s;
* peak resident memory of each verification, measured in a fresh child process
  (its VmHWM, ``ru_maxrss`` where there is no /proc) beside that of a child that
  only imports the module: flat in bundle size.

Each bundle is synthetic: random-ish bytes in three large files (60 %) and 1000
small ones (the same count at every size: memory grows with the number of
files, a few KB each, not with their size), signed with a fresh key, under
/tmp, deleted at the end. Each verification runs in a fresh process, as a CLI
call would. The figures are warm page cache: the files were just written and fit
in memory, so they measure hashing, not the disk. ``--cold`` adds a verify
after dropping the bundle from the page cache (posix_fadvise DONTNEED, after an
fsync), which measures the disk as well. MB = 10^6 bytes.

Usage: python benchmarks/bundle.py [--gb 2] [--workers N] [--cold] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.handoff.integrity import (  # noqa: E402
    MANIFEST,
    SIGNATURE,
    hash_tree,
    init_keys,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_integrity,
    write_tar,
)

MB = 1e6
WRITE_CHUNK = 4 << 20
SMALL_FILES = 1000


def line(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:<44} {value:>10.1f} {unit:<5} {note}", flush=True)


def write_random_file(path: Path, size: int, noise: bytes, rng: random.Random) -> None:
    """``size`` random-ish bytes: slices of ``noise`` at random offsets, written in chunks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(noise)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, WRITE_CHUNK)
            start = rng.randrange(len(noise) - n + 1)
            f.write(view[start:start + n])
            left -= n


def make_payload(root: Path, total: int, seed: int, small_files: int = SMALL_FILES) -> tuple[int, int]:
    """Three large files (60 % of ``total``) and ``small_files`` small ones; returns (files, bytes).

    The number of files is the same at every size, so that memory figures compare bundle sizes only.
    """
    rng = random.Random(seed)
    noise = os.urandom(32 << 20)
    large = int(total * 0.6) // 3
    sizes = {f"splat/part{i}.ply": large for i in range(3)}
    weights = [rng.uniform(0.25, 1.75) for _ in range(small_files)]
    scale = (total - 3 * large) / sum(weights)
    for i, w in enumerate(weights):
        sizes[f"frames/cam{i % 24:03d}/{i:06d}.png"] = int(w * scale)
    for rel, n in sizes.items():
        write_random_file(root / rel, n, noise, rng)
    return len(sizes), sum(sizes.values())


def child(kind: str, bundle: str, trusted: str, workers: str) -> None:
    """Run in a fresh process: verify (or only import) and print the facts as JSON."""
    out: dict[str, object] = {}
    if kind == "verify":
        report = verify_integrity(Path(bundle), trusted=load_public_key(trusted),
                                  workers=int(workers) if workers != "auto" else None)
        out = {"ok": report.ok, "bytes": report.bytes, "seconds": report.seconds, "problems": report.problems[:3]}
    out["maxrss_mb"] = peak_rss() / MB
    print(json.dumps(out))


def peak_rss() -> int:
    """Peak resident memory of this process in bytes.

    /proc's VmHWM where there is one: ``ru_maxrss`` survives exec on Linux, so a
    child would report its parent's peak at the fork when that was higher.
    """
    try:
        for text in Path("/proc/self/status").read_text().splitlines():
            if text.startswith("VmHWM:"):
                return int(text.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_child(kind: str, bundle: Path, trusted: Path, workers: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(bundle), str(trusted), str(workers or "auto")]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def drop_from_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_size(gb: float, tmp: Path, cold: bool, workers: int | None) -> None:
    with tempfile.TemporaryDirectory(prefix="bundle-bench-", dir=tmp) as d:
        work = Path(d)
        bundle, archive = work / "bundle", work / "bundle.tar"
        files, nbytes = make_payload(bundle, int(gb * 1e9), seed=int(gb * 1000))
        os.sync()  # the files are written back before they are read
        tag = f"{nbytes / 1e9:.2f} GB"
        print(f"-- bundle {tag}: {files} files (3 large), warm page cache, {os.cpu_count()} CPUs, "
              f"workers {workers or 'default'}", flush=True)

        t = time.perf_counter()
        entries = hash_tree(bundle, workers=workers)
        line(f"hash_tree {tag}", nbytes / MB / (time.perf_counter() - t), "MB/s")
        private, public = init_keys(work / "keys")
        manifest_bytes = json.dumps({"files": [asdict(e) for e in entries]}, indent=2).encode()
        (bundle / MANIFEST).write_bytes(manifest_bytes)
        (bundle / SIGNATURE).write_text(json.dumps(sign_manifest(manifest_bytes, load_private_key(private))))

        t = time.perf_counter()
        size = write_tar(bundle, archive)
        line(f"write_tar {tag} (incl. fsync)", size / MB / (time.perf_counter() - t), "MB/s")
        os.sync()  # no writeback competing with the reads below

        for what, path in (("folder", bundle), (".tar", archive)):
            r = run_child("verify", path, public, workers)
            assert r["ok"], r["problems"]
            line(f"verify {what} {tag}", r["bytes"] / MB / r["seconds"], "MB/s", "target >= 400, warm cache")
            line(f"verify {what} {tag} peak RSS", r["maxrss_mb"], "MB")
        if cold:
            for what, path in (("folder", bundle), (".tar", archive)):
                drop_from_cache([p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path])
                r = run_child("verify", path, public, workers)
                line(f"verify {what} {tag} cold cache", r["bytes"] / MB / r["seconds"], "MB/s", "reads the disk")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the larger bundle in GB (the smaller is 0.5)")
    ap.add_argument("--cold", action="store_true", help="also verify after dropping the files from the page cache")
    ap.add_argument("--workers", type=int, default=None, help="hashing threads (default: one per CPU, at most 8)")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp"), help="where the bundles are written (and deleted)")
    args = ap.parse_args()
    free = shutil.disk_usage(args.tmp).free
    if free < 2.2 * max(args.gb, 0.5) * 1e9:
        sys.exit(f"{args.tmp} has {free / 1e9:.1f} GB free; a {args.gb} GB bundle and its tar need "
                 f"{2.2 * args.gb:.1f} GB")
    base = run_child("import", Path("."), Path("."), None)
    line("peak RSS of a child that only imports it", base["maxrss_mb"], "MB")
    for gb in sorted({0.5, args.gb}):
        bench_size(gb, args.tmp, args.cold, args.workers)


if __name__ == "__main__":
    main()
