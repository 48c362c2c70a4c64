"""Licences (issue 17, item 1): issued on a verified bundle, signed, never beyond the consent.

One real bundle per module (a small virtual session, bundled and signed);
variants of its consent are the same bundle with an edited MANIFEST.json,
signed again with the studio key, so each is a genuinely signed bundle.
Refusals are checked by field name and by the values their messages name;
the CLI is run in a subprocess through ``twinstudio.cli.main``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from decimal import Decimal
from types import SimpleNamespace

import pytest

pytest.importorskip("nerfstudio")  # the session's dataset export uses nerfstudio's conventions

from train.handoff.integrity import init_keys, load_private_key, sign_manifest  # noqa: E402
from train.handoff.licence import (NOT_IN_FORCE, REVOCATION, TAMPERED, UNTRUSTED, VALID, BundleNotUsable,  # noqa: E402
                                   LicenceError, LicenceNotValid, LicenceRefused, LicenceSignatureError, Rate,
                                   authorise_use, check_use, issue_licence, parse_rate, read_bundle_manifest,
                                   read_licence, verify_licence)
from train.handoff.revocations import entry_of, issue  # noqa: E402
from tests.handoff.test_ledger import flat, twinstudio  # noqa: E402

TODAY = dt.date.today()
DAY = dt.timedelta(days=1)

@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A signed bundle (consent: all scopes, e-commerce, EU, today to today+30), the studio keys, its current
    revocation list (nothing revoked)."""
    from tests.handoff.sessions import make_session
    from train.handoff.bundle import BundleOptions, build_bundle

    tmp = tmp_path_factory.mktemp("licence")
    session = make_session(tmp / "session")
    key, pub = init_keys(tmp / "keys")
    bundle = build_bundle(session, tmp / "bundle", BundleOptions(key=key, generation_kit=False)).path
    published = tmp / "revocations.json"
    published.write_bytes(issue(load_private_key(key), store=tmp / "revocation-store").data)
    return SimpleNamespace(tmp=tmp, bundle=bundle, key=key, pub=pub, revocations=published)


def terms(studio, **over):
    """A licence request within the consent (override any term)."""
    return {"licensee": "Brand X", "purposes": ["e-commerce"], "markets": ["EU"], "valid_from": TODAY,
            "valid_until": TODAY + 10 * DAY, "max_images": 100, "rate": "2.50 EUR/image", "key": studio.key,
            "pubkey": studio.pub, "revocations": studio.revocations, **over}


def variant(studio, tmp_path, edit, key=None):
    """The module's bundle with ``edit(manifest)`` applied and signed again (by ``key``, default the studio's)."""
    dst = tmp_path / "variant"
    shutil.copytree(studio.bundle, dst, copy_function=os.link)  # read only: the payload files are shared
    m = json.loads((dst / "MANIFEST.json").read_text())
    edit(m)
    data = (json.dumps(m, indent=2) + "\n").encode()
    (dst / "MANIFEST.json").unlink()
    (dst / "MANIFEST.json").write_bytes(data)
    (dst / "SIGNATURE.json").unlink()
    (dst / "SIGNATURE.json").write_text(json.dumps(sign_manifest(data, load_private_key(key or studio.key))))
    return dst


# ----------------------------------------------------------------------------- issue


def test_issue_writes_a_signed_deterministic_licence_that_verifies(studio, tmp_path):
    out = tmp_path / "for-brand-x.json"
    path, lic = issue_licence(studio.bundle, **terms(studio, notes="contract BX-2026-17"), out=out)
    manifest = (studio.bundle / "MANIFEST.json").read_bytes()
    m = json.loads(manifest)
    assert path.parent.name == "licences" and path.name == f"{lic.id}.json" and out.read_bytes() == path.read_bytes()
    assert lic.bundle_manifest_sha256 == hashlib.sha256(manifest).hexdigest()
    assert (lic.subject_id, lic.consent_id, lic.agency) == (m["subject"]["id"], m["consent"]["consent_id"],
                                                            "Nova Models")
    assert lic.rate == Rate(amount=Decimal("2.50"), currency="EUR") and str(lic.rate) == "2.50 EUR/image"
    assert (lic.issued_on, lic.valid_from, lic.max_images, lic.notes) == (TODAY, TODAY, 100, "contract BX-2026-17")
    doc = json.loads(path.read_text())
    assert doc["schema"] == "twinstudio.licence" and doc["licence"]["rate"]["amount"] == "2.50"  # never a float
    assert doc["signature"]["key_id"] == lic.issuer and doc["signature"]["signed"] == "licence"
    again, lic2 = issue_licence(studio.bundle, **terms(studio, notes="contract BX-2026-17"))
    assert (again, lic2) == (path, lic)  # the same terms, the same file
    v = verify_licence(out, bundle=studio.bundle, pubkey=studio.pub, revocations=studio.revocations)
    assert (v.exit_code, v.problems, v.trusted) == (VALID, [], True)
    assert verify_licence(out, pubkey=studio.pub, revocations=studio.revocations).exit_code == VALID


@pytest.mark.parametrize("over, field, named", [
    ({"purposes": ["e-commerce", "campaign"]}, "purpose", ["'campaign'", "['e-commerce']"]),
    ({"markets": ["US"]}, "market", ["'US'", "['EU']"]),
    ({"valid_from": TODAY - DAY}, "dates", [str(TODAY - DAY), str(TODAY)]),
    ({"valid_until": TODAY + 31 * DAY}, "dates", [str(TODAY + 31 * DAY), str(TODAY + 30 * DAY)]),
])
def test_a_licence_never_exceeds_the_consent(studio, over, field, named):
    with pytest.raises(LicenceRefused) as e:
        issue_licence(studio.bundle, **terms(studio, **over))
    assert e.value.fields == [field] and e.value.exit_code == 4
    for words in named:
        assert words in e.value.reasons[0].message and words in str(e.value)
    assert str(studio.bundle) in str(e.value)


def test_every_refusal_is_listed_and_nothing_is_written(studio):
    from train.handoff.licence import store_dir

    with pytest.raises(LicenceRefused) as e:
        issue_licence(studio.bundle, **terms(studio, purposes=["campaign"], markets=["EU", "US"],
                                             valid_until=TODAY + 60 * DAY))
    assert e.value.fields == ["purpose", "market", "dates"]
    assert not store_dir().exists()


def test_consent_without_generate_and_worldwide_markets(studio, tmp_path):
    def no_generate(m):
        m["consent"]["scopes"] = ["capture", "train", "share"]

    with pytest.raises(LicenceRefused) as e:
        issue_licence(variant(studio, tmp_path / "a", no_generate), **terms(studio))
    assert e.value.fields == ["consent"] and "'generate'" in str(e.value) and "generation" in str(e.value)

    def worldwide(m):
        m["consent"]["markets"] = ["worldwide"]

    _, lic = issue_licence(variant(studio, tmp_path / "b", worldwide), **terms(studio, markets=["US", "JP"]))
    assert lic.markets == ("US", "JP")


def test_a_bundle_that_does_not_verify_is_never_licensed(studio, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(studio.bundle, bad)
    with open(bad / "splat" / "splat.ply", "r+b") as f:
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(BundleNotUsable) as e:
        issue_licence(bad, **terms(studio))
    assert e.value.exit_code == 3 and "splat/splat.ply" in str(e.value)

    other_key, other_pub = init_keys(tmp_path / "other")
    with pytest.raises(BundleNotUsable) as e:  # a bundle the trusted key did not sign
        issue_licence(studio.bundle, **terms(studio, pubkey=other_pub))
    assert e.value.exit_code == 5
    with pytest.raises(BundleNotUsable) as e:  # no revocation list of the signer held
        issue_licence(studio.bundle, **terms(studio, revocations=None))
    assert e.value.exit_code == 6 and "unknown" in str(e.value)
    _, lic = issue_licence(studio.bundle, **terms(studio, revocations=None, accept_stale_revocations=True))
    assert lic.licensee == "Brand X"


def test_a_revoked_consent_is_not_licensed_and_its_licences_stop(studio, tmp_path):
    path, lic = issue_licence(studio.bundle, **terms(studio))
    c = read_bundle_manifest(studio.bundle).consent
    revoked = tmp_path / "revoked.json"
    revoked.write_bytes(issue(load_private_key(studio.key), [entry_of(c["consent_id"], lic.subject_id, None, "left")],
                              store=tmp_path / "store").data)
    with pytest.raises(BundleNotUsable) as e:
        issue_licence(studio.bundle, **terms(studio, revocations=revoked, max_images=7))
    assert e.value.exit_code == 4 and "revoked" in str(e.value)
    v = verify_licence(path, pubkey=studio.pub, revocations=revoked)
    assert v.exit_code == NOT_IN_FORCE and "revoked" in v.problems[0]


def test_only_the_key_that_signed_the_bundle_licenses_it(studio, tmp_path):
    other_key, other_pub = init_keys(tmp_path / "other")
    trusted = tmp_path / "trusted_keys"
    from train.handoff.trust import trust_key

    trust_key(studio.pub, "studio", trusted)
    trust_key(other_pub, "other", trusted)
    with pytest.raises(LicenceRefused) as e:
        issue_licence(studio.bundle, **terms(studio, key=other_key, pubkey=None, trusted_keys=trusted))
    assert e.value.fields == ["issuer"]


def test_bad_requests_are_input_errors_before_any_work(studio, tmp_path):
    for over, words in (({"rate": "2,50 EUR/image"}, "AMOUNT CURRENCY/image"),
                        ({"rate": "2.50 EUR/photo"}, "unit 'photo'"),
                        ({"valid_until": TODAY - DAY, "valid_from": TODAY}, "before valid_from"),
                        ({"valid_until": "31.12.2026"}, "'31.12.2026' is not a date"),
                        ({"max_images": 0}, "max_images 0"),
                        ({"markets": []}, "no market")):
        with pytest.raises(LicenceError) as e:
            issue_licence(tmp_path / "no-such-bundle", **terms(studio, **over))
        assert e.value.exit_code == 2 and words in str(e.value), (over, str(e.value))


# ----------------------------------------------------------------------------- rates


@pytest.mark.parametrize("text, amount, currency", [("2.50 EUR/image", "2.50", "EUR"), ("0.0125 USD/image",
                                                                                       "0.0125", "USD"),
                                                    ("1200 JPY/image", "1200", "JPY"), (" 3 CHF/image ", "3", "CHF")])
def test_rates_are_exact_decimals(text, amount, currency):
    r = parse_rate(text)
    assert (r.amount, r.currency) == (Decimal(amount), currency) and str(r.amount) == amount
    assert r.times(3) == Decimal(amount) * 3


@pytest.mark.parametrize("text", ["2.5 eur/image", "2,50 EUR/image", "-1 EUR/image", "1e3 EUR/image", "02.50 EUR/image",
                                  "2.50 EURO/image", "2.50 ABC/image", "2.50EUR/image", "2.50 EUR / image", "2.50 EUR",
                                  "2.1234567 EUR/image", "€2.50/image", "NaN EUR/image"])
def test_rates_are_parsed_strictly(text):
    with pytest.raises(LicenceError):
        parse_rate(text)


def test_a_rate_is_never_a_float():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Rate(amount=2.5, currency="EUR")
    assert Rate(amount="0.10", currency="EUR").times(3) == Decimal("0.30")  # 0.1 * 3 as floats is 0.30000000000000004


# ----------------------------------------------------------------------------- verify and use


def test_an_edited_licence_is_tampered(studio, tmp_path):
    path, _ = issue_licence(studio.bundle, **terms(studio))
    doc = json.loads(path.read_text())
    doc["licence"]["max_images"] = 100000
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc, indent=2))
    with pytest.raises(LicenceSignatureError):
        read_licence(edited)
    v = verify_licence(edited, pubkey=studio.pub, revocations=studio.revocations)
    assert v.exit_code == TAMPERED and "changed after it was signed" in v.problems[0]


def test_verify_names_an_expired_licence_another_bundle_and_an_untrusted_signer(studio, tmp_path):
    path, lic = issue_licence(studio.bundle, **terms(studio))
    v = verify_licence(path, pubkey=studio.pub, revocations=studio.revocations, today=TODAY + 11 * DAY)
    assert v.exit_code == NOT_IN_FORCE and f"expired on {lic.valid_until}" in v.problems[0]

    def other_purposes(m):
        m["consent"]["purposes"] = ["e-commerce", "campaign"]

    other = variant(studio, tmp_path, other_purposes)
    v = verify_licence(path, bundle=other, pubkey=studio.pub, revocations=studio.revocations)
    assert v.exit_code == NOT_IN_FORCE and "sha256" in v.problems[0] and str(other) in v.problems[0]
    _, other_pub = init_keys(tmp_path / "other")
    assert verify_licence(path, pubkey=other_pub, revocations=studio.revocations).exit_code == UNTRUSTED
    assert verify_licence(path, pubkey=studio.pub).exit_code == REVOCATION


def test_check_use_names_each_reason(studio, tmp_path):
    _, lic = issue_licence(studio.bundle, **terms(studio, max_images=5, valid_from=TODAY + DAY))
    m = read_bundle_manifest(studio.bundle)
    use = {"on": TODAY + 2 * DAY, "purpose": "e-commerce", "market": "EU", "images_used": 3}
    assert check_use(lic, m, **use) == 1
    assert check_use(lic, m, **use, n=2) == 0
    cases = [({"licensee": "Brand Y"}, ["licensee"]), ({"purpose": "campaign"}, ["purpose", "purpose"]),
             ({"market": "US"}, ["market", "market"]), ({"on": TODAY}, ["dates"]),
             ({"on": TODAY + 11 * DAY}, ["dates"]), ({"n": 3}, ["images"])]
    for over, fields in cases:  # a purpose or market outside the licence is outside the consent too
        with pytest.raises(LicenceRefused) as e:
            check_use(lic, m, **{**use, **over})
        assert e.value.fields == fields, over

    def no_generate(m):
        m["consent"]["scopes"] = ["capture", "train", "share"]

    with pytest.raises(LicenceRefused) as e:
        check_use(lic, read_bundle_manifest(variant(studio, tmp_path, no_generate)), **use)
    assert e.value.fields == ["bundle", "consent"]


def test_authorise_use_counts_the_ledger(studio, tmp_path):
    from train.handoff.ledger import Ledger

    path, lic = issue_licence(studio.bundle, **terms(studio, max_images=2))
    ledger = tmp_path / "usage.jsonl"
    kw = {"purpose": "e-commerce", "market": "EU", "ledger": ledger, "pubkey": studio.pub,
          "revocations": studio.revocations}
    a = authorise_use(path, studio.bundle, **kw)
    assert (a.images_used, a.images_left) == (0, 1)
    Ledger(ledger, key=studio.key, trusted=load_private_key(studio.key).public_key()).record(
        lic, image="IMG-1", image_sha256="1" * 64)
    assert authorise_use(path, studio.bundle, **kw).images_left == 0
    with pytest.raises(LicenceRefused) as e:
        authorise_use(path, studio.bundle, **kw, n=2)
    assert e.value.fields == ["images"]
    with pytest.raises(LicenceRefused) as e:
        authorise_use(path, studio.bundle, **{**kw, "market": "US"})
    assert e.value.fields == ["market", "market"]
    with pytest.raises(LicenceNotValid) as e:  # no revocation list: the consent may have been revoked
        authorise_use(path, studio.bundle, **{**kw, "revocations": None})
    assert e.value.exit_code == REVOCATION and "revocation status unknown" in str(e.value)
    with pytest.raises(LicenceRefused) as e:  # past its last day
        authorise_use(path, studio.bundle, **kw, today=TODAY + 11 * DAY)
    assert e.value.fields == ["dates"]


# ----------------------------------------------------------------------------- the command line


def test_cli_issue_verify_show(studio, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TWINSTUDIO_HOME", str(home))
    common = ["--pubkey", studio.pub, "--revocations", studio.revocations]
    out = tmp_path / "brand-x.json"
    r = twinstudio("licence", "issue", studio.bundle, "--licensee", "Brand X", "--purpose", "e-commerce",
                   "--market", "EU", "--until", TODAY + 5 * DAY, "--max-images", 50, "--rate", "2.50 EUR/image",
                   "--key", studio.key, "--out", out, *common)
    assert r.returncode == 0, r.stdout + r.stderr
    lid = json.loads(out.read_text())["licence"]["id"]
    assert f"issued licence {lid}" in flat(r.stdout) and (home / "licences" / f"{lid}.json").is_file()

    r = twinstudio("licence", "issue", studio.bundle, "--licensee", "Brand X", "--purpose", "campaign",
                   "--market", "US", "--until", TODAY + 5 * DAY, "--max-images", 50, "--rate", "2.50 EUR/image",
                   "--key", studio.key, *common)
    err = flat(r.stderr)
    assert r.returncode == 4 and "[purpose] purpose 'campaign'" in err and "[market] market 'US'" in err
    assert "['EU']" in err and "['e-commerce']" in err

    r = twinstudio("licence", "issue", studio.bundle, "--licensee", "Brand X", "--purpose", "e-commerce",
                   "--market", "EU", "--until", TODAY + 5 * DAY, "--max-images", 50, "--rate", "2.50 euros",
                   "--key", studio.key, *common)
    assert r.returncode == 2 and "rate '2.50 euros'" in flat(r.stderr)

    r = twinstudio("licence", "verify", out, "--bundle", studio.bundle, *common)
    assert r.returncode == 0 and flat(r.stdout).startswith(f"valid: licence {out}"), r.stdout + r.stderr
    r = twinstudio("licence", "verify", lid, "--pubkey", studio.pub)
    assert r.returncode == 6 and "revocation status unknown" in flat(r.stdout)
    r = twinstudio("licence", "show", lid)
    assert r.returncode == 0 and "at most 50; 0 used, 50 left" in flat(r.stdout)
    r = twinstudio("licence", "list")
    assert r.returncode == 0 and lid in r.stdout and "0 / 50" in r.stdout
