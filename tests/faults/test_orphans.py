"""No process outlives the command that started it: SIGKILL the CLI alone (not its process group) and every
worker it started is gone within 2 s (issue: orphans)."""

from __future__ import annotations

import os
import signal
import time


from tests.faults.cli import alive, descendants, start

LIMIT_S = 2.0


def _kill_and_time(proc, workers: set[int]) -> tuple[float, set[int]]:
    """SIGKILL the CLI alone; seconds until its workers are gone (at most 10), and those still running."""
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    proc.wait(timeout=10)
    while alive(workers) and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    took, left = time.monotonic() - t0, alive(workers)
    for p in left:  # do not leave them to the rest of the test run
        os.kill(p, signal.SIGKILL)
    return took, left


def _wait(cond, proc, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_camera_workers_die_with_the_capture(cli_session):
    proc = start("capture", "motion", "--session", cli_session, "--frames", "400", "--plain",
                 "--virtual-source", "pattern", "--sim-latency", "0.05")
    journal = cli_session / "journal.jsonl"
    _wait(lambda: journal.read_bytes().count(b'"ev":"frame"') >= 48, proc, "capture did not get going")
    workers = descendants(proc.pid)
    assert len(workers) >= 24  # one per camera
    took, left = _kill_and_time(proc, workers)
    assert not left, f"still running {took:.1f} s after the CLI died: {sorted(left)}"
    assert took < LIMIT_S


def test_render_workers_die_with_the_render_and_stop_writing(tmp_path):
    out = tmp_path / "render"
    proc = start("rig", "render", "virtual-ring-24", "--out", out, "--takes", "stills", "--scale", "0.25",
                 "--workers", "2", "--plain")

    def images() -> int:
        return sum(1 for _ in (out / "takes").rglob("*.jpg")) if (out / "takes").is_dir() else 0

    _wait(lambda: images() >= 4, proc, "render did not get going")
    workers = descendants(proc.pid)
    assert len(workers) >= 2  # the render workers (and multiprocessing's resource tracker)
    took, left = _kill_and_time(proc, workers)
    assert not left, f"still running {took:.1f} s after the CLI died: {sorted(left)}"
    assert took < LIMIT_S
    n = images()
    time.sleep(1.0)
    assert images() == n  # nobody writes into the folder any more
