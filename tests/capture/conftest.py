"""Fixtures for capture tests: a session with consent on a virtual rig."""

from __future__ import annotations

import datetime as dt

import pytest

from capture.consent import ConsentRecord, add_consent
from capture.session import Session


def consent(**kw) -> ConsentRecord:
    base = dict(subject_id="subj-001", agency="Nova Models", scopes=["capture", "train"], purposes=["e-commerce"],
                markets=["EU"], valid_from=dt.date.today() - dt.timedelta(days=1),
                valid_until=dt.date.today() + dt.timedelta(days=365), compensation_ref="INV-1",
                document_sha256="a" * 64)
    base.update(kw)
    return ConsentRecord(**base)


@pytest.fixture
def session(tmp_path) -> Session:
    s = Session.create(tmp_path / "session", "virtual-ring-24", "subj-001")
    add_consent(s.path, consent())
    return s
