"""The handoff bundle end to end: a real (small) virtual session, captured, reconstructed, trained, bundled.

Covers the layout and manifest, the generation kit, signing and verification
(a changed byte, a missing and an extra file, a foreign key, an expired and a
revoked consent, the revocation status), consent enforced at bundling, the
deterministic archive, and that each file opens in the tools render teams use
(trimesh, open3d, plyfile, pycolmap, nerfstudio). The CLI's faults are in
tests/faults/test_bundle_delivery.py and test_revocation_lists.py.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("nerfstudio")

from capture.consent import ConsentError, load_consents, revoke_consent  # noqa: E402
from train.handoff.bundle import BundleOptions, build_bundle  # noqa: E402
from train.handoff.integrity import BundleError, init_keys, load_private_key  # noqa: E402
from train.handoff.revocations import entry_of, issue  # noqa: E402
from train.handoff.verify import CONSENT, REVOCATION, TAMPERED, UNTRUSTED, VALID, verify_bundle  # noqa: E402

SUBJECT = "subj-007"
KIT = 96  # generation-kit crop size for the tests (1024 in real bundles)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A virtual session at 320x240: stills captured, cameras and masks from ground truth, mesh, a short twin."""
    from tests.handoff.sessions import small_trained_session

    return small_trained_session(tmp_path_factory.mktemp("handoff") / "session")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return init_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def published(keys, tmp_path_factory):
    """The studio's current signed revocation list (nothing revoked), as it publishes it."""
    d = tmp_path_factory.mktemp("revocations")
    signed = issue(load_private_key(keys[0]), store=d / "store")
    (d / "revocations.json").write_bytes(signed.data)
    return d / "revocations.json"


@pytest.fixture(scope="module")
def bundle(session, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "bundle"
    return build_bundle(session, out, BundleOptions(key=keys[0], kit_size=KIT))


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle.path, dst)
    return dst


# ----------------------------------------------------------------------------- contents


def test_layout_and_manifest(bundle, session):
    p = bundle.path
    for rel in ("MANIFEST.json", "SIGNATURE.json", "USAGE.md", "metrics.json", "cameras/transforms.json",
                "cameras/cameras.json", "cameras/colmap/cameras.txt", "geometry/mesh.glb", "geometry/mesh.ply",
                "geometry/points.ply", "splat/splat.ply", "previews/turntable.mp4", "generation/metadata.jsonl",
                "usd/twin.usdz", "viewer/index.html", "splat/lighting.npz"):
        assert (p / rel).is_file(), rel
    m = json.loads((p / "MANIFEST.json").read_text())
    assert m["schema"] == "twinstudio.bundle" and m["version"] == 1
    assert m["subject"] == {"id": SUBJECT}
    c = m["consent"]
    rec = load_consents(session)[0]
    assert c["consent_id"] == rec.consent_id and c["scopes"] == ["capture", "train", "generate", "share"]
    assert c["markets"] == ["EU"] and c["compensation_ref"] == "INV-7" and c["valid_until"] == str(rec.valid_until)
    prov = m["provenance"]
    assert prov["rig"]["name"] == "virtual-ring-24" and prov["session"]["takes"] == {"stills": "stills-001"}
    assert prov["training"]["method"] == "twin-splat" and prov["software"]["twinstudio"]
    assert m["omitted"] == {"motion": "the session has no reconstructed motion take"}
    assert m["revocations"] == {"issuer": bundle.key_id}  # no URL given: only who issues the list
    listed = {f["path"] for f in m["files"]}
    on_disk = {q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file()} - {"MANIFEST.json",
                                                                                      "SIGNATURE.json"}
    assert listed == on_disk
    assert [f["path"] for f in m["files"]] == sorted(listed)
    usage = (p / "USAGE.md").read_text()
    for words in (SUBJECT, "e-commerce", "EU", str(rec.valid_until), "INV-7", "AI-generated", "watermark"):
        assert words in usage


def test_usd_scene_carries_the_trained_splat_mesh_cameras_and_terms(bundle, session):
    from pxr import Usd, UsdGeom

    from train.splat_ply import read_splat_ply
    from train.usd import check_usd, read_usd_splat

    usdz = bundle.path / "usd" / "twin.usdz"
    assert check_usd(usdz) == []
    ply = read_splat_ply(bundle.path / "splat" / "splat.ply")
    back = read_usd_splat(usdz)
    assert np.array_equal(back.means, ply.means) and np.array_equal(back.sh_coeffs(), ply.sh_coeffs())
    stage = Usd.Stage.Open(str(usdz))
    meta = stage.GetRootLayer().customLayerData["twinstudio"]
    assert meta["subject_id"] == SUBJECT and meta["consent"]["consent_id"] == load_consents(session)[0].consent_id
    assert meta["ai_disclosure"]["label"] == "AI-generated digital twin"
    cams = json.loads((bundle.path / "cameras" / "cameras.json").read_text())["cameras"]
    assert len([q for q in stage.Traverse() if q.IsA(UsdGeom.Camera)]) == len(cams) == 24
    assert stage.GetPrimAtPath("/Twin/Mesh").IsA(UsdGeom.Mesh)


def test_every_lighting_preset_renders_from_the_bundle(bundle, session):
    """splat/lighting.npz holds each captured preset's colours: the baked one is splat.ply's, the others differ,
    and a render swaps them in."""
    from train.render import RenderError, load_bundle_twin, orbit_views, render_views
    from train.splat_ply import read_splat_ply

    twin = load_bundle_twin(bundle.path)
    presets = json.loads((session / "train" / "dataset" / "transforms.json").read_text())["twinstudio"]["presets"]
    assert list(twin.lighting) == presets and twin.baked in presets and len(presets) > 1
    np.testing.assert_allclose(twin.lighting[twin.baked], read_splat_ply(bundle.path / "splat" / "splat.ply").sh_dc,
                               atol=1e-6)
    other = next(p for p in presets if p != twin.baked)
    view = orbit_views(twin.params, 1, 96)
    _, a = next(render_views(twin.lit(None), view))
    _, b = next(render_views(twin.lit(other), view))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5  # another preset, other colours
    with pytest.raises(RenderError, match="lighting preset 'candle' is not in the bundle"):
        twin.lit("candle")


def test_generation_kit(bundle):
    import cv2

    g = bundle.path / "generation"
    lines = [json.loads(x) for x in (g / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 24 * 8
    assert [r["file_name"] for r in lines] == sorted(r["file_name"] for r in lines)
    r = lines[0]
    img = cv2.imread(str(g / r["file_name"]))
    mask = cv2.imread(str(g / r["mask_file_name"]), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (KIT, KIT, 3) and mask.shape == (KIT, KIT)
    assert SUBJECT in r["text"] and r["lighting"] in {x["lighting"] for x in lines}
    assert {x["view"] for x in lines} >= {"front", "back"}


def test_images_the_kit_skips_are_listed_in_the_manifest(session, keys, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(session, s, ignore=shutil.ignore_patterns(".virtual"))
    (s / "recon" / "masks" / "stills-001" / "cam05" / "000003.mask.png").unlink()
    r = build_bundle(s, tmp_path / "b", BundleOptions(key=keys[0], kit_size=32))
    assert r.omitted["generation/stills-001/cam05/000003"].startswith("no mask")
    lines = (r.path / "generation" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 24 * 8 - 1
    assert json.loads((r.path / "MANIFEST.json").read_text())["omitted"] == r.omitted


# ----------------------------------------------------------------------------- verification


def test_verify_valid_folder(bundle, keys, published):
    r = verify_bundle(bundle.path, pubkey=keys[1], revocations=published)
    assert r.exit_code == VALID, (r.integrity.problems, r.consent_problems, r.revocation)
    assert r.trusted and r.integrity.files == bundle.files - 2
    assert r.revocation.state == "checked" and r.revocation.serial == 1
    # the same without the list: intact and trusted, but the revocation status is unknown
    r = verify_bundle(bundle.path, pubkey=keys[1])
    assert r.exit_code == REVOCATION and r.revocation.state == "unknown"
    assert verify_bundle(bundle.path, pubkey=keys[1], accept_stale_revocations=True).exit_code == VALID


def test_a_changed_byte_is_detected_and_named(bundle, keys, tmp_path):
    p = _copy(bundle, tmp_path)
    target = p / "splat" / "splat.ply"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    r = verify_bundle(p, pubkey=keys[1])
    assert r.exit_code == TAMPERED and r.integrity.changed == ["splat/splat.ply"]


def test_missing_and_extra_files_are_detected(bundle, keys, tmp_path):
    p = _copy(bundle, tmp_path)
    (p / "geometry" / "mesh.glb").unlink()
    (p / "previews" / "notes.txt").write_text("added later")
    r = verify_bundle(p, pubkey=keys[1])
    assert r.exit_code == TAMPERED
    assert r.integrity.missing == ["geometry/mesh.glb"] and r.integrity.extra == ["previews/notes.txt"]


def test_an_edited_manifest_or_a_foreign_key_is_detected(bundle, keys, tmp_path):
    p = _copy(bundle, tmp_path)
    m = p / "MANIFEST.json"
    m.write_text(m.read_text().replace('"EU"', '"WORLD"'))
    assert verify_bundle(p, pubkey=keys[1]).exit_code == TAMPERED
    _, other_pub = init_keys(tmp_path / "other")
    r = verify_bundle(bundle.path, pubkey=other_pub)
    assert r.exit_code == UNTRUSTED and r.integrity.ok and not r.trusted and r.status == "intact, signer not trusted"


def test_expired_consent(bundle, keys):
    later = dt.date.today() + dt.timedelta(days=31)
    r = verify_bundle(bundle.path, pubkey=keys[1], today=later)
    assert r.exit_code == CONSENT and "expired" in r.consent_problems[0]


def test_revoked_consent(bundle, keys, session, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(session, s, ignore=shutil.ignore_patterns("takes", ".virtual", "train", "recon"))
    [rec] = revoke_consent(s, "subject withdrew")
    signed = issue(load_private_key(keys[0]), [entry_of(rec.consent_id, rec.subject_id, rec.revoked_at,
                                                        rec.revocation_reason)], store=tmp_path / "store")
    revocations = tmp_path / "revocations.json"
    revocations.write_bytes(signed.data)
    r = verify_bundle(bundle.path, pubkey=keys[1], revocations=revocations)
    assert r.exit_code == CONSENT and "revoked" in r.consent_problems[0] and "withdrew" in r.consent_problems[0]
    # bundling that session again is refused
    with pytest.raises(ConsentError, match="revoked"):
        build_bundle(s, tmp_path / "b2", BundleOptions(key=keys[0]))


def test_bundling_needs_share_and_a_key(session, keys, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(session, s, symlinks=True)
    doc = json.loads((s / "consent.json").read_text())
    doc["records"][0]["scopes"] = ["capture", "train"]
    (s / "consent.json").write_text(json.dumps(doc))
    with pytest.raises(ConsentError, match="does not cover 'share'"):
        build_bundle(s, tmp_path / "b", BundleOptions(key=keys[0]))
    with pytest.raises(BundleError, match="keys init"):
        build_bundle(session, tmp_path / "b", BundleOptions(key=tmp_path / "none.key"))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


def test_tar_is_deterministic_and_verifies(session, keys, published, tmp_path):
    a = build_bundle(session, tmp_path / "a.tar", BundleOptions(key=keys[0], kit_size=KIT))
    b = build_bundle(session, tmp_path / "b.tar", BundleOptions(key=keys[0], kit_size=KIT))
    assert a.path.read_bytes() == b.path.read_bytes()
    assert verify_bundle(a.path, pubkey=keys[1], revocations=published).exit_code == VALID
    import tarfile

    with tarfile.open(a.path) as t:
        members = t.getmembers()
    assert [m.name for m in members[:2]] == ["MANIFEST.json", "SIGNATURE.json"]
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == members[0].mtime for m in members)
    # a flipped byte inside the archive is found and the member named
    data = bytearray(a.path.read_bytes())
    with tarfile.open(a.path) as t:
        usage = t.getmember("USAGE.md")
    data[usage.offset_data + 10] ^= 0x20
    a.path.write_bytes(bytes(data))
    r = verify_bundle(a.path, pubkey=keys[1])
    assert r.exit_code == TAMPERED and r.integrity.changed == ["USAGE.md"]


# ----------------------------------------------------------------------------- interop


def test_glb_opens_with_trimesh_and_open3d(bundle):
    import open3d as o3d
    import trimesh

    scene = trimesh.load(bundle.path / "geometry" / "mesh.glb")
    mesh = scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(concatenate=True)
    assert len(mesh.faces) > 1000
    m3 = o3d.io.read_triangle_mesh(str(bundle.path / "geometry" / "mesh.glb"))
    assert len(m3.triangles) == len(mesh.faces)
    pc = o3d.io.read_point_cloud(str(bundle.path / "geometry" / "points.ply"))
    assert len(pc.points) > 1000


def test_splat_ply_has_the_layout_gsplat_and_viewers_read(bundle):
    from plyfile import PlyData

    v = PlyData.read(str(bundle.path / "splat" / "splat.ply"))["vertex"]
    names = [p.name for p in v.properties]
    k = len([n for n in names if n.startswith("f_rest_")])
    expected = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(k)]
                + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert names == expected and k in (0, 9, 24, 45)
    assert all(p.val_dtype in ("f4", "float32") for p in v.properties)
    # gsplat's own loaders take exp(scales), sigmoid(opacity), normalised w-x-y-z quaternions: values must be sane
    scales = np.exp(np.stack([v[f"scale_{i}"] for i in range(3)], 1))
    assert np.all(np.isfinite(scales)) and np.median(scales) < 0.05


def test_cameras_load_with_pycolmap_and_nerfstudio(bundle):
    import pycolmap

    rec = pycolmap.Reconstruction(str(bundle.path / "cameras" / "colmap"))
    assert rec.num_cameras() == 24 and rec.num_images() == 24
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    out = NerfstudioDataParserConfig(data=bundle.path / "cameras", downscale_factor=1,
                                     load_3D_points=True).setup().get_dataparser_outputs("train")
    assert len(out.image_filenames) == 160 and all(p.is_file() for p in out.image_filenames)
    assert out.mask_filenames is not None and all(p.is_file() for p in out.mask_filenames)


# ----------------------------------------------------------------------------- CLI


def test_cli_keys_bundle_verify(session, tmp_path, capsys):
    import os

    from twinstudio.cli import main

    assert main(["keys", "init"]) == 0
    home = os.environ["TWINSTUDIO_HOME"]
    assert oct(os.stat(f"{home}/keys/studio.key").st_mode & 0o777) == "0o600"
    assert main(["keys", "init"]) == 2  # never overwritten silently
    out = tmp_path / "b.tar"
    assert main(["bundle", str(session), "--out", str(out), "--no-generation-kit", "--plain"]) == 0
    text = capsys.readouterr().out
    assert "studio key" in text and "INV-7" in text and "omitted generation" in text
    assert main(["verify", str(out), "--pubkey", f"{home}/keys/studio.pub"]) == 6  # no revocation list yet
    assert "revocation status: unknown" in capsys.readouterr().out
    assert main(["revocations", "export", "--out", str(tmp_path / "revocations.json")]) == 0
    assert "serial 1" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0  # keys init pinned the studio's own key; its list is held
    assert capsys.readouterr().out.startswith("valid")
    assert main(["bundle", str(session), "--out", str(out)]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err
    assert main(["consent", "revoke", "--session", str(session), "--reason", "test"]) == 0
    assert main(["verify", str(out)]) == 4
    assert "revoked" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nothing.tar")]) == 2
