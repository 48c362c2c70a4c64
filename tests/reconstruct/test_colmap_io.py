"""COLMAP models through pycolmap: round trips, the half-pixel convention, binary models, helpful errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from reconstruct.colmap_io import (
    ColmapError,
    qvec_to_rotmat,
    read_colmap_text,
    rotmat_to_qvec,
    write_colmap_text,
)
from rigs.geometry import Camera, Intrinsics, Pose


def _random_cameras(seed: int, n: int, with_k3: bool) -> list[Camera]:
    rng = np.random.default_rng(seed)
    rots = Rotation.random(n, random_state=seed).as_matrix()
    cams = []
    for i in range(n):
        w, h = int(rng.integers(640, 4000)), int(rng.integers(480, 3000))
        dist = (rng.normal(0, 0.1), rng.normal(0, 0.05), rng.normal(0, 1e-3), rng.normal(0, 1e-3),
                rng.normal(0, 0.02) if with_k3 else 0.0)
        intr = Intrinsics(w, h, rng.uniform(500, 3000), rng.uniform(500, 3000),
                          (w - 1) / 2 + rng.normal(0, 20), (h - 1) / 2 + rng.normal(0, 20), dist)
        cams.append(Camera(f"cam{i:02d}", intr, Pose(rots[i], rng.normal(0, 3, 3))))
    return cams


def _studio_camera(k3: float = 0.0) -> Camera:
    intr = Intrinsics(1280, 960, 1100.0, 1105.0, 639.5, 479.5, (-0.12, 0.05, 1e-3, -2e-3, k3))
    R = Rotation.from_euler("xyz", [100.0, -20.0, 35.0], degrees=True).as_matrix()
    return Camera("cam07", intr, Pose(R, np.array([0.2, -0.4, 3.1])))


def _points_in_view(cam: Camera, n: int = 20, seed: int = 3) -> np.ndarray:
    """World points [n, 3] 1.5-4 m in front of ``cam``, inside about 60 % of its view."""
    rng = np.random.default_rng(seed)
    intr = cam.intrinsics
    x = rng.uniform(-0.3, 0.3, n) * intr.width / intr.fx
    y = rng.uniform(-0.3, 0.3, n) * intr.height / intr.fy
    z = rng.uniform(1.5, 4.0, n)
    pc = np.stack([x * z, y * z, z], axis=1)
    return (pc - cam.pose.t) @ cam.pose.R  # R^T (pc - t), row-wise


def _cv2_project(cam: Camera, pts: np.ndarray) -> np.ndarray:
    rvec, _ = cv2.Rodrigues(cam.pose.R)
    uv, _ = cv2.projectPoints(pts, rvec, cam.pose.t, cam.intrinsics.K, cam.intrinsics.dist_array)
    return uv.reshape(-1, 2)


def _data_lines(path: Path) -> list[str]:
    return [s for s in path.read_text().splitlines() if s and not s.startswith("#")]


@pytest.mark.parametrize("with_k3", [False, True])
def test_round_trip_random_cameras(tmp_path: Path, with_k3: bool) -> None:
    cams = _random_cameras(seed=11 + with_k3, n=12, with_k3=with_k3)
    names = {"cam03": "cam03.png"}
    pts = np.random.default_rng(5).normal(0, 2, (50, 3))
    cols = np.random.default_rng(6).integers(0, 256, (50, 3))
    write_colmap_text(tmp_path, cams, names, pts, cols)

    model_line = _data_lines(tmp_path / "cameras.txt")[0].split()[1]
    assert model_line == ("FULL_OPENCV" if with_k3 else "OPENCV")
    assert not list(tmp_path.glob("*.partial"))

    model = read_colmap_text(tmp_path)
    assert [c.id for c in model.cameras] == [c.id for c in cams]
    assert model.names["cam03"] == "cam03.png" and model.names["cam00"] == "cam00.jpg"
    for a, b in zip(cams, model.cameras):
        ia, ib = a.intrinsics, b.intrinsics
        assert (ia.width, ia.height) == (ib.width, ib.height)
        np.testing.assert_allclose(ib.K, ia.K, rtol=0, atol=1e-9)
        np.testing.assert_allclose(ib.dist_array, ia.dist_array, rtol=0, atol=1e-9)
        np.testing.assert_allclose(b.pose.R, a.pose.R, rtol=0, atol=1e-9)
        np.testing.assert_allclose(b.pose.t, a.pose.t, rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.points, pts, rtol=0, atol=1e-12)
    assert model.colors.dtype == np.uint8
    np.testing.assert_array_equal(model.colors, cols)


def test_quaternions_match_scipy_and_invert() -> None:
    rots = Rotation.random(200, random_state=4)
    # and the awkward ones: identity and 180-degree turns about each axis
    extra = Rotation.from_rotvec(np.pi * np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                                                   [0, 1, 1] / np.sqrt(2)]))
    for r in [*rots, *extra]:
        q = rotmat_to_qvec(r.as_matrix())
        assert q[0] >= 0 and abs(np.linalg.norm(q) - 1) < 1e-15
        x, y, z, w = r.as_quat()  # scipy: scalar last, Hamilton
        ref = np.array([w, x, y, z]) * (1 if w >= 0 else -1)
        if abs(q[0]) < 1e-12:  # q and -q are both valid at w == 0
            ref = ref * np.sign(ref @ q)
        np.testing.assert_allclose(q, ref, atol=1e-12)
        np.testing.assert_allclose(qvec_to_rotmat(q), r.as_matrix(), atol=1e-12)


def test_principal_point_is_shifted_half_a_pixel(tmp_path: Path) -> None:
    cam = _studio_camera()
    write_colmap_text(tmp_path, [cam])
    fields = _data_lines(tmp_path / "cameras.txt")[0].split()
    assert fields[:4] == ["1", "OPENCV", "1280", "960"]
    assert [float(f) for f in fields[4:8]] == [1100.0, 1105.0, 640.0, 480.0]  # cx, cy + 0.5

    # COLMAP's projection of a point, by hand from the text file, minus 0.5 is OpenCV's
    fx, fy, cxc, cyc, k1, k2, p1, p2 = (float(v) for v in fields[4:12])
    img = _data_lines(tmp_path / "images.txt")[0].split()
    R, t = qvec_to_rotmat(np.array(img[1:5], dtype=float)), np.array(img[5:8], dtype=float)
    pts = _points_in_view(cam)
    pc = pts @ R.T + t
    x, y = pc[:, 0] / pc[:, 2], pc[:, 1] / pc[:, 2]
    r2 = x * x + y * y
    radial = k1 * r2 + k2 * r2 * r2
    xd = x + x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y + y * radial + 2 * p2 * x * y + p1 * (r2 + 2 * y * y)
    uv_colmap = np.stack([fx * xd + cxc, fy * yd + cyc], axis=1)
    np.testing.assert_allclose(uv_colmap - 0.5, _cv2_project(cam, pts), rtol=0, atol=1e-9)
    np.testing.assert_allclose(uv_colmap - 0.5, cam.project(pts)[0], rtol=0, atol=1e-9)


def test_images_file_layout_and_defaults(tmp_path: Path) -> None:
    cams = _random_cameras(seed=2, n=3, with_k3=False)
    write_colmap_text(tmp_path, cams, {"cam01": "takes/t1/cam01/000000.jpg"})
    lines = (tmp_path / "images.txt").read_text().splitlines()
    body = [s for s in lines if not s.startswith("#")]
    assert len(body) == 6 and body[1::2] == ["", "", ""]  # image line, empty 2D-points line
    assert [s.split()[0] for s in body[::2]] == ["1", "2", "3"]
    assert [s.split()[8] for s in body[::2]] == ["1", "2", "3"]
    assert [s.split()[9] for s in body[::2]] == ["cam00.jpg", "takes/t1/cam01/000000.jpg", "cam02.jpg"]
    assert _data_lines(tmp_path / "points3D.txt") == []
    model = read_colmap_text(tmp_path)
    assert [c.id for c in model.cameras] == ["cam00", "takes/t1/cam01/000000", "cam02"]
    assert model.points.shape == (0, 3) and model.colors.shape == (0, 3)
    model = read_colmap_text(tmp_path, id_from_name=lambda n: n.split("/")[-2] if "/" in n else n[:-4])
    assert [c.id for c in model.cameras] == ["cam00", "cam01", "cam02"]


def test_reads_other_models_and_comments(tmp_path: Path) -> None:
    (tmp_path / "cameras.txt").write_text(
        "# a comment\n\n"
        "1 SIMPLE_PINHOLE 100 80 90 50.5 40.5\n"
        "2 PINHOLE 100 80 90 91 50.5 40.5\n"
        "3 SIMPLE_RADIAL 100 80 90 50.5 40.5 0.01\n"
        "4 RADIAL 100 80 90 50.5 40.5 0.01 -0.002\n"
        "5 FULL_OPENCV 100 80 90 91 50.5 40.5 0.01 -0.002 1e-4 2e-4 0.003 0 0 0\n")
    (tmp_path / "images.txt").write_text(
        "# comment\n"
        "1 1 0 0 0 0 0 1 1 a.jpg\n\n"
        "2 1 0 0 0 0 0 1 2 b.jpg\n"
        "10.5 20.5 -1 11.0 3.0 7\n"  # 2D points are skipped
        "3 2 0 0 0 0 0 1 3 c.jpg\n\n"
        "4 1 0 0 0 0 0 1 4 d.jpg\n\n"
        "5 0 0 0 1 0 0 1 5 e.jpg\n\n")  # no points3D.txt: no points
    model = read_colmap_text(tmp_path)
    a, b, c, d, e = model.cameras
    assert a.intrinsics == Intrinsics(100, 80, 90.0, 90.0, 50.0, 40.0)
    assert b.intrinsics == Intrinsics(100, 80, 90.0, 91.0, 50.0, 40.0)
    assert c.intrinsics.dist == (0.01, 0.0, 0.0, 0.0, 0.0)
    assert d.intrinsics.dist == (0.01, -0.002, 0.0, 0.0, 0.0)
    assert e.intrinsics.dist == (0.01, -0.002, 1e-4, 2e-4, 0.003)
    np.testing.assert_allclose(c.pose.R, np.eye(3), atol=1e-15)  # quaternion normalised
    np.testing.assert_allclose(e.pose.R, np.diag([-1.0, -1.0, 1.0]), atol=1e-15)
    assert model.points.shape == (0, 3) and model.colors.shape == (0, 3)


@pytest.mark.parametrize(("cameras", "images", "where", "words"), [
    ("1 OPENCV 640 480 500 500 320 240 0 0 0\n", "", "cameras.txt:1", "takes 8 parameters"),
    ("# c\n1 OPENCV 640 480 500 500 32O 240 0 0 0 0\n", "", "cameras.txt:2", "'32O' is not a number"),
    ("1 OPENCV_FISHEYE 640 480 500 500 320 240 0 0 0 0\n", "", "cameras.txt:1", "unsupported camera model"),
    ("1 FULL_OPENCV 640 480 500 500 320 240 0 0 0 0 0 0.1 0 0\n", "", "cameras.txt:1", "k4 k5 k6"),
    ("1 PINHOLE 640 480 500 500 320 240\n", "# i\n1 1 0 0 0 0 0 1 1\n\n", "images.txt:2", "got 9 fields"),
    ("1 PINHOLE 640 480 500 500 320 240\n", "1 1 0 0 0 0 0 1 2 a.jpg\n\n", "images.txt:1",
     "CAMERA_ID 2 is not in cameras.txt"),
    ("1 PINHOLE 640 480 500 500 320 240\n", "1 1 0 0 0 0 0 1 1 a.jpg\n\n2 1 0 0 0 0 0 1 1 a.png\n\n",
     "images.txt:3", "gives camera id 'a', as does line 1"),
    ("1 PINHOLE 640 480 500 500 320 240\n", "1 0 0 0 0 0 0 1 1 a.jpg\n\n", "images.txt:1", "no direction"),
    ("1 PINHOLE 640 480 500 500 320 240\n", "1 1 0 0 0 0 nan 1 1 a.jpg\n\n", "images.txt:1", "not finite"),
    ("1 PINHOLE -640 480 500 500 320 240\n", "", "cameras.txt:1", "image size -640x480 must be positive"),
    # truncated and garbled images.txt: pycolmap would say "Check failed: line_stream1 >> image_id ..."
    # or take the image (the garbled 2D points, a dropped last image) without a word
    ("1 PINHOLE 640 480 500 500 320 240\n", "1 1 0 0 0 0 0 1 1 a.jpg\n\n2 1 0 0 0", "images.txt:3", "got 5 fields"),
    ("1 PINHOLE 640 480 500 500 320 240\n", "1 1 0 0 0 0 0 1 1 a.jpg\n10.5 x 3\n", "images.txt:2",
     "POINTS2D: not all 3 fields are numbers"),
    ("1 PINHOLE 640 480 500 500 320 240\n", "1 1 0 0 0 0 0 1 1 a.jpg\n1 2\n", "images.txt:2", "got 2 fields"),
    ("1 PINHOLE 640 480 500 500 320 240\n", "1 1 0 0 0 0 0 1 1 a.jpg\n\n2 1 0 0 0 0 0 1 1 b.jpg\n",
     "images.txt:3", "no POINTS2D line"),
])
def test_bad_lines_raise_naming_file_and_line(tmp_path: Path, cameras: str, images: str, where: str,
                                              words: str) -> None:
    (tmp_path / "cameras.txt").write_text(cameras)
    (tmp_path / "images.txt").write_text(images)
    with pytest.raises(ColmapError) as info:
        read_colmap_text(tmp_path)
    err = info.value
    assert err.exit_code == 2
    assert str(tmp_path / where) in str(err) and words in str(err)
    assert err.path is not None and err.line == int(where.split(":")[1])


def test_bad_points_line_and_missing_file(tmp_path: Path) -> None:
    write_colmap_text(tmp_path, [_studio_camera()], points=np.zeros((2, 3)))
    p = tmp_path / "points3D.txt"
    p.write_text(p.read_text() + "3 0 0 0 300 0 0 0.0\n")
    with pytest.raises(ColmapError, match=r"points3D\.txt:6: colour \[300, 0, 0\]"):
        read_colmap_text(tmp_path)
    (tmp_path / "cameras.txt").unlink()
    with pytest.raises(ColmapError, match=r"cameras\.txt: file is missing"):
        read_colmap_text(tmp_path)


def test_write_checks_inputs_before_writing(tmp_path: Path) -> None:
    cam = _studio_camera()
    out = tmp_path / "model"
    bad = [
        ([cam, cam], {}, "appears more than once"),
        ([cam], {"cam07": "my image.jpg"}, "whitespace"),
        ([Camera("x", cam.intrinsics, Pose(np.diag([1.0, 1.0, -1.0]), cam.pose.t))], {}, "not a rotation"),
        ([Camera("x", cam.intrinsics, Pose(cam.pose.R * 1.01, cam.pose.t))], {}, "not a rotation"),
    ]
    for cams, names, words in bad:
        with pytest.raises(ColmapError, match=words):
            write_colmap_text(out, cams, names)
    with pytest.raises(ColmapError, match="0..255"):
        write_colmap_text(out, [cam], points=np.zeros((1, 3)), point_colors=[[0, 0, 256]])
    assert not out.exists()


# --------------------------------------------------------------------------- pycolmap

@pytest.mark.parametrize("k3", [0.0, 0.01])
def test_pycolmap_reads_the_model_and_projects_like_opencv(tmp_path: Path, k3: float) -> None:
    pycolmap = pytest.importorskip("pycolmap")
    cams = [_studio_camera(k3), *_random_cameras(seed=21, n=3, with_k3=k3 != 0.0)]
    pts = _points_in_view(cams[0], n=5)
    write_colmap_text(tmp_path, cams, points=pts, point_colors=np.full((5, 3), 200))

    rec = pycolmap.Reconstruction(str(tmp_path))
    assert rec.num_images() == len(cams) and rec.num_points3D() == 5
    for cam in cams:
        image = rec.find_image_with_name(f"{cam.id}.jpg")
        assert image is not None and image.has_pose
        cfw = image.cam_from_world()
        np.testing.assert_allclose(cfw.rotation.matrix(), cam.pose.R, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cfw.translation, cam.pose.t, rtol=0, atol=1e-12)
        x, y, z, w = cfw.rotation.quat  # pycolmap: xyzw, the same Hamilton quaternion
        np.testing.assert_allclose(rotmat_to_qvec(cam.pose.R), [w, x, y, z], atol=1e-12)

        c, intr = image.camera, cam.intrinsics
        assert (c.width, c.height) == (intr.width, intr.height)
        expect = [intr.fx, intr.fy, intr.cx + 0.5, intr.cy + 0.5, *intr.dist[:4]]
        if k3 != 0.0:
            assert c.model_name == "FULL_OPENCV"
            expect += [intr.dist[4], 0.0, 0.0, 0.0]
        else:
            assert c.model_name == "OPENCV"
        np.testing.assert_allclose(c.params, expect, rtol=0, atol=1e-12)

        pts_c = _points_in_view(cam, n=20, seed=8)
        want = _cv2_project(cam, pts_c) + 0.5
        got = c.img_from_cam(cam.pose.transform(pts_c))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        got_image = np.array([np.ravel(image.project_point(p)) for p in pts_c])
        np.testing.assert_allclose(got_image, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_image - 0.5, cam.project(pts_c)[0], rtol=0, atol=1e-6)

    p3d = np.array([rec.points3D[i].xyz for i in sorted(rec.point3D_ids())])
    np.testing.assert_allclose(p3d, pts, rtol=0, atol=1e-12)


def test_writing_over_a_pycolmap_model_replaces_its_frames(tmp_path: Path) -> None:
    """pycolmap takes poses from frames.txt when present: a stale one must not survive."""
    pycolmap = pytest.importorskip("pycolmap")
    old, new = _random_cameras(seed=1, n=2, with_k3=False), _random_cameras(seed=2, n=2, with_k3=False)
    (tmp_path / "b").mkdir()
    pycolmap.Reconstruction(str(_write(tmp_path / "a", old))).write_text(str(tmp_path / "b"))
    assert (tmp_path / "b" / "frames.txt").exists()
    write_colmap_text(tmp_path / "b", new)
    rec = pycolmap.Reconstruction(str(tmp_path / "b"))
    for i, cam in enumerate(new, start=1):
        np.testing.assert_allclose(rec.images[i].cam_from_world().translation, cam.pose.t, atol=1e-12)
    assert [c.id for c in read_colmap_text(tmp_path / "b").cameras] == ["cam00", "cam01"]


def _write(folder: Path, cams: list[Camera], points: np.ndarray | None = None,
           colors: np.ndarray | None = None) -> Path:
    write_colmap_text(folder, cams, points=points, point_colors=colors)
    return folder


def test_pycolmap_written_models_read_back_text_and_binary(tmp_path: Path) -> None:
    """A model pycolmap wrote (text or binary) reads back to the same cameras, K, poses and points."""
    pycolmap = pytest.importorskip("pycolmap")
    cams = _random_cameras(seed=7, n=5, with_k3=True)
    pts = np.random.default_rng(9).normal(0, 1, (30, 3))
    cols = np.random.default_rng(10).integers(0, 256, (30, 3))
    rec = pycolmap.Reconstruction(str(_write(tmp_path / "ours", cams, pts, cols)))
    for kind in ("text", "binary"):
        (tmp_path / kind).mkdir()
        getattr(rec, f"write_{kind}")(str(tmp_path / kind))
        model = read_colmap_text(tmp_path / kind)
        assert [c.id for c in model.cameras] == [c.id for c in cams], kind
        for a, b in zip(cams, model.cameras):
            assert (b.intrinsics.width, b.intrinsics.height) == (a.intrinsics.width, a.intrinsics.height)
            np.testing.assert_allclose(b.intrinsics.K, a.intrinsics.K, rtol=0, atol=1e-9)
            np.testing.assert_allclose(b.intrinsics.dist_array, a.intrinsics.dist_array, rtol=0, atol=1e-12)
            np.testing.assert_allclose(b.pose.matrix, a.pose.matrix, rtol=0, atol=1e-9)
            probe = _points_in_view(a, n=10, seed=12)
            np.testing.assert_allclose(b.project(probe)[0], a.project(probe)[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(model.points, pts, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(model.colors, cols)
    assert not (tmp_path / "binary" / "cameras.txt").exists()


def test_written_files_are_deterministic_and_exact(tmp_path: Path) -> None:
    cams = _random_cameras(seed=3, n=4, with_k3=False)
    pts = np.random.default_rng(2).normal(0, 1, (7, 3))
    a, b = _write(tmp_path / "a", cams, pts), _write(tmp_path / "b", cams, pts)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["cameras.txt", "frames.txt", "images.txt", "points3D.txt", "rigs.txt"]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    # 17 significant digits: the text reads back to the same float64
    fields = _data_lines(a / "cameras.txt")[1].split()
    assert float(fields[6]) == cams[1].intrinsics.cx + 0.5 and float(fields[4]) == cams[1].intrinsics.fx
    point = _data_lines(a / "points3D.txt")[2].split()
    assert [float(v) for v in point[1:4]] == pts[2].tolist() and point[4:8] == ["128", "128", "128", "0"]


def test_what_pycolmap_cannot_read_names_the_folder(tmp_path: Path) -> None:
    _write(tmp_path, [_studio_camera()])
    (tmp_path / "frames.txt").write_text("1 1 garbage\n")  # not checked line by line: pycolmap's words
    with pytest.raises(ColmapError, match=r"cannot read the model: .*Check failed") as info:
        read_colmap_text(tmp_path)
    assert info.value.path == tmp_path and str(tmp_path) in str(info.value)
    (tmp_path / "frames.txt").unlink()
    (tmp_path / "images.txt").write_text("1 1 0 0 0 0 0 1 1 a.jpg\n\n1 1 0 0 0 0 0 1 1 b.jpg\n\n")
    with pytest.raises(ColmapError, match=r"images\.txt:3: IMAGE_ID 1 appears twice"):
        read_colmap_text(tmp_path)


def test_reads_a_colmap_model_with_rigs_tracks_and_2d_points(tmp_path: Path) -> None:
    """pycolmap's synthetic model (3 rigs of 2 cameras, 2 frames each, 200 tracked points): each image's pose
    is its rig's pose composed with the camera's pose in the rig, as COLMAP reads it."""
    pycolmap = pytest.importorskip("pycolmap")
    pycolmap.set_random_seed(3)
    options = pycolmap.SyntheticDatasetOptions(num_rigs=3, num_cameras_per_rig=2, num_frames_per_rig=2,
                                               num_points3D=200)
    rec = pycolmap.synthesize_dataset(options)
    rec.write_text(str(tmp_path))
    model = read_colmap_text(tmp_path, id_from_name=lambda n: n)
    assert len(model.cameras) == rec.num_images() == 12 and model.points.shape == (200, 3)
    for image_id, cam in zip(sorted(rec.images), model.cameras):
        image = rec.images[image_id]
        assert cam.id == image.name
        np.testing.assert_allclose(cam.pose.matrix[:3], image.cam_from_world().matrix(), rtol=0, atol=1e-9)
        c = image.camera
        assert c.model_name in ("SIMPLE_RADIAL", "PINHOLE", "SIMPLE_PINHOLE", "RADIAL", "OPENCV")
        np.testing.assert_allclose([cam.intrinsics.cx, cam.intrinsics.cy],
                                   [c.principal_point_x - 0.5, c.principal_point_y - 0.5], rtol=0, atol=1e-12)
        xyz = np.array([rec.points3D[p.point3D_id].xyz for p in image.points2D if p.has_point3D()])
        np.testing.assert_allclose(cam.project(xyz)[0] + 0.5, [image.project_point(x).ravel() for x in xyz],
                                   rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.points, [rec.points3D[i].xyz for i in sorted(rec.point3D_ids())], atol=1e-12)
