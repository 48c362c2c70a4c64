"""Capture over two hosts. Prints one figure per line:

* two capture hosts x 24 virtual cameras (a 48-camera ring, cam001-024 on host
  "a", cam025-048 on host "b"): per frame, the spread across the hosts of the
  moment each host's agent fired its cameras, p50 and p99 in ms; target p99
  <= 5 ms. The orchestrator sends every agent the frame's command with one
  fire time, a little after the slowest recent command's trip, and each agent
  fires at that time (or at once, when its command arrives late: counted);
* the head-to-agent dispatch time per host and frame (p50, p99, ms), and the
  spread of the moments the agents received the command (what the spread
  would be if each agent fired on receipt);
* take time of the split rig over the same rig on one host (plain camera pool
  in this process, no Ray); target <= 1.1x. The hosts' agents are kept
  between takes, as ``capture run`` keeps them; the first take, which starts
  them, is printed on its own line. Measured with simulated camera latency (a
  camera takes ``--latency`` s to shoot, as real bodies do) and with none
  (pure overhead); takes alternate, median of ``--repeats``.

Runs on an embedded local Ray holding both hosts' resources (default), or with
``--two-node`` on tests.raycluster's loopback-only two-node cluster (host a on
the head node, b on a second node), inside a network namespace with only lo.

Usage: python benchmarks/capture_hosts.py [--frames 40] [--latency 0.1] [--repeats 3] [--two-node]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.hosts import HostAgents, host_resource  # noqa: E402
from capture.orchestrator import CaptureOptions, run_take  # noqa: E402
from benchmarks.capture import new_session  # noqa: E402 - the same consented bench session
from capture.session import Session  # noqa: E402

PER_HOST = 24


def ring_rig(frames: int, hosts: bool) -> str:
    """48 virtual cameras on a ring; with ``hosts`` the first 24 on host a, the rest on b."""
    lines = [f'[rig]\nname = "bench-2x{PER_HOST}{"-hosts" if hosts else ""}"\n\n'
             f'[trigger]\ntimeout = "5 s"\nretries = 0\n\n[calibration]\nposes = {frames}\n']
    if hosts:
        lines.append('[[hosts]]\nname = "a"\n\n[[hosts]]\nname = "b"\n')
    n = 2 * PER_HOST
    for i in range(n):
        a = 2 * math.pi * i / n
        host = f'host = "{"a" if i < PER_HOST else "b"}"\n' if hosts else ""
        lines.append(f'[[cameras]]\nid = "cam{i + 1:03d}"\ndriver = "virtual"\n{host}resolution = [640, 480]\n'
                     f'focal_mm = 8.0\nsensor_mm = [6.4, 4.8]\n'
                     f'position = [{3 * math.cos(a):.4f}, {3 * math.sin(a):.4f}, 1.2]\n')
    return "\n".join(lines)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def take(root: Path, name: str, frames: int, hosts: bool, latency: float,
         agents: HostAgents | None = None) -> tuple[float, Session, str]:
    (root / name).mkdir(parents=True)
    s = new_session(root / name, ring_rig(frames, hosts))
    opts = CaptureOptions(source="pattern", latency_s=latency, qa=False, check_disk=False, agents=agents)
    t = time.perf_counter()
    rec = run_take(s, "calibration", opts)
    seconds = time.perf_counter() - t
    if rec.status != "complete":
        raise SystemExit(f"{name}: take {rec.status}, missing {len(rec.missing())}")
    return seconds, s, rec.id


@contextlib.contextmanager
def ray_for(two_node: bool, home: Path):
    if two_node:
        from tests.raycluster import two_node_cluster

        with two_node_cluster(home):
            yield "two loopback Ray nodes (host a on the head, b on a second node)"
    else:
        from tests.raycluster import loopback_only, quiet_ray
        from twinstudio.cluster import connect

        # connect(None) always starts a new embedded Ray (never joins one already running here)
        with loopback_only(), quiet_ray(home), connect(None, resources={host_resource("a"): 1,
                                                                         host_resource("b"): 1}):
            yield "embedded local Ray, both hosts' resources on this machine"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--latency", type=float, default=0.1, help="simulated camera latency, s")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--two-node", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, ray_for(a.two_node, Path(d) / "home") as where, HostAgents() as agents:
        root = Path(d)
        print(f"cluster: {where}; 2 hosts x {PER_HOST} virtual cameras, {a.frames} frames per take")
        spreads, receipt, late, dispatch = [], [], [], {"a": [], "b": []}
        # as in 'capture run', each host's agent is started once (by the first take) for all takes
        first = take(root, "first", a.frames, True, a.latency, agents)[0]
        print(f"first split take (starts both hosts' agents), camera latency {a.latency * 1000:.0f} ms: {first:.2f} s")
        for latency in (a.latency, 0.0):
            single, split = [], []
            for r in range(a.repeats):  # alternate, so that drift of the machine hits both alike
                single.append(take(root, f"one-{latency}-{r}", a.frames, False, latency)[0])
                sec, s, take_id = take(root, f"two-{latency}-{r}", a.frames, True, latency, agents)
                split.append(sec)
                rec = s.take(take_id)
                spreads += list(rec.dispatch_spread_ms().values())
                for hs in rec.dispatch.values():
                    ats = [v["at"] for v in hs.values()]
                    receipt.append((max(ats) - min(ats)) * 1000.0)
                    late.append(max(v.get("late_ms", 0.0) for v in hs.values()))
                    for h, v in hs.items():
                        dispatch[h].append(v["ms"])
            one, two = statistics.median(single), statistics.median(split)
            print(f"take time (agents kept between takes), camera latency {latency * 1000:.0f} ms: split over 2 "
                  f"hosts {two:.2f} s, one host "
                  f"{one:.2f} s, ratio {two / one:.2f}x (target <= 1.1x)")
        print(f"trigger spread across hosts per frame (when each fired): p50 {pct(spreads, 50):.2f} ms, "
              f"p99 {pct(spreads, 99):.2f} ms over {len(spreads)} frames (target p99 <= 5 ms)")
        print(f"frames where a host's command arrived after the fire time: {sum(x > 0 for x in late)} of "
              f"{len(late)} (worst {max(late, default=0):.2f} ms late)")
        print(f"spread of the agents' receipt of the command: p50 {pct(receipt, 50):.2f} ms, "
              f"p99 {pct(receipt, 99):.2f} ms (the spread if each fired on receipt)")
        for h, xs in dispatch.items():
            print(f"dispatch head -> agent {h}: p50 {pct(xs, 50):.2f} ms, p99 {pct(xs, 99):.2f} ms")


if __name__ == "__main__":
    main()
