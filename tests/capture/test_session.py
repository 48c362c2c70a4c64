"""Session folder, journal replay and the manifest on disk."""

from __future__ import annotations

import json

import pytest

from capture.orchestrator import CaptureOptions, run_take
from capture.session import Journal, Session, SessionError, read_manifest, recover
from capture.worker import write_frame


def test_create_refuses_an_existing_session_and_a_bad_rig(tmp_path, session):
    with pytest.raises(SessionError, match="already holds a session"):
        Session.create(session.path, "virtual-ring-24", "subj-001")
    from rigs.errors import RigError

    with pytest.raises(RigError):
        Session.create(tmp_path / "other", tmp_path / "missing.toml", "subj-001")
    assert not (tmp_path / "other").exists()


def test_open_replays_the_journal_into_the_same_manifest(session):
    run_take(session, "stills", CaptureOptions(source="pattern"))
    again = Session.open(session.path)
    assert again.manifest == session.manifest
    assert read_manifest(session.path) == session.manifest


def test_manifest_is_validated_on_read(session):
    (session.path / "session.json").write_text(json.dumps({"schema": "twinstudio.session", "version": 99,
                                                           "subject_id": "x", "rig": "r", "rig_sha256": "0",
                                                           "created_at": 0}))
    with pytest.raises(SessionError, match="version|99"):
        read_manifest(session.path)
    (session.path / "session.json").write_text("{not json")
    with pytest.raises(SessionError, match="not a valid session manifest"):
        read_manifest(session.path)


def test_not_a_session(tmp_path):
    with pytest.raises(SessionError, match="not a session"):
        Session.open(tmp_path)


def test_journal_is_fsynced_json_lines(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.append([{"ev": "a", "n": 1}, {"ev": "b"}])
    j.append([])
    assert j.read() == [{"ev": "a", "n": 1}, {"ev": "b"}]
    with open(j.path, "ab") as f:
        f.write(b"garbage\n{\"ev\": \"c\"}\n")
    with pytest.raises(SessionError, match="corrupt journal line"):
        j.read()


def test_write_frame_writes_once(tmp_path):
    path, sha = write_frame(tmp_path / "cam01" / "000000", "jpg", b"\xff\xd8data")
    assert path.read_bytes() == b"\xff\xd8data" and len(sha) == 64
    with pytest.raises(FileExistsError):
        write_frame(tmp_path / "cam01" / "000000", "jpg", b"other")
    big = bytes(range(256)) * 8192  # 2 MiB: hashed in a thread while written
    import hashlib

    assert write_frame(tmp_path / "cam01" / "000001", "jpg", big)[1] == hashlib.sha256(big).hexdigest()


def test_recover_sets_a_damaged_frame_aside_and_marks_it_lost(session):
    rec = run_take(session, "stills", CaptureOptions(source="pattern"))
    victim = session.path / rec.captured["cam02"][3].path
    victim.write_bytes(b"bit rot")
    counts = recover(session)
    assert counts["lost"] == 1
    assert (3 not in session.take(rec.id).captured["cam02"]) and victim.with_name(victim.name + ".corrupt").exists()
    assert ("cam02", 3) in session.take(rec.id).missing()
