"""Costs of the fault-proofing. Prints one figure per line:

* the session writer lock: acquire + release, median over 2000 rounds (microseconds), and as a share of
  the shortest real command that takes it (a 24-camera stills take on virtual cameras);
* the journal's per-line checksums: append of a 24-event batch with CRC-32 vs the same JSON without
  (microseconds; both fsynced, so the fsync dominates);
* how long camera workers (24, one per camera) and render workers outlive a capture or render CLI killed
  with SIGKILL (median of 3 kills; target <= 2 s). The verification of reconstruction inputs has its own
  benchmark, benchmarks/verify_inputs.py.

Usage: python benchmarks/faults.py [--rounds 2000] [--kills 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.orchestrator import CaptureOptions, run_take  # noqa: E402
from capture.session import Journal, writer_lock  # noqa: E402
from tests.faults.cli import add_consent, alive, descendants, run, start  # noqa: E402


def lock_cost(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        s = Path(d) / "session"
        assert run("capture", "start", "--session", s, "--rig", "virtual-ring-24", "--subject", "subj-042"
                   ).returncode == 0
        assert add_consent(s).returncode == 0
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            with writer_lock(s):
                pass
            times.append(time.perf_counter() - t0)
        lock_us = statistics.median(times) * 1e6
        from capture.session import Session

        session = Session.open(s)
        t0 = time.perf_counter()
        run_take(session, "stills", CaptureOptions(source="pattern"))
        take_s = time.perf_counter() - t0
    print(f"writer lock acquire+release: {lock_us:.1f} us median; {lock_us / 1e6 / take_s * 100:.4f} % of a "
          f"24-camera stills take ({take_s:.2f} s)")


def journal_cost(rounds: int) -> None:
    events = [{"ev": "frame", "take": "stills-001", "camera": f"cam{i:02d}", "frame": 3,
               "record": {"path": f"takes/stills-001/cam{i:02d}/000003.jpg", "sha256": "0" * 64, "size": 812345,
                          "trigger_time": 1796426404.83, "exposure_s": 0.008, "download_s": 0.21, "attempts": 1,
                          "qa": {"sharpness": 3331.07, "highlights": 0.0, "shadows": 0.0, "coverage": 0.83,
                                 "flags": []}}, "t": 1796426404.83} for i in range(24)]
    with tempfile.TemporaryDirectory() as d:
        j = Journal(Path(d) / "j.jsonl")
        plain = Path(d) / "plain.jsonl"
        with_crc, without = [], []
        for _ in range(max(rounds // 10, 50)):
            t0 = time.perf_counter()
            j.append(events)
            with_crc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
            fd = os.open(plain, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            without.append(time.perf_counter() - t0)
        assert len(j.read()) == len(with_crc) * 24
    a, b = statistics.median(with_crc) * 1e6, statistics.median(without) * 1e6
    print(f"journal append of 24 events, fsynced: {a:.0f} us with checksums, {b:.0f} us without "
          f"({(a - b) / b * 100:+.1f} %)")


def _outlive(cmd: list[str], ready, kills: int, label: str, prepare=None) -> None:
    """SIGKILL the CLI running ``cmd`` (``{d}`` = a fresh folder) once ``ready(folder)``; time its workers."""
    times, n = [], 0
    for _ in range(kills):
        with tempfile.TemporaryDirectory() as d:
            if prepare is not None:
                prepare(Path(d))
            proc = start(*[c.replace("{d}", d) for c in cmd])
            deadline = time.monotonic() + 120
            while not ready(Path(d)):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.02)
            workers = descendants(proc.pid)
            n = len(workers)
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            proc.wait()
            while alive(workers) and time.monotonic() - t0 < 30:
                time.sleep(0.005)
            times.append(time.monotonic() - t0)
            for p in alive(workers):
                os.kill(p, signal.SIGKILL)
    print(f"{label}: {n} workers gone {statistics.median(times):.2f} s after SIGKILL of the CLI "
          f"(median of {kills}; worst {max(times):.2f} s; target <= 2 s)")


def worker_exit(kills: int) -> None:
    def session(d: Path) -> None:
        run("capture", "start", "--session", d / "s", "--rig", "virtual-ring-24", "--subject", "subj-042")
        add_consent(d / "s")

    def capture_going(d: Path) -> bool:
        j = d / "s" / "journal.jsonl"
        return j.read_bytes().count(b'"ev":"frame"') >= 48

    def render_going(d: Path) -> bool:
        t = d / "r" / "takes"
        return t.is_dir() and sum(1 for _ in t.rglob("*.jpg")) >= 4

    _outlive(["capture", "motion", "--session", "{d}/s", "--frames", "400", "--plain", "--virtual-source",
              "pattern", "--sim-latency", "0.05"], capture_going, kills, "camera workers (capture motion)",
             prepare=session)
    _outlive(["rig", "render", "virtual-ring-24", "--out", "{d}/r", "--takes", "stills", "--scale", "0.25",
              "--workers", "2", "--plain"], render_going, kills, "render workers (rig render --workers 2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=3)
    a = ap.parse_args()
    lock_cost(a.rounds)
    journal_cost(a.rounds)
    worker_exit(a.kills)


if __name__ == "__main__":
    main()
