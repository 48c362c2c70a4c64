"""Turntable previews: the AI label, orbit cameras that look at the subject, PNG + MP4 output."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rigs.errors import ShapeError
from train.preview import (AI_LABEL, PreviewError, banner_height, label_image, turntable_cameras, video_info,
                           write_turntable)


def _pattern(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 200)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(("w", "h"), [(160, 120), (1280, 960), (121, 97)])
def test_label_changes_only_the_bottom_strip(w, h):
    img = _pattern(w, h)
    before = img.copy()
    out = label_image(img)
    np.testing.assert_array_equal(img, before)  # the input is left alone
    assert out.shape == img.shape and out.dtype == np.uint8
    bh = banner_height(w, h)
    assert 0.05 * h <= bh <= 0.2 * h
    np.testing.assert_array_equal(out[: h - bh], img[: h - bh])
    strip, orig = out[h - bh:].astype(int), img[h - bh:].astype(int)
    assert np.all(np.any(strip != orig, axis=(1, 2)))  # every row of the strip changed
    white = np.all(strip >= 200, axis=2) & np.any(orig < 200, axis=2)
    assert white.sum() > 0.02 * strip.shape[0] * w  # white text ...
    dark = strip.mean(axis=2) < orig.mean(axis=2) - 50
    assert dark.mean() > 0.5  # ... on a darkened strip
    cols = np.flatnonzero(white.any(axis=0))
    assert cols[-1] - cols[0] > 0.55 * w  # sized to the width


def test_label_refuses_non_rgb_uint8():
    with pytest.raises(ShapeError):
        label_image(np.zeros((120, 160), np.uint8))
    with pytest.raises(ShapeError):
        label_image(np.zeros((120, 160, 3), np.float32))
    with pytest.raises(PreviewError):
        label_image(np.zeros((120, 160, 3), np.uint8), text="")
    with pytest.raises(PreviewError, match="ASCII"):
        label_image(np.zeros((120, 160, 3), np.uint8), text="KI-generierter Zwilling \u00e4")


def test_turntable_cameras_look_at_the_centre_from_the_orbit():
    center = np.array([0.3, -0.2, 1.0])
    cams = turntable_cameras(center, radius=2.5, height=0.4, n=12, width=320, height_px=240, fov_deg=50.0)
    assert len(cams) == 12
    centres = []
    for viewmat, K in cams:
        assert viewmat.shape == (4, 4) and K.shape == (3, 3)
        assert K[0, 2] == 160.0 and K[1, 2] == 120.0
        assert K[1, 1] == pytest.approx(120.0 / np.tan(np.radians(25.0)))
        R = viewmat[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        pc = viewmat[:3, :3] @ center + viewmat[:3, 3]
        assert pc[2] > 0
        uv = (K @ pc)[:2] / pc[2]
        np.testing.assert_allclose(uv, [160.0, 120.0], atol=1e-9)  # the centre projects to the image centre
        cam = -R.T @ viewmat[:3, 3]
        d = cam - center
        assert np.hypot(d[0], d[1]) == pytest.approx(2.5) and d[2] == pytest.approx(0.4)
        assert R[1] @ np.array([0.0, 0.0, 1.0]) < 0  # image y (down) points against world up
        centres.append(cam)
    angles = np.degrees(np.arctan2(*(np.array(centres) - center)[:, [1, 0]].T))
    np.testing.assert_allclose(np.diff(np.unwrap(np.radians(angles))), np.radians(30.0), atol=1e-9)
    assert angles[0] == pytest.approx(0.0)


def test_turntable_cameras_refuse_bad_arguments():
    with pytest.raises(PreviewError):
        turntable_cameras(np.zeros(3), radius=0.0, height=1.0, n=4, width=64, height_px=48)
    with pytest.raises(PreviewError):
        turntable_cameras(np.zeros(3), radius=1.0, height=1.0, n=0, width=64, height_px=48)
    with pytest.raises(ShapeError):
        turntable_cameras(np.zeros(2), radius=1.0, height=1.0, n=4, width=64, height_px=48)


def _palette(i: int) -> np.ndarray:
    return np.array([(i * 37) % 256, (i * 91 + 40) % 256, (255 - i * 53) % 256]) / 255.0


def test_write_turntable(tmp_path):
    n, w, h = 8, 160, 120
    cams = turntable_cameras(np.zeros(3), 2.0, 0.5, n, width=w, height_px=h)
    seen = {}

    def render(viewmat, K, width, height):
        i = next(j for j, (v, _) in enumerate(cams) if np.array_equal(v, viewmat))
        seen[i] = (width, height)
        return np.broadcast_to(_palette(i), (height, width, 3)).astype(np.float32)

    progress = []
    res = write_turntable(tmp_path / "preview", render, cams, fps=12,
                          on_progress=lambda done, total: progress.append((done, total)))
    assert seen == {i: (w, h) for i in range(n)}
    assert progress == [(i + 1, n) for i in range(n)]
    assert res["frames"] == n and res["width"] == w and res["height"] == h and res["fps"] == 12
    assert res["label"] == AI_LABEL
    pngs = sorted((tmp_path / "preview" / "turntable").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:03d}.png" for i in range(n)]
    assert res["png_dir"] == str(tmp_path / "preview" / "turntable")
    bh = banner_height(w, h)
    for i, p in enumerate(pngs):
        img = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        assert img.shape == (h, w, 3)
        np.testing.assert_array_equal(img[: h - bh], np.broadcast_to(np.round(_palette(i) * 255), (h - bh, w, 3)))
        np.testing.assert_array_equal(img, label_image(img[:1].repeat(h, axis=0)))  # labelled
    # H.264 that browsers play: High profile, 4:2:0, moov first, n frames at 12 fps
    info = video_info(res["mp4"])
    assert (info["codec"], info["pix_fmt"], info["profile"], info["faststart"]) == ("h264", "yuv420p", "High", True)
    assert info["frames"] == n and info["fps"] == 12 and info["duration"] == pytest.approx(n / 12, abs=1 / 12)
    cap = cv2.VideoCapture(res["mp4"])  # and an independent decoder (OpenCV's FFmpeg) reads the same
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == n and all(f.shape == (h, w, 3) for f in frames)
    for i, f in enumerate(frames):  # the right frame in the right place (lossy codec: colours approximately)
        rgb = cv2.cvtColor(f, cv2.COLOR_BGR2RGB)[10 : h - bh - 10, 10:-10].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(rgb, _palette(i) * 255, atol=12)
    assert not list(tmp_path.rglob("*.partial"))


def test_write_turntable_odd_size_torch_output_and_stale_frames(tmp_path):
    torch = pytest.importorskip("torch")
    cams = turntable_cameras(np.zeros(3), 2.0, 0.5, 5, width=75, height_px=61)

    def render(viewmat, K, width, height):
        return torch.full((height, width, 3), 0.5)

    write_turntable(tmp_path, lambda v, K, w, h: np.ones((h, w, 3)), cams + cams, size=(75, 61))
    res = write_turntable(tmp_path, render, cams, label="AI-generated", size=(75, 61))
    assert (res["width"], res["height"], res["mp4_width"], res["mp4_height"]) == (75, 61, 76, 62)
    assert sorted(p.name for p in (tmp_path / "turntable").iterdir()) == [f"{i:03d}.png" for i in range(5)]
    cap = cv2.VideoCapture(res["mp4"])
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (76, 62)
    cap.release()
    assert cv2.imread(str(tmp_path / "turntable" / "000.png")).shape == (61, 75, 3)


def test_write_turntable_refuses_bad_render_output(tmp_path):
    cams = turntable_cameras(np.zeros(3), 2.0, 0.5, 3, width=64, height_px=48)
    with pytest.raises(PreviewError, match="frame 0.*shape") as e:
        write_turntable(tmp_path, lambda v, K, w, h: np.zeros((h, w)), cams)
    assert e.value.frame == 0
    assert not list(tmp_path.rglob("*.partial")) and not (tmp_path / "turntable.mp4").exists()
    with pytest.raises(PreviewError, match="label"):
        write_turntable(tmp_path, lambda v, K, w, h: np.zeros((h, w, 3)), cams, label="")
    with pytest.raises(PreviewError, match="no cameras"):
        write_turntable(tmp_path, lambda v, K, w, h: np.zeros((h, w, 3)), [])
