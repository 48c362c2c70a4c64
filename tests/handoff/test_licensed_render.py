"""``twinstudio render`` end to end: a licence, licensed images marked twice and metered, refusals, inspect."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from tests.faults.cli import flat, run


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A studio home with keys (Ed25519 and the C2PA chain), a signed bundle and a licence for 3 images."""
    from tests.handoff.sessions import make_session

    root = tmp_path_factory.mktemp("licensed")
    home = root / "home"
    p = run("keys", "init", home=home)
    assert p.returncode == 0, p.stderr
    assert "C2PA signing chain" in flat(p.stdout) and (home / "keys" / "c2pa-ca.pem").is_file()
    session = make_session(root / "session")
    bundle = root / "bundle.tar"
    p = run("bundle", str(session), "--out", str(bundle), "--no-generation-kit", home=home)
    assert p.returncode == 0, p.stderr
    for args in (("revocations", "export", "--out", str(root / "revocations.json")),  # the studio's current list
                 ("revocations", "import", str(root / "revocations.json"))):
        p = run(*args, home=home)
        assert p.returncode == 0, p.stderr
    until = (dt.date.today() + dt.timedelta(days=10)).isoformat()
    p = run("licence", "issue", str(bundle), "--licensee", "Brand X", "--purpose", "e-commerce", "--market", "EU",
            "--until", until, "--max-images", "3", "--rate", "2.50 EUR/image", "--out", str(root / "x.licence.json"),
            home=home)
    assert p.returncode == 0, p.stderr
    return {"root": root, "home": home, "bundle": bundle, "licence": root / "x.licence.json"}


def _render(s, out, *extra):
    return run("render", str(s["bundle"]), "--licence", str(s["licence"]), "--out", str(out), "--size", "1024",
               *extra, home=s["home"])


def test_licensed_images_are_marked_metered_and_inspected(studio, tmp_path):
    from train.handoff.ledger import read_entries

    p = _render(studio, tmp_path / "imgs", "--count", "2")
    assert p.returncode == 0, p.stderr
    files = sorted((tmp_path / "imgs").glob("*.jpg"))
    assert len(files) == 2 and "1 image(s) left on the licence" in flat(p.stdout)
    lic_id = json.loads(studio["licence"].read_text())["licence"]["id"]
    assert all(f.name.startswith(lic_id) for f in files)

    ledger = studio["home"] / "ledger" / "usage.jsonl"
    entries = list(read_entries(ledger))
    assert [e.image for e in entries] == ["1", "2"] and {e.licence for e in entries} == {lic_id}
    import hashlib

    assert sorted(e.image_sha256 for e in entries) == sorted(hashlib.sha256(f.read_bytes()).hexdigest()
                                                             for f in files)
    p = run("ledger", "verify", home=studio["home"])
    assert p.returncode == 0, p.stdout + p.stderr

    # the credentials, validated against the studio CA
    p = run("inspect", str(files[0]), home=studio["home"])
    out = flat(p.stdout)
    assert p.returncode == 0, out
    assert lic_id in out and "credentials valid" in out

    # credentials stripped (decoded and re-encoded as a website would, JPEG q75): the watermark still says it
    import cv2

    img = cv2.imread(str(files[1]))
    stripped = tmp_path / "stripped.jpg"
    cv2.imwrite(str(stripped), img, [cv2.IMWRITE_JPEG_QUALITY, 75])
    p = run("inspect", str(stripped), home=studio["home"])
    out = flat(p.stdout)
    assert p.returncode == 10, out
    assert "watermark only" in out and lic_id in out

    # an image the studio never made
    plain = tmp_path / "plain.jpg"
    cv2.imwrite(str(plain), np.full((256, 256, 3), 200, np.uint8))
    p = run("inspect", str(plain), home=studio["home"])
    assert p.returncode == 11, p.stdout


def test_renders_outside_the_licence_are_refused_before_anything_is_drawn(studio, tmp_path):
    before = (studio["home"] / "ledger" / "usage.jsonl").read_bytes() if (
        studio["home"] / "ledger" / "usage.jsonl").exists() else b""
    p = _render(studio, tmp_path / "a", "--count", "2", "--market", "US")
    assert p.returncode == 4 and "[market]" in flat(p.stderr) and "US" in flat(p.stderr), p.stderr
    p = _render(studio, tmp_path / "b", "--count", "5")
    assert p.returncode == 4 and "[images]" in flat(p.stderr), p.stderr
    p = _render(studio, tmp_path / "c", "--count", "1", "--purpose", "campaign")
    assert p.returncode == 4 and "[purpose]" in flat(p.stderr), p.stderr
    for d in ("a", "b", "c"):
        assert not list((tmp_path / d).glob("*")) if (tmp_path / d).exists() else True
    after = (studio["home"] / "ledger" / "usage.jsonl").read_bytes() if (
        studio["home"] / "ledger" / "usage.jsonl").exists() else b""
    assert after == before


@pytest.mark.parametrize("attack", ["jpeg75", "half", "crop10"])
def test_the_watermark_of_a_real_render_survives_the_web(studio, tmp_path, attack):
    """A licensed render of the twin, stripped of its credentials by the usual trip through the web, still
    names its licence and serial."""
    import cv2

    from train.marking.inspect import WATERMARK_ONLY, inspect_image

    lic_id = json.loads(studio["licence"].read_text())["licence"]["id"]
    made = sorted(studio["root"].glob("made/*.jpg"))
    if not made:
        p = _render(studio, studio["root"] / "made", "--count", "1", "--views", "rig", "--cameras", "cam04")
        assert p.returncode == 0, p.stderr
        made = sorted(studio["root"].glob("made/*.jpg"))
    img = cv2.imread(str(made[0]))
    h, w = img.shape[:2]
    if attack == "half":
        img = cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    elif attack == "crop10":
        img = img[h // 20: h - h // 20, w // 20: w - w // 20]  # 10 % of each side's length, centred
    out = tmp_path / f"{attack}.jpg"
    cv2.imwrite(str(out), img, [cv2.IMWRITE_JPEG_QUALITY, 75])
    r = inspect_image(out, studio["home"] / "keys" / "c2pa-ca.pem", licences=[lic_id])
    assert r.exit_code == WATERMARK_ONLY, r.summary()
    assert r.licence_id == lic_id and r.image_serial == int(made[0].name.split("-")[2]), r.summary()
