"""Camera geometry: projection against OpenCV, distortion inverse, rays, look_at, conventions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rigs.errors import ShapeError
from rigs.geometry import (Camera, Intrinsics, Pose, distort, look_at, nerfstudio_c2w_to_opencv,
                           opencv_to_nerfstudio_c2w, pixel_rays, project_points, rotation_angle_deg,
                           undistort)
from rigs.rigfile import library_rigs, load_rig


def _library_cameras() -> list[Camera]:
    cams: list[Camera] = []
    for path in library_rigs():
        cams += load_rig(path).cameras
    return cams


LIBRARY_CAMERAS = _library_cameras()


def _strong_distortions(n: int, seed: int = 0) -> list[tuple[float, ...]]:
    """Random distortions stronger than the library's, all five terms non-zero."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k1 = rng.uniform(-0.3, 0.3)
        k2 = rng.uniform(-0.1, 0.1)
        p1, p2 = rng.uniform(-0.01, 0.01, size=2)
        k3 = rng.uniform(-0.05, 0.05)
        out.append((k1, k2, p1, p2, k3))
    return out


STRONG = _strong_distortions(12)


def _random_pose(rng: np.random.Generator) -> Pose:
    pos = rng.uniform(-3, 3, size=3) + np.array([0.0, 0.0, 1.5])
    target = rng.uniform(-0.5, 0.5, size=3) + np.array([0.0, 0.0, 1.0])
    return look_at(pos, target)


def _points_in_view(intr: Intrinsics, pose: Pose, n: int, rng: np.random.Generator,
                    margin: float = 0.0) -> np.ndarray:
    """World points [n, 3] in front of the camera whose pinhole projection falls in the image."""
    u = rng.uniform(-margin, intr.width - 1 + margin, n)
    v = rng.uniform(-margin, intr.height - 1 + margin, n)
    z = rng.uniform(0.3, 8.0, n)
    pc = np.stack([(u - intr.cx) / intr.fx * z, (v - intr.cy) / intr.fy * z, z], axis=-1)
    return (pc - pose.t) @ pose.R  # R^T (pc - t)


def _cv2_project(points: np.ndarray, intr: Intrinsics, pose: Pose) -> np.ndarray:
    rvec, _ = cv2.Rodrigues(pose.R)
    uv, _ = cv2.projectPoints(points.reshape(-1, 1, 3), rvec, pose.t.reshape(3, 1), intr.K,
                              intr.dist_array)
    return uv.reshape(-1, 2)


# --------------------------------------------------------------------------- projection


@pytest.mark.parametrize("cam", LIBRARY_CAMERAS[::7], ids=lambda c: c.id)
def test_projection_equals_cv2_library_cameras(cam: Camera) -> None:
    rng = np.random.default_rng(1)
    pts = _points_in_view(cam.intrinsics, cam.pose, 200, rng)
    uv, z = cam.project(pts)
    assert np.all(z > 0)
    np.testing.assert_allclose(uv, _cv2_project(pts, cam.intrinsics, cam.pose), rtol=0, atol=1e-9)


def test_projection_equals_cv2_every_library_distortion() -> None:
    rng = np.random.default_rng(2)
    dists = {c.intrinsics.dist for c in LIBRARY_CAMERAS}
    assert len(dists) > 10  # the virtual rigs give each camera its own lens
    for dist in dists:
        intr = Intrinsics(1280, 960, 1040.0, 1045.0, 641.3, 478.9, dist)
        pose = _random_pose(rng)
        pts = _points_in_view(intr, pose, 50, rng)
        uv, _ = project_points(pts, intr, pose)
        np.testing.assert_allclose(uv, _cv2_project(pts, intr, pose), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dist", STRONG, ids=[f"strong{i}" for i in range(len(STRONG))])
def test_projection_equals_cv2_strong_distortion(dist: tuple[float, ...]) -> None:
    rng = np.random.default_rng(3)
    intr = Intrinsics(800, 600, 620.0, 615.0, 402.5, 297.25, dist)  # type: ignore[arg-type]
    pose = _random_pose(rng)
    pts = _points_in_view(intr, pose, 300, rng, margin=50.0)
    uv, z = project_points(pts, intr, pose)
    assert np.all(z > 0)
    np.testing.assert_allclose(uv, _cv2_project(pts, intr, pose), rtol=0, atol=1e-9)


def test_project_returns_z_depth() -> None:
    pose = look_at(np.array([0.0, -2.0, 1.0]), np.array([0.0, 0.0, 1.0]))
    intr = Intrinsics(640, 480, 500.0, 500.0, 319.5, 239.5)
    uv, z = project_points(np.array([[0.0, 0.0, 1.0], [0.5, 1.0, 1.0]]), intr, pose)
    np.testing.assert_allclose(z, [2.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(uv[0], [319.5, 239.5], atol=1e-9)


# --------------------------------------------------------------------------- distortion


@pytest.mark.parametrize("dist", sorted({c.intrinsics.dist for c in LIBRARY_CAMERAS})[::5] + STRONG,
                         ids=lambda d: ",".join(f"{x:.3g}" for x in d))
def test_undistort_inverts_distort(dist: tuple[float, ...]) -> None:
    rng = np.random.default_rng(4)
    xy = rng.uniform(-0.6, 0.6, size=(500, 2))  # about +-31 degrees: inside any real image
    xy = np.vstack([xy, [[0.0, 0.0], [0.6, 0.6], [-0.6, 0.45]]])
    back = undistort(distort(xy, np.array(dist)), np.array(dist))
    np.testing.assert_allclose(back, xy, rtol=0, atol=1e-10)


def test_distort_matches_cv2_undistort_points_inverse() -> None:
    """Our undistort agrees with OpenCV's iterative undistortPoints (to its looser tolerance)."""
    rng = np.random.default_rng(5)
    dist = np.array(STRONG[0])
    K = np.eye(3)
    xy = rng.uniform(-0.5, 0.5, size=(100, 2))
    xy_d = distort(xy, dist)
    cv = cv2.undistortPointsIter(xy_d.reshape(-1, 1, 2), K, dist, None, None,
                                 (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-14))
    np.testing.assert_allclose(undistort(xy_d, dist), cv.reshape(-1, 2), atol=1e-8)


def test_zero_distortion_is_identity() -> None:
    xy = np.random.default_rng(6).normal(size=(10, 2))
    np.testing.assert_array_equal(distort(xy, np.zeros(5)), xy)
    np.testing.assert_array_equal(undistort(xy, np.zeros(5)), xy)


# --------------------------------------------------------------------------- rays


@pytest.mark.parametrize("dist", [(0.0,) * 5, LIBRARY_CAMERAS[0].intrinsics.dist, STRONG[1], STRONG[2]],
                         ids=["none", "library", "strong1", "strong2"])
def test_pixel_rays_round_trip(dist: tuple[float, ...]) -> None:
    rng = np.random.default_rng(7)
    intr = Intrinsics(1280, 960, 1040.0, 1035.0, 645.2, 476.8, dist)  # type: ignore[arg-type]
    pose = _random_pose(rng)
    uv = np.stack([rng.uniform(0, intr.width - 1, 300), rng.uniform(0, intr.height - 1, 300)], axis=-1)
    uv = np.vstack([uv, [[0, 0], [intr.width - 1, intr.height - 1], [intr.width - 1, 0]]])
    center, dirs = pixel_rays(intr, pose, uv)
    np.testing.assert_allclose(center, pose.center, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-12)
    depth = rng.uniform(0.5, 6.0, len(uv))
    pts = center + dirs * depth[:, None]
    uv_back, z = project_points(pts, intr, pose)
    assert np.all(z > 0)
    np.testing.assert_allclose(uv_back, uv, rtol=0, atol=1e-6)


def test_pixel_rays_default_is_every_pixel_row_major() -> None:
    intr = Intrinsics(8, 6, 10.0, 10.0, 3.5, 2.5, (-0.1, 0.01, 0.001, -0.001, 0.0))
    pose = look_at(np.array([1.0, -2.0, 1.5]), np.array([0.0, 0.0, 1.0]))
    center, dirs = pixel_rays(intr, pose)
    assert dirs.shape == (48, 3)
    uv_back, _ = project_points(center + dirs * 2.0, intr, pose)
    u, v = np.meshgrid(np.arange(8.0), np.arange(6.0))
    np.testing.assert_allclose(uv_back, np.stack([u.ravel(), v.ravel()], axis=-1), atol=1e-6)
    assert tuple(np.round(uv_back[1])) == (1.0, 0.0)  # second ray: next pixel in the first row


# --------------------------------------------------------------------------- look_at


def test_look_at_centre_axis_and_rotation() -> None:
    pos, target = np.array([2.0, -1.5, 1.8]), np.array([0.2, 0.3, 0.9])
    pose = look_at(pos, target)
    np.testing.assert_allclose(pose.center, pos, atol=1e-12)
    np.testing.assert_allclose(pose.R @ pose.R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(pose.R) == pytest.approx(1.0)
    forward = (target - pos) / np.linalg.norm(target - pos)
    np.testing.assert_allclose(pose.R[2], forward, atol=1e-12)  # optical axis (camera z) in world
    intr = Intrinsics(640, 480, 500.0, 500.0, 319.5, 239.5)
    uv, z = project_points(target[None], intr, pose)
    np.testing.assert_allclose(uv[0], [intr.cx, intr.cy], atol=1e-9)
    assert z[0] == pytest.approx(np.linalg.norm(target - pos))


def test_look_at_image_up_is_world_up() -> None:
    # a camera looking horizontally along +y: world z points up in the image (v decreases)
    pose = look_at(np.array([0.0, -3.0, 1.0]), np.array([0.0, 0.0, 1.0]))
    intr = Intrinsics(640, 480, 500.0, 500.0, 319.5, 239.5)
    uv, _ = project_points(np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.5], [0.5, 0.0, 1.0]]), intr, pose)
    assert uv[1, 1] < uv[0, 1] - 10  # higher in the world = higher in the image
    assert uv[1, 0] == pytest.approx(uv[0, 0], abs=1e-9)  # and not sideways
    assert uv[2, 0] > uv[0, 0] + 10  # world +x is to the right when looking along +y
    # the camera's up (-y) is world up exactly for a horizontal view, and close to it when tilted
    np.testing.assert_allclose(-pose.R[1], [0.0, 0.0, 1.0], atol=1e-12)
    tilted = look_at(np.array([1.0, -3.0, 2.5]), np.array([0.0, 0.0, 1.0]))
    assert -tilted.R[1] @ np.array([0.0, 0.0, 1.0]) > 0.9
    assert abs(tilted.R[0, 2]) < 1e-12  # no roll: the image x axis stays horizontal


@pytest.mark.parametrize("target", [(0.0, 0.0, 0.0), (0.0, 0.0, 5.0)], ids=["down", "up"])
def test_look_at_parallel_to_up_raises(target: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="parallel to up"):
        look_at(np.array([0.0, 0.0, 3.0]), np.array(target))


def test_look_at_coincident_raises() -> None:
    with pytest.raises(ValueError, match="coincide"):
        look_at(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- nerfstudio convention


def test_opencv_to_nerfstudio_axes() -> None:
    pose = look_at(np.array([2.5, -1.0, 1.2]), np.array([0.0, 0.3, 1.0]))
    c2w = opencv_to_nerfstudio_c2w(pose)
    assert c2w.shape == (4, 4)
    np.testing.assert_allclose(c2w[:3, 3], pose.center, atol=1e-12)
    np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
    w2c_ns = np.linalg.inv(c2w)

    def to_ns(p: np.ndarray) -> np.ndarray:
        return (w2c_ns @ np.append(p, 1.0))[:3]

    # a point in front of the OpenCV camera (z > 0) is at negative z in the nerfstudio frame
    p_front = pose.center + 2.0 * pose.R[2]
    assert pose.transform(p_front[None])[0, 2] > 0
    np.testing.assert_allclose(to_ns(p_front), [0.0, 0.0, -2.0], atol=1e-12)
    # image-up (OpenCV -y) is nerfstudio +y; image-right is +x in both
    p_up = pose.center - 1.0 * pose.R[1]
    np.testing.assert_allclose(pose.transform(p_up[None])[0], [0.0, -1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(to_ns(p_up), [0.0, 1.0, 0.0], atol=1e-12)
    p_right = pose.center + 1.0 * pose.R[0]
    np.testing.assert_allclose(to_ns(p_right), [1.0, 0.0, 0.0], atol=1e-12)
    # for an upright camera the nerfstudio camera y axis points roughly to world +z
    assert c2w[2, 1] > 0.9


def test_nerfstudio_round_trip() -> None:
    rng = np.random.default_rng(8)
    for _ in range(20):
        pose = _random_pose(rng)
        c2w = opencv_to_nerfstudio_c2w(pose)
        back = nerfstudio_c2w_to_opencv(c2w)
        np.testing.assert_allclose(back.R, pose.R, atol=1e-12)
        np.testing.assert_allclose(back.t, pose.t, atol=1e-12)
        back34 = nerfstudio_c2w_to_opencv(c2w[:3])  # 3x4 accepted as well
        np.testing.assert_allclose(back34.R, pose.R, atol=1e-12)
        np.testing.assert_allclose(back34.t, pose.t, atol=1e-12)
        np.testing.assert_allclose(opencv_to_nerfstudio_c2w(back), c2w, atol=1e-12)


def test_rotation_angle_deg() -> None:
    a = np.radians(30.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    assert rotation_angle_deg(np.eye(3), rz) == pytest.approx(30.0)
    assert rotation_angle_deg(rz, rz) == pytest.approx(0.0, abs=1e-5)  # arccos near 1: ~1e-6 deg noise


# --------------------------------------------------------------------------- intrinsics


@pytest.mark.parametrize("s", [0.5, 0.25, 2.0, 1 / 3])
@pytest.mark.parametrize("dist", [(0.0,) * 5, STRONG[3]], ids=["pinhole", "distorted"])
def test_scaled_keeps_pixel_centre_convention(s: float, dist: tuple[float, ...]) -> None:
    rng = np.random.default_rng(9)
    intr = Intrinsics.from_lens(1200, 900, 14.0, (17.3, 12.975), (3.2, -1.7), dist)
    pose = _random_pose(rng)
    pts = _points_in_view(intr, pose, 100, rng)
    uv, _ = project_points(pts, intr, pose)
    small = intr.scaled(s)
    assert (small.width, small.height) == (round(1200 * s), round(900 * s))
    uv_s, _ = project_points(pts, small, pose)
    np.testing.assert_allclose(uv_s, (uv + 0.5) * s - 0.5, rtol=0, atol=1e-9)


def test_from_lens_principal_point_is_image_centre() -> None:
    intr = Intrinsics.from_lens(640, 480, 8.0, (7.2, 5.4))
    assert (intr.cx, intr.cy) == (319.5, 239.5)
    assert intr.fx == pytest.approx(8.0 / 7.2 * 640)
    assert Intrinsics.from_dict(intr.to_dict()) == intr


def test_camera_dict_round_trip() -> None:
    cam = LIBRARY_CAMERAS[0]
    back = Camera.from_dict(cam.to_dict())
    assert back.id == cam.id and back.intrinsics == cam.intrinsics
    np.testing.assert_array_equal(back.pose.R, cam.pose.R)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "call, name, actual",
    [
        (lambda: Pose(np.eye(4), np.zeros(3)), "R", (4, 4)),
        (lambda: Pose(np.eye(3), np.zeros((3, 1))), "t", (3, 1)),
        (lambda: project_points(np.zeros((5, 2)), Intrinsics(4, 4, 1, 1, 1, 1), Pose()), "points_world", (5, 2)),
        (lambda: project_points(np.zeros(3), Intrinsics(4, 4, 1, 1, 1, 1), Pose()), "points_world", (3,)),
        (lambda: distort(np.zeros((5, 3)), np.zeros(5)), "xy", (5, 3)),
        (lambda: undistort(np.zeros((2, 5)), np.zeros(5)), "xy_d", (2, 5)),
        (lambda: pixel_rays(Intrinsics(4, 4, 1, 1, 1, 1), Pose(), np.zeros((3, 3))), "uv", (3, 3)),
        (lambda: look_at(np.zeros(2), np.ones(3)), "position", (2,)),
        (lambda: nerfstudio_c2w_to_opencv(np.eye(3)), "c2w", (3, 3)),
    ],
    ids=["pose-R", "pose-t", "project-2d", "project-1d", "distort", "undistort", "pixel_rays",
         "look_at", "c2w"],
)
def test_shape_error(call, name: str, actual: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError) as ei:
        call()
    assert ei.value.name == name
    assert ei.value.actual_shape == actual
    assert name in str(ei.value) and str(actual) in str(ei.value)
