"""Reconstruction reads only what the capture wrote, at the size it wrote it (issue items 6 and 9), through the CLI.

A frame whose bytes differ from the sha256 that ``session.json`` records (truncated, overwritten), that
is not listed, or that is listed but gone, is left out and named with its reason in the report; the
stage goes on where enough frames remain and fails by name where not. A folder of photos without a
manifest is decoded first, a decoder's complaint counting as corruption. Images captured at another size
than the rig file's resolution are reconstructed at the size they have.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from rigs.errors import EXIT_INPUT, EXIT_STAGE_FAILED
from rigs.rigfile import resolve_rig_path
from tests.faults.cli import SUBJECT, add_consent, run

#: neighbours on the three rings: enough shared board views to calibrate, and views for the mesh and motion
CAMERAS = ("cam01", "cam02", "cam09", "cam10", "cam17", "cam18")


def small_rig(path: Path, cameras: tuple[str, ...] | None = CAMERAS, poses: int = 48, frames: int = 4) -> Path:
    """virtual-ring-24 with only ``cameras`` (None: all), ``poses`` board poses and ``frames`` motion frames."""
    text = resolve_rig_path("virtual-ring-24").read_text()
    head, *blocks = re.split(r"(?m)^(?=\[\[cameras\]\]|\[\[lights\]\])", text)
    keep = [b for b in blocks if cameras is None or not b.startswith("[[cameras]]")
            or re.search(r'id = "(cam\d+)"', b).group(1) in cameras]
    path.write_text((head + "".join(keep)).replace("poses = 96", f"poses = {poses}")
                    .replace("frames = 24", f"frames = {frames}"))
    return path


def _strict_json(path: Path) -> dict:
    def refuse(const: str):
        raise AssertionError(f"{path}: {const} in a JSON file")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def half(tmp_path_factory) -> Path:
    """A session on a 6-camera, 1280x960 rig captured with ``--render-scale 0.5``: its images are 640x480."""
    root = tmp_path_factory.mktemp("half")
    s = root / "session"
    assert run("capture", "start", "--session", s, "--rig", small_rig(root / "rig.toml"),
               "--subject", SUBJECT).returncode == 0
    assert add_consent(s).returncode == 0
    r = run("capture", "run", "--session", s, "--plain", "--render-scale", "0.5", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return s


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _listed(session: Path, rel: str) -> dict:
    doc = json.loads((session / "session.json").read_text())
    take, cam, name = rel.split("/")[1:]
    return doc["takes"][take]["captured"][cam][str(int(name.split(".")[0]))]


# ----------------------------------------------------------------------------- item 9: image size


def test_half_scale_capture_is_reconstructed_at_its_own_image_size(half, tmp_path):
    s = _copy(half, tmp_path)
    r = run("reconstruct", "run", s, "--stages", "cameras,masks,motion", "--workers", "2", "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = _strict_json(s / "recon" / "report.json")
    assert {k: v["status"] for k, v in rep["stages"].items()} == {"cameras": "done", "masks": "done",
                                                                   "motion": "done"}
    cams = _strict_json(s / "recon" / "cameras.json")["cameras"]
    assert len(cams) == len(CAMERAS)
    assert {(c["intrinsics"]["width"], c["intrinsics"]["height"]) for c in cams} == {(640, 480)}
    for c in cams:  # the principal point near the centre of the 640x480 image, not of 1280x960
        assert abs(c["intrinsics"]["cx"] - 319.5) < 12 and abs(c["intrinsics"]["cy"] - 239.5) < 12
    g = rep["stages"]["cameras"]["ground_truth"]  # and right: scored against the studio's exact cameras
    assert g["max_focal_pct"] < 1.0 and g["max_position_mm"] < 10
    assert rep["stages"]["cameras"]["image_sizes"] == {c: [640, 480] for c in CAMERAS}
    motion = rep["stages"]["motion"]
    assert motion["tracks"] > 0 and motion["cameras_skipped"] == {} and motion["ground_truth"]["median_mm"] < 5
    # the mesh, which came out skipped before: (ground truth moved aside, its scoring is slow)
    shutil.move(s / ".virtual", tmp_path / "virtual")
    r = run("reconstruct", "mesh", s, "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    mesh = _strict_json(s / "recon" / "report.json")["stages"]["mesh"]
    assert mesh["status"] == "done" and mesh["watertight"] and len(mesh["cameras"]) == len(CAMERAS)
    assert mesh["skipped"] == [] and mesh["rescaled"] == {}


# ----------------------------------------------------------------------------- item 6: inputs are verified


def test_damaged_frames_are_left_out_listed_and_the_stages_go_on(half, tmp_path):
    s = _copy(half, tmp_path)
    truncated = "takes/stills-003/cam02/000003.jpg"
    size = (s / truncated).stat().st_size
    (s / truncated).write_bytes((s / truncated).read_bytes()[:1000])
    overwritten = "takes/calib-001/cam01/000005.jpg"  # random bytes, the same length: only the hash tells
    n = (s / overwritten).stat().st_size
    (s / overwritten).write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    unlisted = "takes/stills-003/cam01/000099.jpg"  # a file the capture never wrote
    shutil.copyfile(s / "takes/stills-003/cam01/000000.jpg", s / unlisted)
    gone = "takes/motion-004/cam09/000002.jpg"
    (s / gone).unlink()

    r = run("reconstruct", "run", s, "--stages", "cameras,masks,motion", "--workers", "2", "--plain")
    assert r.returncode == 0, r.stdout + r.stderr
    st = _strict_json(s / "recon" / "report.json")["stages"]
    assert all(v["status"] == "done" for v in st.values()), st
    assert st["cameras"]["left_out"] == {str(s / overwritten): "sha256 differs from session.json"}
    assert st["masks"]["left_out"] == {
        str(s / truncated): f"truncated: 1000 bytes, session.json records {size}",
        str(s / unlisted): "not listed in session.json"}
    assert st["masks"]["images"] == len(CAMERAS) * 8 - 1
    assert not (s / "recon/masks/stills-003/cam02/000003.mask.png").exists()
    assert (s / "recon/masks/stills-003/cam02/000002.mask.png").exists()
    assert st["motion"]["left_out"] == {str(s / gone): "missing (listed in session.json)"}
    assert {"camera": "cam09", "frame": 2, "reason": "left out: missing (listed in session.json)"} \
        in st["motion"]["views_skipped"]
    assert st["motion"]["tracks"] > 0
    for name in ("cameras", "masks", "motion"):
        assert st[name]["verify_seconds"] >= 0
    # the command says so too, path and reason
    assert f"left out {s / truncated}: truncated: 1000 bytes" in r.stdout
    assert f"left out {s / overwritten}: sha256 differs" in r.stdout


def test_too_few_good_frames_fail_the_stage_by_name(half, tmp_path):
    s = _copy(half, tmp_path)
    bad = [f"takes/stills-003/{c}/000000.jpg" for c in CAMERAS[:4]]
    for rel in bad:
        (s / rel).write_bytes((s / rel).read_bytes()[:1000])
    r = run("reconstruct", "run", s, "--stages", "cameras,mesh", "--workers", "2", "--plain")
    assert r.returncode == EXIT_STAGE_FAILED, r.stdout + r.stderr
    mesh = _strict_json(s / "recon" / "report.json")["stages"]["mesh"]
    assert mesh["status"] == "failed"
    assert "2 usable camera(s), a mesh needs at least 3" in mesh["reason"]
    assert set(mesh["left_out"]) == {str(s / rel) for rel in bad}
    assert all(why.startswith("truncated: 1000 bytes") for why in mesh["left_out"].values())
    assert "mesh:" in r.stderr and "2 usable camera(s)" in r.stderr
    assert not (s / "recon" / "mesh").exists()


def test_photo_folder_without_manifest_is_decoded_first(half, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, c in enumerate(CAMERAS[:4]):
        data = (half / "takes/stills-003" / c / "000000.jpg").read_bytes()
        (photos / f"{c}.jpg").write_bytes(data[:1000] if i >= 2 else data)  # OpenCV reads these as grey
    r = run("reconstruct", "sfm", photos, "--out", tmp_path / "out", "--plain")
    assert r.returncode == EXIT_INPUT, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert "only 2 camera(s) have readable images (2 unreadable)" in err
    assert "cam09.jpg (cannot be decoded: image file is truncated" in err and "cam10.jpg" in err
    assert not (tmp_path / "out").exists()
