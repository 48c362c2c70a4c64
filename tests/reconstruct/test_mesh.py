"""Dense geometry: hull, refinement, mesh files and scores, against the virtual studio's ground truth.

The scene is the stills take of virtual-ring-24, all 24 cameras at scale 0.3
(384x288 px: a pixel is about 12 mm on the subject), meshed once per module.
At this scale the targets of the issue (Chamfer <= 5 mm, F-score at 5 mm >=
0.9, measured at full size: see ``benchmarks/mesh.py``) loosen to Chamfer <=
5.5 mm, F-score at 5 mm >= 0.65 and at 10 mm >= 0.9 (measured: 4.5 mm, 0.73);
the tests check those, plus watertightness, the files, the colours and every
bad input.
"""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from reconstruct.inputs import (
    GroundTruth,
    ReconstructError,
    read_cameras,
    write_cameras,
)
from reconstruct.mesh import (
    MeshOptions,
    MeshProgress,
    build_mesh,
    encode_glb,
    encode_obj,
    encode_ply,
    ground_truth_points,
    mesh_topology,
    run_mesh,
    sample_surface,
    score_mesh,
)
from rigs.geometry import Camera
from rigs.virtual.render import RenderOptions, run_render

SCALE = 0.3
TAKE = "stills-001"
#: fast options for the runs that only check inputs and reports
QUICK = MeshOptions(voxel_mm=16.0, levels=3, refine=False)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh") / "render"
    run_render("virtual-ring-24", root, RenderOptions(takes=("stills",), scale=SCALE, workers=1))
    return root


@pytest.fixture(scope="module")
def meshed(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh-out")
    events: list[MeshProgress] = []
    report = run_mesh(scene, scene / "gt" / "cameras.json", out, on_event=events.append, score_points=100_000)
    return report, events, out


# ----------------------------------------------------------------------------- the small scene


def test_mesh_is_watertight_and_accurate(meshed, scene):
    report, events, out = meshed
    doc = json.loads((out / "mesh.json").read_text())
    assert doc["schema"] == "twinstudio.mesh" and doc["version"] == 1
    assert doc["take"] == TAKE and doc["frame"] == 0
    assert len(doc["cameras"]) == 24 and doc["skipped"] == []
    assert report.watertight and doc["watertight"]
    assert doc["topology"]["components"] == 1
    assert doc["vertices"] == report.vertices > 1000 and doc["triangles"] == report.triangles
    assert doc["seconds"] > 0 and set(doc["files"]) == {"ply", "obj", "glb"}
    # the subject stands on the floor and is about 1.77 m tall
    (lo, hi) = np.array(doc["bounds_m"])
    assert lo[2] == pytest.approx(0.0, abs=0.01) and hi[2] == pytest.approx(1.77, abs=0.05)
    g = doc["ground_truth"]
    assert g is not None and g == report.scores
    print(f"\nscale {SCALE}: Chamfer {g['chamfer_mm']:.2f} mm, F@5mm {g['fscore']:.3f}, {doc['seconds']:.1f} s")
    assert g["chamfer_mm"] <= 5.5
    assert g["fscore"] >= 0.65
    stages = {e.stage for e in events}
    assert {"inputs", "hull", "surface", "colour", "write", "score"} <= stages


def test_fscore_at_10mm_and_ground_truth_points(meshed, scene):
    _, _, out = meshed
    import open3d as o3d

    pts = ground_truth_points(scene, TAKE, 0, 50_000)
    assert pts.shape == (50_000, 3)
    # the samples lie on the ground-truth mesh (its outer surface)
    gt_mesh = o3d.io.read_triangle_mesh(str(GroundTruth.find(scene).mesh_path(TAKE, 0)))
    sc = o3d.t.geometry.RaycastingScene()
    sc.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(gt_mesh))
    assert sc.compute_distance(o3d.core.Tensor(pts[:2000].astype(np.float32))).numpy().max() < 1e-5
    mesh = o3d.io.read_triangle_mesh(str(out / "mesh.ply"))
    s = score_mesh(np.asarray(mesh.vertices), np.asarray(mesh.triangles), pts, threshold=0.010)
    assert s["fscore"] >= 0.9 and s["threshold_mm"] == 10.0


def test_files_read_back(meshed):
    import open3d as o3d

    report, _, out = meshed
    ply = o3d.io.read_triangle_mesh(str(out / "mesh.ply"))
    assert len(ply.vertices) == report.vertices and len(ply.triangles) == report.triangles
    assert ply.has_vertex_colors() and ply.has_vertex_normals()
    assert mesh_topology(np.asarray(ply.triangles), len(ply.vertices))["watertight"]
    obj = o3d.io.read_triangle_mesh(str(out / "mesh.obj"))
    assert len(obj.triangles) == report.triangles and obj.has_vertex_colors()
    assert np.allclose(obj.get_axis_aligned_bounding_box().get_extent(),
                       ply.get_axis_aligned_bounding_box().get_extent(), atol=1e-5)
    glb = o3d.io.read_triangle_mesh(str(out / "mesh.glb"))
    assert len(glb.vertices) == report.vertices and len(glb.triangles) == report.triangles
    trimesh = pytest.importorskip("trimesh")
    tm = trimesh.load(out / "mesh.glb", force="mesh")
    assert tm.faces.shape == (report.triangles, 3)
    # glTF is y up: the node turns studio (x, y, z) into (x, z, -y)
    v = np.asarray(ply.vertices)
    assert np.allclose(tm.vertices, np.stack([v[:, 0], v[:, 2], -v[:, 1]], 1), atol=1e-5)
    assert tm.is_watertight


def test_colours_follow_the_clothes(meshed):
    import open3d as o3d

    _, _, out = meshed
    m = o3d.io.read_triangle_mesh(str(out / "mesh.ply"))
    v, c = np.asarray(m.vertices), np.asarray(m.vertex_colors)
    legs = (v[:, 2] > 0.3) & (v[:, 2] < 0.7)  # denim
    chest = (v[:, 2] > 1.15) & (v[:, 2] < 1.35) & (np.abs(v[:, 0]) < 0.1)  # the printed shirt
    jeans, shirt = np.median(c[legs], axis=0), np.median(c[chest], axis=0)
    assert jeans[2] > jeans[0] + 0.1  # blue over red
    assert shirt[0] > shirt[2] and shirt.mean() > jeans.mean() + 0.15  # a light, warm shirt
    assert np.isfinite(c).all() and c.min() >= 0 and c.max() <= 1


# ----------------------------------------------------------------------------- inputs and reports


def test_skips_uncalibrated_and_corrupt_cameras_with_mask_files(scene, tmp_path):
    root = tmp_path / "capture"
    shutil.copytree(scene, root, ignore=shutil.ignore_patterns("gt"))
    shutil.copytree(scene / "gt", root / "gt")
    (root / "takes" / TAKE / "cam03" / "000000.jpg").write_bytes(b"not a jpeg")
    cams = read_cameras(scene / "gt" / "cameras.json")
    write_cameras(tmp_path / "cameras.json", [c for i, c in sorted(cams.items()) if i != "cam24"])
    masks = tmp_path / "masks"
    gt = GroundTruth.find(scene)
    for cid in cams:  # the layout run_masks writes: <camera>/<frame>.mask.png
        (masks / cid).mkdir(parents=True)
        cv2.imwrite(str(masks / cid / "000000.mask.png"), gt.mask(TAKE, cid, 0).astype(np.uint8) * 255)
    rep = run_mesh(root, tmp_path / "cameras.json", tmp_path / "out", masks_dir=masks, options=QUICK,
                   score_points=0)
    # the overwritten image fails its render.json hash: left out before it is read
    assert rep.skipped["cam03"] == "000000.jpg left out: sha256 differs from render.json"
    assert "not in cameras.json" in rep.skipped["cam24"]
    assert len(rep.cameras) == 22 and rep.watertight and rep.scores is None
    doc = json.loads(rep.manifest_path.read_text())
    assert {"camera": "cam03", "reason": rep.skipped["cam03"]} in doc["skipped"]
    assert doc["left_out"] == {str(root / "takes" / TAKE / "cam03" / "000000.jpg"): "sha256 differs from render.json"}
    assert doc["masks"] == "files"


def test_too_few_usable_cameras(scene, tmp_path):
    cams = read_cameras(scene / "gt" / "cameras.json")
    write_cameras(tmp_path / "three.json", [cams["cam01"], cams["cam05"], cams["cam09"]])
    root = tmp_path / "capture"
    shutil.copytree(scene / "takes" / TAKE / "cam01", root / "takes" / TAKE / "cam01")
    shutil.copytree(scene / "takes" / TAKE / "cam05", root / "takes" / TAKE / "cam05")
    (root / "takes" / TAKE / "cam09").mkdir()
    (root / "takes" / TAKE / "cam09" / "000000.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(ReconstructError, match="2 usable camera") as e:
        run_mesh(root, tmp_path / "three.json", tmp_path / "out", options=QUICK)
    assert "cam09" in str(e.value) and e.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_intrinsics_follow_the_image_size_of_the_same_aspect_ratio(scene, tmp_path):
    exact = read_cameras(scene / "gt" / "cameras.json")
    cams = dict(exact)
    # calibrated at twice the size of these images (a capture shot at a smaller render scale)
    cams["cam07"] = Camera("cam07", exact["cam07"].intrinsics.scaled(2.0), exact["cam07"].pose)
    write_cameras(tmp_path / "cameras.json", cams.values())
    rep = run_mesh(scene, tmp_path / "cameras.json", tmp_path / "out", options=QUICK, score_points=0)
    big, small = cams["cam07"].intrinsics, exact["cam07"].intrinsics
    doc = json.loads(rep.manifest_path.read_text())
    assert doc["rescaled"] == {"cam07": f"{big.width}x{big.height} -> {small.width}x{small.height}"}
    assert "cam07" in rep.cameras and len(rep.cameras) == 24 and rep.watertight
    ref = run_mesh(scene, scene / "gt" / "cameras.json", tmp_path / "ref", options=QUICK, score_points=0)
    assert rep.vertices == ref.vertices  # the scaled intrinsics are the exact ones: the same mesh
    # another aspect ratio is another sensor mode, not a resize: refused, naming the camera
    i = exact["cam07"].intrinsics
    cams["cam07"] = Camera("cam07", type(i)(i.width * 2, i.height, i.fx, i.fy, i.cx, i.cy, i.dist),
                           exact["cam07"].pose)
    write_cameras(tmp_path / "wide.json", cams.values())
    with pytest.raises(ReconstructError, match="cam07") as e:
        run_mesh(scene, tmp_path / "wide.json", tmp_path / "out2", options=QUICK)
    assert f"calibrated for {i.width * 2}x{i.height}" in str(e.value) and "another aspect ratio" in str(e.value)
    assert e.value.facts["camera"] == "cam07" and not (tmp_path / "out2").exists()


def test_empty_or_missing_mask_files(scene, tmp_path):
    masks = tmp_path / "masks"
    gt = GroundTruth.find(scene)
    cams = read_cameras(scene / "gt" / "cameras.json")
    for cid in cams:
        (masks / cid).mkdir(parents=True)
        m = gt.mask(TAKE, cid, 0) & (cid != "cam05")
        cv2.imwrite(str(masks / cid / "000000.mask.png"), m.astype(np.uint8) * 255)
    with pytest.raises(ReconstructError, match="mask of camera cam05 is empty"):
        run_mesh(scene, scene / "gt" / "cameras.json", tmp_path / "out", masks_dir=masks, options=QUICK)
    (masks / "cam05" / "000000.mask.png").unlink()
    with pytest.raises(ReconstructError, match="no mask for camera cam05"):
        run_mesh(scene, scene / "gt" / "cameras.json", tmp_path / "out", masks_dir=masks, options=QUICK)


def test_build_mesh_checks_its_arguments(scene):
    gt = GroundTruth.find(scene)
    cams = gt.cameras()
    masks = {c: gt.mask(TAKE, c, 0) for c in ("cam01", "cam05", "cam09", "cam13")}
    with pytest.raises(ReconstructError, match="at least 3 cameras"):
        build_mesh(cams, {}, dict(list(masks.items())[:2]), QUICK)
    with pytest.raises(ReconstructError, match="cam99"):
        build_mesh(cams, {}, {**masks, "cam99": masks["cam01"]}, QUICK)
    with pytest.raises(ReconstructError, match="cam05: the mask is empty"):
        build_mesh(cams, {}, {**masks, "cam05": np.zeros_like(masks["cam05"])}, QUICK)
    with pytest.raises(ReconstructError, match="cam01: mask is"):
        build_mesh(cams, {}, {**masks, "cam01": masks["cam01"][:-1]}, QUICK)
    with pytest.raises(ReconstructError, match="voxel_mm"):
        build_mesh(cams, {}, masks, MeshOptions(voxel_mm=0.0))
    with pytest.raises(ReconstructError, match="no cameras file"):
        run_mesh(scene, scene / "missing.json", scene / "out")
    # four cameras and no images: a grey, closed hull
    res = build_mesh(cams, {}, masks, QUICK)
    assert res.watertight and np.allclose(res.colors, 0.7)


# ----------------------------------------------------------------------------- pure functions


def _sphere(radius: float, resolution: int = 100):
    import open3d as o3d

    m = o3d.geometry.TriangleMesh.create_sphere(radius=radius, resolution=resolution)
    return np.asarray(m.vertices), np.asarray(m.triangles)


def _on_sphere(radius: float, n: int, seed: int, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    p = np.random.default_rng(seed).normal(size=(n, 3))
    return np.asarray(centre) + radius * p / np.linalg.norm(p, axis=1, keepdims=True)


def test_score_mesh_on_spheres():
    v, t = _sphere(0.1)
    # ground truth 3 mm outside the mesh: every distance is ~3 mm, all within 5 mm
    s = score_mesh(v, t, _on_sphere(0.103, 50_000, seed=1))
    assert s["completeness_mm"] == pytest.approx(3.0, abs=0.05)
    assert s["accuracy_mm"] == pytest.approx(3.0, abs=0.2)  # + a little for the spacing of the samples
    assert s["chamfer_mm"] == pytest.approx((s["accuracy_mm"] + s["completeness_mm"]) / 2, abs=1e-3)
    assert s["precision"] == s["recall"] == s["fscore"] == 1.0
    # 8 mm away: nothing within 5 mm, everything within 10 mm
    far = _on_sphere(0.108, 20_000, seed=2)
    assert score_mesh(v, t, far)["fscore"] == 0.0 and score_mesh(v, t, far, threshold=0.01)["fscore"] == 1.0
    # half the truth is a second sphere the mesh misses: recall 1/2, precision 1, F 2/3
    gt = np.concatenate([_on_sphere(0.1, 20_000, 3), _on_sphere(0.1, 20_000, 4, centre=(1.0, 0, 0))])
    s = score_mesh(v, t, gt)
    assert s["recall"] == pytest.approx(0.5, abs=1e-3) and s["precision"] == 1.0
    assert s["fscore"] == pytest.approx(2 / 3, abs=1e-3)
    with pytest.raises(ReconstructError):
        score_mesh(v, t, np.zeros((0, 3)))


def test_sample_surface_is_uniform_and_deterministic():
    v, t = _sphere(1.0, 60)
    a = sample_surface(v, t, 20_000, seed=5)
    assert np.array_equal(a, sample_surface(v, t, 20_000, seed=5))
    assert np.linalg.norm(a, axis=1) == pytest.approx(1.0, abs=0.01)
    assert np.abs(a.mean(axis=0)).max() < 0.02  # no side preferred


def test_mesh_topology():
    import open3d as o3d

    box = o3d.geometry.TriangleMesh.create_box()
    t = np.asarray(box.triangles)
    top = mesh_topology(t, 8)
    assert top["watertight"] and top["genus"] == 0 and top["components"] == 1
    assert not mesh_topology(t[1:], 8)["watertight"] and mesh_topology(t[1:], 8)["boundary_edges"] == 3
    two = mesh_topology(np.concatenate([t, t + 8]), 16)
    assert two["watertight"] and two["components"] == 2
    torus = o3d.geometry.TriangleMesh.create_torus()
    assert mesh_topology(np.asarray(torus.triangles))["genus"] == 1
    flipped = t.copy()
    flipped[0] = flipped[0, ::-1]
    assert not mesh_topology(flipped, 8)["watertight"]
    # two cones sharing their apex: closed, but not a manifold at the apex
    cone = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]])
    bowtie = np.concatenate([cone, np.where(cone == 0, 0, cone + 3)])
    assert mesh_topology(bowtie)["nonmanifold_vertices"] == 1


def test_encoders_round_trip(tmp_path):
    """Each file read back by two libraries: the same vertices, faces, normals and colours, z up or glTF's y up."""
    import open3d as o3d
    import trimesh
    from plyfile import PlyData

    box = o3d.geometry.TriangleMesh.create_box()
    box.compute_vertex_normals()
    v, t, n = np.asarray(box.vertices), np.asarray(box.triangles), np.asarray(box.vertex_normals)
    colors = np.linspace(0, 1, 24).reshape(8, 3)  # sRGB 0..1
    u8 = np.round(colors * 255)
    linear = np.where(colors <= 0.04045, colors / 12.92, ((colors + 0.055) / 1.055) ** 2.4)
    for ext, enc in (("ply", encode_ply), ("obj", encode_obj), ("glb", encode_glb)):
        data = enc(v, t, n, colors)
        assert data == enc(v, t, n, colors), ext  # deterministic: bundles are hashed
        (tmp_path / f"m.{ext}").write_bytes(data)

    ply = PlyData.read(str(tmp_path / "m.ply"))
    assert not ply.text and ply.byte_order == "<"
    vert = ply["vertex"].data
    assert [p.name for p in ply["vertex"].properties] == ["x", "y", "z", "nx", "ny", "nz", "red", "green", "blue",
                                                          "alpha"]
    assert vert["x"].dtype == np.float32 and vert["red"].dtype == np.uint8
    np.testing.assert_allclose(np.stack([vert["x"], vert["y"], vert["z"]], 1), v, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.stack([vert["red"], vert["green"], vert["blue"]], 1), u8)
    np.testing.assert_array_equal(np.stack(ply["face"].data["vertex_indices"]), t)
    m = o3d.io.read_triangle_mesh(str(tmp_path / "m.ply"))
    np.testing.assert_allclose(np.asarray(m.vertices), v, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(m.triangles), t)
    np.testing.assert_allclose(np.asarray(m.vertex_normals), n, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(m.vertex_colors), u8 / 255, rtol=0, atol=1e-12)

    obj = trimesh.load(tmp_path / "m.obj", process=False)
    np.testing.assert_allclose(obj.vertices, v, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(obj.faces, t)
    np.testing.assert_array_equal(obj.visual.vertex_colors[:, :3], u8)
    m = o3d.io.read_triangle_mesh(str(tmp_path / "m.obj"))  # open3d may reorder the vertices
    order = [int(np.argmin(np.linalg.norm(v - p, axis=1))) for p in np.asarray(m.vertices)]
    np.testing.assert_allclose(np.asarray(m.vertices), v[order], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.vertex_colors), u8[order] / 255, rtol=0, atol=1e-6)

    # glTF is y up: the node turns studio (x, y, z) into (x, z, -y); COLOR_0 is linear RGB float
    y_up = np.stack([v[:, 0], v[:, 2], -v[:, 1]], 1)
    scene = trimesh.load(tmp_path / "m.glb")
    world = scene.to_geometry()
    np.testing.assert_allclose(world.vertices, y_up, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(world.faces, t)
    np.testing.assert_allclose(world.vertex_normals, np.stack([n[:, 0], n[:, 2], -n[:, 1]], 1), rtol=0, atol=1e-7)
    (raw,) = scene.geometry.values()
    np.testing.assert_allclose(raw.vertices, v, rtol=0, atol=1e-7)  # the vertex data stay in studio coordinates
    np.testing.assert_allclose(raw.visual.vertex_attributes["color"], linear, rtol=0, atol=1e-7)
    assert raw.visual.material.metallicFactor == 0.0 and raw.visual.material.roughnessFactor == 1.0
    m = o3d.io.read_triangle_mesh(str(tmp_path / "m.glb"))  # reorders the vertices too
    order = np.array([int(np.argmin(np.linalg.norm(y_up - p, axis=1))) for p in np.asarray(m.vertices)])
    np.testing.assert_allclose(np.asarray(m.vertices), y_up[order], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(order[np.asarray(m.triangles)], t)
    np.testing.assert_allclose(np.asarray(m.vertex_colors), linear[order], rtol=0, atol=1e-7)
    raw_bytes = (tmp_path / "m.glb").read_bytes()
    assert raw_bytes[:4] == b"glTF" and len(raw_bytes) % 4 == 0


def test_encoders_without_normals_or_colours(tmp_path):
    import open3d as o3d

    v = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    t = np.array([[0, 1, 2]])
    for ext, enc in (("ply", encode_ply), ("obj", encode_obj), ("glb", encode_glb)):
        (tmp_path / f"m.{ext}").write_bytes(enc(v, t))
        m = o3d.io.read_triangle_mesh(str(tmp_path / f"m.{ext}"))
        assert len(m.triangles) == 1 and not m.has_vertex_colors(), ext
        assert not m.has_vertex_normals() or ext == "obj", ext
