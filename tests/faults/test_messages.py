"""Messages keep what they say: bracketed keys and paths survive rich, absurd nesting is a named error
(issue: messages are readable)."""

from __future__ import annotations

import pytest

from rigs.rigfile import resolve_rig_path
from tests.faults.cli import add_consent, flat, run


@pytest.fixture
def ring_toml() -> str:
    return resolve_rig_path("virtual-ring-24").read_text()


def test_bracketed_keys_survive_in_rig_errors(tmp_path, ring_toml):
    bad = tmp_path / "hair.toml"
    bad.write_text(ring_toml.replace("levels = { key = 0.55", "levels = { hair = 1.0, key = 0.55", 1))
    r = run("rig", "check", bad)
    assert r.returncode == 2
    assert "[presets.flat.levels.hair]: preset 'flat' names light 'hair', which is not in [[lights]]" in \
        flat(r.stderr)

    no_rig = tmp_path / "norig.toml"
    no_rig.write_text(ring_toml.replace("[rig]\n", "", 1).replace('name = "virtual-ring-24"\n', "", 1))
    r = run("rig", "check", no_rig)
    assert r.returncode == 2 and "norig.toml [rig]: missing required key 'rig'" in flat(r.stderr)


def test_a_rig_nested_thousands_deep_is_a_named_error(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    r = run("rig", "check", deep)
    assert r.returncode == 2, r.stderr
    assert "deep.toml: nested too deeply" in flat(r.stderr) and "Traceback" not in r.stderr


def test_a_consent_file_nested_thousands_deep_is_a_named_error(cli_session):
    (cli_session / "consent.json").write_text("[" * 100000 + "]" * 100000)
    for args in (("consent", "show", "--session", cli_session),
                 ("capture", "stills", "--session", cli_session, "--plain", "--virtual-source", "pattern")):
        r = run(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "consent.json: not a valid consent file: RecursionError" in flat(r.stderr)
        assert "Traceback" not in r.stderr


def test_paths_and_names_with_brackets_are_printed_as_they_are(tmp_path):
    s = tmp_path / "[studio b] s1"
    r = run("capture", "start", "--session", s, "--rig", "virtual-ring-24", "--subject", "subj-042")
    assert r.returncode == 0, r.stderr
    assert f"{s} for subj-042" in flat(r.stdout)
    assert add_consent(s).returncode == 0
    r = run("consent", "show", "--session", s)
    assert r.returncode == 0 and "[studio b] s1" in flat(r.stdout)
