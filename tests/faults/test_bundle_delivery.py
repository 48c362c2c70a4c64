"""Faults of a delivered bundle, through the real CLI: shared files, a re-signed bundle, consent gates.

- A folder bundle shares no inode with the session, so a byte flipped in the
  delivered folder changes nothing in the studio (issue item 11).
- Trust is explicit: a bundle edited and re-signed with another key is never
  "valid"; without a trusted key verify says "intact, signer not trusted"
  (exit 5); pinned keys live in a trusted-keys file (item 12).
- Consent gates: no bundle without 'share'; no generation kit without
  'generate' (the bundle is built without it and says why).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

pytest.importorskip("nerfstudio")  # the dataset export of the session uses nerfstudio's conventions

from tests.handoff.sessions import file_ids, make_session, twinstudio  # noqa: E402


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tree_hashes(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """(session, studio home, folder bundle): a session with every scope, the studio's key, its bundle."""
    tmp = tmp_path_factory.mktemp("delivery")
    session = make_session(tmp / "session")
    home = tmp / "studio"
    r = twinstudio("keys", "init", home=home)
    assert r.returncode == 0, r.stderr
    bundle = tmp / "bundle"
    r = twinstudio("bundle", session, "--out", bundle, "--no-generation-kit", "--plain", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    return session, home, bundle


def test_a_folder_bundle_shares_no_file_with_the_session(studio, tmp_path):
    session, home, bundle = studio
    out = tmp_path / "delivered"
    r = twinstudio("bundle", session, "--out", out, "--no-generation-kit", "--plain", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    # the bundle holds the session's bytes (images, masks, splat) ...
    images = sorted((out / "cameras" / "images").iterdir())
    assert len(images) == 24 * 8  # every camera's stills under the 8 lighting steps
    for p in images[:5]:
        assert p.read_bytes() == (session / "train" / "dataset" / "images" / p.name).read_bytes()
    assert (out / "splat" / "splat.ply").read_bytes() == (session / "train" / "twin" / "splat.ply").read_bytes()
    # ... in files of its own: no (device, inode) of the bundle is one of the session's
    shared = file_ids(out).keys() & file_ids(session).keys()
    assert not shared, sorted(file_ids(out)[k] for k in shared)[:10]

    before = _tree_hashes(session)
    payload = [p for p in out.rglob("*") if p.is_file() and p.name not in ("MANIFEST.json", "SIGNATURE.json")]
    assert len(payload) > 300
    for p in payload:  # flip one byte of every delivered file
        data = bytearray(p.read_bytes())
        if data:
            data[len(data) // 2] ^= 0x01
            p.write_bytes(bytes(data))
    assert _tree_hashes(session) == before  # the studio's files are untouched
    frames = json.loads((session / "session.json").read_text())["takes"]["stills-001"]["captured"]
    for cam in frames.values():  # and every captured frame still matches session.json
        for rec in cam.values():
            assert _sha(session / rec["path"]) == rec["sha256"], rec["path"]

    r = twinstudio("verify", out, home=home)
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.startswith("tampered") and "splat/splat.ply: changed" in r.stdout


def test_a_re_signed_bundle_is_never_valid_without_a_trusted_key(studio, tmp_path):
    from train.handoff.integrity import MANIFEST, SIGNATURE, init_keys, load_private_key, sign_manifest

    session, home, bundle = studio
    # an attacker edits the splat, fixes the manifest and signs it with a key of their own
    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    splat = forged / "splat" / "splat.ply"
    data = bytearray(splat.read_bytes())
    data[-1] ^= 0x01
    splat.write_bytes(bytes(data))
    m = json.loads((forged / MANIFEST).read_text())
    entry = next(f for f in m["files"] if f["path"] == "splat/splat.ply")
    entry["sha256"] = _sha(splat)
    manifest_bytes = json.dumps(m, indent=2).encode()
    (forged / MANIFEST).write_bytes(manifest_bytes)
    attacker_priv, attacker_pub = init_keys(tmp_path / "attacker")
    (forged / SIGNATURE).write_text(json.dumps(sign_manifest(manifest_bytes, load_private_key(attacker_priv))))

    render = tmp_path / "render-team"  # a render team's machine: nothing pinned yet
    for b in (forged, bundle):
        r = twinstudio("verify", b, home=render)
        assert r.returncode == 5, r.stdout + r.stderr
        assert r.stdout.startswith("intact, signer not trusted") and "not trusted" in r.stdout

    studio_pub = home / "keys" / "studio.pub"
    r = twinstudio("keys", "trust", studio_pub, "--name", "nova-studio", home=render)
    assert r.returncode == 0 and "trusted" in r.stdout, r.stdout + r.stderr
    r = twinstudio("keys", "trusted", home=render)
    assert r.returncode == 0 and "nova-studio" in r.stdout
    assert (render / "trusted_keys").read_text().count("nova-studio") == 1

    r = twinstudio("verify", forged, home=render)  # pinned: the forger's key is still not the studio's
    assert r.returncode == 5 and "intact, signer not trusted" in r.stdout, r.stdout + r.stderr
    r = twinstudio("verify", forged, "--pubkey", studio_pub, home=render)  # the one-off form
    assert r.returncode == 5, r.stdout + r.stderr
    r = twinstudio("verify", bundle, home=render)  # trusted, but no revocation list held: not plain "valid"
    assert r.returncode == 6, r.stdout + r.stderr
    assert "revocation status: unknown" in r.stdout and "trusted ('nova-studio')" in r.stdout
    r = twinstudio("verify", bundle, "--accept-stale-revocations", home=render)
    assert r.returncode == 0 and r.stdout.startswith("valid") and "unknown" in r.stdout, r.stdout

    # a manifest edited into nonsense (and so no longer signed) is tampered, not a crash
    for consent in ("xy", {"consent_id": []}):
        broken = tmp_path / f"broken-{type(consent).__name__}"
        shutil.copytree(bundle, broken)
        m = json.loads((broken / MANIFEST).read_text())
        m["consent"] = consent
        (broken / MANIFEST).write_text(json.dumps(m))
        r = twinstudio("verify", broken, home=render)
        assert r.returncode == 3 and "Traceback" not in r.stderr, r.stdout + r.stderr
    r = twinstudio("verify", bundle, "--trusted-keys", tmp_path / "elsewhere", home=render)
    assert r.returncode == 5, r.stdout

    # a damaged trust file is unusable input, named with its line, never read half
    with open(render / "trusted_keys", "a") as f:
        f.write("0123456789abcdef someone not-a-key\n")
    r = twinstudio("verify", bundle, home=render)
    assert r.returncode == 2 and "trusted_keys:3" in r.stderr, r.stdout + r.stderr
    (render / "trusted_keys").write_text("\n".join((render / "trusted_keys").read_text().splitlines()[:-1]) + "\n")
    r = twinstudio("keys", "untrust", "nova-studio", home=render)
    assert r.returncode == 0, r.stdout + r.stderr
    assert twinstudio("verify", bundle, home=render).returncode == 5
    assert twinstudio("keys", "untrust", "nova-studio", home=render).returncode == 2  # nothing left to remove


def test_the_studio_trusts_its_own_new_key(studio):
    _, home, bundle = studio
    lines = [x for x in (home / "trusted_keys").read_text().splitlines() if not x.startswith("#")]
    assert len(lines) == 1 and " this-studio " in lines[0]
    r = twinstudio("verify", bundle, "--accept-stale-revocations", home=home)
    assert r.returncode == 0 and "trusted ('this-studio')" in r.stdout, r.stdout + r.stderr


def _consent_scopes(session, scopes) -> None:
    doc = json.loads((session / "consent.json").read_text())
    doc["records"][0]["scopes"] = list(scopes)
    (session / "consent.json").write_text(json.dumps(doc))


def test_no_bundle_without_share(studio, tmp_path):
    session, home, _ = studio
    s = tmp_path / "s"
    s.mkdir()
    for name in ("session.json", "consent.json", "rig.toml"):  # the gate is met before anything else is read
        shutil.copy(session / name, s / name)
    _consent_scopes(s, ["capture", "train", "generate"])
    r = twinstudio("bundle", s, "--out", tmp_path / "b.tar", "--plain", home=home)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "does not cover 'share'" in r.stderr
    assert not (tmp_path / "b.tar").exists() and not list(tmp_path.glob(".b.tar*"))


def test_without_generate_the_bundle_has_no_generation_kit(studio, tmp_path):
    session, home, _ = studio
    s = tmp_path / "s"
    shutil.copytree(session, s, ignore=shutil.ignore_patterns(".virtual"))
    _consent_scopes(s, ["capture", "train", "share"])
    out = tmp_path / "b"
    r = twinstudio("bundle", s, "--out", out, "--plain", home=home)  # the kit is asked for (the default)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "omitted generation: the consent does not allow it" in r.stdout
    assert not (out / "generation").exists()
    m = json.loads((out / "MANIFEST.json").read_text())
    assert "does not cover 'generate'" in m["omitted"]["generation"]
    assert not any(f["path"].startswith("generation/") for f in m["files"])
    assert m["consent"]["scopes"] == ["capture", "train", "share"]
    r = twinstudio("verify", out, "--accept-stale-revocations", home=home)  # what is left is intact and signed
    assert r.returncode == 0, r.stdout + r.stderr
