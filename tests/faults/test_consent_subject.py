"""A consent record counts only for the session's subject (issue: consent belongs to one person)."""

from __future__ import annotations

import datetime as dt
import json

from capture.consent import ConsentFile, ConsentRecord
from tests.faults.cli import SUBJECT, add_consent, flat, run


def test_a_record_of_somebody_else_is_refused_when_added(tmp_path):
    s = tmp_path / "session"
    assert run("capture", "start", "--session", s, "--rig", "virtual-ring-24", "--subject", SUBJECT).returncode == 0
    r = add_consent(s, subject="somebody-else")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"is for subject '{SUBJECT}'; a consent record of 'somebody-else' cannot be added" in flat(r.stderr)
    assert not (s / "consent.json").exists()


def test_a_record_of_somebody_else_opens_no_door(tmp_path):
    s = tmp_path / "session"
    assert run("capture", "start", "--session", s, "--rig", "virtual-ring-24", "--subject", SUBJECT).returncode == 0
    other = ConsentRecord(subject_id="somebody-else", agency="Nova Models", scopes=["capture", "train", "share"],
                          purposes=["e-commerce"], markets=["EU"], valid_from=dt.date.today(),
                          valid_until=dt.date.today() + dt.timedelta(days=30), compensation_ref="INV-9",
                          document_sha256="b" * 64)
    (s / "consent.json").write_text(ConsentFile(records=[other]).model_dump_json(by_alias=True))  # by hand
    r = run("capture", "stills", "--session", s, "--plain", "--virtual-source", "pattern")
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"is for subject 'somebody-else', not this session's '{SUBJECT}'" in flat(r.stderr)
    assert b"take_start" not in (s / "journal.jsonl").read_bytes()
    show = run("consent", "show", "--session", s)
    assert "another subject" in show.stdout

    doc = json.loads((s / "consent.json").read_text())
    doc["records"] = []
    (s / "consent.json").write_text(json.dumps(doc))
    assert add_consent(s).returncode == 0
    r = run("capture", "stills", "--session", s, "--plain", "--virtual-source", "pattern")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_record_of_somebody_else_opens_no_later_door(tmp_path):
    from tests.handoff.sessions import ALL_SCOPES, consent, make_session, twinstudio

    s = make_session(tmp_path / "s")
    home = tmp_path / "home"
    assert twinstudio("keys", "init", home=home).returncode == 0
    other = consent(ALL_SCOPES, subject="somebody-else")
    (s / "consent.json").write_text(ConsentFile(records=[other]).model_dump_json(by_alias=True))  # by hand
    for args in (("reconstruct", "masks", s), ("reconstruct", "run", s, "--cameras-from", "existing"),
                 ("train", "export", s, "--out", tmp_path / "ds"), ("train", "run", s, "--device", "cpu"),
                 ("bundle", s, "--out", tmp_path / "twin.tar")):
        r = twinstudio(*args, home=home)
        assert r.returncode == 4, (args, r.stdout, r.stderr)
        assert "is for subject 'somebody-else', not this session's 'subj-007'" in flat(r.stderr), args
    assert not (tmp_path / "ds").exists() and not (tmp_path / "twin.tar").exists()
