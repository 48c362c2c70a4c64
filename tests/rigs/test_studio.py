"""The virtual studio's renders agree with their ground truth and with OpenCV."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import open3d as o3d
import pytest

from rigs.fileio import sha256_file
from rigs.geometry import Camera, Pose
from rigs.rigfile import load_rig
from rigs.virtual.board import board_poses
from rigs.virtual.motion import default_clip
from rigs.virtual.render import DEPTH_SCALE, RenderOptions, load_render_manifest, run_render
from rigs.virtual.studio import FrameState, VirtualStudio

SCALE = 0.5  # 640x480 renders of virtual-ring-24


@pytest.fixture(scope="module")
def rig():
    return load_rig("virtual-ring-24")


@pytest.fixture(scope="module")
def studio(rig):
    return VirtualStudio(rig)


def _cam(rig, i: int, scale: float = SCALE) -> Camera:
    c = rig.cameras[i]
    return Camera(c.id, c.intrinsics.scaled(scale), c.pose)


def _project_cv(cam: Camera, pts: np.ndarray) -> np.ndarray:
    rvec, _ = cv2.Rodrigues(cam.pose.R)
    uv, _ = cv2.projectPoints(pts.reshape(-1, 1, 3), rvec, cam.pose.t, cam.intrinsics.K,
                              cam.intrinsics.dist_array)
    return uv.reshape(-1, 2)


@pytest.mark.parametrize("cam_index", [0, 9, 20])
def test_gt_surface_points_land_on_mask_pixels(rig, studio, cam_index):
    """Ground-truth surface points project (cv2.projectPoints) onto subject pixels within 0.5 px."""
    cam = _cam(rig, cam_index)
    posed = studio.person.pose()
    dyn = studio.frame(FrameState(posed))
    img = studio.render(studio.view(cam), dyn, rig.preset_steps("flat")[0], noise=False)
    pts = studio.person.surface_samples(posed, 20000, seed=1)
    uv = _project_cv(cam, pts)
    z = cam.pose.transform(pts)[:, 2]
    px = np.round(uv).astype(int)
    h, w = img.mask.shape
    inside = (px[:, 0] >= 1) & (px[:, 0] < w - 1) & (px[:, 1] >= 1) & (px[:, 1] < h - 1)
    px, z, uv = px[inside], z[inside], uv[inside]
    # visible points: not hidden behind other surfaces (rendered depth at the pixel matches)
    visible = np.abs(img.depth[px[:, 1], px[:, 0]] - z) < 0.004
    assert visible.sum() > 2000
    hits = img.mask[px[visible, 1], px[visible, 0]]
    assert hits.mean() > 0.995, f"only {hits.mean():.4f} of visible GT points land on mask pixels"
    # the few misses are silhouette points: a mask pixel centre lies within 0.5 px (L-inf) + rounding
    for (u, v) in uv[visible][~hits]:
        window = img.mask[int(np.floor(v)):int(np.floor(v)) + 2, int(np.floor(u)):int(np.floor(u)) + 2]
        assert window.any(), (u, v)


def test_depth_backprojects_onto_the_gt_mesh_and_reprojects_exactly(rig, studio):
    """Mask pixels back-projected with the rendered depth lie on the GT mesh and reproject to their centre."""
    cam = _cam(rig, 4)
    posed = studio.person.pose(default_clip().params(12))
    img = studio.render(studio.view(cam), studio.frame(FrameState(posed)), rig.preset_steps("flat")[0])
    v, u = np.nonzero(img.mask)
    pix = np.stack([u, v], axis=1).astype(np.float64)
    # independent back-projection: OpenCV's undistortPoints, not rigs.geometry
    xy = cv2.undistortPointsIter(pix.reshape(-1, 1, 2), cam.intrinsics.K, cam.intrinsics.dist_array, None, None,
                                 (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-12)).reshape(-1, 2)
    z = img.depth[v, u].astype(np.float64)
    pc = np.concatenate([xy * z[:, None], z[:, None]], axis=1)
    pw = (pc - cam.pose.t) @ cam.pose.R
    scene = o3d.t.geometry.RaycastingScene()
    mesh = posed.to_open3d()
    scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(mesh))
    dist = scene.compute_distance(o3d.core.Tensor(pw.astype(np.float32))).numpy()
    assert np.median(dist) < 1e-4 and np.percentile(dist, 99) < 1e-3, (np.median(dist), dist.max())
    back = _project_cv(cam, pw)
    assert np.abs(back - pix).max() < 0.01


def test_depth_png_matches_an_independent_ray_cast(tmp_path, rig):
    """GT depth on disk equals z-depth from casting OpenCV-undistorted rays at the GT mesh on disk."""
    out = tmp_path / "r"
    res = run_render("virtual-ring-24", out, RenderOptions(takes=("stills",), cameras=("cam03", "cam14"),
                                                            scale=0.25, workers=1))
    assert res.images == 2 * len(rig.preset_steps())
    cams = {c["id"]: Camera.from_dict(c) for c in json.loads((out / "gt" / "cameras.json").read_text())["cameras"]}
    mesh = o3d.io.read_triangle_mesh(str(out / "takes/stills-001/gt/meshes/000000.ply"))
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(mesh))
    for cid, cam in cams.items():
        depth = cv2.imread(str(out / f"takes/stills-001/gt/{cid}/000000.depth.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(out / f"takes/stills-001/gt/{cid}/000000.mask.png"), cv2.IMREAD_UNCHANGED) > 0
        assert depth.dtype == np.uint16 and depth.shape == mask.shape == (240, 320)
        v, u = np.mgrid[0:240, 0:320]
        pix = np.stack([u.ravel(), v.ravel()], 1).astype(np.float64)
        xy = cv2.undistortPointsIter(pix.reshape(-1, 1, 2), cam.intrinsics.K, cam.intrinsics.dist_array, None,
                                     None, (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-12))
        d_cam = np.concatenate([xy.reshape(-1, 2), np.ones((len(pix), 1))], axis=1)
        d_cam /= np.linalg.norm(d_cam, axis=1, keepdims=True)
        rays = np.concatenate([np.broadcast_to(cam.pose.center, d_cam.shape), d_cam @ cam.pose.R], 1)
        t = scene.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))["t_hit"].numpy()
        z_gt = t * d_cam[:, 2]
        hit = np.isfinite(z_gt).reshape(240, 320)
        both = hit & mask
        # the mask is exactly where rays meet the subject (a few silhouette pixels may flip)
        assert (hit ^ mask).sum() <= 0.01 * mask.sum() + 3
        z_png = depth[both] / DEPTH_SCALE
        assert np.percentile(np.abs(z_png - z_gt.reshape(240, 320)[both]), 99) < 3e-4
        # per-image depth holds the subject only; the empty studio's depth is written once per camera
        assert not depth[~mask].any()
        backdrop = cv2.imread(str(out / f"takes/stills-001/gt/{cid}/backdrop.depth.png"), cv2.IMREAD_UNCHANGED)
        assert backdrop.dtype == np.uint16 and (backdrop[~mask] > 0).mean() > 0.9
        assert (backdrop[mask].astype(int) > depth[mask]).all()  # the subject stands in front of it


def test_board_corners_are_detected_where_they_project(rig, studio):
    """The rendered ChArUco board is detected by OpenCV at the projected GT corner positions."""
    poses = board_poses(studio.board, rig.volume, rig.calibration.poses, seed=rig.virtual.seed)
    detector = cv2.aruco.CharucoDetector(studio.board.cv_board)
    errors, raw = [], []
    for bp in poses[:6]:
        dyn = studio.frame(FrameState(None, bp))
        corners_w = studio.board.corners @ bp.R.T + bp.t
        normal = bp.R[:, 2]
        for i in range(len(rig.cameras)):
            cam = rig.cameras[i]
            if np.dot(cam.pose.center - corners_w.mean(0), -normal) < 1.5:  # faces the printed side
                continue
            img = studio.render(studio.view(cam), dyn, rig.preset_steps("flat")[0], noise_key=i)
            gray = cv2.cvtColor(img.rgb, cv2.COLOR_RGB2GRAY)
            cc, ids, _, _ = detector.detectBoard(gray)
            if ids is None or len(ids) < 10:
                continue
            gt = _project_cv(cam, corners_w[ids.ravel()])
            raw.append(np.linalg.norm(cc.reshape(-1, 2) - gt, axis=1))
            # CharucoDetector's corners sit ~0.45 px right of and below the true saddle points
            # (its own convention, seen on its generated board images too); cornerSubPix,
            # started from them, finds the saddle points of the rendered board
            fine = cv2.cornerSubPix(gray, cc.astype(np.float32), (5, 5), (-1, -1),
                                    (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_COUNT, 100, 1e-4))
            errors.append(np.linalg.norm(fine.reshape(-1, 2) - gt, axis=1))
            break
    assert len(errors) >= 4, "the board should be detected in most poses"
    err = np.concatenate(errors)
    assert np.percentile(np.concatenate(raw), 95) < 1.0
    assert np.median(err) < 0.15 and np.percentile(err, 95) < 0.4, (np.median(err), err.max())


def test_render_is_deterministic_and_noisy(rig, studio):
    cam = _cam(rig, 2, 0.25)
    view = studio.view(cam)
    dyn = studio.frame(FrameState(studio.person.pose()))
    step = rig.preset_steps("flat")[0]
    a = studio.render(view, dyn, step, noise_key=5)
    b = studio.render(view, dyn, step, noise_key=5)
    c = studio.render(view, dyn, step, noise_key=6)
    clean = studio.render(view, dyn, step, noise=False)
    assert np.array_equal(a.rgb, b.rgb)
    assert not np.array_equal(a.rgb, c.rgb)
    diff = a.rgb.astype(float) - clean.rgb.astype(float)
    unclipped = (clean.rgb > 10) & (clean.rgb < 245)
    assert abs(diff[unclipped].std() - rig.virtual.noise_sigma) < 0.3


def test_each_lighting_step_lights_the_subject_differently(rig, studio):
    cam = _cam(rig, 0, 0.25)
    view = studio.view(cam)
    dyn = studio.frame(FrameState(studio.person.pose()))
    means, images = {}, {}
    for step in rig.preset_steps():
        img = studio.render(view, dyn, step, noise=False)
        means[step.name] = img.rgb[img.mask].astype(float).mean(axis=0)
        images[step.name] = img.rgb.astype(float)
    names = list(means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(images[names[i]] - images[names[j]]).mean() > 1.0, (names[i], names[j])
    # cam01 stands in front; the rim lights sit behind the subject and light little of its front
    assert means["olat-front"].mean() > means["olat-rim-l"].mean()


def test_subject_casts_a_shadow_on_the_floor(rig, studio):
    cam = _cam(rig, 20, 0.25)
    view = studio.view(cam)
    step = rig.preset_steps("olat")[0]
    with_subject = studio.render(view, studio.frame(FrameState(studio.person.pose())), step, noise=False)
    empty = studio.render(view, studio.frame(FrameState()), step, noise=False)
    darker = (with_subject.rgb.astype(int).sum(2) < empty.rgb.astype(int).sum(2) - 15) & ~with_subject.mask
    assert darker.sum() > 50


def test_rest_and_motion_frames_differ_and_mask_matches_depth(rig, studio):
    cam = _cam(rig, 1, 0.25)
    view = studio.view(cam)
    clip = default_clip()
    step = rig.preset_steps("flat")[0]
    a = studio.render(view, studio.frame(FrameState(studio.person.pose(clip.params(0)))), step)
    b = studio.render(view, studio.frame(FrameState(studio.person.pose(clip.params(23)))), step)
    assert (a.mask ^ b.mask).sum() > 200
    # the subject stands in front of the backdrop: subject depth < 3.5 m, backdrop farther
    assert a.depth[a.mask].max() < 3.8 and np.median(a.depth[~a.mask]) > 4.0


def test_run_render_layout_manifest_and_hashes(tmp_path):
    out = tmp_path / "render"
    seen = []
    res = run_render("virtual-ring-24", out,
                     RenderOptions(takes=("calibration", "stills", "motion"), frames=3, scale=0.2,
                                   cameras=("cam01", "cam02"), workers=2),
                     on_event=lambda ev: seen.append(ev))
    assert res.takes == ["calib-001", "stills-002", "motion-003"]
    rig = load_rig("virtual-ring-24")
    per_cam = rig.calibration.poses + len(rig.preset_steps()) + 3
    assert res.images == 2 * per_cam == len(seen) and seen[-1].done == seen[-1].total == res.images
    m = load_render_manifest(out / "render.json")
    assert [t["id"] for t in m.takes] == res.takes
    assert len(m.images) == res.images
    for f in m.images[:: max(1, len(m.images) // 7)]:
        assert sha256_file(out / f.path) == f.sha256
    assert (out / "takes/motion-003/cam02/000002.jpg").exists()
    assert (out / "takes/motion-003/gt/cam02/000002.depth.png").exists()
    assert (out / "takes/motion-003/gt/meshes/000002.ply").exists()
    gt = json.loads((out / "takes/motion-003/gt/frames.json").read_text())
    assert [f["time"] for f in gt["frames"]] == pytest.approx([0, 1 / 24, 2 / 24])
    assert "birthmark" in gt["frames"][1]["landmarks"] and "head" in gt["frames"][1]["joints"]
    calib = json.loads((out / "takes/calib-001/gt/frames.json").read_text())
    assert calib["board"]["squares"] == [10, 7] and "board_to_world" in calib["frames"][0]
    stills = json.loads((out / "takes/stills-002/gt/frames.json").read_text())
    assert [f["step"] for f in stills["frames"]] == [s.name for s in rig.preset_steps()]
    img = cv2.imread(str(out / "takes/stills-002/cam01/000000.jpg"))
    assert img.shape == (192, 256, 3)
    assert not list(out.rglob("*.partial"))


def test_board_pose_is_board_to_world(studio, rig):
    bp = board_poses(studio.board, rig.volume, 3, seed=1)[0]
    assert isinstance(bp, Pose)
    centre = studio.board.corners.mean(0) @ bp.R.T + bp.t
    # the technician walks the board over the stage, beyond the capture volume (reach 1.8 x its radius)
    assert 0.4 < centre[2] < 1.9 and np.hypot(centre[0], centre[1]) < 1.8 * rig.volume.radius


def test_unknown_camera_is_refused_before_writing(tmp_path):
    from rigs.virtual.render import RenderError

    with pytest.raises(RenderError, match="cam99"):
        run_render("virtual-ring-24", tmp_path / "x", RenderOptions(cameras=("cam99",)))
    assert not (tmp_path / "x").exists()


def test_library_rigs_render_a_frame(tmp_path):
    """Every virtual library rig renders (tiny scale, one camera)."""
    for name in ("virtual-ring-24", "virtual-dome-96"):
        res = run_render(name, tmp_path / name, RenderOptions(takes=("stills",), scale=0.1, cameras=("cam05",),
                                                              workers=1, ground_truth=False))
        assert res.images == len(load_rig(name).preset_steps())
        assert Path(res.manifest_path).exists()
