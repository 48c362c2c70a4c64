"""Takes on virtual cameras: parallel firing, files and hashes, retries, missing cameras,
reshoot, the settings guard, disk space and QA."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.consent import add_consent
from capture.events import CameraUpdate, Message, QAWarning, TakeFinished
from capture.orchestrator import CaptureError, CaptureOptions, plan_frames, reshoot, run_take
from capture.qa import frame_qa
from capture.session import Session
from rigs.fileio import sha256_file
from rigs.rigfile import load_rig, parse_rig
from tests.capture.conftest import consent

PATTERN = CaptureOptions(source="pattern")


def _files(session: Session, take: str) -> dict[str, str]:
    return {p.relative_to(session.path).as_posix(): sha256_file(p)
            for p in (session.path / "takes" / take).rglob("*.jpg")}


def test_stills_from_the_virtual_studio(session):
    events = []
    rec = run_take(session, "stills", CaptureOptions(render_scale=0.1), on_event=events.append)
    rig = session.rig
    assert rec.status == "complete" and rec.missing() == []
    assert rec.id == "stills-001" and len(rec.frames) == len(rig.preset_steps()) == 8
    on_disk = _files(session, rec.id)
    assert len(on_disk) == 24 * 8
    for cam, frames in rec.captured.items():
        for idx, r in frames.items():
            assert r.path == f"takes/stills-001/{cam}/{idx:06d}.jpg" and on_disk[r.path] == r.sha256
            assert r.qa is not None and {"sharpness", "coverage"} <= set(r.qa)
    # the captured file is the virtual studio's render for that camera and lighting step
    rendered = session.path / ".virtual/stills/takes/stills-001/cam05/000003.jpg"
    assert sha256_file(rendered) == rec.captured["cam05"][3].sha256
    # lights were set to every step, in order, before its frame
    lights = [e.text.removeprefix("lights: ") for e in events if isinstance(e, Message) and e.text.startswith("lights")]
    assert lights == [s.name for s in rig.preset_steps()]
    assert rec.skew_s is not None and rec.skew_s < 0.5
    manifest = json.loads((session.path / "session.json").read_text())
    assert manifest["schema"] == "twinstudio.session" and manifest["takes"]["stills-001"]["status"] == "complete"


def test_a_failing_camera_is_retried_then_marked_missing_and_reshoot_fills_only_the_gaps(session):
    events = []
    opts = CaptureOptions(source="pattern", failure_rate=0.45, seed=3)
    rec = run_take(session, "stills", opts, on_event=events.append)
    missing = rec.missing()
    assert rec.status == "incomplete" and missing
    assert any(isinstance(e, CameraUpdate) and e.state == "retrying" for e in events)
    assert any(r.attempts > 1 for frames in rec.captured.values() for r in frames.values())
    assert all(rec.failures[c][i] for c, i in missing)
    assert "missing frames from" in " ".join(rec.qa_flags)
    before = _files(session, rec.id)
    assert len(before) == 24 * 8 - len(missing)
    fired = []
    rec2 = reshoot(session, rec.id, PATTERN,
                   on_event=lambda e: fired.append(e.camera) if isinstance(e, CameraUpdate) and e.state == "firing"
                   else None)
    assert rec2.status == "complete" and rec2.missing() == []
    assert sorted(fired) == sorted(c for c, _ in missing)  # only the missing ones fired
    after = _files(session, rec.id)
    assert {k: after[k] for k in before} == before  # nothing captured before was rewritten
    assert len(after) == 24 * 8


def test_a_disconnected_camera_loses_its_frames_and_the_rest_are_kept(session):
    opts = CaptureOptions(source="pattern", disconnect_after=2, extra={"virtual_disconnect": "cam07"})
    events = []
    rec = run_take(session, "stills", opts, on_event=events.append)
    assert {c for c, _ in rec.missing()} == {"cam07"}
    assert sorted(rec.captured["cam07"]) == [0, 1]
    assert all(len(rec.captured[c]) == 8 for c in rec.cameras if c != "cam07")
    assert any(isinstance(e, CameraUpdate) and e.state == "disconnected" and e.camera == "cam07" for e in events)
    fin = [e for e in events if isinstance(e, TakeFinished)][0]
    assert fin.status == "incomplete" and "cam07/2" in fin.missing
    # once gone, the camera is not fired again in this take; its later frames are recorded as failed
    assert sum(1 for e in events if isinstance(e, CameraUpdate) and e.camera == "cam07" and e.state == "firing") == 3
    assert "disconnected earlier" in rec.failures["cam07"][5]


def test_motion_is_paced_at_the_rig_fps_with_timestamps(session):
    rec = run_take(session, "motion", CaptureOptions(source="pattern", frames=6))
    assert [f.time for f in rec.frames] == pytest.approx([i / 24 for i in range(6)])
    t = [np.median([rec.captured[c][i].trigger_time for c in rec.cameras]) for i in range(6)]
    assert t[-1] - t[0] >= 5 / 24 - 0.01
    for frames in rec.captured.values():
        for r in frames.values():
            assert r.download_s is not None and r.download_s >= 0 and r.exposure_s is not None


PROFILED = """
[rig]
name = "profiled"

[profiles.body]
shutter = "1/200"
aperture = "f/11"
iso = 200
white_balance = "Flash"

[[cameras]]
id = "camA"
driver = "virtual"
resolution = [320, 240]
focal_mm = 6.0
sensor_mm = [6.4, 4.8]
position = [0.0, -3.0, 1.0]
profile = "body"

[[cameras]]
id = "camB"
driver = "virtual"
resolution = [320, 240]
focal_mm = 6.0
sensor_mm = [6.4, 4.8]
position = [0.0, 3.0, 1.0]
profile = "body"
"""


@pytest.fixture
def profiled(tmp_path) -> Session:
    parse_rig(PROFILED, "profiled.toml")  # valid
    rig_file = tmp_path / "profiled.toml"
    rig_file.write_text(PROFILED)
    s = Session.create(tmp_path / "s", rig_file, "subj-001")
    add_consent(s.path, consent())
    return s


def test_settings_guard_reads_back_and_corrects_every_body(profiled):
    events = []
    run_take(profiled, "stills", PATTERN, on_event=events.append)  # bodies arrive at ISO 3200, 1/60
    assert any(isinstance(e, Message) and "settings corrected on camA, camB" in e.text for e in events)
    journal = [json.loads(x) for x in (profiled.path / "journal.jsonl").read_text().splitlines()]
    fixes = {e["camera"]: e for e in journal if e["ev"] == "settings"}
    assert set(fixes) == {"camA", "camB"}
    for fix in fixes.values():
        assert fix["corrected"] and fix["readback"]["iso"] == "200" and fix["readback"]["shutter"] == "1/200"
    assert Session.open(profiled.path).manifest.settings["camB"]["aperture"] == "f/11"


def test_settings_guard_blocks_a_take_it_cannot_fix(profiled):
    opts = CaptureOptions(source="pattern", extra={"virtual_settings_stuck": "camB"})
    with pytest.raises(CaptureError, match=r"camB: iso is '3200', profile says '200'"):
        run_take(profiled, "stills", opts)
    take = Session.open(profiled.path).manifest.takes["stills-001"]
    assert take.status == "blocked" and not take.captured


def test_short_disk_space_refuses_the_take(session, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("capture.orchestrator.shutil.disk_usage", lambda p: Usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(CaptureError, match="not enough disk space") as e:
        run_take(session, "stills", PATTERN)
    assert e.value.facts["needed_bytes"] > 10**6
    assert Session.open(session.path).manifest.takes == {}


def test_plan_frames_follow_the_rig():
    rig = load_rig("virtual-ring-24")
    assert [f.board_index for f in plan_frames(rig, "calibration", PATTERN)] == list(range(rig.calibration.poses))
    assert [f.step for f in plan_frames(rig, "stills", PATTERN)] == [s.name for s in rig.preset_steps()]
    assert len(plan_frames(rig, "motion", CaptureOptions(frames=5))) == 5
    with pytest.raises(CaptureError):
        plan_frames(rig, "portraits", PATTERN)


def test_frame_qa_flags_blur_clipping_and_an_empty_frame(tmp_path):
    rig = load_rig("virtual-ring-24")
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    enc = lambda img: cv2.imencode(".png", img)[1].tobytes()  # noqa: E731
    assert frame_qa(enc(sharp), rig.qa)["flags"] == []
    blurred = cv2.GaussianBlur(sharp, (0, 0), 8)
    assert any("blurred" in f for f in frame_qa(enc(blurred), rig.qa)["flags"])
    white = np.full((480, 640, 3), 255, np.uint8)
    assert any("highlights" in f for f in frame_qa(enc(white), rig.qa)["flags"])
    green = np.zeros((480, 640, 3), np.uint8)
    green[:] = (60, 170, 40)  # BGR: the backdrop, no subject
    green += rng.integers(0, 30, green.shape, dtype=np.uint8)
    flags = frame_qa(enc(green), rig.qa)["flags"]
    assert any("subject not in frame" in f for f in flags)
    assert frame_qa(b"not an image", rig.qa)["flags"] == ["undecodable"]


def test_qa_warnings_reach_the_events(tmp_path):
    from rigs.rigfile import resolve_rig_path

    rig = tmp_path / "ring-12-poses.toml"  # the library rig walks the board through 96 poses
    rig.write_text(resolve_rig_path("virtual-ring-24").read_text().replace("poses = 96", "poses = 12"))
    session = Session.create(tmp_path / "session", str(rig), "subj-001")
    add_consent(session.path, consent())
    events = []
    run_take(session, "calibration", CaptureOptions(source="pattern"), on_event=events.append)
    # pattern frames are sharp and fully "covered": calibration expects no subject, so no coverage flag
    assert not [e for e in events if isinstance(e, QAWarning)]
    rec = Session.open(session.path).manifest.takes["calib-001"]
    assert len(rec.frames) == 12 and rec.status == "complete"
    assert Path(session.path / rec.captured["cam01"][0].path).exists()
