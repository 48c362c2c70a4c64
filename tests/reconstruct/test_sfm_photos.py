"""Structure from motion on a folder of photos: bodies from EXIF, principal points, two mappers, bad files.

The photos are rendered here: a textured room (floor, back and side walls)
seen by 12 cameras of one body whose principal point is well off the image
centre (+18, -12 px at 640x480), so the test knows every answer. The slow
test at the end runs a real Strecha set from ``../shared/data`` (real photos,
surveyed cameras) end to end.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycolmap")

from reconstruct.photos import FULL_FRAME_DIAGONAL_MM, PhotoInfo, group_bodies, read_photo_info
from reconstruct.sfm import SfmError, SfmOptions, _choose, run_sfm, score_sfm
from rigs.geometry import Camera, Intrinsics, Pose, look_at

W, H = 640, 480
TRUE = Intrinsics(width=W, height=H, fx=520.0, fy=520.0, cx=W / 2 + 18.0, cy=H / 2 - 12.0)  # OpenCV pixel centres
ROOM = 3.0  # half-width of the room (m)


# ----------------------------------------------------------------------------- a room of photos


def _texture(seed: int, size: int = 1024) -> np.ndarray:
    """Blobs at several scales: SIFT finds features at every octave."""
    rng = np.random.default_rng(seed)
    tex = np.zeros((size, size), np.float32)
    for sigma, weight in ((1.5, 0.5), (4.0, 1.0), (12.0, 1.5)):
        tex += weight * cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigma)
    return cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX).astype(np.float32)


#: planes of the room: (point, normal, in-plane axes u and v)
PLANES = (
    (np.array([0, ROOM, 0.0]), np.array([0, -1, 0.0]), np.array([1, 0, 0.0]), np.array([0, 0, 1.0])),  # back
    (np.array([0, 0, 0.0]), np.array([0, 0, 1.0]), np.array([1, 0, 0.0]), np.array([0, 1, 0.0])),  # floor
    (np.array([-ROOM, 0, 0.0]), np.array([1, 0, 0.0]), np.array([0, 1, 0.0]), np.array([0, 0, 1.0])),  # left
    (np.array([ROOM, 0, 0.0]), np.array([-1, 0, 0.0]), np.array([0, 1, 0.0]), np.array([0, 0, 1.0])),  # right
)


def render_room(intr: Intrinsics, pose: Pose, textures: list[np.ndarray]) -> np.ndarray:
    """Ray-cast the room: each pixel takes the texture of the nearest plane it hits (grey BGR uint8)."""
    u, v = np.meshgrid(np.arange(intr.width, dtype=np.float64), np.arange(intr.height, dtype=np.float64))
    rays = np.stack([(u - intr.cx) / intr.fx, (v - intr.cy) / intr.fy, np.ones_like(u)], -1) @ pose.R  # world
    c = pose.center
    best_t = np.full(u.shape, np.inf)
    out = np.zeros(u.shape, np.float32)
    for (p0, n, ax, ay), tex in zip(PLANES, textures):
        denom = rays @ n
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((p0 - c) @ n) / denom
        hit = c + rays * t[..., None]
        a, b = (hit - p0) @ ax, (hit - p0) @ ay
        ok = (t > 0) & (t < best_t) & np.isfinite(t)
        size = tex.shape[0]
        mx = ((a + 2 * ROOM) / (4 * ROOM) * size).astype(np.float32)  # 1 texel ~ 1.2 cm
        my = ((b + 2 * ROOM) / (4 * ROOM) * size).astype(np.float32)
        val = cv2.remap(tex, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        out = np.where(ok, val, out)
        best_t = np.where(ok, t, best_t)
    rng = np.random.default_rng(int(abs(c).sum() * 1000))
    img = np.clip(out + rng.normal(0, 1.5, out.shape), 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)


def room_cameras(n: int = 12) -> list[Camera]:
    """Cameras in an arc in front of the back wall, all looking at it and the floor."""
    cams = []
    for i in range(n):
        x = -1.6 + 3.2 * i / (n - 1)
        centre = np.array([x, -1.0 + 0.3 * math.sin(i), 1.4 + 0.25 * math.cos(1.7 * i)])
        target = np.array([0.4 * x, ROOM, 0.9 + 0.2 * math.sin(2.3 * i)])
        cams.append(Camera(f"IMG_{i:04d}", TRUE, look_at(centre, target)))
    return cams


def _exif(make: str = "", model: str = "", serial: str = "", focal: float | None = None,
          focal35: float | None = None, orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if orientation is not None:
        exif[0x0112] = orientation
    sub = exif.get_ifd(0x8769)
    if serial:
        sub[0xA431] = serial
    if focal is not None:
        sub[0x920A] = focal
    if focal35 is not None:
        sub[0xA405] = int(focal35)
    return exif


def _save(path: Path, bgr: np.ndarray, exif: Image.Exif | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    im.save(path, quality=95, **({"exif": exif} if exif is not None else {}))
    return path


@pytest.fixture(scope="module")
def room(tmp_path_factory) -> tuple[Path, dict[str, Camera]]:
    """12 photos of the room, one body (EXIF make/model/serial and a 35 mm-equivalent focal length), plus
    the stray files a real folder holds: a text file, a truncated JPEG, a text file named .jpg."""
    folder = tmp_path_factory.mktemp("room") / "photos"
    textures = [_texture(s) for s in range(len(PLANES))]
    cams = room_cameras()
    # the EXIF's 35 mm equivalent is 5 % off (as a rounded EXIF value is): a prior, not the answer
    f35 = round(TRUE.fx * 1.05 / math.hypot(W, H) * FULL_FRAME_DIAGONAL_MM)
    for cam in cams:
        _save(folder / f"{cam.id}.jpg", render_room(cam.intrinsics, cam.pose, textures),
              _exif("Twin", "Studio One", "SN-1", focal=35.0, focal35=f35))
    (folder / "notes.txt").write_text("shot on a Tuesday")
    good = (folder / "IMG_0000.jpg").read_bytes()
    (folder / "IMG_9000.jpg").write_bytes(good[: len(good) // 2])  # truncated mid-stream
    (folder / "IMG_9001.jpg").write_text("not a photo")
    return folder, {c.id: c for c in cams}


@pytest.fixture(scope="module")
def room_sfm(room, tmp_path_factory):
    folder, _ = room
    return run_sfm(folder, tmp_path_factory.mktemp("room_out") / "sfm", SfmOptions(threads=2))


# ----------------------------------------------------------------------------- EXIF


def test_exif_body_identity_focal_prior_and_rotation(tmp_path):
    img = np.zeros((60, 80, 3), np.uint8)
    p = _save(tmp_path / "a.jpg", img, _exif("Canon", "EOS R5", "0123", focal=50.0, focal35=50))
    info = read_photo_info(p)
    assert (info.make, info.model, info.serial, info.focal_mm, info.width, info.height) == \
        ("Canon", "EOS R5", "0123", 50.0, 80, 60)
    assert info.focal_px == pytest.approx(50 / FULL_FRAME_DIAGONAL_MM * math.hypot(80, 60))
    assert "35 mm equivalent" in info.focal_source
    # rotated a quarter turn by its EXIF: displayed 60 x 80
    r = read_photo_info(_save(tmp_path / "r.jpg", img, _exif("Canon", "EOS R5", "0123", orientation=6)))
    assert (r.width, r.height, r.orientation) == (60, 80, 6)
    # no EXIF at all: no identity, no prior
    n = read_photo_info(_save(tmp_path / "n.jpg", img))
    assert not n.has_identity and n.focal_px is None and n.body_key() == ("", "", "", "", None, 80, 60)
    with pytest.raises(OSError):
        read_photo_info(tmp_path / "missing.jpg")


def test_bodies_group_by_serial_lens_focal_and_size():
    infos = {
        "a1": PhotoInfo(800, 600, "Canon", "R5", "1", focal_mm=50.0, focal_px=1000.0, focal_source="EXIF"),
        "a2": PhotoInfo(800, 600, "Canon", "R5", "1", focal_mm=50.0, focal_px=1000.0, focal_source="EXIF"),
        "b1": PhotoInfo(800, 600, "Canon", "R5", "2", focal_mm=50.0, focal_px=1000.0, focal_source="EXIF"),
        "z1": PhotoInfo(800, 600, "Canon", "R5", "1", focal_mm=35.0, focal_px=700.0, focal_source="EXIF"),
        "n1": PhotoInfo(800, 600),
        "n2": PhotoInfo(800, 600),
        "p1": PhotoInfo(600, 800),
    }
    bodies = group_bodies(infos)
    groups = sorted(sorted(b.images) for b in bodies.values())
    assert groups == [["a1", "a2"], ["b1"], ["n1", "n2"], ["p1"], ["z1"]]
    a = next(b for b in bodies.values() if "a1" in b.images)
    assert a.focal_prior and a.focal_px == 1000.0 and "#1" in a.label and "50mm" in a.label
    n = next(b for b in bodies.values() if "n1" in b.images)
    assert not n.focal_prior and n.focal_px == pytest.approx(1.2 * 800) and n.label == "no EXIF body 800x600"
    assert len(group_bodies(infos, "image")) == len(infos)
    with pytest.raises(ValueError, match="differ in size"):
        group_bodies(infos, "one")
    same = {k: v for k, v in infos.items() if k != "p1"}
    assert [sorted(b.images) for b in group_bodies(same, "one").values()] == [sorted(same)]


# ----------------------------------------------------------------------------- the room


def test_one_body_principal_point_refined_and_poses_right(room, room_sfm):
    folder, truth = room
    r = room_sfm
    assert sorted(r.registered) == sorted(truth) and r.unregistered == {}
    (bid, body), = r.bodies.items()
    assert body["images"] == sorted(truth) and body["focal_prior"] and "35 mm" in body["focal_source"]
    assert body["principal_point"] == "refined" and body["coverage"] >= 0.6
    cam = next(iter(r.cameras.values())).intrinsics
    print(f"\nroom: principal point ({cam.cx:.2f}, {cam.cy:.2f}) px, true ({TRUE.cx}, {TRUE.cy}); "
          f"focal {cam.fx:.2f}, true {TRUE.fx}")
    assert abs(cam.cx - TRUE.cx) < 1.5 and abs(cam.cy - TRUE.cy) < 1.5
    assert abs(cam.fx / TRUE.fx - 1) < 0.005
    assert all(c.intrinsics == cam for c in r.cameras.values())  # one body: one set of intrinsics
    score = score_sfm(r.cameras, truth)
    print(f"room: position {score['median_position_mm']:.2f} / {score['max_position_mm']:.2f} mm, rotation "
          f"{score['median_rotation_deg']:.4f} / {score['max_rotation_deg']:.4f} deg")
    assert score["median_position_mm"] < 5 and score["max_rotation_deg"] < 0.1
    doc = json.loads(r.cameras_path.read_text())
    assert doc["bodies"][bid]["principal_point_offset_px"] == pytest.approx([18.5, -11.5], abs=1.5)  # COLMAP px
    assert doc["mapping"]["chosen"] in ("incremental", "global")
    assert set(doc["mapping"]["candidates"]) == {"incremental", "global"}
    assert all(c["agreed"] == len(truth) for c in doc["mapping"]["candidates"].values())
    assert {c["body"] for c in doc["cameras"]} == {bid}


def test_stray_and_broken_files_are_named_never_decoded_grey(room_sfm):
    r = room_sfm
    assert r.notes == {"notes.txt": "not an image file (by its name); skipped"}
    assert set(r.skipped_images) == {"IMG_9000.jpg", "IMG_9001.jpg"}
    assert "truncated" in r.skipped_images["IMG_9000.jpg"] or "cannot be decoded" in r.skipped_images["IMG_9000.jpg"]
    assert r.skipped_images["IMG_9001.jpg"] == "cannot be decoded: not an image file"
    assert "IMG_9000" not in r.cameras and "IMG_9000" not in r.unregistered
    doc = json.loads(r.cameras_path.read_text())
    assert doc["notes"] == r.notes and doc["skipped_images"] == r.skipped_images


def test_principal_point_held_when_asked_and_worse(room, room_sfm, tmp_path):
    folder, truth = room
    held = run_sfm(folder, tmp_path / "held", SfmOptions(threads=2, principal_point="hold", mapper="incremental"))
    (body,) = held.bodies.values()
    assert body["principal_point"] == "held at the image centre (option)"
    cam = next(iter(held.cameras.values())).intrinsics
    assert (cam.cx, cam.cy) == (W / 2 - 0.5, H / 2 - 0.5)  # the centre, in OpenCV's pixel convention
    assert held.mapping["candidates"].keys() == {"incremental"}
    a, b = score_sfm(held.cameras, truth), score_sfm(room_sfm.cameras, truth)
    print(f"\nroom, principal point held: {a['median_position_mm']:.2f} mm; refined: {b['median_position_mm']:.2f} mm")
    assert b["median_position_mm"] < a["median_position_mm"]


def test_rotated_photos_and_bodies_per_camera(room, tmp_path):
    """EXIF-rotated photos are used as displayed; a camera per photo when asked."""
    folder, truth = room
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(sorted(truth)[:6]):
        im = Image.open(folder / f"{name}.jpg")
        if i % 2:  # stored a quarter turn clockwise of how it is shown; EXIF orientation 6 turns it back
            im.transpose(Image.Transpose.ROTATE_90).save(photos / f"{name}.jpg", quality=95,
                                                          exif=_exif("Twin", "Studio One", orientation=6))
        else:
            im.save(photos / f"{name}.jpg", quality=95, exif=_exif("Twin", "Studio One"))
    r = run_sfm(photos, tmp_path / "out", SfmOptions(threads=2, group="image", mapper="incremental"))
    assert len(r.bodies) == 6 and all(len(b["images"]) == 1 for b in r.bodies.values())
    assert all(b["size"] == [W, H] for b in r.bodies.values())  # as displayed
    assert len(r.registered) == 6
    for b in r.bodies.values():  # one photo each: nothing constrains a principal point
        assert b["principal_point"].startswith("held at the image centre: 1 image(s)")


def test_unknown_camera_model_and_mixed_sizes_in_one_body(room, tmp_path):
    folder, _ = room
    with pytest.raises(SfmError, match="camera model 'KANNALA'"):
        run_sfm(folder, tmp_path / "a", SfmOptions(threads=1, camera_model="KANNALA"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("IMG_0000", "IMG_0001", "IMG_0002"):
        shutil.copyfile(folder / f"{name}.jpg", mixed / f"{name}.jpg")
    Image.open(mixed / "IMG_0002.jpg").resize((320, 240)).save(mixed / "IMG_0002.jpg")
    with pytest.raises(SfmError, match=r"mixed: photos of one camera differ in size: 640x480 \(IMG_0000\), .*320x240 \(IMG_0002\)"):
        run_sfm(mixed, tmp_path / "b", SfmOptions(threads=1, group="one"))
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- choosing a model


def test_mapper_choice_leaves_out_a_camera_the_mappers_disagree_on():
    ring = {f"c{i}": np.array([math.cos(i / 2), math.sin(i / 2), 0.1 * i]) for i in range(10)}
    # the global model: the same cameras in another frame (scaled, moved), one of them 3 spacings away
    other = {c: 2.0 * p + 5.0 for c, p in ring.items()}
    other["c4"] = other["c4"] + np.array([0.0, 0.0, 3.0])
    cands = {"incremental": {"registered": 10, "reprojection_error_px": 0.7},
             "global": {"registered": 10, "reprojection_error_px": 0.6}}
    chosen, left_out = _choose(cands, {"incremental": ring, "global": other})
    assert chosen == "global" and list(left_out) == ["c4"] and "neighbour spacings apart" in left_out["c4"]
    assert cands["incremental"]["agreed"] == cands["global"]["agreed"] == 9
    # a model that registers more cameras wins over a lower reprojection error
    fewer = {c: p for c, p in other.items() if c != "c9"}
    cands = {"incremental": {"registered": 10, "reprojection_error_px": 0.7},
             "global": {"registered": 9, "reprojection_error_px": 0.5}}
    assert _choose(cands, {"incremental": ring, "global": {c: 2.0 * p for c, p in ring.items() if c != "c9"}}) \
        == ("incremental", {})
    # one mapper only: kept as it is
    assert _choose({"global": {"registered": 9, "reprojection_error_px": 0.5}}, {"global": fewer}) == ("global", {})


# ----------------------------------------------------------------------------- real photos (slow)

STRECHA = Path(__file__).resolve().parents[3] / "shared" / "data" / "strecha" / "Herz-Jesus-P25"


@pytest.mark.slow
@pytest.mark.skipif(not (STRECHA / "images").is_dir(), reason="../shared/data/strecha is not on this machine")
def test_real_photos_end_to_end(tmp_path):
    """Herz-Jesus-P25 (25 real photos, surveyed cameras): every photo registered, the stray K.txt noted,
    positions and rotations within the figures measured by benchmarks/sfm_real.py (plus a margin)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sfm_real", Path(__file__).resolve().parents[2] / "benchmarks"
                                                  / "sfm_real.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = run_sfm(STRECHA / "images", tmp_path / "out")
    gt = bench.read_ground_truth(STRECHA)
    s = bench.score({c: (cam.pose.R, cam.pose.center) for c, cam in r.cameras.items()}, gt)
    print(f"\nHerz-Jesus-P25: {s['registered']}/{s['images']}, position {s['median_position_m'] * 1000:.1f} / "
          f"{s['max_position_m'] * 1000:.1f} mm, relative rotation {s['median_relative_rotation_deg']:.3f} deg, "
          f"{r.seconds:.0f} s")
    assert s["registered"] == 25 and r.unregistered == {}
    assert r.notes == {"K.txt": "not an image file (by its name); skipped"}
    (body,) = r.bodies.values()
    assert body["principal_point"] == "refined"
    assert s["median_position_m"] < 0.010 and s["max_position_m"] < 0.025  # COLMAP's defaults: 16 / 42 mm
    assert s["median_relative_rotation_deg"] < 0.1  # COLMAP's defaults: 0.20 deg


def test_cli_summary_names_the_mapper_bodies_and_files(room, tmp_path, capsys):
    from twinstudio.cli import main

    folder, truth = room
    assert main(["reconstruct", "sfm", str(folder), "--out", str(tmp_path / "out"), "--plain",
                 "--mapper", "global"]) == 0
    text = capsys.readouterr().out
    assert f"registered {len(truth)} camera(s)" in text and "arbitrary frame and scale" in text
    assert "mapper kept: global (global: 12 registered" in text
    assert "body01 (Twin Studio One #SN-1 35mm 640x480, 12 photo(s)): SIMPLE_RADIAL focal" in text
    assert "principal point refined (+18." in text and "distortion refined" in text
    assert "left out IMG_9000.jpg: cannot be decoded" in text and "note: notes.txt: not an image file" in text
    assert main(["reconstruct", "sfm", str(folder), "--out", str(tmp_path / "x"), "--camera-model", "FISHEYE"]) == 2
    assert "FISHEYE" in capsys.readouterr().err


def test_a_failing_global_mapper_leaves_the_incremental_model(room, tmp_path, monkeypatch):
    import reconstruct.sfm as sfm

    def broken(*args, **kwargs):
        raise RuntimeError("rotation averaging diverged")

    monkeypatch.setattr(sfm, "_map_global", broken)
    folder, truth = room
    r = run_sfm(folder, tmp_path / "out", SfmOptions(threads=2))
    assert r.mapping["chosen"] == "incremental" and len(r.registered) == len(truth)
    assert r.mapping["candidates"]["global"]["error"] == "failed: rotation averaging diverged"
    with pytest.raises(SfmError, match="the global mapper failed: rotation averaging diverged"):
        run_sfm(folder, tmp_path / "out2", SfmOptions(threads=2, mapper="global"))
