"""Keys, hashing, signatures, the deterministic tar and verification of handoff bundles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from train.handoff.integrity import (
    MANIFEST,
    SIGNATURE,
    TAR_MTIME,
    BundleError,
    FileEntry,
    SigningKeyError,
    check_signature,
    hash_file,
    hash_tree,
    init_keys,
    iter_tar,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_integrity,
    write_tar,
)

PAYLOAD = {
    "splat/splat.ply": bytes(range(256)) * 40 + b"tail",
    "previews/turntable/000.png": b"\x89PNG fake frame 0",
    "previews/turntable/001.png": b"\x89PNG fake frame 1",
    "previews/MANIFEST.json": b"a payload file that only shares the reserved name",
    "empty.txt": b"",
    "README.txt": b"AI-generated digital twin\n",
}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys")


def make_bundle(root: Path, private_key_path: Path) -> Path:
    """A tiny signed bundle: payload files, a manifest listing them, a signature over it."""
    for rel, data in PAYLOAD.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    files = [{"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
             for rel, data in sorted(PAYLOAD.items())]
    manifest_bytes = json.dumps({"schema": "test", "files": files}, indent=2).encode()
    (root / MANIFEST).write_bytes(manifest_bytes)
    doc = sign_manifest(manifest_bytes, load_private_key(private_key_path))
    (root / SIGNATURE).write_text(json.dumps(doc, indent=2))
    return root


@pytest.fixture
def bundle(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    return make_bundle(tmp_path / "bundle", keys[0])


# --------------------------------------------------------------------------- keys


def test_init_keys_writes_private_0600_public_0644_in_a_0700_folder(tmp_path: Path) -> None:
    priv, pub = init_keys(tmp_path / "new" / "keys", name="studio")
    assert (priv.name, pub.name) == ("studio.key", "studio.pub")
    assert mode(priv) == 0o600
    assert mode(pub) == 0o644
    assert mode(priv.parent) == 0o700
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert not list(priv.parent.glob("*.partial"))


def test_init_keys_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    priv, pub = init_keys(tmp_path)
    first = key_id(load_public_key(pub))
    with pytest.raises(SigningKeyError) as e:
        init_keys(tmp_path)
    assert e.value.path == priv and "studio.key" in str(e.value)
    assert e.value.exit_code == 2
    assert key_id(load_public_key(pub)) == first  # untouched
    init_keys(tmp_path, overwrite=True)
    assert key_id(load_public_key(pub)) != first
    assert mode(priv) == 0o600


def test_keys_load_round_trip_and_key_id_is_stable(keys: tuple[Path, Path]) -> None:
    private = load_private_key(keys[0])
    public = load_public_key(keys[1])
    kid = key_id(public)
    assert kid == key_id(private.public_key()) == key_id(load_public_key(keys[1]))
    assert len(kid) == 16 and int(kid, 16) >= 0
    public.verify(private.sign(b"studio"), b"studio")  # the same pair


def test_load_private_key_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    priv, _ = init_keys(tmp_path)
    priv.chmod(0o644)
    with pytest.raises(SigningKeyError) as e:
        load_private_key(priv)
    assert str(priv) in str(e.value) and "0644" in str(e.value)


def test_load_keys_refuse_garbage_other_algorithms_and_missing_files(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def private_file(name: str, data: bytes) -> Path:
        path = tmp_path / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
        return path

    garbage = private_file("garbage.key", b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_file = private_file("ec.key", ec_key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    for load, path, words in [(load_private_key, garbage, "not a PEM"),
                              (load_private_key, ec_file, "not Ed25519"),
                              (load_public_key, ec_pub, "not Ed25519"),
                              (load_public_key, garbage, "not a PEM"),
                              (load_private_key, tmp_path / "absent.key", "not found")]:
        with pytest.raises(SigningKeyError) as e:
            load(path)
        assert str(path) in str(e.value) and words in str(e.value)
        assert e.value.path == path


# --------------------------------------------------------------------------- hashing


def test_hash_file_streams_across_chunk_boundaries(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    for chunk in (7, 4096, 1 << 20):
        assert hash_file(tmp_path / "f", chunk=chunk) == (len(data), hashlib.sha256(data).hexdigest())


def test_hash_tree_lists_every_payload_file_sorted_with_hashlibs_hashes(bundle: Path) -> None:
    progress: list[tuple[int, int]] = []
    entries = hash_tree(bundle, on_progress=lambda done, total: progress.append((done, total)))
    assert [e.path for e in entries] == sorted(PAYLOAD)  # the top-level MANIFEST/SIGNATURE left out
    for e in entries:
        data = (bundle / e.path).read_bytes()
        assert e == FileEntry(e.path, len(data), hashlib.sha256(data).hexdigest())
    total = sum(map(len, PAYLOAD.values()))
    assert progress[-1] == (total, total)
    assert hash_tree(bundle, workers=1) == hash_tree(bundle, workers=3) == entries


def test_hash_tree_refuses_symlinks(bundle: Path) -> None:
    (bundle / "splat" / "link.ply").symlink_to(bundle / "splat" / "splat.ply")
    with pytest.raises(BundleError) as e:
        hash_tree(bundle)
    assert e.value.member == "splat/link.ply" and "symbolic link" in str(e.value)


# --------------------------------------------------------------------------- signatures


def test_signature_checks(keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = load_private_key(keys[0]), load_public_key(keys[1])
    manifest = b'{"files": []}\n'
    doc = sign_manifest(manifest, private)
    assert doc["key_id"] == key_id(public) and doc["signed"] == MANIFEST
    assert check_signature(manifest, doc, None) == []
    assert check_signature(manifest, doc, public) == []

    tampered = manifest.replace(b"[]", b"[ ]")
    assert any("changed after it was signed" in p for p in check_signature(tampered, doc, public))

    _, other_pub = init_keys(tmp_path, name="other")
    other = load_public_key(other_pub)
    (problem,) = check_signature(manifest, doc, other)
    assert key_id(public) in problem and key_id(other) in problem

    forged = dict(doc, signature=sign_manifest(b"something else", private)["signature"])
    assert any("does not verify" in p for p in check_signature(manifest, forged, None))
    for garbage in ("nonsense", {}, dict(doc, signature="!!not base64"), dict(doc, public_key="AAAA")):
        assert check_signature(manifest, garbage, None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- verifying a folder


def test_verify_folder_bundle_valid(bundle: Path, keys: tuple[Path, Path]) -> None:
    public = load_public_key(keys[1])
    report = verify_integrity(bundle, trusted=public)
    assert report.ok and report.signature_ok and report.trusted, report.problems
    assert report.key_id == key_id(public)
    assert (report.problems, report.changed, report.missing, report.extra) == ([], [], [], [])
    assert report.files == len(PAYLOAD) and report.bytes == sum(map(len, PAYLOAD.values()))
    assert report.manifest is not None and report.manifest["schema"] == "test"
    assert verify_integrity(bundle).ok  # no trusted key: intact, and signed by report.key_id


def test_verify_folder_reports_a_changed_byte(bundle: Path) -> None:
    ply = bundle / "splat" / "splat.ply"
    data = bytearray(ply.read_bytes())
    data[5000] ^= 1
    ply.write_bytes(bytes(data))
    report = verify_integrity(bundle)
    assert not report.ok and report.signature_ok
    assert report.changed == ["splat/splat.ply"]
    assert any("splat/splat.ply" in p and "sha256" in p for p in report.problems)


def test_verify_folder_reports_missing_extra_and_odd_files(bundle: Path) -> None:
    (bundle / "previews" / "turntable" / "001.png").unlink()
    (bundle / "previews" / "turntable" / "002.png").write_bytes(b"smuggled")
    (bundle / "empty.txt").unlink()
    (bundle / "empty.txt").symlink_to("/etc/hostname")
    report = verify_integrity(bundle)
    assert not report.ok and report.signature_ok
    assert report.missing == ["previews/turntable/001.png"]
    assert report.extra == ["previews/turntable/002.png"]
    assert report.changed == ["empty.txt"]  # a symlink is not the listed file
    assert any("symbolic link" in p for p in report.problems)


def test_verify_folder_reports_a_modified_manifest(bundle: Path, keys: tuple[Path, Path]) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["schema"] = "edited"
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    report = verify_integrity(bundle, trusted=load_public_key(keys[1]))
    assert not report.ok and not report.signature_ok and not report.trusted
    assert any(MANIFEST in p and "changed after it was signed" in p for p in report.problems)


def test_verify_folder_reports_an_unsigned_bundle(bundle: Path) -> None:
    (bundle / SIGNATURE).unlink()
    report = verify_integrity(bundle)
    assert not report.ok and not report.signature_ok
    assert any("not signed" in p for p in report.problems)


def test_verify_raises_for_unusable_input(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(BundleError) as e:
        verify_integrity(tmp_path / "nowhere")
    assert e.value.exit_code == 2
    (bundle / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify_integrity(bundle)
    (bundle / MANIFEST).write_text(json.dumps({"files": [{"path": "../x", "size": 1, "sha256": "0" * 64}]}))
    with pytest.raises(BundleError, match="not a relative"):
        verify_integrity(bundle)


# --------------------------------------------------------------------------- the tar


def test_write_tar_is_deterministic(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    a = make_bundle(tmp_path / "a" / "bundle", keys[0])
    b = tmp_path / "b" / "elsewhere"
    shutil.copytree(a, b)
    for p in b.rglob("*"):
        os.utime(p, (1_234_567_890, 1_234_567_890))
    (b / "README.txt").chmod(0o600)
    size_a = write_tar(a, tmp_path / "a.tar")
    size_b = write_tar(b, tmp_path / "b.tar")
    assert size_a == size_b == (tmp_path / "a.tar").stat().st_size
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_write_tar_members_sorted_with_manifest_and_signature_first(bundle: Path, tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    write_tar(bundle, tmp_path / "b.tar", on_progress=lambda done, total: progress.append((done, total)))
    with tarfile.open(tmp_path / "b.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [MANIFEST, SIGNATURE, *sorted(PAYLOAD)]
        for m in members:
            assert m.isreg() and m.mode == 0o644 and m.mtime == TAR_MTIME
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert tar.extractfile("splat/splat.ply").read() == PAYLOAD["splat/splat.ply"]  # type: ignore[union-attr]
    assert progress[-1][0] == progress[-1][1]


def test_write_tar_order_and_refusals(bundle: Path, tmp_path: Path) -> None:
    order = sorted(PAYLOAD, reverse=True)
    write_tar(bundle, tmp_path / "b.tar", order=order)
    assert [name for name, _, _ in iter_tar(tmp_path / "b.tar")] == [MANIFEST, SIGNATURE, *order]
    with pytest.raises(BundleError, match="order"):
        write_tar(bundle, tmp_path / "c.tar", order=order[1:])
    with pytest.raises(BundleError, match="inside"):
        write_tar(bundle, bundle / "self.tar")
    (bundle / "link").symlink_to("README.txt")
    with pytest.raises(BundleError, match="symbolic link"):
        write_tar(bundle, tmp_path / "d.tar")


def test_verify_tar_valid_and_a_flipped_byte_in_a_member(bundle: Path, tmp_path: Path,
                                                         keys: tuple[Path, Path]) -> None:
    archive = tmp_path / "b.tar"
    write_tar(bundle, archive)
    report = verify_integrity(archive, trusted=load_public_key(keys[1]))
    assert report.ok and report.trusted, report.problems
    assert report.files == len(PAYLOAD)

    with tarfile.open(archive) as tar:
        offset = tar.getmember("previews/turntable/001.png").offset_data
    data = bytearray(archive.read_bytes())
    data[offset + 3] ^= 0xFF
    archive.write_bytes(bytes(data))
    report = verify_integrity(archive)
    assert not report.ok and report.signature_ok
    assert report.changed == ["previews/turntable/001.png"]


def test_verify_tar_reports_links_unsafe_paths_and_trailing_data(bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in [MANIFEST, SIGNATURE, *sorted(PAYLOAD)]:
            tar.add(bundle / rel, arcname=rel)
        link = tarfile.TarInfo("shortcut")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        escape = tarfile.TarInfo("../escape.sh")
        escape.size = 3
        tar.addfile(escape, io.BytesIO(b"rm\n"))
    with archive.open("ab") as f:
        f.write(b"appended after the end")
    report = verify_integrity(archive)
    assert not report.ok and report.signature_ok
    assert report.extra == ["shortcut"]
    text = "\n".join(report.problems)
    assert "symbolic link" in text and "'../escape.sh'" in text and "after its last readable member" in text
    with pytest.raises(BundleError, match="symbolic link") as e:
        list(iter_tar(archive))
    assert e.value.member == "shortcut"


def test_verify_tar_reports_a_damaged_header(bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "b.tar"
    write_tar(bundle, archive)
    with tarfile.open(archive) as tar:
        header = tar.getmember("previews/turntable/001.png").offset
    data = bytearray(archive.read_bytes())
    data[header + 10] ^= 1  # the name field: the header checksum no longer matches
    archive.write_bytes(bytes(data))
    report = verify_integrity(archive)
    assert not report.ok
    assert "previews/turntable/001.png" in report.missing
    assert any("damaged header" in p for p in report.problems)


def test_verify_tar_accepts_dot_prefixed_names_and_directory_entries(bundle: Path, tmp_path: Path) -> None:
    archive = tmp_path / "by-hand.tar"
    with tarfile.open(archive, "w") as tar:  # like `tar -C bundle -cf by-hand.tar .`
        tar.add(bundle, arcname=".")
    assert verify_integrity(archive).ok


def test_iter_tar_streams_names_sizes_and_contents(bundle: Path, tmp_path: Path) -> None:
    write_tar(bundle, tmp_path / "b.tar")
    got = {name: (size, f.read()) for name, size, f in iter_tar(tmp_path / "b.tar")}
    for rel, data in PAYLOAD.items():
        assert got[rel] == (len(data), data)
