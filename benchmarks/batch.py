"""Batch benchmarks: what Ray costs, and what a second node buys. Prints one figure per line.

The batch is N small virtual sessions (the virtual studio's stills of
virtual-ring-24 at 1/10 scale, its cameras as the existing calibration and
its mesh as the seed), each taken through reconstruct (cameras, masks) ->
train (a short CPU run) -> bundle by the real stage functions.

* **overhead**: the batch on the embedded local Ray limited to one CPU (one
  stage at a time, as the baseline) vs the same stages called one after
  another in one process (``run_stage`` without Ray). Each runs in a fresh
  process timed from its start to its exit, so both pay their imports and
  the Ray run also pays Ray's start-up and stop (what ``twinstudio batch``
  costs a user); the batch alone (after start-up) is shown too. Target <= 1.1x.
* **scaling**: two loopback nodes with one CPU each vs one node with one CPU
  (each a real raylet and object store, Ray's ``cluster_utils.Cluster``), on
  the same batch: throughput ratio, target >= 1.7x. Every stage uses one
  thread (reconstruction workers, torch threads) so that a CPU is a CPU.

Every run gets its own copies of the sessions (a stage that finished is
current and would not run again). Everything runs inside a network namespace
with only loopback when this process may make one (root), else on
127.0.0.1 with Ray's quiet settings; nothing is sent off the machine.

Usage: python benchmarks/batch.py [--sessions 6] [--iterations 60] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the baseline's stages get one thread, as each Ray task does


def make_template(where: Path) -> Path:
    from reconstruct.inputs import GroundTruth
    from tests.handoff.sessions import captured_session

    root = where / "template"
    take = captured_session(root, ("capture", "train", "generate", "share"))
    mesh = root / "recon" / "mesh" / take / "mesh.ply"
    mesh.parent.mkdir(parents=True)
    shutil.copy(GroundTruth.find(root).mesh_path(take, 0), mesh)
    return root


def copies(template: Path, where: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        dst = where / f"s{i:02d}"
        shutil.copytree(template, dst, symlinks=True)
        out.append(dst)
    return out


def child(mode: str, work: Path, n: int, iterations: int) -> float:
    """Wall seconds of a fresh process that runs the batch in ``mode`` ('serial' or 'ray'), start to exit."""
    import subprocess

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), "--sessions", str(n),
                        "--iterations", str(iterations)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{mode} run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    for line in r.stdout.splitlines():
        if line.startswith("batch alone:"):
            print(f"  {mode}: {line}")
    return wall


def batch_options(work: Path, iterations: int, out: str):
    from reconstruct.pipeline import ReconstructOptions
    from train.runner import TrainOptions
    from twinstudio.batch import BatchOptions

    return BatchOptions(
        reconstruct=ReconstructOptions(cameras_from="existing", stages=("cameras", "masks"), workers=1),
        train=TrainOptions(device="cpu", iterations=iterations, turntable_frames=8, cpu_threads=1),
        key=work / "keys" / "studio.key", recon_cpus=1, train_cpus=1, bundle_cpus=1, out=work / out)


def run_child(mode: str, work: Path, n: int, iterations: int) -> None:
    sessions = copies(work / "template", work / mode, n)
    options = batch_options(work, iterations, f"{mode}-out")
    if mode == "serial":
        print(f"batch alone: {serial(sessions, options):.1f} s")
    else:
        _, batch = on_ray(sessions, options, num_cpus=1)
        print(f"batch alone: {batch:.1f} s (after Ray's start-up)")


def serial(sessions: list[Path], options) -> float:
    """The same stage functions one after another in this process, no Ray."""
    from twinstudio.batch import run_stage, session_names

    t0 = time.perf_counter()
    for s, name in zip(sessions, session_names(sessions)):
        for stage in options.stages:
            run_stage(str(s.resolve()), name, stage, options, "cpu")
    return time.perf_counter() - t0


def on_ray(sessions: list[Path], options, address: str | None = None, num_cpus: int | None = None) -> tuple[float, float]:
    """(seconds including Ray's start-up, seconds of the batch alone)."""
    from twinstudio.batch import run_batch
    from twinstudio.cluster import connect

    t0 = time.perf_counter()
    with connect(address, num_cpus=num_cpus):
        result = run_batch(sessions, options)
        total = time.perf_counter() - t0
    failed = result.failed
    if failed:
        raise SystemExit(f"batch failed: {failed} (report {result.report})")
    return total, result.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--child", choices=("serial", "ray"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args.child, args.work, args.sessions, args.iterations)

    from tests.raycluster import loopback_only, quiet_ray
    from train.handoff.integrity import init_keys

    work = Path(tempfile.mkdtemp(prefix="twinstudio-batch-bench-", dir=args.tmp))
    n = args.sessions
    try:
        with loopback_only() as isolated, quiet_ray(work / "home"):
            print(f"network: {'a namespace with only loopback' if isolated else '127.0.0.1 (no namespace)'}")
            make_template(work)
            init_keys(work / "keys")
            print(f"batch: {n} sessions x reconstruct, train, bundle (training {args.iterations} CPU steps)")
            base = child("serial", work, n, args.iterations)
            print(f"serial, one fresh process, no Ray: {base:.1f} s ({base / n:.2f} s a session)")
            total = child("ray", work, n, args.iterations)
            print(f"embedded local Ray, 1 CPU, one fresh process: {total:.1f} s")
            print(f"overhead (Ray 1 CPU / serial, process start to exit): {total / base:.3f}x (target <= 1.1x)")

            times = {}
            for nodes in (1, 2):
                from ray.cluster_utils import Cluster

                c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                                  "include_dashboard": False})
                if nodes == 2:
                    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
                try:
                    _, times[nodes] = on_ray(copies(work / "template", work / f"nodes{nodes}", n),
                                             batch_options(work, args.iterations, f"nodes{nodes}-out"),
                                             address=c.address)
                finally:
                    c.shutdown()
                print(f"{nodes} loopback node(s) x 1 CPU: {times[nodes]:.1f} s ({n / times[nodes] * 60:.1f} "
                      "sessions/min)")
            print(f"scaling (2 nodes / 1 node throughput): {times[1] / times[2]:.2f}x (target >= 1.7x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
