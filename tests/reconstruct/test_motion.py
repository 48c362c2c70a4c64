"""Motion: multi-view triangulation with outliers, and surface points tracked through a rendered take.

Run with ``-s`` to see the accuracy figures of the small render.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from reconstruct.inputs import GroundTruth, ReconstructError, write_cameras
from reconstruct.motion import (
    MOTION_SCHEMA,
    MotionOptions,
    MotionProgress,
    frame_times,
    run_motion,
    score_motion,
    triangulate_points,
)
from rigs.errors import ShapeError
from rigs.geometry import Camera
from rigs.rigfile import load_rig
from rigs.virtual.motion import default_clip
from rigs.virtual.person import build_person
from rigs.virtual.render import RenderOptions, run_render

#: the cameras the person turns through (from facing -y to facing +x), on all three rings
CAMERAS = ("cam01", "cam02", "cam09", "cam10", "cam17", "cam18")
SCALE = 0.5
#: the clip always spans the whole turn: 12 frames keep a frame's rotation under 15 degrees
FRAMES = 12
#: bounds for this half-size render with 6 cameras (the issue's 5 mm median is for 24 cameras at
#: full size, measured by benchmarks/motion.py)
MEDIAN_MM = 6.0
P90_MM = 20.0
TAKE = "motion-001"


def _options(**kw) -> MotionOptions:
    """Options for the half-size render: 4 views (of 6 cameras) make a new point."""
    from dataclasses import replace

    return replace(MotionOptions().scaled(SCALE), **{"min_new_views": 4, **kw})


def _rig_cameras() -> list[Camera]:
    return load_rig("virtual-ring-24").cameras


# ----------------------------------------------------------------------------- triangulation


def _synthetic(n: int, seed: int = 0):
    cams = _rig_cameras()[:12]
    rng = np.random.default_rng(seed)
    X = rng.uniform([-0.3, -0.3, 0.2], [0.3, 0.3, 1.8], (n, 3))  # [N, 3] in the capture volume
    uv = np.stack([c.project(X)[0] for c in cams])  # [C, N, 2]
    return cams, X, uv, rng


def test_triangulate_points_is_exact_on_exact_projections():
    cams, X, uv, rng = _synthetic(200)
    uv[rng.random(uv.shape[:2]) < 0.5] = np.nan  # each camera sees about half of the points
    seen = np.isfinite(uv[..., 0]).sum(axis=0)
    tri = triangulate_points(cams, list(uv), min_views=2)
    ok = seen >= 2
    assert np.isfinite(tri.points[ok]).all() and np.isnan(tri.points[~ok]).all()
    np.testing.assert_allclose(tri.points[ok], X[ok], atol=1e-9)
    assert (tri.views[ok] == seen[ok]).all()  # every view is an inlier
    assert np.nanmax(tri.errors_px) < 1e-6 and np.nanmax(tri.rms_px) < 1e-6
    assert tri.points.shape == (200, 3) and tri.inliers.shape == (200, 12) and tri.errors_px.shape == (200, 12)


def test_triangulate_points_rejects_outliers():
    cams, X, uv, rng = _synthetic(400, seed=1)
    uv = uv + rng.normal(0, 0.3, uv.shape)  # 0.3 px of localisation noise
    visible = rng.random(uv.shape[:2]) < 0.6
    uv[~visible] = np.nan
    outlier = visible & (rng.random(uv.shape[:2]) < 0.2)  # 20 % gross errors of 5..40 px
    shift = rng.uniform(5, 40, outlier.sum())[:, None] * _unit(rng, int(outlier.sum()))
    uv[outlier] += shift
    tri = triangulate_points(cams, list(uv), threshold_px=1.5, min_views=3)
    good = np.isfinite(tri.points).all(axis=1)
    inliers = tri.inliers.T  # [C, N]
    # where the good views are the majority (at least 3), every gross error is rejected and the good views kept
    clean = ((visible & ~outlier).sum(axis=0) >= 3) & ((visible & ~outlier).sum(axis=0) > outlier.sum(axis=0))
    assert clean.mean() > 0.85
    assert good[clean].all() and not (inliers & outlier)[:, clean].any()
    assert inliers[visible & ~outlier & clean[None, :]].mean() > 0.99
    err = np.linalg.norm(tri.points[clean] - X[clean], axis=1)
    assert np.median(err) < 1e-3 and err.max() < 5e-3  # metres: about 0.3 px at 3 m, averaged over views
    # a point whose views disagree has too few inliers: NaN, not a wrong point
    assert (tri.views[~good] == 0).all() and ((visible & ~outlier).sum(axis=0)[~good] < 3).all()


def test_triangulate_points_checks_its_input():
    cams, X, uv, _ = _synthetic(5)
    with pytest.raises(ShapeError):
        triangulate_points(cams, list(uv[:3]))  # one array per camera
    with pytest.raises(ShapeError):
        triangulate_points(cams, [u[:, :1] for u in uv])
    with pytest.raises(ShapeError):
        triangulate_points([], [])
    # a view from behind the camera never counts
    behind = cams[0].pose.center + 2 * (cams[0].pose.center - X[0])
    uv2 = np.stack([c.project(np.vstack([X[:1], behind[None]]))[0] for c in cams[:2]])
    tri = triangulate_points(cams[:2], list(uv2), min_views=2)
    assert np.isfinite(tri.points[0]).all() and np.isnan(tri.points[1]).all()


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi, n)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


# ----------------------------------------------------------------------------- a rendered take


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    out = tmp_path_factory.mktemp("motion") / "render"
    run_render("virtual-ring-24", out, RenderOptions(takes=("motion",), frames=FRAMES, scale=SCALE, cameras=CAMERAS,
                                                     workers=2))  # about 20 s on 2 cores
    return out


@pytest.fixture(scope="module")
def tracked(render, tmp_path_factory):
    out = tmp_path_factory.mktemp("motion-out")
    events: list[MotionProgress] = []
    report = run_motion(render, render / "gt" / "cameras.json", out, _options(), on_event=events.append)
    return report, events


def test_run_motion_tracks_surface_points_against_ground_truth(tracked):
    report, events = tracked
    s = report.score
    live = np.isfinite(report.points).all(axis=2)  # [T, N]
    print(f"\nmotion {SCALE}x, {len(CAMERAS)} cameras, {FRAMES} frames: {report.points.shape[1]} tracks, "
          f"{live.sum(1).tolist()} per frame, median {s.median_mm:.2f} mm, p90 {s.p90_mm:.2f} mm, "
          f"kept {s.kept_fraction:.2f}, median views {np.median(report.views[live]):.0f}, {report.seconds:.1f} s")
    assert report.take == TAKE and report.frames == list(range(FRAMES))
    assert s is not None and s.samples == live.sum()
    assert s.median_mm < MEDIAN_MM and s.p90_mm < P90_MM
    assert np.nanmedian(s.errors_m[-1]) * 1e3 < MEDIAN_MM  # no worse at the end of the take
    assert live[0].sum() >= 20 and live.sum(axis=1).min() >= 20  # points in every frame ...
    assert s.kept_fraction >= 0.15  # ... some followed from the first frame to the last ...
    assert (live.sum(axis=0) >= FRAMES // 2).sum() >= 20  # ... and many over half the take
    # a track id is one surface point: alive over one unbroken run of frames, never revived
    first, last = live.argmax(axis=0), len(live) - 1 - live[::-1].argmax(axis=0)
    runs = live.sum(axis=0)
    assert (runs == last - first + 1).all()
    assert (report.views[live] >= MotionOptions().min_views).all()
    assert np.all(report.rms_px[live] <= _options().reprojection_px)
    np.testing.assert_allclose(report.times, np.arange(FRAMES) / 24.0)
    assert [e.done for e in events] == list(range(1, FRAMES + 1)) and events[-1].tracks == live[-1].sum()
    assert report.cameras_used == list(CAMERAS) and not report.cameras_skipped and not report.views_skipped


def test_motion_outputs_agree(tracked):
    report, _ = tracked
    with np.load(report.npz_path) as z:
        np.testing.assert_array_equal(z["points"], report.points)
        np.testing.assert_array_equal(z["times"], report.times)
        np.testing.assert_array_equal(z["frames"], report.frames)
        np.testing.assert_array_equal(z["track_ids"], report.track_ids)
        np.testing.assert_array_equal(z["views"], report.views)
        assert z["points"].shape == (FRAMES, len(report.track_ids), 3) and list(z["cameras"]) == list(CAMERAS)
        points, views, rms, times = z["points"], z["views"], z["rms_px"], z["times"]
    with report.csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["track", "frame", "time_s", "x", "y", "z", "views", "rms_px"]
    live = np.isfinite(points).all(axis=2)
    assert len(rows) == live.sum()  # one row per track per frame it is tracked in
    for row in rows:
        n, k = int(row["track"]), int(row["frame"])
        assert [float(row[a]) for a in "xyz"] == points[k, n].tolist()  # the same numbers, exactly
        assert float(row["time_s"]) == times[k] and int(row["views"]) == views[k, n]
        assert float(row["rms_px"]) == float(rms[k, n])
    doc = json.loads(report.manifest_path.read_text())
    assert doc["schema"] == MOTION_SCHEMA and doc["version"] == 1
    assert doc["take"] == TAKE and doc["frames"] == FRAMES and doc["tracks"] == len(report.track_ids)
    assert doc["cameras_used"] == list(CAMERAS) and doc["cameras_skipped"] == {} and doc["time_source"] == "fps"
    assert doc["ground_truth"]["median_mm"] == pytest.approx(report.score.median_mm, abs=1e-3)
    assert doc["tracks_per_frame"] == live.sum(axis=1).tolist()
    assert doc["options"]["min_new_views"] == 4 and doc["options"]["patch_half"] == _options().patch_half


def test_score_motion_is_zero_on_true_trajectories(render):
    """The scorer itself: surface points carried by their parts score 0, a shifted copy its shift."""
    rig = load_rig(render / "rig.toml")
    person = build_person(rig.virtual.seed)
    clip = default_clip(FRAMES, rig.motion.fps)
    posed = [person.pose(clip.params(f)) for f in range(FRAMES)]
    tri = np.random.default_rng(3).choice(len(person.triangles), 300, replace=False)
    part = person.triangle_part[tri]
    joint = [person.parts[p].joint for p in part]
    pts = np.full((FRAMES, 300, 3), np.nan)
    for n, (t, j) in enumerate(zip(tri, joint)):
        x0 = posed[0].vertices[person.triangles[t]].mean(axis=0)  # a triangle's centroid: on the surface
        G0 = posed[0].joint_transforms[j]
        local = np.linalg.solve(G0[:3, :3], x0 - G0[:3, 3])
        for f in range(FRAMES):
            G = posed[f].joint_transforms[j]
            pts[f, n] = G[:3, :3] @ local + G[:3, 3]
    pts[3:, :100] = np.nan  # a third of the tracks lost after frame 2
    gt = GroundTruth.find(render)
    s = score_motion(pts, list(range(FRAMES)), gt, TAKE)
    assert s.median_mm < 1e-3 and s.p90_mm < 1e-3
    assert s.kept_fraction == pytest.approx(200 / 300) and s.samples == 3 * 300 + (FRAMES - 3) * 200
    assert np.isnan(s.errors_m[3:, :100]).all()
    # points 3 mm off the surface (along the outward normal), carried rigidly: 3 mm in every frame
    off = pts.copy()
    for n, t in enumerate(tri):
        a, b, c = posed[0].vertices[person.triangles[t]]
        normal = np.cross(b - a, c - a)
        normal /= np.linalg.norm(normal)
        G0 = posed[0].joint_transforms[joint[n]]
        if normal @ (pts[0, n] - G0[:3, 3]) < 0:
            normal = -normal  # outwards: away from the part's joint
        local = np.linalg.solve(G0[:3, :3], pts[0, n] + 0.003 * normal - G0[:3, 3])
        for f in range(FRAMES):
            G = posed[f].joint_transforms[joint[n]]
            off[f, n] = np.where(np.isfinite(pts[f, n]), G[:3, :3] @ local + G[:3, 3], np.nan)
    s = score_motion(off, list(range(FRAMES)), gt, TAKE)
    assert s.median_mm == pytest.approx(3.0, abs=0.05)
    with pytest.raises(ShapeError):
        score_motion(pts[:, :, :2], list(range(FRAMES)), gt, TAKE)


# ----------------------------------------------------------------------------- bad input


def _small_root(render, tmp_path, cameras=("cam01", "cam09", "cam17"), frames=2):
    """A copy of part of the render: a few cameras, the first frames."""
    root = tmp_path / "root"
    for cam in cameras:
        d = root / "takes" / TAKE / cam
        d.mkdir(parents=True)
        for f in range(frames):
            shutil.copy(render / "takes" / TAKE / cam / f"{f:06d}.jpg", d)
    shutil.copy(render / "rig.toml", root / "rig.toml")
    return root


def test_cameras_missing_from_the_calibration_are_skipped(render, tmp_path):
    root = _small_root(render, tmp_path, cameras=("cam01", "cam02", "cam09", "cam17"))
    cams = GroundTruth.find(render).cameras()
    path = write_cameras(tmp_path / "cameras.json", [cams[c] for c in ("cam01", "cam09", "cam17")])
    report = run_motion(root, path, tmp_path / "out", _options(min_new_views=3))
    assert report.cameras_skipped == {"cam02": f"not in {path}"} and report.cameras_used == ["cam01", "cam09", "cam17"]
    assert report.score is None  # no ground truth beside this copy
    assert json.loads(report.manifest_path.read_text())["cameras_skipped"] == {"cam02": f"not in {path}"}
    assert np.isfinite(report.points).all(axis=2).sum() > 0
    path1 = write_cameras(tmp_path / "one.json", [cams["cam01"]])
    with pytest.raises(ReconstructError, match=r"1 usable calibrated camera\(s\) \(cam01\).*cam09") as err:
        run_motion(root, path1, tmp_path / "out1")
    assert err.value.facts["take"] == TAKE and err.value.exit_code == 2
    assert not (tmp_path / "out1").exists()  # nothing written before the input is checked


def test_corrupt_and_missing_frames_skip_the_view(render, tmp_path):
    root = _small_root(render, tmp_path, frames=3)
    (root / "takes" / TAKE / "cam09" / "000001.jpg").write_bytes(b"not a jpeg")
    (root / "takes" / TAKE / "cam17" / "000002.jpg").unlink()
    report = run_motion(root, render / "gt" / "cameras.json", tmp_path / "out", _options())
    # no manifest beside this copy: every frame is decoded before use, the broken one left out
    bad = root / "takes" / TAKE / "cam09" / "000001.jpg"
    assert list(report.left_out) == [str(bad)] and report.left_out[str(bad)].startswith("cannot be decoded")
    assert report.views_skipped == [{"camera": "cam09", "frame": 1, "reason": f"left out: {report.left_out[str(bad)]}"},
                                    {"camera": "cam17", "frame": 2, "reason": "missing"}]
    assert report.frames == [0, 1, 2] and report.time_source == "fps"
    doc = json.loads(report.manifest_path.read_text())
    assert doc["views_skipped"] == report.views_skipped and doc["left_out"] == report.left_out


def test_intrinsics_follow_the_image_size_and_another_aspect_skips_the_camera(render, tmp_path):
    from rigs.geometry import Intrinsics

    root = _small_root(render, tmp_path)
    half = GroundTruth.find(render).cameras()
    used = ("cam01", "cam09", "cam17")
    # calibrated at 1280x960, the render is half that: the intrinsics follow the images, exactly
    double = [Camera(c, half[c].intrinsics.scaled(2.0), half[c].pose) for c in used]
    opts = _options(min_new_views=3)
    report = run_motion(root, write_cameras(tmp_path / "full.json", double), tmp_path / "full", opts)
    ref = run_motion(root, write_cameras(tmp_path / "half.json", [half[c] for c in used]), tmp_path / "half", opts)
    assert report.cameras_used == list(used) and report.cameras_skipped == {}
    assert report.rescaled == {c: "1280x960 -> 640x480" for c in used}
    assert report.points.shape == ref.points.shape and report.points.shape[1] > 0
    np.testing.assert_allclose(report.points, ref.points, atol=1e-6)
    # another aspect ratio (a cropped sensor mode, not a resize): the camera goes whole
    wide = {c: Camera(c, Intrinsics(1280, 720, *[getattr(double[i].intrinsics, k) for k in ("fx", "fy", "cx", "cy")],
                                    double[i].intrinsics.dist), double[i].pose) for i, c in enumerate(used)}
    with pytest.raises(ReconstructError, match=r"0 usable .*cam01 \(size 640x480, calibrated for 1280x720 "
                                               r"\(another aspect ratio\)\)") as err:
        run_motion(root, write_cameras(tmp_path / "wide.json", wide.values()), tmp_path / "out")
    assert err.value.facts["take"] == TAKE and not (tmp_path / "out").exists()
    # one camera of the wrong aspect is skipped, the others tracked
    mixed = [wide["cam01"]] + [half[c] for c in ("cam09", "cam17")]
    report = run_motion(root, write_cameras(tmp_path / "mixed.json", mixed), tmp_path / "out",
                        MotionOptions(max_frames=1))
    assert report.cameras_used == ["cam09", "cam17"] and list(report.cameras_skipped) == ["cam01"]


def test_takes_without_frames_or_cameras(render, tmp_path):
    root = tmp_path / "empty"
    (root / "takes" / TAKE / "cam01").mkdir(parents=True)
    with pytest.raises(ReconstructError, match="no frames") as err:
        run_motion(root, render / "gt" / "cameras.json", tmp_path / "out")
    assert err.value.facts["take"] == TAKE
    with pytest.raises(ReconstructError, match="no take 'motion-009'"):
        run_motion(render, render / "gt" / "cameras.json", tmp_path / "out", MotionOptions(take="motion-009"))
    with pytest.raises(ReconstructError, match="no motion take"):
        run_motion(tmp_path, render / "gt" / "cameras.json", tmp_path / "out")
    with pytest.raises(ReconstructError, match="no cameras file"):
        run_motion(render, tmp_path / "nope.json", tmp_path / "out")
    with pytest.raises(ReconstructError, match="no camera\\(s\\) cam05"):
        run_motion(render, render / "gt" / "cameras.json", tmp_path / "out", MotionOptions(cameras=("cam01", "cam05")))
    with pytest.raises(ReconstructError) as err:
        MotionOptions(min_views=1)
    assert err.value.facts["option"] == "min_views"


def test_frame_times_prefer_the_session_trigger_times(tmp_path):
    from capture.session import FramePlan, FrameRecord, SessionManifest, TakeRecord

    take = TakeRecord(id=TAKE, kind="motion", cameras=["cam01", "cam02"], started_at=100.0,
                      frames=[FramePlan(index=i, time=i / 24) for i in range(3)])
    for cam, skew in (("cam01", 0.0), ("cam02", 0.002)):
        take.captured[cam] = {i: FrameRecord(path=f"takes/{TAKE}/{cam}/{i:06d}.jpg", sha256="0", size=1,
                                             trigger_time=1000.0 + i * 0.05 + skew) for i in range(3)}
    m = SessionManifest(subject_id="s", rig="virtual-ring-24", rig_sha256="0", created_at=0.0, takes={TAKE: take})
    (tmp_path / "session.json").write_text(json.dumps(m.model_dump(mode="json", by_alias=True)))
    t, source = frame_times(tmp_path, TAKE, [0, 1, 2])
    assert source == "trigger"
    np.testing.assert_allclose(t, [0.0, 0.05, 0.1])  # medians across cameras, from the first frame
    del take.captured["cam01"][2]
    take.captured["cam02"][2] = take.captured["cam02"][2].model_copy(update={"trigger_time": None})
    (tmp_path / "session.json").write_text(json.dumps(m.model_dump(mode="json", by_alias=True)))
    t, source = frame_times(tmp_path, TAKE, [0, 1, 2])
    assert source == "plan"
    np.testing.assert_allclose(t, [0.0, 1 / 24, 2 / 24])
    t, source = frame_times(tmp_path / "elsewhere", TAKE, [4, 6])
    assert source == "assumed"
    np.testing.assert_allclose(t, [0.0, 2 / 24])
