"""Subject masks: chroma key and clean plate, scored against the virtual studio's ground truth.

Run with ``-s`` to see the IoU per image, per take and per lighting step.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from reconstruct.masks import (
    MaskError,
    MaskOptions,
    MaskProgress,
    _guided_filter_reference,
    clean_plate_mask,
    estimate_backdrop_hue,
    guided_filter,
    key_mask,
    mask_iou,
    run_masks,
    subject_masks,
)
from rigs.errors import ShapeError
from rigs.rigfile import load_rig
from rigs.virtual.render import RenderOptions, rendered_cameras, run_render

CAMERAS = ("cam01", "cam06", "cam11", "cam17", "cam22")
SCALE = 0.5
#: the issue's target, per image on average, and the floor for any single image
MEAN_IOU = 0.97
MIN_IOU = 0.93


# ----------------------------------------------------------------------------- the rendered set


def _render_plates(render: Path, out: Path) -> None:
    """Clean plates as a studio shoots them: the empty studio from every camera under every lighting step.

    Written as ``out/<camera>/<step>.jpg`` (JPEG q95 like the takes), with their own sensor noise.
    """
    from rigs.virtual.studio import FrameState, VirtualStudio

    rig = load_rig(render / "rig.toml")
    studio = VirtualStudio(rig)
    empty = studio.frame(FrameState())
    for cam in rendered_cameras(rig, RenderOptions(scale=SCALE, cameras=CAMERAS)):
        view = studio.view(cam)
        (out / cam.id).mkdir(parents=True)
        for step in rig.preset_steps():
            img = studio.render(view, empty, step, noise_key=zlib.crc32(f"plate/{cam.id}/{step.name}".encode()))
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img.rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            (out / cam.id / f"{step.name}.jpg").write_bytes(buf.tobytes())


@pytest.fixture(scope="module")
def studio_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    render = root / "render"
    run_render("virtual-ring-24", render, RenderOptions(takes=("stills", "motion"), frames=3, scale=SCALE,
                                                         cameras=CAMERAS, workers=1))
    manifest = json.loads((render / "render.json").read_text())
    steps = {t["id"]: t["steps"] for t in manifest["takes"]}
    plates = root / "plates"
    _render_plates(render, plates)
    images = []
    for entry in manifest["images"]:
        path = render / entry["path"]
        take, cam = path.parts[-3], path.parts[-2]
        frame = int(path.stem)
        images.append(SimpleNamespace(path=path, take=take, camera=cam, frame=frame, step=steps[take][frame],
                                      gt=render / "takes" / take / "gt" / cam / f"{frame:06d}.mask.png",
                                      plate=plates / cam / f"{steps[take][frame]}.jpg"))
    return SimpleNamespace(root=root, render=render, plates=plates, steps=steps, images=images,
                           rig=load_rig(render / "rig.toml"))


def _gt(item) -> np.ndarray:
    return cv2.imread(str(item.gt), cv2.IMREAD_GRAYSCALE) > 0


def _report(title: str, rows: list[tuple[object, float]]) -> None:
    """Print IoUs per image and grouped per take and per lighting step (visible with -s)."""
    print(f"\n{title}: {len(rows)} images, mean IoU {np.mean([r[1] for r in rows]):.4f}, "
          f"min {np.min([r[1] for r in rows]):.4f}")
    for key in ("take", "step"):
        groups: dict[str, list[float]] = defaultdict(list)
        for item, iou in rows:
            groups[getattr(item, key)].append(iou)
        for name, ious in groups.items():
            print(f"  {key} {name:<14} n={len(ious):<3} mean {np.mean(ious):.4f} min {np.min(ious):.4f}")
    for item, iou in rows:
        print(f"  {item.take}/{item.camera}/{item.frame:06d} {item.step:<13} {iou:.4f}")


def _check_ious(rows: list[tuple[object, float]]) -> None:
    ious = np.array([r[1] for r in rows])
    worst = min(rows, key=lambda r: r[1])[0]
    assert ious.mean() >= MEAN_IOU, f"mean IoU {ious.mean():.4f}"
    assert ious.min() >= MIN_IOU, f"min IoU {ious.min():.4f} on {worst.path}"
    for key in ("take", "step"):
        groups: dict[str, list[float]] = defaultdict(list)
        for item, iou in rows:
            groups[getattr(item, key)].append(iou)
        for name, g in groups.items():
            assert np.mean(g) >= MEAN_IOU, f"mean IoU {np.mean(g):.4f} for {key} {name}"


def test_key_masks_match_ground_truth(studio_set):
    """Every still (all 8 lighting steps, one-light-at-a-time included) and motion frame, keyed alone."""
    options = MaskOptions.for_rig(studio_set.rig)
    rows = []
    for item in studio_set.images:
        mask = key_mask(cv2.imread(str(item.path)), options)
        rows.append((item, mask_iou(mask, _gt(item))))
    _report("chroma key", rows)
    assert {r[0].step for r in rows} == {"flat", "key-fill-rim", "olat-key", "olat-fill", "olat-rim-l",
                                         "olat-rim-r", "olat-top", "olat-front"}
    _check_ious(rows)


def test_clean_plate_masks_match_ground_truth(studio_set):
    """The same images against a clean plate of their camera under their lighting step."""
    options = MaskOptions.for_rig(studio_set.rig)
    rows = []
    for item in studio_set.images:
        mask = clean_plate_mask(cv2.imread(str(item.path)), cv2.imread(str(item.plate)), options)
        rows.append((item, mask_iou(mask, _gt(item))))
    _report("clean plate", rows)
    _check_ious(rows)


def test_backdrop_hue_is_estimated_from_the_image(studio_set):
    lin = np.array(studio_set.rig.virtual.backdrop_rgb)
    r, g, b = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    expected = math.degrees(math.atan2(math.sqrt(3) / 2 * (g - b), r - (g + b) / 2))  # about 135
    for item in studio_set.images[::7]:
        hue = estimate_backdrop_hue(cv2.imread(str(item.path)))
        assert hue is not None and abs(hue - expected) < 4.0, (item.path, hue, expected)
    # a prior far from the backdrop finds nothing within its window
    assert estimate_backdrop_hue(cv2.imread(str(studio_set.images[0].path)),
                                 MaskOptions(backdrop_hue_deg=240.0)) is None


def test_run_masks_writes_the_image_layout(studio_set, tmp_path):
    events: list[MaskProgress] = []
    out = tmp_path / "masks"
    report = run_masks(studio_set.render, out, MaskOptions.for_rig(studio_set.rig), on_event=events.append)
    assert len(report.records) == len(studio_set.images)  # ground truth PNGs are not taken for images
    assert [e.done for e in events] == list(range(1, len(studio_set.images) + 1))
    assert all(e.total == len(studio_set.images) for e in events)
    for item in studio_set.images:
        rel = item.path.relative_to(studio_set.render)
        target = out / rel.parent / f"{item.path.stem}.mask.png"
        assert target.is_file(), target
        mask = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (480, 640)
        assert set(np.unique(mask)) <= {0, 255}
        gt = _gt(item)
        frac = report.area_fractions[rel.as_posix()]
        assert frac == pytest.approx(np.count_nonzero(mask) / mask.size)
        assert frac == pytest.approx(gt.mean(), rel=0.05)
    doc = json.loads(report.manifest_path.read_text())
    assert doc["schema"] == "twinstudio.masks" and doc["version"] == 1
    assert len(doc["masks"]) == len(studio_set.images)
    first = doc["masks"][0]
    assert first["mask"] == first["image"].rsplit(".", 1)[0] + ".mask.png" and first["method"] == "key"
    assert doc["options"]["backdrop_hue_deg"] == studio_set.rig.qa.backdrop_hue_deg


def test_run_masks_with_plates_per_camera_and_step(studio_set, tmp_path):
    stills = [i for i in studio_set.images if i.take.startswith("stills") and i.camera == "cam06"]
    by_path = {i.path: i for i in stills}
    report = run_masks([i.path for i in stills], tmp_path / "out", plate=lambda p: by_path[p].plate)
    assert [r.method for r in report.records] == ["plate"] * len(stills)
    # the list's common folder is the camera folder: masks land directly in out/
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mask.png")) == \
        sorted(f"{i.frame:06d}.mask.png" for i in stills)
    for record in report.records:
        gt = _gt(by_path[record.image])
        assert mask_iou(cv2.imread(str(record.mask), cv2.IMREAD_GRAYSCALE), gt) >= MIN_IOU


def test_subject_masks_yields_in_order_and_mixes_key_and_plate(studio_set):
    items = [i for i in studio_set.images if i.camera == "cam11"][:4]
    plate_for = {items[1].path: items[1].plate}
    got = list(subject_masks([i.path for i in items], MaskOptions(), plate=plate_for.get))
    assert [p for p, _ in got] == [i.path for i in items]
    for (_, mask), item in zip(got, items):
        assert mask.dtype == bool and mask_iou(mask, _gt(item)) >= MIN_IOU


def test_run_masks_validates_before_writing(studio_set, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MaskError, match="missing"):
        run_masks([studio_set.images[0].path, tmp_path / "nope.jpg"], out)
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskError, match="no images"):
        run_masks(tmp_path / "empty", out)
    with pytest.raises(MaskError, match="clean plate"):
        run_masks([studio_set.images[0].path], out, plate=tmp_path / "no-plate.jpg")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MaskError, match="not a folder"):
        run_masks([studio_set.images[0].path], tmp_path / "file")
    bad = tmp_path / "bad" / "000000.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(MaskError, match="cannot read") as err:
        run_masks(bad.parent, out)
    assert err.value.facts["path"] == str(bad)


# ----------------------------------------------------------------------------- synthetic scenes

_GREEN = np.array([118, 195, 89], dtype=np.float32)  # BGR, the virtual cyclorama lit
_H, _W = 240, 320


def _scene(backdrop=_GREEN, noise=0.0, jpeg=False, seed=0, square=(128, 128, 128)) -> dict:
    """A backdrop with a brightness gradient, a darker shadow band, a grey square with a black
    'shoe' below it that stands in the shadow, and a specular highlight on the square."""
    ramp = np.linspace(0.75, 1.0, _W, dtype=np.float32)[None, :, None]
    img = np.broadcast_to(backdrop * ramp, (_H, _W, 3)).copy()
    shadow = np.zeros((_H, _W), bool)
    shadow[150:200, 60:300] = True
    img[shadow] *= 0.45
    subject = np.zeros((_H, _W), bool)
    subject[60:160, 120:180] = True  # the grey square ...
    subject[160:185, 135:165] = True  # ... and its black shoe, in the shadow
    img[60:160, 120:180] = square
    img[160:185, 135:165] = 12
    img[80:90, 150:160] = 250  # specular highlight
    if noise:
        img += np.random.default_rng(seed).normal(0, noise, img.shape).astype(np.float32)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if jpeg:
        img = cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_COLOR)
    return {"image": img, "subject": subject, "shadow": shadow}


def test_key_grey_square_in_a_green_studio_with_a_shadow():
    s = _scene()
    mask = key_mask(s["image"])
    assert mask.dtype == bool and mask.shape == (_H, _W)
    wrong = mask ^ s["subject"]
    edge = s["subject"] & ~(cv2.erode(s["subject"].astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    assert np.count_nonzero(wrong) <= 8 and not (wrong & ~edge).any()  # at most a rounded corner


def test_key_with_noise_and_jpeg_keeps_shadows_out():
    s = _scene(noise=1.5, jpeg=True)
    mask = key_mask(s["image"])
    assert mask_iou(mask, s["subject"]) >= 0.97
    near = cv2.dilate(s["subject"].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert not (mask & s["shadow"] & ~near).any()


def test_key_drops_the_unlit_ceiling_but_not_dark_parts_of_the_subject():
    s = _scene(noise=1.5, jpeg=True)
    img = s["image"].copy()
    img[:40] = 14  # a black ceiling across the top of the frame
    img[:40, 200:240] = 30  # with a lighter piece of rigging
    mask = key_mask(img)
    assert not mask[:40].any()
    assert mask[165:180, 140:160].all()  # the black shoe is kept: it hangs on the lit square
    assert mask_iou(mask, s["subject"]) >= 0.97
    assert mask_iou(key_mask(img, MaskOptions(drop_unlit=False)), s["subject"]) < 0.7


def test_key_keeps_a_part_split_off_the_subject_and_drops_specks():
    s = _scene()
    img = s["image"].copy()
    img[100:130, 220:235] = (140, 172, 224)  # a hand seen apart from the body (skin, BGR)
    img[20, 20] = 128  # a single grey speck
    mask = key_mask(img)
    assert mask[100:130, 220:235].all()
    assert not mask[15:25, 15:25].any()
    assert not key_mask(img, MaskOptions(min_component_fraction=0.5))[100:130, 220:235].any()


def test_key_on_a_blue_screen():
    s = _scene(backdrop=np.array([200, 60, 40], np.float32), noise=1.5)  # hue about 233 degrees
    mask = key_mask(s["image"], MaskOptions(backdrop_hue_deg=230.0))
    assert mask_iou(mask, s["subject"]) >= 0.97


def test_key_without_a_subject_is_empty():
    s = _scene(noise=1.5)
    img = s["image"].copy()
    img[s["subject"]] = (_GREEN * 0.9).astype(np.uint8)
    assert not key_mask(img).any()


def test_clean_plate_on_a_grey_backdrop_ignores_shadows():
    """A backdrop the key cannot handle (grey): the plate difference still finds the subject only."""
    grey = np.array([150, 150, 150], np.float32)
    s = _scene(backdrop=grey, noise=1.5, seed=1, square=(60, 50, 190))  # a red sweater
    ramp = np.linspace(0.75, 1.0, _W, dtype=np.float32)[None, :, None]
    plate = np.clip(np.round(np.broadcast_to(grey * ramp, (_H, _W, 3))
                             + np.random.default_rng(2).normal(0, 1.5, (_H, _W, 3))), 0, 255).astype(np.uint8)
    mask = clean_plate_mask(s["image"], plate)
    assert mask_iou(mask, s["subject"]) >= 0.97
    assert mask[165:180, 140:160].all()  # the black shoe: darker than any shadow
    assert mask[80:90, 150:160].all()  # the highlight: brighter than the plate
    near = cv2.dilate(s["subject"].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert not (mask & s["shadow"] & ~near).any()
    assert not clean_plate_mask(plate, plate).any()


def test_clean_plate_must_match_the_image():
    s = _scene()
    with pytest.raises(ShapeError):
        clean_plate_mask(s["image"], s["image"][:100])


def test_images_must_be_bgr_uint8():
    with pytest.raises(ShapeError):
        key_mask(np.zeros((10, 10), np.uint8))
    with pytest.raises(ShapeError):
        key_mask(np.zeros((10, 10, 3), np.float32))


# ----------------------------------------------------------------------------- small parts


def test_mask_iou_edge_cases():
    a = np.zeros((4, 5), bool)
    assert mask_iou(a, a) == 1.0  # both empty
    b = a.copy()
    b[1:3, 1:3] = True
    assert mask_iou(a, b) == 0.0 and mask_iou(b, a) == 0.0
    assert mask_iou(b, b) == 1.0
    c = a.copy()
    c[1:3, 2:4] = True
    assert mask_iou(b, c) == pytest.approx(2 / 6)
    assert mask_iou(b.astype(np.uint8) * 255, c) == pytest.approx(2 / 6)  # 0/255 PNG masks
    with pytest.raises(ShapeError):
        mask_iou(b, b[:3])
    with pytest.raises(ShapeError):
        mask_iou(np.zeros(5, bool), np.zeros(5, bool))


@pytest.mark.parametrize("radius", [1, 2])
def test_guided_filter_agrees_with_the_reference(radius):
    rng = np.random.default_rng(radius)
    guide = rng.random((11, 14)).astype(np.float32)
    src = (rng.random((11, 14)) > 0.5).astype(np.float32)
    fast = guided_filter(guide, src, radius, 1e-3)
    ref = _guided_filter_reference(guide, src, radius, 1e-3)
    np.testing.assert_allclose(fast, ref, atol=1e-4)


def test_options_are_validated_and_follow_the_rig(studio_set):
    with pytest.raises(MaskError) as err:
        MaskOptions(min_saturation=2.0)
    assert err.value.facts["option"] == "min_saturation"
    with pytest.raises(MaskError):
        MaskOptions(refine="grabcut")
    with pytest.raises(MaskError):
        MaskOptions(plate_max_ratio=0.9)
    opts = MaskOptions.for_rig(studio_set.rig, open_radius=1)
    assert opts.backdrop_hue_deg == studio_set.rig.qa.backdrop_hue_deg
    assert opts.hue_tolerance_deg == studio_set.rig.qa.backdrop_hue_tolerance_deg
    assert opts.open_radius == 1
