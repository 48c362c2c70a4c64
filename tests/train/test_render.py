"""Views of a twin from its bundle: framing, rig-camera geometry, folder and archive alike, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from rigs.geometry import Camera, Intrinsics, look_at
from train.render import (RenderError, camera_file_views, load_bundle_twin, orbit_views, render_views, rig_views,
                          subject_box)
from train.splat_ply import SplatParams


def _person_like(n: int = 3000, seed: int = 0) -> SplatParams:
    """A 1.7 m tall, 0.4 m wide column of opaque Gaussians standing on z = 0, plus faint floaters far out."""
    rng = np.random.default_rng(seed)
    body = np.c_[rng.uniform(-0.2, 0.2, n), rng.uniform(-0.1, 0.1, n), rng.uniform(0.0, 1.7, n)]
    floaters = rng.uniform(-3, 3, (50, 3))
    means = np.r_[body, floaters]
    logits = np.r_[np.full(n, 3.0), np.full(50, -4.0)]
    m = len(means)
    return SplatParams(means=means, log_scales=np.full((m, 3), -4.0), quats=np.tile([1.0, 0, 0, 0], (m, 1)),
                       opacity_logits=logits, sh_dc=rng.normal(0, 0.5, (m, 3)), sh_rest=np.zeros((m, 0, 3)))


def _project(view, pts):
    cam = (np.c_[pts, np.ones(len(pts))] @ view.viewmat.T)[:, :3]
    uv = cam[:, :2] / cam[:, 2:3] * [view.K[0, 0], view.K[1, 1]] + [view.K[0, 2], view.K[1, 2]]
    return uv, cam[:, 2]


def test_orbit_views_frame_the_whole_subject_and_ignore_floaters():
    p = _person_like()
    lo, hi = subject_box(p)
    assert np.all(lo > [-0.25, -0.15, -0.05]) and np.all(hi < [0.25, 0.15, 1.75])  # floaters left out
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    views = orbit_views(p, 8, 512)
    assert [v.name for v in views] == [f"orbit-{i:03d}" for i in range(8)]
    for v in views:
        uv, depth = _project(v, corners)
        assert (depth > 0).all()
        assert uv.min() > 0.02 * 512 and uv.max() < 0.98 * 512, (v.name, uv.min(), uv.max())
        # the subject is not lost in the frame: its height covers at least half of the image
        assert np.ptp(uv[:, 1]) > 0.5 * 512


def test_a_rig_view_is_the_cameras_own_image_cropped_square():
    """A rig view of size H is the camera's own H-tall image (principal point at the centre), cropped square."""
    p = _person_like(1500)
    intr = Intrinsics(160, 120, 150.0, 150.0, 79.5, 59.5)
    cam = Camera("camA", intr, look_at(np.array([3.0, 0.5, 1.0]), np.array([0.0, 0.0, 0.85])))
    (view,) = rig_views({"camA": cam}, 120)
    _, square = next(render_views(p, [view]))
    from train.exports import render_splat

    K = np.array([[150.0, 0, 80.0], [0, 150.0, 60.0], [0, 0, 1]])  # pixel centres at +0.5
    full = render_splat(p, cam.pose.matrix, K, 160, 120, background=(1.0, 1.0, 1.0))
    full8 = np.clip(np.rint(full * 255), 0, 255).astype(np.uint8)
    assert np.abs(square.astype(int) - full8[:, 20:140].astype(int)).max() <= 1
    assert (square[0, 0] == 255).all()  # white background
    assert (square < 250).any()  # and the subject is in it


def test_unknown_cameras_and_bad_sizes_are_refused(tmp_path):
    cams = {"cam01": Camera("cam01", Intrinsics(64, 48, 60.0, 60.0, 31.5, 23.5),
                            look_at(np.array([2.0, 0, 1]), np.zeros(3)))}
    with pytest.raises(RenderError, match="no camera 'cam99' in the bundle"):
        rig_views(cams, 64, ["cam99"])
    with pytest.raises(RenderError, match="image size 9 px"):
        rig_views(cams, 9)
    with pytest.raises(RenderError, match="orbit needs at least 1 view"):
        orbit_views(_person_like(100), 0, 64)
    (tmp_path / "cams.json").write_text("{")
    with pytest.raises(RenderError, match="cams.json"):
        camera_file_views(tmp_path / "cams.json", 64)


def test_a_bundle_folder_and_its_archive_give_the_same_twin(tmp_path):
    from tests.handoff.sessions import make_session
    from train.handoff.bundle import BundleOptions, build_bundle
    from train.handoff.integrity import init_keys

    session = make_session(tmp_path / "session")
    key, _ = init_keys(tmp_path / "keys")
    folder = build_bundle(session, tmp_path / "b", BundleOptions(key=key, generation_kit=False)).path
    tar = build_bundle(session, tmp_path / "b.tar", BundleOptions(key=key, generation_kit=False)).path
    a, b = load_bundle_twin(folder), load_bundle_twin(tar)
    assert a.manifest_bytes == b.manifest_bytes and a.manifest_sha256 == b.manifest_sha256
    assert np.array_equal(a.params.means, b.params.means) and sorted(a.cameras) == sorted(b.cameras)
    assert a.manifest["subject"]["id"] == "subj-007"
    (folder / "splat" / "splat.ply").unlink()
    with pytest.raises(RenderError, match="the bundle has no splat/splat.ply"):
        load_bundle_twin(folder)
    with pytest.raises(RenderError, match="no such bundle"):
        load_bundle_twin(tmp_path / "nothing")
