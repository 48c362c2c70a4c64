"""The synthetic person of the virtual studio and its "turn and arm raise" clip.

Conventions under test (rigs/virtual/person.py, rigs/virtual/motion.py): metres,
world z up, floor at z = 0, the person faces -y at rest so +x is their left.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import open3d as o3d
import pytest

from rigs.errors import ShapeError, TwinstudioError
from rigs.virtual.motion import PoseParams, default_clip
from rigs.virtual.person import Person, PosedPerson, build_person, skeleton

CLIP_FRAMES = (0, 12, 23)
TORSO = ("chest", "abdomen", "pelvis")
ARMS = ("hand_l", "hand_r", "forearm_l", "forearm_r")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def person() -> Person:
    return build_person(0)


@pytest.fixture(scope="module")
def rest(person: Person) -> PosedPerson:
    return person.pose()


@pytest.fixture(scope="module")
def clip():
    return default_clip()


@pytest.fixture(scope="module")
def posed_frames(person: Person, clip) -> list[PosedPerson]:
    """The person in every frame of the default clip."""
    return [person.pose(clip.params(f)) for f in range(clip.frames)]


# ----------------------------------------------------------------------------- helpers


def _part_slice(person: Person, name: str) -> slice:
    """Vertex index range of a part (parts own contiguous vertex blocks)."""
    k = person.part_names.index(name)
    tri_verts = np.unique(person.triangles[person.triangle_part == k])
    s, e = int(tri_verts.min()), int(tri_verts.max()) + 1
    assert e - s == len(tri_verts), "a part's vertices should be one contiguous block"
    return slice(s, e)


def _inside_parts(person: Person, posed: PosedPerson, points: np.ndarray, names,
                  grow: float = 0.0) -> np.ndarray:
    """Whether points are inside any of the named parts' own analytic shapes, grown by ``grow`` (m)."""
    out = np.zeros(len(points), dtype=bool)
    for name in names:
        part = person.parts[person.part_names.index(name)]
        g = posed.joint_transforms[part.joint]
        local = (points - g[:3, 3]) @ g[:3, :3]
        q = (local - part.shape.centre) @ part.shape.axes
        out |= part.shape.implicit(q, shrink=-grow) < 1.0
    return out


def _scene(posed: PosedPerson) -> o3d.t.geometry.RaycastingScene:
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(posed.vertices.astype(np.float32)),
                        o3d.core.Tensor(posed.triangles.astype(np.uint32)))
    return scene


def _distance(posed: PosedPerson, pts: np.ndarray) -> np.ndarray:
    q = o3d.core.Tensor(np.asarray(pts, dtype=np.float32).reshape(-1, 3))
    return _scene(posed).compute_distance(q).numpy()


def _yaw(G: np.ndarray) -> float:
    """Rotation about world z of a joint transform (radians)."""
    return math.atan2(G[1, 0], G[0, 0])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s], [s, c]])


def _tile_pixels(person: Person, name: str) -> np.ndarray:
    """The texture atlas tile a part's UVs cover."""
    uv = person.vertex_uv[_part_slice(person, name)]
    h, w = person.texture.shape[:2]
    x0, y0 = np.floor(uv.min(0) * [w, h]).astype(int)
    x1, y1 = np.ceil(uv.max(0) * [w, h]).astype(int)
    return person.texture[y0:y1, x0:x1]


def _laplacian_var(img: np.ndarray) -> float:
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def _landmark_vertex(rest: PosedPerson, name: str) -> int:
    hits = np.flatnonzero(np.all(rest.vertices == rest.landmarks[name], axis=1))
    assert len(hits) >= 1, f"landmark {name} is not a mesh vertex"
    return int(hits[0])


# ----------------------------------------------------------------------------- build


def test_build_is_deterministic(person: Person) -> None:
    again = Person(0)
    other = Person(1)
    assert np.array_equal(again.triangles, person.triangles)
    assert np.array_equal(again.vertex_uv, person.vertex_uv)
    assert np.array_equal(again.texture, person.texture)
    assert np.array_equal(again.pose().vertices, person.pose().vertices)
    assert not np.array_equal(other.texture, person.texture)
    # the seed only changes the texture, not the geometry
    assert np.array_equal(other.triangles, person.triangles)


def test_mesh_arrays_are_consistent(person: Person, rest: PosedPerson) -> None:
    n_v, n_t = len(rest.vertices), len(person.triangles)
    assert person.triangles.dtype == np.int32 and person.triangles.shape == (n_t, 3)
    assert person.triangles.min() == 0 and person.triangles.max() == n_v - 1
    assert person.vertex_uv.shape == (n_v, 2)
    assert person.vertex_uv.min() >= 0.0 and person.vertex_uv.max() <= 1.0
    assert person.triangle_part.shape == (n_t,)
    assert set(np.unique(person.triangle_part)) == set(range(len(person.part_names)))
    assert person.texture.dtype == np.uint8 and person.texture.ndim == 3 and person.texture.shape[2] == 3
    assert rest.vertex_colors.shape == (n_v, 3) and rest.vertex_colors.dtype == np.float32


def test_parts_and_skeleton(person: Person) -> None:
    assert len(person.part_names) >= 10
    assert len(set(person.part_names)) == len(person.part_names)
    joints = skeleton()
    names = [j.name for j in joints]
    assert len(set(names)) == len(names)
    roots = [j for j in joints if j.parent is None]
    assert len(roots) == 1 and roots[0].name == "pelvis"
    seen: set[str] = set()
    for j in joints:
        if j.parent is not None:
            assert j.parent in seen, f"{j.name} comes before its parent {j.parent}"
        seen.add(j.name)
    # every part hangs on a joint of the skeleton
    assert {p.joint for p in person.parts} <= set(names)


# ----------------------------------------------------------------------------- rest pose


def test_rest_height_and_floor(rest: PosedPerson) -> None:
    z = rest.vertices[:, 2]
    assert 1.70 <= z.max() <= 1.80
    assert -0.005 <= z.min() <= 0.01


def test_rest_faces_minus_y_left_is_plus_x(rest: PosedPerson) -> None:
    for name, p in rest.landmarks.items():
        if name.endswith("_l"):
            assert p[0] > 0, name
        if name.endswith("_r"):
            assert p[0] < 0, name
    for name in ("nose_tip", "chin", "sternum", "navel", "knee_l", "knee_r", "toe_l", "toe_r"):
        assert rest.landmarks[name][1] < 0, f"{name} should be on the front (-y)"


@pytest.mark.parametrize("frame", [None, *CLIP_FRAMES])
def test_arms_do_not_enter_the_torso(person: Person, clip, frame) -> None:
    posed = person.pose(None if frame is None else clip.params(frame))
    for name in ARMS:
        v = posed.vertices[_part_slice(person, name)]
        assert not _inside_parts(person, posed, v, TORSO).any(), name
        # not even close: a clear gap of 2 cm around the torso
        assert not _inside_parts(person, posed, v, TORSO, grow=0.02).any(), name


# ----------------------------------------------------------------------------- pose / FK


def test_pose_keeps_triangles_and_moves_parts_rigidly(person: Person, rest: PosedPerson,
                                                      posed_frames) -> None:
    for f in CLIP_FRAMES:
        posed = posed_frames[f]
        assert np.array_equal(posed.triangles, person.triangles)
        assert posed.vertices.shape == rest.vertices.shape
        for name in person.part_names:
            sl = _part_slice(person, name)
            idx = np.linspace(sl.start, sl.stop - 1, 7).astype(int)
            a, b = rest.vertices[idx], posed.vertices[idx]
            da = np.linalg.norm(a[:, None] - a[None], axis=-1)
            db = np.linalg.norm(b[:, None] - b[None], axis=-1)
            np.testing.assert_allclose(db, da, atol=1e-9, err_msg=f"{name} frame {f}")
    # the last frame really moves things
    assert np.abs(posed_frames[-1].vertices - rest.vertices).max() > 0.1


def test_joint_positions_follow_fk(posed_frames) -> None:
    joints = skeleton()
    for f, posed in enumerate(posed_frames):
        assert set(posed.joints) == {j.name for j in joints}
        for j in joints:
            G = posed.joint_transforms[j.name]
            np.testing.assert_allclose(G[:3, :3] @ G[:3, :3].T, np.eye(3), atol=1e-12)
            np.testing.assert_allclose(np.linalg.det(G[:3, :3]), 1.0, atol=1e-12)
            np.testing.assert_allclose(G[:3, 3], posed.joints[j.name], atol=0)
            if j.parent is None:
                continue
            d = np.linalg.norm(posed.joints[j.name] - posed.joints[j.parent])
            assert d == pytest.approx(np.linalg.norm(j.offset), abs=1e-12), f"{j.name} frame {f}"


# ----------------------------------------------------------------------------- landmarks


def test_landmark_names(person: Person, rest: PosedPerson) -> None:
    assert len(person.landmark_names) >= 12
    assert len(set(person.landmark_names)) == len(person.landmark_names)
    assert set(person.landmark_names) <= set(rest.landmarks)
    assert "birthmark" in person.landmark_names


@pytest.mark.parametrize("frame", CLIP_FRAMES)
def test_landmarks_lie_on_the_posed_mesh(person: Person, posed_frames, frame: int) -> None:
    posed = posed_frames[frame]
    pts = np.array([posed.landmarks[n] for n in person.landmark_names])
    assert pts.shape == (len(person.landmark_names), 3)
    d = _distance(posed, pts)
    assert d.max() < 1e-5, dict(zip(person.landmark_names, d))


def test_birthmark_on_left_forearm(person: Person, rest: PosedPerson) -> None:
    assert rest.landmarks["birthmark"][0] > 0
    v = _landmark_vertex(rest, "birthmark")
    sl = _part_slice(person, "forearm_l")
    assert sl.start <= v < sl.stop


# ----------------------------------------------------------------------------- surface samples, inside


@pytest.mark.parametrize("frame", [None, 23])
def test_surface_samples(person: Person, clip, frame) -> None:
    posed = person.pose(None if frame is None else clip.params(frame))
    n = 5000
    pts = person.surface_samples(posed, n)
    assert pts.shape == (n, 3)
    assert np.isfinite(pts).all()
    assert _distance(posed, pts).max() < 1e-4
    assert not person.inside(pts, posed).any()
    # deterministic for a seed
    assert np.array_equal(person.surface_samples(posed, n), pts)
    assert pts[:, 2].min() > -0.005


def test_inside(person: Person, rest: PosedPerson, posed_frames) -> None:
    chest = person.parts[person.part_names.index("chest")]
    for posed in (rest, posed_frames[12], posed_frames[-1]):
        g = posed.joint_transforms["chest"]
        chest_centre = g[:3, :3] @ chest.shape.centre + g[:3, 3]
        front = g[:3, :3] @ np.array([0.0, -1.0, 0.0])  # the chest's -y is the person's front
        pts = np.stack([posed.joints["pelvis"], chest_centre, chest_centre + 0.5 * front])
        res = person.inside(pts, posed)
        assert res.dtype == bool and res.shape == (3,)
        assert res.tolist() == [True, True, False]
    # far away and on the floor under the person: outside
    assert not person.inside(np.array([[5.0, 5.0, 1.0], [0.0, 0.0, -0.1]]), rest).any()
    assert person.inside(np.zeros((0, 3)), rest).shape == (0,)


@pytest.mark.parametrize("shape", [(3,), (4, 2), (4, 4), (2, 4, 3)])
def test_inside_rejects_wrong_shapes(person: Person, rest: PosedPerson, shape) -> None:
    with pytest.raises(ShapeError):
        person.inside(np.zeros(shape), rest)


# ----------------------------------------------------------------------------- texture, albedo


def test_albedo_values(person: Person) -> None:
    rng = np.random.default_rng(3)
    uv = rng.random((1000, 2))
    a = person.albedo(uv)
    assert a.shape == (1000, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    av = person.albedo(person.vertex_uv)
    assert av.shape == (len(person.vertex_uv), 3) and av.dtype == np.float32
    assert av.min() >= 0.0 and av.max() <= 1.0
    # corners of the atlas stay in range too
    corners = person.albedo(np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    assert corners.min() >= 0.0 and corners.max() <= 1.0


@pytest.mark.parametrize("shape", [(2,), (4, 3), (4, 1), (2, 4, 2)])
def test_albedo_rejects_wrong_shapes(person: Person, shape) -> None:
    with pytest.raises(ShapeError):
        person.albedo(np.zeros(shape))


def test_clothing_is_rich_in_detail(person: Person) -> None:
    skin = _laplacian_var(_tile_pixels(person, "neck"))
    for name in ("chest", "abdomen", "upper_arm_l"):
        assert _laplacian_var(_tile_pixels(person, name)) > 20 * skin, name
    for name in ("pelvis", "thigh_l", "shin_r"):  # denim: less than the print, still far above skin
        assert _laplacian_var(_tile_pixels(person, name)) > 5 * skin, name


def test_nothing_is_green(person: Person) -> None:
    t = person.texture.astype(np.int32)
    greenish = (t[..., 1] > t[..., 0] + 20) & (t[..., 1] > t[..., 2] + 20)
    assert greenish.mean() < 1e-4


def test_birthmark_is_darker_than_the_forearm(person: Person, rest: PosedPerson) -> None:
    v = _landmark_vertex(rest, "birthmark")
    mark = person.albedo(person.vertex_uv[v:v + 1])[0]
    skin = np.median(person.vertex_albedo[_part_slice(person, "forearm_l")], axis=0)
    assert mark.sum() < 0.5 * skin.sum(), (mark, skin)
    assert (mark < skin).all()


def test_tattoo_landmark_is_inside_the_ink_on_the_right_forearm(person: Person, rest: PosedPerson) -> None:
    assert rest.landmarks["tattoo"][0] < 0
    v = _landmark_vertex(rest, "tattoo")
    sl = _part_slice(person, "forearm_r")
    assert sl.start <= v < sl.stop
    near = np.flatnonzero(np.linalg.norm(rest.vertices[sl] - rest.landmarks["tattoo"], axis=1) < 0.04) + sl.start
    ink = person.albedo(person.vertex_uv[near]).sum(axis=1)
    skin = np.median(person.vertex_albedo[sl], axis=0).sum()
    assert len(near) >= 10 and (ink < 0.4 * skin).mean() > 0.05, (len(near), np.sort(ink)[:5], skin)


def test_to_open3d(rest: PosedPerson, posed_frames) -> None:
    for posed in (rest, posed_frames[-1]):
        m = posed.to_open3d()
        assert isinstance(m, o3d.geometry.TriangleMesh)
        assert len(m.vertices) == len(posed.vertices)
        assert len(m.triangles) == len(posed.triangles)
        assert m.has_vertex_colors() and m.has_vertex_normals()
        np.testing.assert_allclose(np.asarray(m.vertices), posed.vertices)
        assert np.array_equal(np.asarray(m.triangles), posed.triangles)
        cols = np.asarray(m.vertex_colors)
        assert cols.shape == (len(posed.vertices), 3) and cols.min() >= 0 and cols.max() <= 1
        normals = np.asarray(m.vertex_normals)
        np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- motion clip


def test_default_clip_timing(clip) -> None:
    assert clip.frames == 24
    assert clip.fps == 24.0
    assert clip.time(12) == 0.5
    assert clip.time(0) == 0.0
    for bad in (-1, 24, 100):
        with pytest.raises(IndexError):
            clip.params(bad)


def test_default_clip_starts_at_rest(person: Person, rest: PosedPerson, clip) -> None:
    p0 = clip.params(0)
    posed = person.pose(p0)
    np.testing.assert_allclose(posed.vertices, rest.vertices, atol=1e-9, rtol=0)
    np.testing.assert_allclose(person.pose(PoseParams.rest()).vertices, rest.vertices, atol=0, rtol=0)
    assert p0.root_yaw == 0.0
    np.testing.assert_allclose(p0.root_translation, 0.0, atol=1e-12)


def test_default_clip_turns_and_raises_arms(posed_frames) -> None:
    first, last = posed_frames[0], posed_frames[-1]
    turn = _yaw(last.joint_transforms["pelvis"]) - _yaw(first.joint_transforms["pelvis"])
    assert abs(math.degrees(turn)) > 60
    assert turn > 0  # towards the person's left
    for w in ("wrist_l", "wrist_r"):
        assert last.joints[w][2] - first.joints[w][2] > 0.3, w


def test_default_clip_stays_above_the_floor(posed_frames) -> None:
    for f, posed in enumerate(posed_frames):
        assert posed.vertices[:, 2].min() >= -0.005, f"frame {f}"
        assert posed.vertices[:, 2].min() <= 0.01, f"frame {f}: feet leave the floor"


def test_default_clip_feet_stay_planted(posed_frames) -> None:
    """The feet stay in place relative to the turn.

    The clip turns the whole body (feet included) by 90 degrees about the
    vertical through the pelvis, so each ankle, 9.5 cm off that axis, sweeps
    ~13 cm in world xy by design; what must stay put is the ankle in the
    body's turning frame, the point between the feet and the ankle height.
    """
    first = posed_frames[0]
    for f, posed in enumerate(posed_frames):
        yaw = _yaw(posed.joint_transforms["pelvis"])
        mid0 = 0.5 * (first.joints["ankle_l"] + first.joints["ankle_r"])
        mid = 0.5 * (posed.joints["ankle_l"] + posed.joints["ankle_r"])
        assert np.linalg.norm(mid[:2] - mid0[:2]) < 0.1, f"frame {f}"
        for a in ("ankle_l", "ankle_r"):
            here = posed.joints[a]
            # the turn is about the world z axis (the pelvis stands over the origin)
            swept = _rot_z(yaw) @ first.joints[a][:2]
            assert np.linalg.norm(here[:2] - swept) < 0.02, f"{a} frame {f}"
        assert min(posed.joints["ankle_l"][2], posed.joints["ankle_r"][2]) == pytest.approx(
            first.joints["ankle_l"][2], abs=1e-9)


def test_default_clip_other_lengths(person: Person, rest: PosedPerson) -> None:
    c = default_clip(frames=10, fps=30)
    assert c.frames == 10 and c.fps == 30.0
    assert c.time(9) == pytest.approx(0.3)
    np.testing.assert_allclose(person.pose(c.params(0)).vertices, rest.vertices, atol=1e-9, rtol=0)
    last = person.pose(c.params(9))
    assert math.degrees(_yaw(last.joint_transforms["pelvis"])) > 60
    with pytest.raises(IndexError):
        c.params(10)
    one = default_clip(frames=1)
    assert one.frames == 1
    np.testing.assert_allclose(person.pose(one.params(0)).vertices, rest.vertices, atol=1e-9, rtol=0)


def test_default_clip_is_deterministic(clip) -> None:
    again = default_clip()
    for f in range(clip.frames):
        a, b = clip.params(f), again.params(f)
        assert a.root_yaw == b.root_yaw
        assert np.array_equal(a.root_translation, b.root_translation)
        assert a.angles.keys() == b.angles.keys()
        for k in a.angles:
            assert np.array_equal(a.angles[k], b.angles[k])


def test_pose_params_validation(person: Person) -> None:
    with pytest.raises(TwinstudioError):
        person.pose(PoseParams(angles={"tail": np.zeros(3)}))
    with pytest.raises(ShapeError):
        PoseParams(angles={"elbow_l": np.zeros(2)})
    with pytest.raises(ShapeError):
        PoseParams(angles={"elbow_l": np.zeros((3, 1))})
    with pytest.raises(ShapeError):
        PoseParams(root_translation=np.zeros(2))
    # lists are accepted and converted
    p = PoseParams(angles={"elbow_l": [0.1, 0.0, 0.0]}, root_translation=[0.0, 0.0, 0.1], root_yaw=1)
    assert isinstance(p.angles["elbow_l"], np.ndarray) and isinstance(p.root_yaw, float)
    posed = person.pose(p)
    assert posed.vertices[:, 2].min() == pytest.approx(person.pose().vertices[:, 2].min() + 0.1)
