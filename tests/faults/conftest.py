"""Fault tests drive the real command line in subprocesses (helpers in :mod:`tests.faults.cli`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.cli import SUBJECT, add_consent, run


@pytest.fixture
def cli_session(tmp_path) -> Path:
    """A session on virtual-ring-24 with consent for everything, made through the CLI."""
    s = tmp_path / "session"
    r = run("capture", "start", "--session", s, "--rig", "virtual-ring-24", "--subject", SUBJECT)
    assert r.returncode == 0, r.stdout + r.stderr
    r = add_consent(s)
    assert r.returncode == 0, r.stdout + r.stderr
    return s
