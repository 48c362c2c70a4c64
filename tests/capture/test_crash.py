"""Crash safety: a capture killed with SIGKILL loses nothing that reached disk, and resume completes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.session import Session
from rigs.fileio import sha256_file

FRAMES = 40


def _frame_events(journal: Path) -> int:
    if not journal.exists():
        return 0
    return journal.read_bytes().count(b'"ev":"frame"')


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "twinstudio", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, **kw)


@pytest.mark.parametrize("kill_after", [1, 150, 600])
def test_sigkill_then_resume_keeps_every_frame_on_disk(session, kill_after):
    journal = session.path / "journal.jsonl"
    proc = _cli("capture", "motion", "--session", str(session.path), "--frames", str(FRAMES), "--plain",
                "--virtual-source", "pattern", "--sim-latency", "0.01")
    deadline = time.monotonic() + 60
    while _frame_events(journal) < kill_after:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "capture did not get going"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the capture machine "crashes": orchestrator and workers at once
    proc.wait(timeout=10)

    take_dir = session.path / "takes" / "motion-001"
    # what a crash can leave besides complete frames: a half-written file, and a complete file
    # whose journal entry never made it (written by its worker, not yet recorded)
    half = take_dir / "cam03" / f"{FRAMES - 1:06d}.jpg.partial"
    half.parent.mkdir(parents=True, exist_ok=True)
    half.write_bytes(b"\xff\xd8 half a jpeg")
    orphan = take_dir / "cam05" / f"{FRAMES - 1:06d}.jpg"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    if not orphan.exists():
        orphan.write_bytes(cv2.imencode(".jpg", np.full((30, 40, 3), 90, np.uint8))[1].tobytes())
    on_disk = {p: sha256_file(p) for p in take_dir.rglob("*.jpg")}
    assert on_disk

    out = subprocess.run([sys.executable, "-m", "twinstudio", "capture", "resume", "--session", str(session.path),
                          "--plain", "--virtual-source", "pattern"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "motion-001" in out.stdout

    s = Session.open(session.path)
    take = s.manifest.takes["motion-001"]
    assert take.status == "complete" and take.missing() == []
    assert not half.exists() and not list(take_dir.rglob("*.partial"))
    for path, sha in on_disk.items():  # every frame that reached disk is kept, unchanged and recorded
        assert path.exists() and sha256_file(path) == sha
        cam, idx = path.parent.name, int(path.stem)
        assert take.captured[cam][idx].sha256 == sha
    assert take.captured["cam05"][FRAMES - 1].sha256 == on_disk[orphan]
    for frames in take.captured.values():  # and the manifest agrees with the files
        assert len(frames) == FRAMES
        for r in frames.values():
            assert sha256_file(s.path / r.path) == r.sha256
    journal_events = [json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
    assert any(e["ev"] == "discarded" for e in journal_events)
    assert json.loads((s.path / "session.json").read_text())["takes"]["motion-001"]["status"] == "complete"


def test_a_torn_journal_line_is_ignored(session):
    with open(session.path / "journal.jsonl", "ab") as f:
        f.write(b'{"ev":"take_start","take":"mot')  # the crash hit mid-append
    assert Session.open(session.path).manifest.takes == {}
