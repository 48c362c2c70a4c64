"""Clean plates: the empty studio from every camera under every lighting step of the stills.

A plates take renders the backdrop only (no subject, no board, no shadow);
the still of the same camera and step differs from its plate only on the
subject and where the subject's shadow darkens the backdrop. ``find_plate``
finds the plate behind a still in a render folder and in a session.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.consent import add_consent
from capture.orchestrator import CaptureOptions, plan_frames, prepare_virtual_studio, run_take
from capture.session import Session
from reconstruct.inputs import (
    ReconstructError,
    capture_kind,
    find_plate,
    find_take,
    list_takes,
    plate_steps,
    plates_for,
)
from rigs.geometry import Camera
from rigs.rigfile import Rig, load_rig, resolve_rig_path
from rigs.virtual.render import RenderOptions, plan_takes, run_render
from rigs.virtual.studio import FrameState, VirtualStudio
from tests.capture.conftest import consent

CAMERAS = ("cam01", "cam07", "cam13")


def _small_rig(path: Path, cameras: tuple[str, ...] = CAMERAS) -> Path:
    """virtual-ring-24 with only ``cameras`` (a session on it starts few worker processes)."""
    text = resolve_rig_path("virtual-ring-24").read_text()
    head, *blocks = re.split(r"(?m)^(?=\[\[cameras\]\]|\[\[lights\]\])", text)
    keep = [b for b in blocks
            if not b.startswith("[[cameras]]") or re.search(r'id = "(cam\d+)"', b).group(1) in cameras]
    path.write_text(head + "".join(keep))
    return path


@pytest.fixture(scope="module")
def rig() -> Rig:
    return load_rig("virtual-ring-24")


@pytest.fixture(scope="module")
def render(tmp_path_factory) -> Path:
    """Plates and stills of three cameras at 256x192, without sensor noise (the two differ only by the subject)."""
    out = tmp_path_factory.mktemp("plates") / "render"
    run_render("virtual-ring-24", out, RenderOptions(takes=("plates", "stills"), scale=0.2, cameras=CAMERAS,
                                                      workers=1, noise=False))
    return out


def _img(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def test_plan_takes_gives_a_plate_per_stills_step_with_nobody_on_stage(rig):
    plates, stills = plan_takes(rig, RenderOptions(takes=("plates", "stills")))
    assert (plates.id, plates.kind, stills.id) == ("plates-001", "plates", "stills-002")
    assert [f.step for f in plates.frames] == [f.step for f in stills.frames] == rig.preset_steps()
    assert [f.index for f in plates.frames] == list(range(len(rig.preset_steps())))
    assert all(f.clip_frame is None and f.board_index is None for f in plates.frames)
    assert all(f.clip_frame == 0 for f in stills.frames)


def test_plan_frames_of_plates_mirror_the_stills(rig):
    opts = CaptureOptions(source="pattern")
    plates, stills = plan_frames(rig, "plates", opts), plan_frames(rig, "stills", opts)
    assert [(f.index, f.step) for f in plates] == [(f.index, f.step) for f in stills]
    assert [f.step for f in plates] == [s.name for s in rig.preset_steps()]
    assert all(f.clip_frame is None and f.board_index is None for f in plates)


def test_an_empty_frame_renders_the_backdrop_and_a_still_only_darkens_it_outside_the_subject(rig):
    studio = VirtualStudio(rig)
    c = rig.cameras[0]
    view = studio.view(Camera(c.id, c.intrinsics.scaled(0.2), c.pose))
    empty = studio.frame(FrameState(None, None))
    subject = studio.frame(FrameState(studio.person.pose(), None))
    for step in rig.preset_steps()[:3]:
        plate = studio.render(view, empty, step, noise=False)
        still = studio.render(view, subject, step, noise=False)
        assert not plate.mask.any() and not plate.foreground.any()
        assert np.array_equal(plate.depth, studio.backdrop_depth(view))  # nothing in front of the backdrop
        out = ~still.mask
        # outside the subject the still is the plate, or the plate in the subject's shadow: never brighter
        assert (still.rgb[out].astype(int) <= plate.rgb[out].astype(int)).all(), step.name
        differ = (still.rgb != plate.rgb).any(-1)
        assert differ[still.mask].mean() > 0.95
        assert differ[out].mean() < 0.15  # the shadow on the floor and the backdrop, not the whole image


def test_plates_take_files_and_ground_truth(render, rig):
    m = json.loads((render / "render.json").read_text())
    takes = {t["id"]: t for t in m["takes"]}
    assert takes["plates-001"]["kind"] == "plates"
    assert takes["plates-001"]["steps"] == takes["stills-002"]["steps"] == [s.name for s in rig.preset_steps()]
    gt = json.loads((render / "takes/plates-001/gt/frames.json").read_text())
    assert gt["kind"] == "plates" and [f["step"] for f in gt["frames"]] == takes["plates-001"]["steps"]
    for f in gt["frames"]:
        assert not {"mesh", "joints", "landmarks", "board_to_world"} & set(f), f
        assert set(f["levels"]) and f["preset"]
    for cam in CAMERAS:
        for i in range(len(gt["frames"])):
            assert not _img(render / f"takes/plates-001/gt/{cam}/{i:06d}.mask.png").any()
            assert not _img(render / f"takes/plates-001/gt/{cam}/{i:06d}.depth.png").any()  # depth of nothing
        assert _img(render / f"takes/plates-001/gt/{cam}/backdrop.depth.png").any()


@pytest.mark.parametrize("cam", CAMERAS)
def test_plate_images_equal_the_stills_away_from_the_subject(render, cam):
    n = len(json.loads((render / "render.json").read_text())["takes"][0]["steps"])
    for i in range(n):
        plate = _img(render / f"takes/plates-001/{cam}/{i:06d}.jpg").astype(int)
        still = _img(render / f"takes/stills-002/{cam}/{i:06d}.jpg").astype(int)
        mask = _img(render / f"takes/stills-002/gt/{cam}/{i:06d}.mask.png") > 127
        assert mask.any()
        diff = np.abs(plate - still).max(-1)
        assert (diff[mask] > 20).mean() > 0.95  # the subject is not in the plate
        # away from the subject (JPEG blocks and 4:2:0 chroma smear an edge over a few px) only its shadow
        # differs, and a shadow only darkens
        away = cv2.dilate(mask.astype(np.uint8), np.ones((17, 17), np.uint8)) == 0
        assert (diff[away] > 8).mean() < 0.1, (cam, i)
        assert ((still - plate).max(-1)[away] > 8).mean() < 0.005, (cam, i)


def test_find_plate_in_a_render_folder(render, rig):
    steps = [s.name for s in rig.preset_steps()]
    assert capture_kind("plates-001") == "plates"
    assert list_takes(render, "plates") == ["plates-001"] and find_take(render, "stills") == "stills-002"
    for i in (0, 3, len(steps) - 1):
        assert find_plate(render, "stills-002", "cam07", i) == render / f"takes/plates-001/cam07/{i:06d}.jpg"
    assert find_plate(render, "stills-002", "cam99", 0) is None  # a camera without plates
    assert plate_steps(render, "plates-001")[steps[2]] == {c: render / f"takes/plates-001/{c}/000002.jpg"
                                                          for c in CAMERAS}
    assert plates_for(render, "stills-002")["cam13"] == {i: render / f"takes/plates-001/cam13/{i:06d}.jpg"
                                                         for i in range(len(steps))}
    with pytest.raises(ReconstructError, match="stills-002 has no frame 99"):
        find_plate(render, "stills-002", "cam01", 99)
    with pytest.raises(ReconstructError, match="no take 'stills-009'"):
        find_plate(render, "stills-009", "cam01", 0)
    # a plates take is never read as stills, even when named
    with pytest.raises(ReconstructError, match="plates-001 is a plates take, not a stills take"):
        find_take(render, "stills", "plates-001")


def test_find_plate_without_a_plates_take_is_none(tmp_path):
    out = tmp_path / "render"
    run_render("virtual-ring-24", out, RenderOptions(takes=("stills",), scale=0.1, cameras=("cam01",), workers=1,
                                                      ground_truth=False))
    assert find_plate(out, "stills-001", "cam01", 0) is None


def test_plates_in_a_session_are_found_by_step_and_skip_subject_qa(tmp_path):
    s = Session.create(tmp_path / "session", _small_rig(tmp_path / "rig.toml"), "subj-001")
    add_consent(s.path, consent())
    opts = CaptureOptions(render_scale=0.1)
    prepare_virtual_studio(s, ("plates", "stills"), opts)
    plates = run_take(s, "plates", opts)
    stills = run_take(s, "stills", opts)
    assert (plates.id, plates.kind, plates.status, stills.id) == ("plates-001", "plates", "complete", "stills-002")
    assert [f.step for f in plates.frames] == [f.step for f in stills.frames]
    for cam, frames in plates.captured.items():
        for r in frames.values():  # an empty studio is neither "blurred" nor "subject not in frame"
            assert not [f for f in r.qa["flags"] if "subject" in f or "blurred" in f], (cam, r.qa)
    # the captured plate is the virtual studio's plate of that camera and step
    for i in (0, 5):
        p = find_plate(s.path, "stills-002", "cam07", i)
        assert p == s.path / plates.captured["cam07"][i].path == s.path / f"takes/plates-001/cam07/{i:06d}.jpg"
        rendered = s.path / f".virtual/studio/takes/plates-001/cam07/{i:06d}.jpg"
        assert p.read_bytes() == rendered.read_bytes()
    assert find_plate(s.path, "stills-002", "cam02", 0) is None  # not a camera of this rig
    # a later plates take (the lights were re-rigged) replaces the earlier plates
    again = run_take(s, "plates", CaptureOptions(source="pattern"))
    assert again.id == "plates-003"
    assert find_plate(s.path, "stills-002", "cam13", 2) == s.path / "takes/plates-003/cam13/000002.jpg"
    assert plates_for(s.path, "stills-002")["cam01"][7] == s.path / "takes/plates-003/cam01/000007.jpg"
    # the reconstruction's stages read the stills, never the plates
    assert find_take(s.path, "stills") == "stills-002" and list_takes(s.path, "plates") == ["plates-001",
                                                                                           "plates-003"]


def test_a_hardware_plates_take_asks_to_clear_the_stage_once(tmp_path, monkeypatch):
    s = Session.create(tmp_path / "session", _small_rig(tmp_path / "rig.toml", ("cam01", "cam02")), "subj-001")
    add_consent(s.path, consent())
    monkeypatch.setattr(Rig, "is_virtual", property(lambda self: False))  # as if the bodies were real
    asked: list[str] = []
    opts = CaptureOptions(source="pattern", prompt=asked.append)
    rec = run_take(s, "plates", opts)
    assert rec.status == "complete"
    n = len(s.rig.preset_steps())
    assert asked == [f"clear the stage: clean plates of the empty studio, {n} lighting steps; then continue"]
    run_take(s, "stills", opts)
    assert len(asked) == 1  # the stills need no prompt
