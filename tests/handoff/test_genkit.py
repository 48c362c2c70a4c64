"""The generation kit: crops, masks, captions, views and metadata of a tiny synthetic capture."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.consent import ConsentError, ConsentInputError, ConsentRecord, add_consent, revoke_consent
from capture.session import FramePlan, FrameRecord, SessionManifest, TakeRecord
from reconstruct.inputs import write_cameras
from rigs.fileio import sha256_file
from rigs.geometry import Camera, Intrinsics, look_at
from train.handoff import genkit
from train.handoff.genkit import (
    KitError,
    KitOptions,
    build_generation_kit,
    caption,
    cut_square,
    lighting_description,
    view_name,
    view_of,
)

TAKE = "stills-001"
SUBJECT = "subj-042"
STEPS = {0: ("flat", 0.0), 1: ("key-fill-rim", 0.0), 2: ("olat-key", 0.0)}
SUBJECT_BGR = (40, 40, 220)      # red subject
BACKDROP_BGR = (60, 160, 60)     # green backdrop
W, H = 160, 120
# id -> position; the subject (an upright ellipsoid) stands at the origin, centre 1 m high
POSITIONS = {
    "cam01": (0.0, -3.0, 1.0),   # -y: the front (cam01 convention, no ground truth here)
    "cam02": (3.0, 0.0, 1.0),    # +x: the subject's left when facing -y
    "cam03": (0.0, 3.0, 1.0),    # behind
    "cam04": (-3.0, 0.0, 1.0),   # the subject's right
    "cam05": (0.3, -3.0, 2.8),   # in front, high up
}


def _camera(cid: str, pos: tuple[float, float, float]) -> Camera:
    intr = Intrinsics(W, H, 75.0, 75.0, (W - 1) / 2, (H - 1) / 2)
    return Camera(cid, intr, look_at(np.array(pos), np.array([0.0, 0.0, 1.0])))


def _subject_mask(cam: Camera) -> np.ndarray:
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 48), np.linspace(-1, 1, 24))
    r = np.sqrt(1 - v ** 2)
    pts = np.stack([0.25 * r * np.cos(u), 0.18 * r * np.sin(u), 1.0 + 0.85 * v], axis=-1).reshape(-1, 3)
    uv, _ = cam.project(pts)
    hull = cv2.convexHull(np.round(uv).astype(np.int32))
    mask = np.zeros((H, W), np.uint8)
    cv2.fillConvexPoly(mask, hull, 255)
    return mask


def make_capture(root: Path, monkeypatch: pytest.MonkeyPatch, *, extra_cameras: tuple[str, ...] = (),
                 scopes: tuple[str, ...] = ("capture", "generate")) -> Path:
    """A capture root: a session of SUBJECT with consent for ``scopes``, cameras.json, a stills take of 3
    lighting steps with images and masks."""
    root.mkdir(parents=True)
    (root / "session.json").write_text(json.dumps({"subject_id": SUBJECT}))  # the subject, for add_consent
    today = dt.date.today()
    add_consent(root, ConsentRecord(subject_id=SUBJECT, agency="Nova", scopes=list(scopes), purposes=["e-commerce"],
                                    markets=["EU"], valid_from=today, valid_until=today + dt.timedelta(days=30),
                                    compensation_ref="INV-1", document_sha256="a" * 64))
    cams = [_camera(c, p) for c, p in POSITIONS.items()]
    write_cameras(root / "recon" / "cameras.json", cams, method="calibration")
    for cam in cams + [_camera(c, (3.0, -3.0, 1.0)) for c in extra_cameras]:
        mask = _subject_mask(cam)
        img_dir, mask_dir = root / "takes" / TAKE / cam.id, root / "recon" / "masks" / TAKE / cam.id
        img_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for frame in STEPS:
            img = np.empty((H, W, 3), np.uint8)
            img[:] = BACKDROP_BGR
            img[:, :, 0] = np.linspace(40, 90, W, dtype=np.uint8)[None, :]  # a gradient: replicate padding shows
            img[mask > 0] = SUBJECT_BGR
            img[mask > 0, 1] += np.uint8(10 * frame)
            cv2.imwrite(str(img_dir / f"{frame:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(mask_dir / f"{frame:06d}.mask.png"), mask)
    # the session manifest of a captured stills-001: every frame with its sha256 (what the kit verifies)
    captured: dict[str, dict[int, FrameRecord]] = {}
    for img in sorted((root / "takes" / TAKE).glob("*/*.jpg")):
        captured.setdefault(img.parent.name, {})[int(img.stem)] = FrameRecord(
            path=img.relative_to(root).as_posix(), sha256=sha256_file(img), size=img.stat().st_size)
    take = TakeRecord(id=TAKE, kind="stills", status="complete", cameras=sorted(captured),
                      frames=[FramePlan(index=f, step=STEPS[f][0]) for f in STEPS], started_at=0.0,
                      captured=captured)
    manifest = SessionManifest(subject_id=SUBJECT, rig="virtual-ring-24", rig_sha256="0" * 64, created_at=0.0,
                               takes={TAKE: take})
    (root / "session.json").write_text(manifest.model_dump_json(by_alias=True))
    monkeypatch.setattr(genkit, "frame_lighting", lambda r, t: dict(STEPS))
    return root


@pytest.fixture
def capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return make_capture(tmp_path / "capture", monkeypatch)


def _lines(result) -> list[dict]:
    return [json.loads(line) for line in result.metadata.read_text().splitlines()]


def test_kit_has_one_square_image_and_mask_per_camera_and_step(capture: Path, tmp_path: Path) -> None:
    events: list[dict] = []
    r = build_generation_kit(capture, tmp_path / "gen", "subj-042", KitOptions(size=64), on_event=events.append)
    assert r.images == len(POSITIONS) * len(STEPS) and r.skipped == {}
    images = sorted((r.out_dir / "images").iterdir())
    masks = sorted((r.out_dir / "masks").iterdir())
    assert len(images) == len(masks) == r.images
    assert (r.out_dir / "images" / "cam01_key-fill-rim.jpg").is_file()
    for p in images:
        assert cv2.imread(str(p)).shape == (64, 64, 3)
    for p in masks:
        m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
    assert events[-1] == {"event": "progress", "stage": "generation kit", "done": r.images, "total": r.images}
    assert all(e["stage"] == "generation kit" for e in events)


def test_full_size_output_is_1024_square(capture: Path, tmp_path: Path) -> None:
    r = build_generation_kit(capture, tmp_path / "gen", "subj-042",
                             KitOptions(cameras=("cam01",), presets=("flat",)))
    assert r.images == 1
    assert cv2.imread(str(r.out_dir / "images" / "cam01_flat.jpg")).shape == (1024, 1024, 3)
    assert cv2.imread(str(r.out_dir / "masks" / "cam01_flat.png"), cv2.IMREAD_UNCHANGED).shape == (1024, 1024)


def test_mask_crop_aligns_with_image_crop(capture: Path, tmp_path: Path) -> None:
    r = build_generation_kit(capture, tmp_path / "gen", "subj-042", KitOptions(size=96, presets=("flat",)))
    for rec in _lines(r):
        img = cv2.imread(str(r.out_dir / rec["file_name"])).astype(int)
        mask = cv2.imread(str(r.out_dir / rec["mask_file_name"]), cv2.IMREAD_UNCHANGED) > 0
        red = (img[..., 2] > 150) & (img[..., 1] < 110)
        assert mask.mean() > 0.1  # the subject fills much of the crop
        assert (red == mask).mean() > 0.97, rec["camera"]
        # the box is the subject's with the margin: the mask touches no edge of the crop
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()


def test_crop_box_is_centred_on_the_mask_with_the_margin(capture: Path, tmp_path: Path) -> None:
    r = build_generation_kit(capture, tmp_path / "gen", SUBJECT, KitOptions(size=32, margin=0.1, presets=("flat",)))
    for rec in _lines(r):
        mask = cv2.imread(str(capture / "recon" / "masks" / TAKE / rec["camera"] / "000000.mask.png"), 0)
        ys, xs = np.nonzero(mask)
        w, h = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        x0, y0, side = rec["crop_box_px"]
        assert side == int(np.ceil(max(w, h) * 1.2))
        assert abs((x0 + side / 2) - (xs.min() + xs.max() + 1) / 2) <= 0.5
        assert abs((y0 + side / 2) - (ys.min() + ys.max() + 1) / 2) <= 0.5


def test_metadata_lines_are_sorted_and_point_at_files(capture: Path, tmp_path: Path) -> None:
    r = build_generation_kit(capture, tmp_path / "gen", "subj-042", KitOptions(size=48))
    recs = _lines(r)
    assert r.metadata == r.out_dir / "metadata.jsonl"
    assert len(recs) == r.images
    names = [rec["file_name"] for rec in recs]
    assert names == sorted(names)
    for rec in recs:
        assert (r.out_dir / rec["file_name"]).is_file() and (r.out_dir / rec["mask_file_name"]).is_file()
        assert rec["subject"] == "subj-042" and rec["text"].startswith("a photo of subj-042, full body, ")
        assert f"{rec['view']} view" in rec["text"] and rec["elevation"] in rec["text"]
        assert rec["lighting_description"] in rec["text"]
        assert rec["lighting"] in {s for s, _ in STEPS.values()}
        assert rec["source"] == f"takes/{TAKE}/{rec['camera']}/{_frame_of(rec['lighting']):06d}.jpg"
        assert rec["pose"] == "standing, arms relaxed"
    flat = next(rec for rec in recs if rec["file_name"] == "images/cam01_flat.jpg")
    assert flat["mask_file_name"] == "masks/cam01_flat.png"
    assert flat["text"] == ("a photo of subj-042, full body, front view, eye level, soft even studio light, "
                            "standing, arms relaxed, plain studio backdrop")
    assert list(flat)[:3] == ["file_name", "mask_file_name", "text"]


def _frame_of(step: str) -> int:
    return next(f for f, (s, _) in STEPS.items() if s == step)


def test_views_and_elevations_from_camera_positions(capture: Path, tmp_path: Path) -> None:
    r = build_generation_kit(capture, tmp_path / "gen", SUBJECT, KitOptions(size=32, presets=("flat",)))
    assert r.front_source == "camera cam01"
    assert np.allclose(r.subject_center, [0.0, 0.0, 1.0], atol=0.05)  # triangulated from the masks
    got = {rec["camera"]: (rec["view"], rec["elevation"], rec["azimuth_deg"]) for rec in _lines(r)}
    assert got["cam01"][:2] == ("front", "eye level") and abs(got["cam01"][2]) < 1.0
    assert got["cam02"][:2] == ("left profile", "eye level") and abs(got["cam02"][2] - 90) < 1.5
    assert got["cam03"][:2] == ("back", "eye level")
    assert got["cam04"][:2] == ("right profile", "eye level") and abs(got["cam04"][2] + 90) < 1.5
    assert got["cam05"][:2] == ("front", "high angle")


def test_front_azimuth_option_turns_the_views(capture: Path, tmp_path: Path) -> None:
    # the subject faces +x: its left is +y, so the camera at -y sees its right side
    r = build_generation_kit(capture, tmp_path / "gen", SUBJECT,
                             KitOptions(size=32, presets=("flat",), front_azimuth_deg=0.0))
    assert r.front_source == "option" and r.front_azimuth_deg == 0.0
    got = {rec["camera"]: rec["view"] for rec in _lines(r)}
    assert got == {"cam01": "right profile", "cam02": "front", "cam03": "left profile", "cam04": "back",
                   "cam05": "right profile"}


def test_virtual_ground_truth_gives_the_facing(capture: Path, tmp_path: Path) -> None:
    # a virtual-render-like root whose skeleton faces +x (left hip and shoulder towards +y)
    (capture / "render.json").write_text("{}")
    (capture / "gt").mkdir()
    (capture / "gt" / "cameras.json").write_text((capture / "recon" / "cameras.json").read_text())
    joints = {"hip_l": [0.0, 0.095, 0.91], "hip_r": [0.0, -0.095, 0.91],
              "shoulder_l": [0.0, 0.185, 1.42], "shoulder_r": [0.0, -0.185, 1.42]}
    gt_dir = capture / "takes" / TAKE / "gt"
    gt_dir.mkdir()
    (gt_dir / "frames.json").write_text(json.dumps({"frames": [{"index": 0, "step": "flat", "joints": joints}]}))
    r = build_generation_kit(capture, tmp_path / "gen", SUBJECT, KitOptions(size=32, presets=("flat",)))
    assert r.front_source == "virtual ground truth" and r.front_azimuth_deg == pytest.approx(0.0)
    got = {rec["camera"]: rec["view"] for rec in _lines(r)}
    assert got["cam02"] == "front" and got["cam01"] == "right profile"


def test_view_sectors() -> None:
    cases = {0: "front", 20: "front", 22.5: "front", 25: "front-left three-quarter", 45: "front-left three-quarter",
             -45: "front-right three-quarter", 67.5: "front-left three-quarter", 90: "left profile",
             -90: "right profile", 135: "back-left three-quarter", -135: "back-right three-quarter",
             157.5: "back-left three-quarter", 170: "back", 180: "back", -180: "back", 360: "front"}
    for az, name in cases.items():
        assert view_name(az) == name, az


def test_view_of_a_camera() -> None:
    center = np.array([0.0, 0.0, 1.0])
    # default front: the virtual studio's person faces -y
    assert view_of(_camera("a", (0.0, -3.0, 1.0)), center) == ("front", "eye level", pytest.approx(0.0))
    view, elev, az = view_of(_camera("b", (2.0, -2.0, 3.0)), center)
    assert (view, elev) == ("front-left three-quarter", "high angle") and az == pytest.approx(45.0)
    view, elev, az = view_of(_camera("c", (-3.0, 0.0, 0.05)), center)
    assert (view, elev) == ("right profile", "low angle") and az == pytest.approx(-90.0)
    assert view_of(_camera("d", (3.0, 0.0, 1.0)), center, front_azimuth_deg=0.0)[0] == "front"


def test_captions_and_lighting_words() -> None:
    assert caption("subj-042", "front-left three-quarter", "eye level", "soft even studio light",
                   "standing") == ("a photo of subj-042, full body, front-left three-quarter view, eye level, "
                                   "soft even studio light, standing, plain studio backdrop")
    assert "three-point studio lighting" in caption("x", "back", "high angle", "key-fill-rim", "standing")
    assert lighting_description("olat-rim-l") == "single studio light from the left rim position"
    assert lighting_description("olat-top") == "single studio light from the top position"
    assert lighting_description("olat-hair-light") == "single studio light from the hair light position"
    assert lighting_description("sunset-gel") == "studio lighting"


def test_skips_missing_and_empty_masks_bad_images_and_uncalibrated_cameras(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_capture(tmp_path / "capture", monkeypatch, extra_cameras=("cam99",))
    masks = root / "recon" / "masks" / TAKE
    (masks / "cam02" / "000001.mask.png").unlink()
    cv2.imwrite(str(masks / "cam03" / "000000.mask.png"), np.zeros((H, W), np.uint8))
    (root / "takes" / TAKE / "cam04" / "000002.jpg").write_bytes(b"not a jpeg")
    r = build_generation_kit(root, tmp_path / "gen", SUBJECT, KitOptions(size=32))
    assert r.images == len(POSITIONS) * len(STEPS) - 3
    assert set(r.skipped) == {"cam99", f"{TAKE}/cam02/000001", f"{TAKE}/cam03/000000", f"{TAKE}/cam04/000002"}
    assert "uncalibrated" in r.skipped["cam99"]
    assert r.skipped[f"{TAKE}/cam02/000001"].startswith("no mask")
    assert r.skipped[f"{TAKE}/cam03/000000"].startswith("empty mask")
    assert r.skipped[f"{TAKE}/cam04/000002"].startswith("left out: ")  # it no longer matches session.json
    assert "session.json records" in r.skipped[f"{TAKE}/cam04/000002"]
    names = {rec["file_name"] for rec in _lines(r)}
    assert "images/cam02_key-fill-rim.jpg" not in names and "images/cam02_flat.jpg" in names
    assert not (r.out_dir / "images" / "cam03_flat.jpg").exists()


def test_same_input_gives_the_same_bytes(capture: Path, tmp_path: Path) -> None:
    a = build_generation_kit(capture, tmp_path / "a", SUBJECT, KitOptions(size=40))
    b = build_generation_kit(capture, tmp_path / "b", SUBJECT, KitOptions(size=40))
    files_a = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.out_dir) for p in b.out_dir.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 * a.images + 1
    for rel in files_a:
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel


def test_a_rerun_with_fewer_steps_leaves_no_stale_images(capture: Path, tmp_path: Path) -> None:
    build_generation_kit(capture, tmp_path / "gen", SUBJECT, KitOptions(size=32))
    r = build_generation_kit(capture, tmp_path / "gen", SUBJECT, KitOptions(size=32, presets=("flat",)))
    assert sorted(p.name for p in (r.out_dir / "images").iterdir()) == [f"{c}_flat.jpg" for c in sorted(POSITIONS)]
    assert len(list((r.out_dir / "masks").iterdir())) == len(POSITIONS)


def test_crop_leaving_the_image_is_padded_with_the_border() -> None:
    img = np.zeros((10, 10, 3), np.uint8)
    img[:, :, 0] = np.arange(10, dtype=np.uint8)[None, :] * 20   # varies along x
    img[:, :, 1] = np.arange(10, dtype=np.uint8)[:, None] * 20   # varies along y
    mask = np.full((10, 10), 255, np.uint8)
    out = cut_square(img, -4, -2, 16, 16, is_mask=False)        # no resize: side == size
    assert out.shape == (16, 16, 3)
    assert (out[:, :4, 0] == 0).all() and (out[:2, :, 1] == 0).all()  # left / top: first column / row
    assert (out[:, 4:14, 0] == img[0, :, 0]).all()
    assert (out[:, 14:, 0] == 180).all()                          # right: the last column
    m = cut_square(mask, -4, -2, 16, 16, is_mask=True)
    assert (m[:, :4] == 0).all() and (m[:2] == 0).all() and (m[2:12, 4:14] == 255).all() and (m[12:] == 0).all()


def test_bad_inputs_raise_kit_errors(capture: Path, tmp_path: Path) -> None:
    with pytest.raises(KitError, match="olat-moon"):
        build_generation_kit(capture, tmp_path / "gen", SUBJECT, KitOptions(presets=("olat-moon",)))
    with pytest.raises(KitError, match="cam42"):
        build_generation_kit(capture, tmp_path / "gen", SUBJECT, KitOptions(cameras=("cam42",)))
    with pytest.raises(KitError, match="subject_id"):
        build_generation_kit(capture, tmp_path / "gen", " ")
    with pytest.raises(KitError, match="no take"):
        build_generation_kit(capture, tmp_path / "gen", SUBJECT, KitOptions(take="stills-009"))
    with pytest.raises(KitError, match="size"):
        KitOptions(size=0)
    with pytest.raises(KitError, match="margin"):
        KitOptions(margin=-0.1)
    assert not (tmp_path / "gen").exists()  # nothing written before the inputs were checked
    (capture / "recon" / "cameras.json").unlink()
    with pytest.raises(KitError, match="cameras") as e:
        build_generation_kit(capture, tmp_path / "gen", SUBJECT)
    assert e.value.exit_code == 2


def test_the_kit_needs_consent_to_generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_capture(tmp_path / "capture", monkeypatch, scopes=("capture", "train", "share"))
    with pytest.raises(ConsentError, match="does not cover 'generate'") as e:
        build_generation_kit(root, tmp_path / "gen", SUBJECT, KitOptions(size=32))
    assert e.value.exit_code == 4 and not (tmp_path / "gen").exists()
    with pytest.raises(KitError, match="not 'subj-999'"):  # a session's imagery is captioned with its own subject
        build_generation_kit(make_capture(tmp_path / "c2", monkeypatch), tmp_path / "gen", "subj-999")
    revoke_consent(tmp_path / "c2", "withdrawn")
    with pytest.raises(ConsentError, match="revoked"):
        build_generation_kit(tmp_path / "c2", tmp_path / "gen", SUBJECT)
    (root / "session.json").unlink()  # a session without its manifest: whose imagery is it?
    with pytest.raises(ConsentInputError, match="a session without its session.json"):
        build_generation_kit(root, tmp_path / "gen", SUBJECT)
    (root / "consent.json").unlink()  # a folder that is neither a session nor a virtual render: nothing to check
    with pytest.raises(ConsentInputError, match="not a capture session") as e:
        build_generation_kit(root, tmp_path / "gen", SUBJECT)
    assert e.value.exit_code == 2 and not (tmp_path / "gen").exists()


def test_sfm_frame_cameras_are_refused(capture: Path, tmp_path: Path) -> None:
    cams = [_camera(c, p) for c, p in POSITIONS.items()]
    write_cameras(capture / "recon" / "cameras.json", cams, method="sfm", frame="sfm", units="arbitrary")
    with pytest.raises(KitError, match="arbitrary frame"):
        build_generation_kit(capture, tmp_path / "gen", SUBJECT)


DEMO = Path(__file__).resolve().parents[2] / "out" / "demo" / "session"


@pytest.mark.skipif(not (DEMO / "recon" / "cameras.json").is_file(), reason="no demo session (make demo)")
def test_demo_session(tmp_path: Path) -> None:
    subject = json.loads((DEMO / "session.json").read_text())["subject_id"]
    r = build_generation_kit(DEMO, tmp_path / "generation", subject, KitOptions(size=256, cameras=("cam01", "cam03")))
    assert r.front_source == "virtual ground truth" and r.front_azimuth_deg == pytest.approx(-90.0)
    assert r.images == 16 and r.skipped == {}
    recs = _lines(r)
    assert {rec["lighting"] for rec in recs} == {"flat", "key-fill-rim", "olat-key", "olat-fill", "olat-rim-l",
                                                 "olat-rim-r", "olat-top", "olat-front"}
    views = {rec["camera"]: rec["view"] for rec in recs}
    assert views == {"cam01": "front", "cam03": "left profile"}
    assert cv2.imread(str(r.out_dir / recs[0]["file_name"])).shape == (256, 256, 3)
