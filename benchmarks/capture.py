"""Capture benchmarks. Prints one figure per line:

* a take on 200 virtual cameras (one worker process each) with 150 ms ± 30 ms
  simulated latency: per frame, the time from firing to every result being
  journaled, divided by the slowest camera's own latency (its worker's time
  from the command to its file on disk); target <= 1.15;
* writing + hashing captured frames (temp file, fsync, rename, sha256) in MB/s;
  target >= 200 MB/s;
* resident memory of the orchestrating process over 100 consecutive takes
  (24 cameras): after take 10 and after take 100; target: flat.

Usage: python benchmarks/capture.py [--cameras 200] [--frames 10] [--takes 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.consent import ConsentRecord, add_consent  # noqa: E402
from capture.events import CameraUpdate, FrameStarted  # noqa: E402
from capture.orchestrator import CaptureOptions, run_take  # noqa: E402
from capture.session import Session  # noqa: E402
from capture.worker import write_frame  # noqa: E402


def ring_rig(n: int, poses: int) -> str:
    lines = [f'[rig]\nname = "bench-{n}"\n\n[calibration]\nposes = {poses}\n']
    for i in range(n):
        a = 2 * math.pi * i / n
        lines.append(f'[[cameras]]\nid = "cam{i + 1:03d}"\ndriver = "virtual"\nresolution = [640, 480]\n'
                     f'focal_mm = 8.0\nsensor_mm = [6.4, 4.8]\n'
                     f'position = [{3 * math.cos(a):.4f}, {3 * math.sin(a):.4f}, 1.2]\n')
    return "\n".join(lines)


def new_session(root: Path, rig_text: str) -> Session:
    rig = root / "rig.toml"
    rig.write_text(rig_text)
    s = Session.create(root / "session", rig, "bench-subject")
    add_consent(s.path, ConsentRecord(subject_id="bench-subject", agency="bench", scopes=["capture"],
                                      purposes=["benchmark"], markets=["none"], valid_from=dt.date.today(),
                                      valid_until=dt.date.today() + dt.timedelta(days=1),
                                      compensation_ref="none", document_sha256="0" * 64))
    return s


def take_latency(cameras: int, frames: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        s = new_session(Path(d), ring_rig(cameras, frames))
        fired: dict[int, float] = {}
        done: dict[int, float] = {}
        slowest: dict[int, float] = {}

        def on_event(ev) -> None:
            now = time.perf_counter()
            if isinstance(ev, FrameStarted):
                fired[ev.frame] = now
            elif isinstance(ev, CameraUpdate):
                if ev.state in ("ok", "failed", "disconnected"):
                    done[ev.frame] = now
                    if ev.latency_s is not None:
                        slowest[ev.frame] = max(slowest.get(ev.frame, 0.0), ev.latency_s)

        opts = CaptureOptions(source="pattern", latency_s=0.150, jitter_s=0.030, seed=7, check_disk=True)
        t0 = time.perf_counter()
        rec = run_take(s, "calibration", opts, on_event=on_event)
        total = time.perf_counter() - t0
        ratios = [(done[f] - fired[f]) / slowest[f] for f in sorted(fired)]
        print("take_vs_slowest_per_frame: " + " ".join(f"{r:.3f}" for r in ratios))
        print(f"take_cameras: {cameras}  frames: {frames}  status: {rec.status}  "
              f"(take incl. starting {cameras} workers: {total:.1f} s)")
        print(f"take_frame_time_ms_median: {1000 * sorted(done[f] - fired[f] for f in fired)[len(fired) // 2]:.0f}")
        print(f"slowest_camera_latency_ms_median: {1000 * sorted(slowest.values())[len(slowest) // 2]:.0f}")
        print(f"take_vs_slowest_camera_ratio_max: {max(ratios):.3f}  (median {sorted(ratios)[len(ratios) // 2]:.3f};"
              f" target <= 1.15)")
        print(f"trigger_skew_ms: {1000 * rec.skew_s:.1f}" if rec.skew_s is not None else "trigger_skew_ms: -")


def write_throughput(total_mb: int = 512, size_mb: int = 8) -> None:
    rng = os.urandom(size_mb * 2**20)
    with tempfile.TemporaryDirectory(dir=".") as d:
        t0 = time.perf_counter()
        for i in range(total_mb // size_mb):
            write_frame(Path(d) / "cam01" / f"{i:06d}", "jpg", rng)
        dt_s = time.perf_counter() - t0
    print(f"write_hash_MBps: {total_mb / dt_s:.0f}  ({total_mb} MB in {size_mb} MB frames, fsync each; "
          f"target >= 200)")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_over_takes(takes: int, cameras: int = 24) -> None:
    import gc

    with tempfile.TemporaryDirectory() as d:
        s = new_session(Path(d), ring_rig(cameras, 1))
        opts = CaptureOptions(source="pattern")
        marks = {}
        for i in range(1, takes + 1):
            run_take(s, "calibration", opts)
            if i in (10, takes // 2, takes):
                gc.collect()
                marks[i] = rss_mb()
        # what the manifest itself holds: load a second copy of the same session
        before = rss_mb()
        copy = Session.open(s.path)
        gc.collect()
        manifest_mb = rss_mb() - before
        del copy
        growth = marks[takes] - marks[10]
        expected = manifest_mb * (takes - 10) / takes  # the records of takes 11..N
        print(f"rss_after_take_10_MB: {marks[10]:.1f}")
        print(f"rss_after_take_{takes // 2}_MB: {marks[takes // 2]:.1f}")
        print(f"rss_after_take_{takes}_MB: {marks[takes]:.1f}  (growth {growth:+.1f} MB over {takes - 10} takes "
              f"of {cameras} cameras)")
        print(f"manifest_records_MB: {manifest_mb:.1f}  ({takes * cameras} frame records; "
              f"{manifest_mb * 1024 / (takes * cameras):.1f} KB each)")
        print(f"rss_growth_beyond_manifest_MB: {growth - expected:+.1f}  (target: ~0, memory flat)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, default=200)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--takes", type=int, default=100)
    args = ap.parse_args()
    take_latency(args.cameras, args.frames)
    write_throughput()
    memory_over_takes(args.takes)


if __name__ == "__main__":
    main()
