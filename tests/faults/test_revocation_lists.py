"""Revocation reaches render teams (issue item 13), through the real CLI, on two machines' homes.

The studio revokes, issues and exports its signed list; a render team, with
the studio key pinned, imports it and verify reports the status as checked
(serial, dates), stale or unknown; stale and unknown are never plain "valid";
a revoked consent is exit 4. Lists edited, signed by another key or older
than the one held are refused.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tarfile

import pytest

pytest.importorskip("nerfstudio")  # the dataset export of the session uses nerfstudio's conventions

from tests.handoff.sessions import make_session, twinstudio  # noqa: E402

URL = "https://studio.example/twins/revocations.json"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """(session, studio home, bundle .tar, render-team home with the studio key pinned)."""
    tmp = tmp_path_factory.mktemp("revocation")
    session = make_session(tmp / "session", ("capture", "train", "share"))  # no 'generate': no kit, faster
    home = tmp / "studio"
    assert twinstudio("keys", "init", home=home).returncode == 0
    bundle = tmp / "bundle.tar"
    r = twinstudio("bundle", session, "--out", bundle, "--revocations-url", URL, "--plain", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    render = tmp / "render-team"
    r = twinstudio("keys", "trust", home / "keys" / "studio.pub", "--name", "nova-studio", home=render)
    assert r.returncode == 0, r.stdout + r.stderr
    return session, home, bundle, render


def _session_copy(session, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(session, s, ignore=shutil.ignore_patterns("takes", ".virtual", "train", "recon"))
    return s


def _fresh_render_home(render, tmp_path):
    r = tmp_path / "render"
    r.mkdir()
    shutil.copy(render / "trusted_keys", r / "trusted_keys")
    return r


def test_revocation_reaches_a_render_team(studio, tmp_path):
    session, home, bundle, render_pinned = studio
    render = _fresh_render_home(render_pinned, tmp_path)
    with tarfile.open(bundle) as t:
        manifest = json.load(t.extractfile("MANIFEST.json"))
    assert manifest["revocations"]["url"] == URL
    issuer = manifest["revocations"]["issuer"]
    assert (home / "trusted_keys").read_text().split("\n")[1].startswith(issuer)

    r = twinstudio("verify", bundle, home=render)  # no list held: unknown, not valid
    assert r.returncode == 6, r.stdout + r.stderr
    assert "revocation status: unknown" in r.stdout and URL in r.stdout

    r = twinstudio("revocations", "export", "--out", tmp_path / "pub1.json", home=home)
    assert r.returncode == 0 and "serial 1" in r.stdout, r.stdout + r.stderr
    r = twinstudio("revocations", "import", tmp_path / "pub1.json", home=render)
    assert r.returncode == 0 and "imported" in r.stdout and "nova-studio" in r.stdout, r.stdout + r.stderr
    r = twinstudio("verify", bundle, home=render)
    today = dt.datetime.now(dt.timezone.utc).date()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("valid")
    assert (f"revocation status: checked (serial 1, issued {today}, next update {today + dt.timedelta(days=7)})"
            in r.stdout)

    # the subject withdraws: the studio revokes, the list is re-issued and published
    s = _session_copy(session, tmp_path)
    r = twinstudio("consent", "revoke", "--session", s, "--reason", "subject withdrew", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "serial 2, 1 revoked" in r.stdout
    r = twinstudio("revocations", "export", "--out", tmp_path / "pub3.json", home=home)
    assert r.returncode == 0 and "serial 3" in r.stdout, r.stdout + r.stderr
    r = twinstudio("verify", bundle, home=home)  # on the studio's machine at once
    assert r.returncode == 4 and "subject withdrew" in r.stdout, r.stdout + r.stderr

    r = twinstudio("revocations", "import", tmp_path / "pub3.json", home=render)
    assert r.returncode == 0 and "updated (was serial 1)" in r.stdout, r.stdout + r.stderr
    r = twinstudio("verify", bundle, home=render)
    assert r.returncode == 4, r.stdout + r.stderr
    assert r.stdout.startswith("consent not in force") and "revoked" in r.stdout and "subject withdrew" in r.stdout
    r = twinstudio("revocations", "show", home=render)
    consent_id = manifest["consent"]["consent_id"]
    assert r.returncode == 0 and consent_id in r.stdout and "serial 3" in r.stdout, r.stdout

    # an older list cannot bring the consent back
    r = twinstudio("revocations", "import", tmp_path / "pub1.json", home=render)
    assert r.returncode == 2 and "older" in r.stderr, r.stdout + r.stderr
    assert twinstudio("verify", bundle, home=render).returncode == 4
    r = twinstudio("verify", bundle, "--revocations", tmp_path / "pub1.json", home=render)  # nor given explicitly
    assert r.returncode == 4 and "serial 3" in r.stdout, r.stdout + r.stderr
    r = twinstudio("revocations", "import", tmp_path / "pub3.json", home=render)
    assert r.returncode == 0 and "already held" in r.stdout


def test_edited_and_foreign_lists_are_refused(studio, tmp_path):
    from train.handoff.integrity import init_keys, load_private_key
    from train.handoff.revocations import issue

    session, home, bundle, render_pinned = studio
    render = _fresh_render_home(render_pinned, tmp_path)
    s = _session_copy(session, tmp_path)
    assert twinstudio("consent", "revoke", "--session", s, "--reason", "withdrew", home=home).returncode == 0
    assert twinstudio("revocations", "export", "--out", tmp_path / "pub.json", home=home).returncode == 0

    edited = json.loads((tmp_path / "pub.json").read_text())
    edited["list"]["revoked"] = []  # drop the revocation, keep the signature
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    r = twinstudio("revocations", "import", tmp_path / "edited.json", home=render)
    assert r.returncode == 3 and "signature does not verify" in r.stderr, r.stdout + r.stderr
    r = twinstudio("verify", bundle, "--revocations", tmp_path / "edited.json", home=render)
    assert r.returncode == 2 and "signature does not verify" in r.stderr, r.stdout + r.stderr

    # a list signed by someone else's key: intact, but not a trusted issuer
    other = load_private_key(init_keys(tmp_path / "other")[0])
    forged = issue(other, store=tmp_path / "other-store")
    (tmp_path / "forged.json").write_bytes(forged.data)
    r = twinstudio("revocations", "import", tmp_path / "forged.json", home=render)
    assert r.returncode == 5 and "not a trusted key" in r.stderr, r.stdout + r.stderr
    r = twinstudio("verify", bundle, "--revocations", tmp_path / "forged.json", home=render)
    assert r.returncode == 6 and "not of the signer" in r.stdout and "was ignored" in r.stdout, r.stdout + r.stderr

    r = twinstudio("revocations", "import", tmp_path / "pub.json", home=render)
    assert r.returncode == 0
    assert twinstudio("verify", bundle, home=render).returncode == 4
    # another issuer's list given explicitly hides nothing: the held list of the signer still revokes
    for extra in ((), ("--accept-stale-revocations",)):
        r = twinstudio("verify", bundle, "--revocations", tmp_path / "forged.json", *extra, home=render)
        assert r.returncode == 4 and "withdrew" in r.stdout, r.stdout + r.stderr


def test_a_stale_list_is_not_plain_valid(studio, tmp_path):
    from train.handoff.integrity import load_private_key
    from train.handoff.revocations import issue

    _, home, bundle, render_pinned = studio
    render = _fresh_render_home(render_pinned, tmp_path)
    # the studio's list as published ten days ago, with a next update seven days after that
    studio_key = load_private_key(home / "keys" / "studio.key")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    old = issue(studio_key, now=past, store=tmp_path / "studio-store")
    (tmp_path / "old.json").write_bytes(old.data)
    r = twinstudio("revocations", "import", tmp_path / "old.json", home=render)
    assert r.returncode == 0, r.stdout + r.stderr
    r = twinstudio("verify", bundle, home=render)
    assert r.returncode == 6, r.stdout + r.stderr
    assert r.stdout.startswith("intact and trusted, revocation status stale")
    assert f"stale (serial 1, issued {past.date()}" in r.stdout and URL in r.stdout
    r = twinstudio("verify", bundle, "--accept-stale-revocations", home=render)
    assert r.returncode == 0 and "stale" in r.stdout and "accepted" in r.stdout, r.stdout + r.stderr


def test_revoking_without_a_studio_key_says_so_and_lists_it_once_there_is_one(studio, tmp_path):
    session, _, _, _ = studio
    home = tmp_path / "new-studio"
    s = _session_copy(session, tmp_path)
    r = twinstudio("consent", "revoke", "--session", s, "--reason", "withdrew", "--key", tmp_path / "none.key",
                   home=home)
    assert r.returncode == 2 and "none.key" in r.stderr, r.stdout + r.stderr  # a key named but missing
    assert json.loads((s / "consent.json").read_text())["records"][0]["revoked_at"] is None  # nothing done

    r = twinstudio("consent", "revoke", "--session", s, "--reason", "withdrew", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "revoked consent" in r.stdout and "not on a signed revocation list" in r.stdout
    assert json.loads((s / "consent.json").read_text())["records"][0]["revoked_at"] is not None
    assert not (home / "revocations").exists()

    assert twinstudio("keys", "init", home=home).returncode == 0
    r = twinstudio("consent", "revoke", "--session", s, "--reason", "withdrew", home=home)  # lists what is missing
    assert r.returncode == 0 and "listing (revoked on" in r.stdout and "serial 1, 1 revoked" in r.stdout, r.stdout
    r = twinstudio("consent", "revoke", "--session", s, "--reason", "withdrew", home=home)
    assert r.returncode == 2 and "no consent in force" in r.stderr, r.stdout + r.stderr
