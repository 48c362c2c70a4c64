"""Splat PLY: round trips, the exact layout viewers read, channel-major f_rest, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from train.splat_ply import (
    AI_DISCLOSURE_COMMENT,
    GENERATOR_COMMENT,
    SH_C0,
    SplatError,
    SplatParams,
    ply_property_names,
    read_splat_ply,
    splat_ply_comments,
    splat_stats,
    write_splat_ply,
)


def _random_params(n: int, degree: int, seed: int = 0) -> SplatParams:
    """Random Gaussians whose SH channels all differ (so a channel/coefficient mix-up shows)."""
    rng = np.random.default_rng(seed)
    k1 = (degree + 1) ** 2 - 1
    rest = rng.normal(size=(n, k1, 3)).astype(np.float32)
    rest[..., 1] += 10.0  # channels far apart
    rest[..., 2] -= 10.0
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    return SplatParams(means=rng.uniform(-1, 1, (n, 3)), log_scales=rng.uniform(-6, -2, (n, 3)),
                       quats=quats, opacity_logits=rng.normal(size=n),
                       sh_dc=rng.normal(size=(n, 3)) + [0.0, 5.0, -5.0], sh_rest=rest)


def _assert_same(a: SplatParams, b: SplatParams) -> None:
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=0, atol=1e-6, err_msg=name)
        assert getattr(b, name).dtype == np.float32


@pytest.mark.parametrize("degree", [3, 0, 1])
def test_round_trip(tmp_path, degree):
    p = _random_params(257, degree, seed=degree)
    path = write_splat_ply(tmp_path / "splat.ply", p, comments=["session demo-001"])
    assert path == tmp_path / "splat.ply"
    q = read_splat_ply(path)
    assert q.n == 257 and q.sh_degree == degree
    _assert_same(p, q)
    assert splat_ply_comments(path) == [GENERATOR_COMMENT, AI_DISCLOSURE_COMMENT, "session demo-001"]
    assert not list(tmp_path.glob("*.partial"))


def test_header_bytes_and_other_readers(tmp_path):
    """The exact header, the float32 rows behind it, and open3d reading the positions."""
    import open3d as o3d

    p = _random_params(33, 2, seed=4)
    path = write_splat_ply(tmp_path / "s.ply", p, comments=["session demo-001"])
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    assert data[:end].decode("ascii").splitlines() == [
        "ply", "format binary_little_endian 1.0", f"comment {GENERATOR_COMMENT}", f"comment {AI_DISCLOSURE_COMMENT}",
        "comment session demo-001", "element vertex 33", *(f"property float {nm}" for nm in ply_property_names(2)),
        "end_header"]
    rows = np.frombuffer(data[end:], dtype="<f4").reshape(33, len(ply_property_names(2)))
    np.testing.assert_array_equal(rows[:, :3], p.means)
    np.testing.assert_array_equal(rows[:, -8], p.opacity_logits)
    assert PlyData.read(str(path)).comments == [GENERATOR_COMMENT, AI_DISCLOSURE_COMMENT, "session demo-001"]
    cloud = o3d.io.read_point_cloud(str(path))
    np.testing.assert_array_equal(np.asarray(cloud.points), p.means.astype(np.float64))
    assert np.all(np.asarray(cloud.normals) == 0)


def test_property_names_and_order_as_viewers_read_them(tmp_path):
    p = _random_params(5, 3)
    path = write_splat_ply(tmp_path / "s.ply", p)
    ply = PlyData.read(str(path))
    assert ply.text is False and ply.byte_order == "<"
    assert [e.name for e in ply.elements] == ["vertex"]
    props = ply["vertex"].properties
    expected = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                + [f"f_rest_{i}" for i in range(45)]
                + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert [pr.name for pr in props] == expected == ply_property_names(3)
    assert {pr.val_dtype for pr in props} == {"f4"}
    v = ply["vertex"].data
    assert np.all(v["nx"] == 0) and np.all(v["ny"] == 0) and np.all(v["nz"] == 0)
    np.testing.assert_allclose(v["opacity"], p.opacity_logits, atol=1e-7)  # the logit, not the opacity
    np.testing.assert_allclose(v["scale_1"], p.log_scales[:, 1], atol=1e-7)  # the log, not the std-dev
    np.testing.assert_allclose(v["rot_0"], p.quats[:, 0], atol=1e-6)  # w first
    np.testing.assert_allclose(v["f_dc_2"], p.sh_dc[:, 2], atol=1e-7)
    assert [pr.name for pr in PlyData.read(str(write_splat_ply(tmp_path / "d0.ply", _random_params(2, 0))))
            ["vertex"].properties] == ply_property_names(0)


def test_f_rest_is_channel_major(tmp_path):
    n, k1 = 2, 15
    rest = np.zeros((n, k1, 3), np.float32)
    for k in range(k1):
        for c in range(3):
            rest[:, k, c] = 100 * c + k + np.arange(n) * 1000  # value names (gaussian, channel, coefficient)
    p = SplatParams(np.zeros((n, 3)), np.zeros((n, 3)), np.tile([1.0, 0, 0, 0], (n, 1)), np.zeros(n),
                    np.zeros((n, 3)), rest)
    v = PlyData.read(str(write_splat_ply(tmp_path / "s.ply", p)))["vertex"].data
    for c in range(3):
        for k in range(k1):
            np.testing.assert_array_equal(v[f"f_rest_{c * k1 + k}"], 100 * c + k + np.arange(n) * 1000)
    # what nerfstudio's exporter does: features_rest.transpose(1, 2).reshape(N, -1)
    flat = np.stack([v[f"f_rest_{i}"] for i in range(3 * k1)], axis=1)
    np.testing.assert_array_equal(flat, rest.transpose(0, 2, 1).reshape(n, -1))
    np.testing.assert_array_equal(read_splat_ply(tmp_path / "s.ply").sh_rest, rest)


def test_reads_a_hand_built_inria_style_file(tmp_path):
    """A file written by someone else (properties in another order, extras, unnormalised quats)."""
    n = 3
    names = ["x", "y", "z", "opacity", "rot_0", "rot_1", "rot_2", "rot_3", "scale_0", "scale_1", "scale_2",
             "f_dc_0", "f_dc_1", "f_dc_2", "red"] + [f"f_rest_{i}" for i in range(9)]
    arr = np.zeros(n, dtype=[(nm, "f4") for nm in names])
    arr["rot_0"] = 2.0
    for i in range(9):
        arr[f"f_rest_{i}"] = i  # channel c = i // 3, coefficient k = i % 3
    path = tmp_path / "inria.ply"
    PlyData([PlyElement.describe(arr, "vertex")], text=True).write(str(path))
    p = read_splat_ply(path)
    assert p.sh_degree == 1
    np.testing.assert_array_equal(p.sh_rest[0], [[0, 3, 6], [1, 4, 7], [2, 5, 8]])
    np.testing.assert_array_equal(p.quats[:, 0], 2.0)  # as stored
    q = read_splat_ply(write_splat_ply(tmp_path / "ours.ply", p))
    np.testing.assert_allclose(q.quats, np.tile([1.0, 0, 0, 0], (n, 1)))  # normalised on write


def test_file_size(tmp_path):
    for degree, n in [(3, 100), (0, 7), (2, 1)]:
        p = _random_params(n, degree)
        path = write_splat_ply(tmp_path / f"s{degree}.ply", p, comments=["x"])
        data = path.read_bytes()
        header = data[: data.index(b"end_header\n") + len(b"end_header\n")]
        k = (degree + 1) ** 2
        assert len(data) == len(header) + n * 4 * (17 + 3 * (k - 1))


@pytest.mark.parametrize("field", ["means", "sh_rest", "opacity_logits", "quats"])
def test_nan_and_inf_refused(tmp_path, field):
    p = _random_params(10, 3)
    getattr(p, field).reshape(-1)[7] = np.nan if field != "quats" else np.inf
    with pytest.raises(SplatError) as e:
        write_splat_ply(tmp_path / "bad.ply", p)
    assert e.value.field == field and "bad.ply" in str(e.value) and "NaN/inf" in str(e.value)
    assert e.value.exit_code == 2
    assert not (tmp_path / "bad.ply").exists() and not list(tmp_path.iterdir())
    write_splat_ply(tmp_path / "ok.ply", p.subset(p.valid_mask()))
    assert read_splat_ply(tmp_path / "ok.ply").n == 10 - 1


def test_zero_quaternion_and_bad_comment_refused(tmp_path):
    p = _random_params(4, 0)
    p.quats[2] = 0.0
    with pytest.raises(SplatError, match="zero quaternion.*index 2") as e:
        write_splat_ply(tmp_path / "q.ply", p)
    assert e.value.field == "quats"
    with pytest.raises(SplatError, match="one line"):
        write_splat_ply(tmp_path / "c.ply", _random_params(4, 0), comments=["two\nlines"])


def test_wrong_shapes_refused():
    p = _random_params(4, 1)
    with pytest.raises(SplatError, match="opacity_logits has shape"):
        SplatParams(p.means, p.log_scales, p.quats, p.opacity_logits[:3], p.sh_dc, p.sh_rest)
    with pytest.raises(SplatError, match="sh_rest has shape") as e:
        SplatParams(p.means, p.log_scales, p.quats, p.opacity_logits, p.sh_dc, np.zeros((4, 5, 3)))
    assert e.value.field == "sh_rest"
    with pytest.raises(SplatError, match="quats"):
        SplatParams(p.means, p.log_scales, p.quats[:, :3], p.opacity_logits, p.sh_dc, p.sh_rest)


def _write_without(path, drop: str) -> None:
    names = [nm for nm in ply_property_names(1) if nm != drop]
    arr = np.zeros(2, dtype=[(nm, "<f4") for nm in names])
    arr["rot_0"] = 1.0
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(path))


@pytest.mark.parametrize("drop", ["opacity", "scale_2", "rot_3", "f_dc_1", "f_rest_4", "x"])
def test_missing_property_refused_by_name(tmp_path, drop):
    _write_without(tmp_path / "m.ply", drop)
    with pytest.raises(SplatError) as e:
        read_splat_ply(tmp_path / "m.ply")
    assert "m.ply" in str(e.value) and "missing vertex property" in str(e.value)
    assert f"'{drop}'" in str(e.value) and e.value.field == drop


def test_unknown_f_rest_count_refused(tmp_path):
    _write_without(tmp_path / "last.ply", "f_rest_8")  # 8 left, no gap: no SH degree has 8
    with pytest.raises(SplatError, match="has 8 f_rest properties") as e:
        read_splat_ply(tmp_path / "last.ply")
    assert e.value.field == "f_rest"
    names = ply_property_names(0) + [f"f_rest_{i}" for i in range(12)]
    arr = np.zeros(1, dtype=[(nm, "<f4") for nm in names])
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(tmp_path / "twelve.ply"))
    with pytest.raises(SplatError, match="12 f_rest"):
        read_splat_ply(tmp_path / "twelve.ply")


def test_unreadable_files_refused(tmp_path):
    with pytest.raises(SplatError, match="no such file"):
        read_splat_ply(tmp_path / "absent.ply")
    (tmp_path / "junk.ply").write_bytes(b"not a ply at all")
    with pytest.raises(SplatError, match="not a readable PLY"):
        read_splat_ply(tmp_path / "junk.ply")
    arr = np.zeros(1, dtype=[(nm, "<f4") for nm in ply_property_names(0)])
    arr["opacity"] = np.inf
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(tmp_path / "inf.ply"))
    with pytest.raises(SplatError, match="'opacity' has NaN/inf"):
        read_splat_ply(tmp_path / "inf.ply")
    with pytest.raises(SplatError, match=r"junk\.ply: not a readable PLY"):
        splat_ply_comments(tmp_path / "junk.ply")
    with pytest.raises(SplatError, match="no such file"):
        splat_ply_comments(tmp_path / "absent.ply")


def test_from_splats_and_torch(tmp_path):
    torch = pytest.importorskip("torch")
    p = _random_params(6, 3)
    ns = p.to_torch()
    assert ns["opacities"].shape == (6, 1) and ns["features_rest"].shape == (6, 15, 3)
    _assert_same(p, SplatParams.from_splats(ns))
    gs = {"means": ns["means"], "scales": ns["scales"], "quats": ns["quats"],
          "opacities": ns["opacities"][:, 0].requires_grad_(), "sh0": ns["features_dc"][:, None, :],
          "shN": torch.nn.Parameter(ns["features_rest"])}
    _assert_same(p, SplatParams.from_splats(gs))
    np.testing.assert_array_equal(p.sh_coeffs()[:, 0], p.sh_dc)
    with pytest.raises(SplatError, match="lack"):
        SplatParams.from_splats({"means": ns["means"]})


def test_empty_splat_and_stats(tmp_path):
    empty = _random_params(0, 3)
    assert read_splat_ply(write_splat_ply(tmp_path / "e.ply", empty)).n == 0
    assert splat_stats(empty) == {"count": 0, "sh_degree": 3, "bbox_min": None, "bbox_max": None,
                                  "median_scale": None, "median_opacity": None}
    p = SplatParams(means=[[0, 0, 0], [1, 2, 3], [-1, 0, 5]], log_scales=np.log([[0.01] * 3] * 3),
                    quats=[[1, 0, 0, 0]] * 3, opacity_logits=[0, 0, 0], sh_dc=[[-0.5 / SH_C0] * 3] * 3,
                    sh_rest=np.zeros((3, 0, 3)))
    s = splat_stats(p)
    assert s["count"] == 3 and s["sh_degree"] == 0
    assert s["bbox_min"] == [-1, 0, 0] and s["bbox_max"] == [1, 2, 5]
    assert s["median_scale"] == pytest.approx(0.01) and s["median_opacity"] == pytest.approx(0.5)
