"""Consent: recorded, shown, revoked; capture refuses without a record in force covering it."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from capture.consent import ConsentError, add_consent, load_consents, require_consent, revoke_consent
from capture.orchestrator import CaptureOptions, run_take
from capture.session import Session
from tests.capture.conftest import consent

TODAY = dt.date.today()


def test_record_round_trips_and_is_in_force(tmp_path):
    rec = add_consent(tmp_path, consent())
    assert load_consents(tmp_path)[0].consent_id == rec.consent_id
    assert require_consent(tmp_path, "capture").consent_id == rec.consent_id


@pytest.mark.parametrize("kw,scope,on,phrase", [
    ({}, "share", TODAY, "does not cover 'share'"),
    ({"valid_until": TODAY - dt.timedelta(days=1), "valid_from": TODAY - dt.timedelta(days=30)}, "capture", TODAY,
     "expired"),
    ({"valid_from": TODAY + dt.timedelta(days=3)}, "capture", TODAY, "valid only from"),
])
def test_not_in_force(tmp_path, kw, scope, on, phrase):
    add_consent(tmp_path, consent(**kw))
    with pytest.raises(ConsentError, match=phrase) as e:
        require_consent(tmp_path, scope, on)
    assert e.value.exit_code == 4


def test_missing_consent_says_how_to_record_it(tmp_path):
    with pytest.raises(ConsentError, match="consent add"):
        require_consent(tmp_path, "capture")


def test_revocation_blocks_and_is_kept(tmp_path):
    add_consent(tmp_path, consent())
    revoke_consent(tmp_path, "subject asked")
    with pytest.raises(ConsentError, match="revoked"):
        require_consent(tmp_path, "capture")
    rec = load_consents(tmp_path)[0]
    assert rec.revocation_reason == "subject asked" and rec.revoked_at is not None


@pytest.mark.parametrize("kw", [{"document_sha256": "xyz"}, {"scopes": ["capture", "sell"]}, {"scopes": []},
                                {"valid_until": TODAY - dt.timedelta(days=400)}, {"subject_id": "a b"}])
def test_invalid_records_are_rejected(kw):
    with pytest.raises(ValidationError):
        consent(**kw)


def test_another_subject_cannot_share_a_session(tmp_path):
    add_consent(tmp_path, consent())
    with pytest.raises(ConsentError, match="subj-001"):
        add_consent(tmp_path, consent(subject_id="subj-002"))


def test_capture_refuses_without_consent_and_after_revocation(tmp_path):
    s = Session.create(tmp_path / "s", "virtual-ring-24", "subj-001")
    opts = CaptureOptions(source="pattern")
    with pytest.raises(ConsentError):
        run_take(s, "stills", opts)
    assert s.manifest.takes == {}  # nothing started
    add_consent(s.path, consent())
    run_take(s, "stills", opts)
    revoke_consent(s.path, "withdrawn")
    with pytest.raises(ConsentError, match="revoked"):
        run_take(s, "motion", opts)
    assert list(Session.open(s.path).manifest.takes) == ["stills-001"]
