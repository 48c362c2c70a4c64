"""One writer per session: a second `capture` exits 2 naming the holder; readers keep working; a dead
holder's lock is released by the kernel (issue: two writers)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from rigs.fileio import sha256_file
from tests.faults.cli import run, start

FRAMES = 60


def _wait_for_frames(session: Path, proc, n: int = 30) -> None:
    journal = session / "journal.jsonl"
    deadline = time.monotonic() + 60
    while journal.read_bytes().count(b'"ev":"frame"') < n:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "capture did not get going"
        time.sleep(0.02)


def test_a_second_writer_is_refused_by_name_while_readers_keep_working(cli_session):
    first = start("capture", "motion", "--session", cli_session, "--frames", FRAMES, "--plain",
                  "--virtual-source", "pattern", "--sim-latency", "0.05")
    try:
        _wait_for_frames(cli_session, first)
        for args in (("capture", "motion", "--session", cli_session, "--frames", "2", "--plain",
                      "--virtual-source", "pattern"),
                     ("capture", "run", "--session", cli_session, "--plain", "--virtual-source", "pattern"),
                     ("capture", "resume", "--session", cli_session, "--plain", "--virtual-source", "pattern"),
                     ("capture", "reshoot", "motion-001", "--session", cli_session, "--plain",
                      "--virtual-source", "pattern"),
                     ("capture", "repair", "--session", cli_session)):
            second = run(*args)
            assert second.returncode == 2, (args, second.stdout, second.stderr)
            err = " ".join(second.stderr.split())
            assert f"pid {first.pid}" in err and "being written by another process" in err, err
            assert "capture motion" in err and "--frames 60" in err  # the holder's command
        status = run("capture", "status", "--session", cli_session)  # a reader, during the run
        assert status.returncode == 0, status.stderr
        assert "motion-001" in status.stdout and "open" in status.stdout
        assert f"pid {first.pid}" in " ".join(status.stdout.split())
        assert first.poll() is None  # the refusals did not disturb the writer
    finally:
        out = first.communicate(timeout=120)[0].decode()
    assert first.returncode == 0, out

    doc = json.loads((cli_session / "session.json").read_text())
    assert list(doc["takes"]) == ["motion-001"]  # no second take was started
    take = doc["takes"]["motion-001"]
    assert take["status"] == "complete"
    listed = {r["path"]: r["sha256"] for frames in take["captured"].values() for r in frames.values()}
    on_disk = {p.relative_to(cli_session).as_posix(): sha256_file(p) for p in (cli_session / "takes").rglob("*")
               if p.is_file()}
    assert listed == on_disk and len(listed) == 24 * FRAMES  # nothing on disk that nothing lists
    assert "being written" not in run("capture", "status", "--session", cli_session).stdout


def test_the_lock_dies_with_its_holder(cli_session):
    first = start("capture", "motion", "--session", cli_session, "--frames", FRAMES, "--plain",
                  "--virtual-source", "pattern", "--sim-latency", "0.05")
    _wait_for_frames(cli_session, first, 10)
    os.kill(first.pid, signal.SIGKILL)  # only the orchestrator: its workers must not keep the lock either
    first.wait(timeout=10)
    r = run("capture", "resume", "--session", cli_session, "--plain", "--virtual-source", "pattern")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "completed takes: motion-001" in " ".join(r.stdout.split())
