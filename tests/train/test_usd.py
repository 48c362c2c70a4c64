"""The twin as OpenUSD: read back with pxr, cameras that project like the rig's, splat values equal to the PLY's,
motion as time samples, the checks catching what a broken writer would produce, and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

pxr = pytest.importorskip("pxr")
from pxr import Gf, Usd, UsdGeom, UsdVol, Vt  # noqa: E402

from rigs.geometry import Camera, Intrinsics, Pose, look_at, project_points  # noqa: E402
from rigs.rigfile import load_rig, resolve_rig_path  # noqa: E402
from train.splat_ply import SplatParams, read_splat_ply, write_splat_ply  # noqa: E402
from train.usd import (CAMERA_TOLERANCE_PX, TwinSources, UsdExportError, check_usd, project_with_usd_camera,  # noqa: E402
                       read_usd_splat, write_usd)

SUBJECT = "subj-042"
CONSENT = {"consent_id": "c-1", "agency": "Nova Models", "scopes": ["capture", "train", "share"],
           "purposes": ["e-commerce"], "markets": ["EU"], "valid_from": "2026-12-01", "valid_until": "2027-01-01",
           "compensation_ref": "INV-7", "document_sha256": "a" * 64}


def _splat(n: int = 500, degree: int = 3, seed: int = 0) -> SplatParams:
    rng = np.random.default_rng(seed)
    k1 = (degree + 1) ** 2 - 1
    rest = rng.normal(size=(n, k1, 3)).astype(np.float32)
    rest[..., 1] += 10.0  # channels far apart, so a channel or coefficient mix-up shows
    return SplatParams(means=rng.normal(0, 0.2, (n, 3)) + [0, 0, 1.0], log_scales=rng.uniform(-6, -3, (n, 3)),
                       quats=rng.normal(size=(n, 4)) * 3.0, opacity_logits=rng.normal(size=n) * 3,
                       sh_dc=rng.normal(size=(n, 3)), sh_rest=rest)


def _cameras() -> dict[str, Camera]:
    """The library rig's cameras (with their lens distortion), plus one with a far-off principal point and
    non-square pixels."""
    cams = {c.id: c for c in load_rig(resolve_rig_path("virtual-ring-24")).cameras[:6]}
    odd = Intrinsics(640, 400, 700.0, 760.0, 401.3, 150.8, (0.05, -0.01, 0.0, 0.0, 0.0))
    cams["odd cam/1"] = Camera("odd cam/1", odd, look_at(np.array([2.0, 1.0, 1.6]), np.array([0.0, 0.0, 1.0])))
    return cams


def _write_cameras(path, cams):
    from reconstruct.inputs import write_cameras

    write_cameras(path, cams.values(), method="test")


def _mesh_ply(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    m.apply_translation([0, 0, 1.0])
    rng = np.random.default_rng(1)
    colors = rng.integers(0, 256, (len(m.vertices), 3), dtype=np.uint8)
    m.visual.vertex_colors = np.c_[colors, np.full(len(colors), 255, np.uint8)]
    m.export(path)
    return np.asarray(m.vertices), np.asarray(m.faces), colors


def _motion(path, frames: int = 6, tracks: int = 40) -> dict:
    rng = np.random.default_rng(2)
    pts = rng.normal(0, 0.2, (frames, tracks, 3)) + [0, 0, 1.0]
    pts[1, :5] = np.nan  # tracks lost in a frame
    doc = {"points": pts, "times": np.arange(frames) / 25.0 + 0.0004 * rng.random(frames),
           "frames": np.arange(10, 10 + frames), "track_ids": np.arange(100, 100 + tracks)}
    np.savez_compressed(path, **doc)
    return doc


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    d = tmp_path_factory.mktemp("usd")
    params = _splat()
    write_splat_ply(d / "splat.ply", params)
    cams = _cameras()
    _write_cameras(d / "cameras.json", cams)
    mesh = _mesh_ply(d / "mesh.ply")
    motion = _motion(d / "trajectories.npz")
    sources = TwinSources(splat=d / "splat.ply", cameras=d / "cameras.json", mesh=d / "mesh.ply",
                          motion=d / "trajectories.npz", subject_id=SUBJECT, consent=CONSENT,
                          ai_disclosure={"label": "AI-generated digital twin", "requirement": "disclose it"},
                          provenance={"session_manifest_sha256": "b" * 64}, origin="test")
    result = write_usd(sources, d / "twin.usdz")
    return {"dir": d, "params": params, "cams": cams, "mesh": mesh, "motion": motion, "sources": sources,
            "result": result, "stage": Usd.Stage.Open(str(result.path))}


def test_the_scene_reads_back_with_pxr(twin):
    r, stage = twin["result"], twin["stage"]
    assert r.problems == []
    assert (r.gaussians, r.sh_degree, r.cameras, r.motion_frames) == (500, 3, 7, 6)
    assert UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.z and UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    assert stage.GetDefaultPrim().GetPath() == "/Twin"
    assert stage.GetPrimAtPath("/Twin/Splat").IsA(UsdVol.ParticleField3DGaussianSplat)
    assert stage.GetPrimAtPath("/Twin/Mesh").IsA(UsdGeom.Mesh)
    assert len([p for p in stage.Traverse() if p.IsA(UsdGeom.Camera)]) == 7
    meta = stage.GetRootLayer().customLayerData["twinstudio"]
    assert meta["subject_id"] == SUBJECT
    assert meta["consent"]["consent_id"] == "c-1" and list(meta["consent"]["markets"]) == ["EU"]
    assert meta["ai_disclosure"]["label"] == "AI-generated digital twin"
    assert meta["splat"]["ply_sha256"] == hashlib.sha256((twin["dir"] / "splat.ply").read_bytes()).hexdigest()
    assert "opacities in [0, 1] after the" in stage.GetRootLayer().documentation


def test_splat_values_equal_the_ply(twin):
    ply = read_splat_ply(twin["dir"] / "splat.ply")
    s = UsdVol.ParticleField3DGaussianSplat(twin["stage"].GetPrimAtPath("/Twin/Splat"))
    np.testing.assert_array_equal(np.asarray(s.GetPositionsAttr().Get()), ply.means)
    np.testing.assert_array_equal(np.asarray(s.GetScalesAttr().Get()), np.exp(ply.log_scales))
    np.testing.assert_allclose(np.asarray(s.GetOpacitiesAttr().Get()), 1 / (1 + np.exp(-ply.opacity_logits)),
                               rtol=1e-6)
    q = s.GetOrientationsAttr().Get()
    want = ply.quats / np.linalg.norm(ply.quats, axis=1, keepdims=True)
    got = np.array([[x.GetReal(), *x.GetImaginary()] for x in q])  # through Gf's accessors, not memory order
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert s.GetRadianceSphericalHarmonicsDegreeAttr().Get() == 3
    sh = np.asarray(s.GetRadianceSphericalHarmonicsCoefficientsAttr().Get()).reshape(500, 16, 3)
    np.testing.assert_array_equal(sh[:, 0], ply.sh_dc)
    np.testing.assert_array_equal(sh[:, 1:], ply.sh_rest)  # coefficient-major per particle, channels inside
    back = read_usd_splat(twin["result"].path)
    np.testing.assert_array_equal(back.means, ply.means)
    # float32 opacities hold a logit of 6 only to ~3e-5: compare where the values are used, after the sigmoid
    np.testing.assert_allclose(1 / (1 + np.exp(-back.opacity_logits)), 1 / (1 + np.exp(-ply.opacity_logits)),
                               atol=1e-7)
    np.testing.assert_allclose(back.log_scales, ply.log_scales, atol=1e-6)


def test_extent_holds_every_gaussian_to_three_sigma(twin):
    s = UsdVol.ParticleField3DGaussianSplat(twin["stage"].GetPrimAtPath("/Twin/Splat"))
    lo, hi = np.asarray(s.GetExtentAttr().Get())
    p = twin["params"]
    reach = 3 * np.exp(p.log_scales).max(axis=1)[:, None]
    assert (p.means - reach >= lo - 1e-6).all() and (p.means + reach <= hi + 1e-6).all()
    np.testing.assert_allclose(lo, (p.means - reach).min(axis=0), atol=1e-6)


def test_mesh_vertices_project_through_the_usd_cameras_like_the_rig(twin):
    """Through OpenUSD's own frustum (view and projection matrices) to the same pixel as rigs.geometry
    projects with the camera's pinhole (the bundle's images are undistorted), <= 0.01 px."""
    vertices = twin["mesh"][0]
    stage = twin["stage"]
    by_id = {p.GetCustomDataByKey("twinstudio")["cameraId"]: p for p in stage.Traverse() if p.IsA(UsdGeom.Camera)}
    assert set(by_id) == set(twin["cams"])
    worst = 0.0
    for cid, cam in twin["cams"].items():
        pinhole = dataclasses.replace(cam.intrinsics, dist=(0.0,) * 5)
        want, depth = project_points(vertices, pinhole, cam.pose)
        got = project_with_usd_camera(stage, str(by_id[cid].GetPath()), vertices, pinhole.width, pinhole.height)
        assert (depth > 0).all()
        worst = max(worst, float(np.abs(got - want).max()))
        info = by_id[cid].GetCustomDataByKey("twinstudio")
        assert list(info["opencvDistortion"]) == list(cam.intrinsics.dist)
        near, far = UsdGeom.Camera(by_id[cid]).GetClippingRangeAttr().Get()
        assert near < depth.min() and depth.max() < far
    assert worst <= CAMERA_TOLERANCE_PX, worst
    assert "odd_cam_1" in {p.GetName() for p in by_id.values()}  # a valid prim name, the id kept in customData


def test_mesh_colours_and_topology(twin):
    vertices, faces, colors = twin["mesh"]
    m = UsdGeom.Mesh(twin["stage"].GetPrimAtPath("/Twin/Mesh"))
    np.testing.assert_allclose(np.asarray(m.GetPointsAttr().Get()), vertices, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.GetFaceVertexIndicesAttr().Get()).reshape(-1, 3), faces)
    pv = m.GetDisplayColorPrimvar()
    assert pv.GetInterpolation() == UsdGeom.Tokens.vertex
    c = colors / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(np.asarray(pv.Get()), linear, atol=1e-6)


def test_motion_is_time_sampled_at_the_capture_frame_rate(twin):
    stage, mo = twin["stage"], twin["motion"]
    assert stage.GetTimeCodesPerSecond() == pytest.approx(25.0, rel=0.02)
    assert (stage.GetStartTimeCode(), stage.GetEndTimeCode()) == (10.0, 15.0)
    pts = UsdGeom.Points(stage.GetPrimAtPath("/Twin/Motion/Tracks"))
    assert pts.GetPointsAttr().GetTimeSamples() == [float(f) for f in mo["frames"]]
    for k, f in enumerate(mo["frames"]):
        live = np.isfinite(mo["points"][k]).all(axis=1)
        np.testing.assert_allclose(np.asarray(pts.GetPointsAttr().Get(float(f))), mo["points"][k][live], atol=1e-6)
        np.testing.assert_array_equal(np.asarray(pts.GetIdsAttr().Get(float(f))), mo["track_ids"][live])
    assert len(pts.GetPointsAttr().Get(11.0)) == 35  # five tracks lost in the second frame


def test_the_same_twin_gives_the_same_bytes(twin, tmp_path):
    again = write_usd(twin["sources"], tmp_path / "again.usdz")
    assert again.path.read_bytes() == twin["result"].path.read_bytes()


def _broken(twin, tmp_path, edit) -> list[str]:
    src = Usd.Stage.Open(str(twin["result"].path))
    out = tmp_path / "broken.usdc"
    src.Export(str(out))
    stage = Usd.Stage.Open(str(out))
    edit(stage)
    stage.GetRootLayer().Save()
    return check_usd(out)


@pytest.mark.parametrize("edit, expected", [
    (lambda st: UsdVol.ParticleField3DGaussianSplat(st.GetPrimAtPath("/Twin/Splat")).GetOpacitiesAttr().Set(
        Vt.FloatArray([-1.0] * 500)), "opacities outside [0, 1]"),
    (lambda st: UsdVol.ParticleField3DGaussianSplat(st.GetPrimAtPath("/Twin/Splat")).GetScalesAttr().Set(
        Vt.Vec3fArray([Gf.Vec3f(0.01)] * 499)), "scales has 499 values, expected 500"),
    (lambda st: UsdVol.ParticleField3DGaussianSplat(st.GetPrimAtPath("/Twin/Splat"))
     .GetRadianceSphericalHarmonicsDegreeAttr().Set(2), "has 8000 values, expected 4500"),
    (lambda st: UsdVol.ParticleField3DGaussianSplat(st.GetPrimAtPath("/Twin/Splat")).GetExtentAttr().Clear(),
     "no extent"),
    (lambda st: UsdVol.ParticleField3DGaussianSplat(st.GetPrimAtPath("/Twin/Splat")).GetExtentAttr().Set(
        Vt.Vec3fArray([Gf.Vec3f(0), Gf.Vec3f(0.1)])), "does not hold every Gaussian"),
    (lambda st: UsdGeom.SetStageMetersPerUnit(st, 0.01), "metersPerUnit is 0.01"),
    (lambda st: st.GetPrimAtPath("/Twin/Cameras/cam01").GetAttribute("horizontalApertureOffset").Set(0.01),
     "/Twin/Cameras/cam01: the USD camera projects"),
    (lambda st: UsdGeom.Mesh(st.GetPrimAtPath("/Twin/Mesh")).GetFaceVertexIndicesAttr().Set(
        Vt.IntArray([0, 1, 99999] * 320)), "faceVertexIndices reach 99999"),
])
def test_the_checks_catch_a_broken_scene(twin, tmp_path, edit, expected):
    problems = _broken(twin, tmp_path, edit)
    assert any(expected in p for p in problems), problems


def test_refusals_name_the_file(twin, tmp_path):
    with pytest.raises(UsdExportError, match=r"twin\.obj: the USD file must end in"):
        write_usd(twin["sources"], tmp_path / "twin.obj")
    (tmp_path / "bad.usda").write_text("#usda 1.0\n(\n broken")
    with pytest.raises(UsdExportError, match="bad.usda: not a USD file"):
        check_usd(tmp_path / "bad.usda")
    (tmp_path / "trajectories.npz").write_bytes(b"not a zip")
    bad = dataclasses.replace(twin["sources"], motion=tmp_path / "trajectories.npz")
    with pytest.raises(UsdExportError, match="trajectories.npz: cannot read the motion tracks"):
        write_usd(bad, tmp_path / "t.usdz")
    assert not (tmp_path / "t.usdz").exists() and not list(tmp_path.glob(".t.usdz.*"))


def _layer_data(path) -> dict:
    stage = Usd.Stage.Open(str(path))  # held while its layer is read
    return stage.GetRootLayer().customLayerData["twinstudio"]


def test_cli_exports_a_session_and_a_bundle(tmp_path, capsys):
    from tests.handoff.sessions import make_session
    from twinstudio.cli import main

    def run(args):
        rc = main(args)
        cap = capsys.readouterr()
        return rc, " ".join(cap.out.split()), " ".join(cap.err.split())

    from train.handoff.bundle import BundleOptions, build_bundle
    from train.handoff.integrity import init_keys

    session = make_session(tmp_path / "session")
    rc, out, err = run(["export", "usd", str(session), "--out", str(tmp_path / "s.usda")])
    assert rc == 0, err
    assert "64 Gaussians" in out and "checks: passed" in out
    meta = _layer_data(tmp_path / "s.usda")
    assert meta["subject_id"] == "subj-007" and "session_manifest_sha256" in meta["provenance"]
    rc, _, err = run(["export", "usd", str(session), "--out", str(tmp_path / "s.usda")])
    assert rc == 2 and "already exists" in err

    key, _ = init_keys(tmp_path / "keys")
    b = build_bundle(session, tmp_path / "bundle", BundleOptions(key=key, generation_kit=False))
    assert (b.path / "usd" / "twin.usdz").is_file()
    assert "usd/twin.usdz" in {f["path"] for f in b.manifest["files"]}
    rc, out, err = run(["export", "usd", str(b.path), "--out", str(tmp_path / "b.usdz")])
    assert rc == 0, err
    meta = _layer_data(tmp_path / "b.usdz")
    want = hashlib.sha256((b.path / "MANIFEST.json").read_bytes()).hexdigest()
    assert meta["provenance"]["bundle_manifest_sha256"] == want
    assert json.loads((b.path / "MANIFEST.json").read_text())["consent"]["consent_id"] == meta["consent"]["consent_id"]
    rc, out, _ = run(["export", "check", str(b.path / "usd" / "twin.usdz")])
    assert rc == 0 and "passed" in out
    rc, _, err = run(["export", "usd", str(tmp_path), "--out", str(tmp_path / "x.usdz")])
    assert rc == 2 and "neither a session" in err
