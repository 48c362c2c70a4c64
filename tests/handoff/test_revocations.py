"""Signed revocation lists and trusted keys, as library functions (the CLI's faults: tests/faults)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from train.handoff.integrity import init_keys, key_id, load_private_key, load_public_key
from train.handoff.revocations import (
    RevocationError,
    RevocationSignatureError,
    UntrustedIssuerError,
    entry_of,
    import_list,
    issue,
    parse_list,
    revocation_status,
)
from train.handoff.trust import TrustError, load_trusted_keys, trust_index, trust_key, trusted_key, untrust_key

NOW = dt.datetime(2026, 5, 1, 9, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def key(tmp_path):
    return load_private_key(init_keys(tmp_path / "keys")[0])


def _entry(cid: str = "c1"):
    return entry_of(cid, "subj-007", NOW, "withdrew")


def test_each_issue_has_the_next_serial_and_keeps_what_was_revoked(key, tmp_path):
    store = tmp_path / "store"
    a = issue(key, [_entry("c1")], now=NOW, store=store)
    b = issue(key, [_entry("c2"), _entry("c1")], now=NOW + dt.timedelta(days=1), valid_days=2, store=store)
    assert (a.serial, b.serial) == (1, 2)
    assert [e.consent_id for e in b.list.revoked] == ["c1", "c2"]
    assert a.list.next_update == NOW + dt.timedelta(days=7) and b.list.next_update == NOW + dt.timedelta(days=3)
    assert a.list.issuer == key_id(key.public_key())
    assert parse_list(b.data).list == b.list  # what is stored and published parses back to the same list
    with pytest.raises(RevocationError, match="valid days"):
        issue(key, valid_days=0, store=store)


def test_the_unsigned_list_of_earlier_versions_is_folded_into_the_first_issue(key, tmp_path):
    old = {"consent_id": "old1", "subject_id": "subj-001", "revoked_at": "2025-01-01T00:00:00+00:00", "reason": "x"}
    (tmp_path / "revocations.json").write_text(json.dumps({"schema": "twinstudio.revocations", "version": 1,
                                                           "revoked": [old]}))
    signed = issue(key, [_entry("c1")], now=NOW, store=tmp_path / "revocations")
    assert [e.consent_id for e in signed.list.revoked] == ["c1", "old1"]


@pytest.mark.parametrize("edit", [
    lambda d: d["list"]["revoked"].clear(),
    lambda d: d["list"].__setitem__("next_update", "2099-01-01T00:00:00Z"),
    lambda d: d["list"].__setitem__("serial", 99),
    lambda d: d["list"].__setitem__("extra", 1),
    lambda d: d["signature"].__setitem__("signed", "MANIFEST.json"),
])
def test_any_edit_of_a_list_breaks_its_signature(key, tmp_path, edit):
    doc = json.loads(issue(key, [_entry()], now=NOW, store=tmp_path).data)
    edit(doc)
    with pytest.raises(RevocationSignatureError) as e:
        parse_list(json.dumps(doc).encode())
    assert e.value.exit_code == 3


def test_a_list_claiming_another_issuer_is_refused(key, tmp_path):
    from train.handoff.integrity import sign_document
    from train.handoff.revocations import LIST_SCHEMA, canonical

    body = json.loads(issue(key, now=NOW, store=tmp_path).data)["list"]
    body["issuer"] = "0123456789abcdef"
    doc = {"schema": LIST_SCHEMA, "version": 1, "list": body,
           "signature": sign_document(canonical(body), key, signed="list")}
    with pytest.raises(RevocationSignatureError, match="names issuer 0123456789abcdef"):
        parse_list(json.dumps(doc).encode())
    with pytest.raises(RevocationError, match="schema"):
        parse_list(b'{"schema": "twinstudio.revocations", "revoked": []}')


def test_import_checks_trust_and_serials(key, tmp_path):
    studio = tmp_path / "studio"
    lists = []
    for _ in range(2):
        lists.append(tmp_path / f"pub{len(lists) + 1}.json")
        lists[-1].write_bytes(issue(key, now=NOW, store=studio).data)
    held = tmp_path / "held"
    with pytest.raises(UntrustedIssuerError):
        import_list(lists[0], {}, store=held)
    trusted = trust_index([trusted_key(key.public_key(), "nova")])
    assert import_list(lists[1], trusted, store=held).outcome == "new"
    with pytest.raises(RevocationError, match="older"):
        import_list(lists[0], trusted, store=held)
    assert import_list(lists[1], trusted, store=held).outcome == "unchanged"


def test_status_checked_stale_unknown_and_the_newest_list_wins(key, tmp_path):
    kid = key_id(key.public_key())
    trusted = trust_index([trusted_key(key.public_key(), "nova")])
    held = tmp_path / "held"
    assert revocation_status(kid, trusted, now=NOW, store=held).state == "unknown"
    studio = tmp_path / "studio"
    first = tmp_path / "first.json"
    first.write_bytes(issue(key, now=NOW, store=studio).data)
    second = tmp_path / "second.json"
    second.write_bytes(issue(key, [_entry()], now=NOW, store=studio).data)
    import_list(second, trusted, store=held)
    st = revocation_status(kid, trusted, now=NOW + dt.timedelta(days=1), store=held)
    assert (st.state, st.serial, "c1" in st.revoked) == ("checked", 2, True)
    assert st.summary() == "checked (serial 2, issued 2026-05-01, next update 2026-05-08)"
    older = revocation_status(kid, trusted, list_path=first, now=NOW, store=held)
    assert older.serial == 2 and "c1" in older.revoked  # an older list given explicitly hides nothing
    stale = revocation_status(kid, trusted, now=NOW + dt.timedelta(days=8), store=held)
    assert stale.state == "stale" and "c1" in stale.revoked
    assert revocation_status(kid, {}, now=NOW, store=held).state == "unknown"  # the issuer is not trusted


def test_trusted_keys_file(tmp_path):
    path = tmp_path / "trusted_keys"
    pub = init_keys(tmp_path / "k")[1]
    k, new = trust_key(pub, "nova-studio", path)
    assert new and not trust_key(pub, "other-name", path)[1]  # a key is pinned once
    assert load_trusted_keys(path) == [k] and k.key_id == key_id(load_public_key(pub))
    with pytest.raises(TrustError, match="invalid key name"):
        trust_key(pub, "two words", path)
    lines = path.read_text().splitlines()
    kid, name, b64 = lines[1].split()
    path.write_text(f"{lines[0]}\nffffffffffffffff {name} {b64}\n")
    with pytest.raises(TrustError, match=r"trusted_keys:2: key id ffffffffffffffff is not the id"):
        load_trusted_keys(path)
    path.write_text(f"{lines[0]}\n{kid} {name} {b64}\n")
    assert untrust_key(kid, path) == [k] and load_trusted_keys(path) == []


def test_a_held_list_under_another_issuers_name_is_refused(key, tmp_path):
    from train.handoff.revocations import held_list, held_path

    other = load_private_key(init_keys(tmp_path / "other")[0])
    store = tmp_path / "store"
    mine = issue(key, [_entry("c1")], now=NOW, store=store)
    theirs = issue(other, now=NOW, store=tmp_path / "other-store")
    held_path(mine.list.issuer, store).write_bytes(theirs.data)  # would hide c1's revocation
    with pytest.raises(RevocationError, match=f"holds the list of key {theirs.list.issuer}"):
        held_list(mine.list.issuer, store)
