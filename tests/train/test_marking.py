"""Released images are marked twice: C2PA credentials (read back by c2pa's own Reader) and a watermark.

Images are 1024x1024 renders of the virtual studio's person (one on the green
cyclorama with sensor noise, one composited on a flat noise-free grey like the
twin's preview renders), made in the test: a few seconds, deterministic.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("c2pa", reason="c2pa-python (C2PA content credentials) is not installed")
cv2 = pytest.importorskip("cv2", reason="OpenCV is not installed")

from train.marking import encode_image, mark_image  # noqa: E402
from train.marking.credentials import (  # noqa: E402
    CA_CERT, SIGNER_KEY, TRAINED_ALGORITHMIC_MEDIA, TRUSTED, TAMPERED, UNTRUSTED, ABSENT, CredentialsError,
    init_c2pa_chain, load_c2pa_chain, read_credentials, sign_image,
)
from train.marking.inspect import (  # noqa: E402
    CREDENTIALS_VALID, NOTHING_FOUND, WATERMARK_ONLY, InspectError, inspect_image,
)
from train.marking.watermark import (  # noqa: E402
    TILE, WatermarkOptions, WatermarkPayload, _fold, bit_error_rate, embed_watermark, extract_watermark,
)

BUNDLE = "3f" * 32
LICENCE = "LIC-2027-0042"
DISCLOSURE = "This image was made by a model of a real, consenting person (twinstudio)."
SIZE = 1024


def studio_images(n: int, size: int = SIZE, seed: int = 0) -> list[np.ndarray]:
    """``n`` renders ``[size, size, 3]`` uint8 of the virtual studio's person (camera, zoom and pose vary).

    Even ones are the studio as rendered (green cyclorama, sensor noise); odd
    ones put the person on a flat, noise-free grey, as the twin's previews are.
    """
    from rigs.geometry import Camera, Intrinsics
    from rigs.rigfile import load_rig
    from rigs.virtual.motion import default_clip
    from rigs.virtual.studio import FrameState, VirtualStudio

    rig = load_rig("virtual-ring-24")
    studio = VirtualStudio(rig)
    clip = default_clip()
    rng = np.random.default_rng(seed)
    step = rig.preset_steps("flat")[0]
    out = []
    for k in range(n):
        cam0 = rig.cameras[int(rng.integers(len(rig.cameras)))]
        f = cam0.intrinsics.fx * size / cam0.intrinsics.height * float(rng.uniform(1.1, 2.6))
        cx, cy = (size - 1) / 2 + rng.uniform(-0.15, 0.15, 2) * size
        cam = Camera(cam0.id, Intrinsics(size, size, f, f, float(cx), float(cy), cam0.intrinsics.dist), cam0.pose)
        posed = studio.person.pose(clip.params(int(rng.integers(clip.frames))))
        img = studio.render(studio.view(cam), studio.frame(FrameState(posed)), step, noise_key=k)
        rgb = np.where(img.mask[..., None], img.rgb, np.uint8(217)) if k % 2 else img.rgb
        out.append(np.ascontiguousarray(rgb))
    return out


# ----------------------------------------------------------------------------- the attacks


def jpeg(rgb: np.ndarray, quality: int = 75) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def half(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)


def crop10(rgb: np.ndarray) -> np.ndarray:
    """10 % off each side's length, at an offset that is no multiple of the tile or cell."""
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[51:51 + int(0.9 * h), 37:37 + int(0.9 * w)])


ATTACKS = {"jpeg_q75": jpeg, "resize_0.5": half, "crop_10pct": crop10}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return studio_images(2)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return init_c2pa_chain(tmp_path_factory.mktemp("keys"))


def _mark(rgb, chain, fmt="jpeg", serial=17):
    return mark_image(rgb, fmt, bundle_sha256=BUNDLE, licence_id=LICENCE, image_serial=serial,
                      disclosure=DISCLOSURE, chain=chain, subject_id="subject-7")


# ----------------------------------------------------------------------------- the chain


def test_chain_files_modes_and_refusals(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key_dir = tmp_path / "keys"
    init_c2pa_chain(key_dir)
    assert {p.name: p.stat().st_mode & 0o777 for p in key_dir.iterdir()} == {
        "c2pa-ca.pem": 0o644, "c2pa-ca.key": 0o600, "c2pa-signer.pem": 0o644, "c2pa-signer.key": 0o600}
    signer, ca = x509.load_pem_x509_certificates((key_dir / "c2pa-signer.pem").read_bytes())
    assert signer.issuer == ca.subject
    assert signer.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in signer.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert signer.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski
    with pytest.raises(CredentialsError, match="refusing to overwrite"):
        init_c2pa_chain(key_dir)
    os.chmod(key_dir / SIGNER_KEY, 0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load_c2pa_chain(key_dir)
    with pytest.raises(CredentialsError, match="not found"):
        load_c2pa_chain(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- C2PA, read by c2pa's Reader


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_credentials_trusted_with_the_anchor_untrusted_without(images, chain, fmt):
    data = _mark(images[0], chain, fmt)
    r = read_credentials(data, fmt, chain.anchor_pem)
    assert (r.state, r.validation_state, r.failures) == (TRUSTED, "Trusted", ())
    assert r.twin is not None
    assert (r.twin.bundle_sha256, r.twin.licence_id, r.twin.image_serial, r.twin.subject_id,
            r.twin.disclosure) == (BUNDLE, LICENCE, 17, "subject-7", DISCLOSURE)
    assert r.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    ingredient, = r.manifest["ingredients"]
    assert ingredient["instance_id"].endswith(BUNDLE) and ingredient["relationship"] == "inputTo"
    actions = next(a for a in r.manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert actions[0]["action"] == "c2pa.created" and actions[0]["description"] == DISCLOSURE

    untrusted = read_credentials(data, fmt)
    assert untrusted.state == UNTRUSTED and untrusted.failures == ("signingCredential.untrusted",)
    other = init_c2pa_chain(Path(chain.source).parent / f"other-{fmt}")  # another studio's CA
    assert read_credentials(data, fmt, other.anchor_pem).state == UNTRUSTED


def _edit_jpeg_scan(data: bytes) -> bytes:
    """Change entropy-coded image data (so pixels change) and keep every other byte, the manifest too."""
    sos = data.rindex(b"\xff\xda")
    i = sos + (len(data) - sos) // 2
    while data[i] in (0xFF, 0xFE, 0x00):
        i += 1
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def _edit_png_pixel(data: bytes) -> bytes:
    """Change one pixel inside the IDAT stream, re-compressed into valid chunks; caBX (the manifest) kept."""
    pos, chunks = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[0][1][:8])  # IHDR; 8-bit RGB rows of 1 filter byte + 3 * w
    raw = bytearray(zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT")))
    raw[(h // 2) * (1 + 3 * w) + 1 + 3 * (w // 2)] ^= 0x10  # the red of the middle pixel
    out, idat_done = [data[:8]], False
    for kind, body in chunks:
        if kind == b"IDAT":
            if idat_done:
                continue
            kind, body, idat_done = b"IDAT", zlib.compress(bytes(raw)), True
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


@pytest.mark.parametrize("fmt,edit", [("jpeg", _edit_jpeg_scan), ("png", _edit_png_pixel)])
def test_credentials_tampered_after_a_pixel_edit(images, chain, fmt, edit):
    data = _mark(images[0], chain, fmt)
    edited = edit(data)
    assert cv2.imdecode(np.frombuffer(edited, np.uint8), cv2.IMREAD_COLOR) is not None  # still an image
    r = read_credentials(edited, fmt, chain.anchor_pem)
    assert r.state == TAMPERED and "assertion.dataHash.mismatch" in r.failures
    assert read_credentials(encode_image(images[0], fmt), fmt, chain.anchor_pem).state == ABSENT


def test_sign_refuses_a_garbage_anchor_and_format(images, chain):
    data = encode_image(images[0], "jpeg")
    with pytest.raises(CredentialsError, match="not a PEM certificate"):
        read_credentials(data, "jpeg", "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(CredentialsError, match="format"):
        sign_image(data, "gif", bundle_sha256=BUNDLE, licence_id=LICENCE, image_serial=1, disclosure="",
                   chain=chain)


# ----------------------------------------------------------------------------- the watermark


def test_payload_layout_and_crc():
    p = WatermarkPayload.for_licence(LICENCE, 123456)
    bits = p.to_bits()
    assert bits.shape == (64,) and WatermarkPayload.from_bits(bits) == p and p.matches(LICENCE)
    assert not p.matches("LIC-2027-0043")
    for i in (0, 30, 63):
        flipped = bits.copy()
        flipped[i] ^= 1
        assert WatermarkPayload.from_bits(flipped) is None
    with pytest.raises(ValueError):
        WatermarkPayload(0, 1 << 24)


def test_fold_matches_a_plain_loop():
    r = np.random.default_rng(1).normal(size=(300, 290)).astype(np.float32)
    ref = np.zeros((TILE, TILE))
    for y in range(r.shape[0]):
        for x in range(r.shape[1]):
            ref[y % TILE, x % TILE] += r[y, x]
    np.testing.assert_allclose(_fold(r), ref, rtol=1e-4, atol=1e-3)


def test_watermark_checks_its_input_and_survives_tiny_images():
    from train.marking.watermark import WatermarkError

    with pytest.raises(WatermarkError, match="uint8 RGB"):
        embed_watermark(np.zeros((64, 64), np.uint8), WatermarkPayload(1, 2))
    with pytest.raises(WatermarkError):
        extract_watermark(np.zeros((64, 64, 3), np.float32))
    tiny = embed_watermark(np.full((40, 30, 3), 90, np.uint8), WatermarkPayload(1, 2))
    assert not extract_watermark(tiny).found  # too little of the tile to read, and no crash


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_watermark_payload_survives(images, attack):
    for k, rgb in enumerate(images):
        p = WatermarkPayload.for_licence(LICENCE, 1000 + k)
        marked = embed_watermark(rgb, p)
        psnr = 10 * np.log10(255.0 ** 2 / np.mean((marked.astype(float) - rgb) ** 2))
        assert psnr > 40, psnr
        r = extract_watermark(ATTACKS[attack](marked))
        assert r.payload == p, (k, r)
        assert bit_error_rate(r, p) <= 0.02, (k, r.bits)


def test_no_false_positives_on_unmarked_images(images):
    unmarked = [f(rgb) for rgb in images for f in (lambda x: x, jpeg, half, crop10, lambda x: x[:, ::-1])]
    rng = np.random.default_rng(3)
    unmarked += [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), np.full((400, 600, 3), 128, np.uint8)]
    for k, rgb in enumerate(unmarked):
        r = extract_watermark(np.ascontiguousarray(rgb))
        assert not r.found and r.z < 8, (k, r.z)
    # a mark made with another key is not read with the default one
    other = embed_watermark(images[0], WatermarkPayload(1, 2), WatermarkOptions(key=b"another studio"))
    assert not extract_watermark(other).found
    assert extract_watermark(other, key=b"another studio").payload == WatermarkPayload(1, 2)


# ----------------------------------------------------------------------------- inspect


def test_inspect_three_outcomes(images, chain, tmp_path, monkeypatch):
    monkeypatch.setenv("TWINSTUDIO_HOME", str(tmp_path / "home"))  # no studio CA there: anchors are explicit
    anchor = Path(chain.source).parent / CA_CERT
    signed = tmp_path / "signed.jpg"
    signed.write_bytes(_mark(images[1], chain, serial=4242))
    r = inspect_image(signed, anchor)
    assert (r.exit_code, r.licence_id, r.image_serial) == (CREDENTIALS_VALID, LICENCE, 4242)
    assert BUNDLE in r.twin and "credentials valid" in r.summary()

    # a website strips the metadata and re-encodes at q75: the watermark still says where it came from
    stripped = tmp_path / "stripped.jpg"
    cv2.imwrite(str(stripped), cv2.imread(str(signed)), [cv2.IMWRITE_JPEG_QUALITY, 75])
    r = inspect_image(stripped, anchor, licences={"LIC-OTHER": "twin A", LICENCE: "twin B"})
    assert (r.exit_code, r.licence_id, r.image_serial, r.twin) == (WATERMARK_ONLY, LICENCE, 4242, "twin B")
    assert r.credentials.state == ABSENT and "watermark only" in r.summary()

    # credentials present but not trusted here (no anchor): the watermark answers
    r = inspect_image(signed, None, licences=[LICENCE])
    assert (r.exit_code, r.credentials.state, r.licence_id) == (WATERMARK_ONLY, UNTRUSTED, LICENCE)
    # the licence list does not hold it: the tag and serial are still reported
    r = inspect_image(stripped, anchor)
    assert r.exit_code == WATERMARK_ONLY and r.licence_id is None and "licence tag" in r.summary()

    plain = tmp_path / "plain.png"
    plain.write_bytes(encode_image(images[0], "png"))
    r = inspect_image(plain, anchor)
    assert r.exit_code == NOTHING_FOUND and "nothing found" in r.summary()

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(InspectError) as e:
        inspect_image(junk, anchor)
    assert e.value.exit_code == 2


def test_inspect_uses_the_studio_ca_by_default(images, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TWINSTUDIO_HOME", str(home))
    studio_chain = init_c2pa_chain(home / "keys")
    assert load_c2pa_chain() == studio_chain
    img = tmp_path / "x.png"
    img.write_bytes(_mark(images[0], studio_chain, "png"))
    r = inspect_image(img)
    assert r.exit_code == CREDENTIALS_VALID and r.trust_anchor == str(home / "keys" / CA_CERT)
