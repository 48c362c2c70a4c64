"""Reconstruction's exit codes, empty results and consent gate, through the real CLI (issue items 7 and 8).

Exit codes (rigs.errors): 0 every stage asked for is done, or skipped because it does not apply (no
motion take) and was not named; 7 a stage asked for produced nothing (the report, written first, says
why); 4 the session's consent does not cover a stage (nothing is written); 2 input that cannot be used.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from rigs.errors import EXIT_CONSENT, EXIT_STAGE_FAILED
from tests.faults.cli import SUBJECT, add_consent, run
from tests.faults.test_recon_inputs import small_rig


def _strict_json(path: Path) -> dict:
    """A JSON file read the way strict parsers read it: NaN or Infinity anywhere is an error."""
    def refuse(const: str):
        raise AssertionError(f"{path}: {const} in a JSON file")

    return json.loads(path.read_text(), parse_constant=refuse)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A virtual render at 128x96: calibration (12 board poses, too small to detect), stills, 3 motion frames."""
    root = tmp_path_factory.mktemp("tiny")
    rig = small_rig(root / "ring.toml", cameras=None, poses=12, frames=3)
    r = run("rig", "render", rig, "--out", root / "render", "--takes", "calibration,stills,motion", "--scale", "0.1",
            "--workers", "1", "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "render"


def _report(root: Path) -> dict:
    return _strict_json(root / "recon" / "report.json")


# ----------------------------------------------------------------------------- item 7: exit codes tell the truth


def test_run_exits_7_when_calibration_fails_and_says_which_stages_failed(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    r = run("reconstruct", "run", root, "--plain", "--workers", "1")
    assert r.returncode == EXIT_STAGE_FAILED, r.stdout + r.stderr
    st = _report(root)["stages"]
    assert st["cameras"]["status"] == "failed" and "saw the board" in st["cameras"]["reason"]
    assert st["masks"]["status"] == "done"  # what could run did, and is in the report
    for name in ("mesh", "motion"):  # asked for by 'run', and impossible without cameras
        assert st[name] == {"status": "failed", "reason": "needs cameras, which failed"}, name
    assert "3 stage(s) failed" in r.stderr and "cameras:" in r.stderr and "report.json" in r.stderr
    assert "failed" in r.stdout  # the stage table says so too
    assert not (root / "recon" / "cameras.json").exists()


def test_skipped_only_where_a_stage_does_not_apply_and_was_not_named(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    for take in ("stills-002", "motion-003"):  # a capture of the board only
        shutil.rmtree(root / "takes" / take)
    (root / "recon").mkdir()
    shutil.copyfile(root / "gt" / "cameras.json", root / "recon" / "cameras.json")
    # 'run' asks for every stage; masks, mesh and motion do not apply and were not named: skipped, exit 0
    r = run("reconstruct", "run", root, "--cameras-from", "existing", "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    st = _report(root)["stages"]
    assert st["cameras"]["status"] == "done"
    assert {k: (v["status"], v["reason"].split(": ")[-1]) for k, v in st.items() if k != "cameras"} == {
        "masks": ("skipped", "no stills take"), "mesh": ("skipped", "no stills take"),
        "motion": ("skipped", "no motion take")}
    # named, by a single-stage command or by --stages: the same missing take is a failure
    r = run("reconstruct", "motion", root, "--plain")
    assert r.returncode == EXIT_STAGE_FAILED, r.stdout + r.stderr
    assert "motion: " in r.stderr and "no motion take" in r.stderr
    st = _report(root)["stages"]
    assert st["motion"]["status"] == "failed" and st["cameras"]["status"] == "done"  # the others are kept
    r = run("reconstruct", "run", root, "--cameras-from", "existing", "--stages", "masks", "--plain")
    assert r.returncode == EXIT_STAGE_FAILED and "no stills take" in r.stderr, r.stdout + r.stderr


def test_single_stage_without_cameras_exits_7(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    r = run("reconstruct", "mesh", root, "--plain")
    assert r.returncode == EXIT_STAGE_FAILED, r.stdout + r.stderr
    st = _report(root)["stages"]
    assert st["cameras"]["status"] == "failed" and "no cameras file" in st["cameras"]["reason"]
    assert st["mesh"] == {"status": "failed", "reason": "needs cameras, which failed"}
    assert not (root / "recon" / "mesh").exists()


def test_run_on_a_session_without_takes_exits_7(tmp_path):
    s = tmp_path / "session"
    assert run("capture", "start", "--session", s, "--rig", "virtual-ring-24", "--subject", SUBJECT).returncode == 0
    assert add_consent(s).returncode == 0
    r = run("reconstruct", "run", s, "--plain")
    assert r.returncode == EXIT_STAGE_FAILED, r.stdout + r.stderr
    st = _report(s)["stages"]
    assert st["cameras"]["status"] == "failed"
    assert "no calibration or stills take" in st["cameras"]["reason"]
    assert {k: v["status"] for k, v in st.items()} == {"cameras": "failed", "masks": "skipped", "mesh": "skipped",
                                                        "motion": "skipped"}


def test_sfm_without_a_result_in_run_exits_7(tiny, tmp_path):
    """SfM that cannot map (or whose result disagrees with the rig, tests/reconstruct/test_sfm.py) fails the stage."""
    root = _copy(tiny, tmp_path)
    r = run("reconstruct", "run", root, "--cameras-from", "sfm", "--stages", "cameras", "--plain", timeout=600)
    assert r.returncode == EXIT_STAGE_FAILED, r.stdout + r.stderr
    cams = _report(root)["stages"]["cameras"]
    assert cams["status"] == "failed" and "mapping failed" in cams["reason"]
    assert "cameras: " in r.stderr and "mapping failed" in " ".join(r.stderr.split())
    assert not (root / "recon" / "cameras.json").exists()  # SfM's cameras are used only once accepted


# ----------------------------------------------------------------------------- item 8: no NaN in any file


def test_short_motion_take_writes_an_empty_result_with_its_reason_never_nan(tiny, tmp_path):
    root = _copy(tiny, tmp_path)
    (root / "recon").mkdir()
    shutil.copyfile(root / "gt" / "cameras.json", root / "recon" / "cameras.json")
    r = run("reconstruct", "motion", root, "--plain")  # 3 frames at 128x96: nothing can be tracked
    assert "Traceback" not in r.stderr and "not JSON compliant" not in r.stderr, r.stderr
    assert r.returncode == EXIT_STAGE_FAILED, r.stdout + r.stderr
    motion = _report(root)["stages"]["motion"]
    assert motion["status"] == "failed" and motion["tracks"] == 0 and motion["frames"] == 3
    assert "no surface point was tracked" in motion["reason"] and "5 or more" in motion["reason"]
    doc = _strict_json(root / "recon" / "motion" / "motion-003" / "motion.json")
    assert doc["tracks"] == 0 and doc["reason"] and doc["median_rms_px"] is None
    g = doc["ground_truth"]  # scored against the virtual studio: no figure, and why
    assert g["median_mm"] is None and g["samples"] == 0 and g["reason"] == "no tracked point to score"
    csv = (root / "recon" / "motion" / "motion-003" / "trajectories.csv").read_text().splitlines()
    assert csv == ["track,frame,time_s,x,y,z,views,rms_px"]


# ----------------------------------------------------------------------------- consent at reconstruct's doors


@pytest.fixture(scope="module")
def consented(tmp_path_factory) -> Path:
    """A small session (6 cameras at 128x96) with consent for capture and train, captured through the CLI."""
    root = tmp_path_factory.mktemp("consent")
    s = root / "session"
    rig = small_rig(root / "rig.toml", poses=12, frames=2)
    assert run("capture", "start", "--session", s, "--rig", rig, "--subject", SUBJECT).returncode == 0
    assert add_consent(s, scopes=("capture", "train")).returncode == 0
    r = run("capture", "run", "--session", s, "--plain", "--render-scale", "0.1")
    assert r.returncode == 0, r.stdout + r.stderr
    return s


def _tree(root: Path) -> dict[str, float]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _set_consent(session: Path, **fields) -> None:
    doc = json.loads((session / "consent.json").read_text())
    for rec in doc["records"]:
        rec.update(fields)
    (session / "consent.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("fault", ["revoked", "expired", "capture only"])
def test_consent_not_in_force_stops_every_door_and_writes_nothing(consented, tmp_path, fault):
    s = _copy(consented, tmp_path)
    if fault == "revoked":
        r = run("consent", "revoke", "--session", s, "--reason", "subject withdrew")
        assert r.returncode == 0, r.stdout + r.stderr
        why = "revoked"
    elif fault == "expired":
        yesterday = dt.date.today() - dt.timedelta(days=1)
        _set_consent(s, valid_from=(yesterday - dt.timedelta(days=30)).isoformat(), valid_until=yesterday.isoformat())
        why = "expired"
    else:
        _set_consent(s, scopes=["capture"])
        why = "does not cover 'train'"
    before = _tree(s)
    doors = [("reconstruct", "run", s), ("reconstruct", "run", s, "--cameras-from", "sfm"),
             ("reconstruct", "masks", s), ("reconstruct", "mesh", s), ("reconstruct", "motion", s),
             ("reconstruct", "sfm", s, "--out", s / "recon" / "sfm")]
    if fault != "capture only":  # the board images need consent to 'capture', which this record still gives
        doors.append(("reconstruct", "calibrate", s))
    for door in doors:
        r = run(*door, "--plain")
        assert r.returncode == EXIT_CONSENT, (door, r.stdout + r.stderr)
        assert why in r.stderr, (door, r.stderr)
        assert _tree(s) == before, door  # nothing new, nothing touched
    if fault == "capture only":
        r = run("reconstruct", "calibrate", s, "--plain")
        assert r.returncode != EXIT_CONSENT and "consent" not in r.stderr, r.stdout + r.stderr
