"""A journal torn by a power cut, or damaged in the middle, through the real CLI (issue: torn last line)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from rigs.fileio import sha256_file
from tests.faults.cli import flat, run

FRAMES = 4


def _motion(session: Path) -> None:
    r = run("capture", "motion", "--session", session, "--frames", FRAMES, "--plain", "--virtual-source", "pattern")
    assert r.returncode == 0, r.stdout + r.stderr


def _lines(journal: Path) -> list[bytes]:
    return journal.read_bytes().splitlines(keepends=True)


def _assert_sound(journal: Path) -> None:
    """Every line is terminated, JSON, and carries a matching checksum."""
    data = journal.read_bytes()
    assert data.endswith(b"\n")
    for n, line in enumerate(data.splitlines(), 1):
        ev = json.loads(line)
        crc = ev.pop("crc")
        body = json.dumps(ev, separators=(",", ":")).encode()
        assert f"{zlib.crc32(body):08x}" == crc, f"line {n}"


def _assert_files_listed(session: Path) -> None:
    """The manifest and the frame files on disk agree, hash for hash, and the take is complete."""
    doc = json.loads((session / "session.json").read_text())
    listed = {}
    for take in doc["takes"].values():
        assert take["status"] == "complete", take["id"]
        for frames in take["captured"].values():
            for rec in frames.values():
                listed[rec["path"]] = rec["sha256"]
    on_disk = {p.relative_to(session).as_posix(): sha256_file(p) for p in (session / "takes").rglob("*.jpg")}
    assert listed == on_disk


@pytest.mark.parametrize("where", ["take_end", "mid-take", "garbage"])
def test_a_torn_final_line_is_cut_aside_and_resume_recovers_from_disk(cli_session, where):
    _motion(cli_session)
    journal = cli_session / "journal.jsonl"
    lines = _lines(journal)
    if where == "take_end":  # the power cut hit while the take's end was being written
        assert b'"ev":"take_end"' in lines[-1]
        keep, torn = b"".join(lines[:-1]), lines[-1][: len(lines[-1]) // 2]
    elif where == "mid-take":  # ... or half-way through the take: later frames reached disk, not the journal
        k = len(lines) // 2
        keep, torn = b"".join(lines[:k]), lines[k][:37]
    else:  # a file system that extended the file with zeros
        keep, torn = b"".join(lines), b"\x00" * 300
    journal.write_bytes(keep + torn)

    st = run("capture", "status", "--session", cli_session)
    assert st.returncode == 0, st.stderr
    assert "ends in a torn line" in st.stdout

    r = run("capture", "resume", "--session", cli_session, "--plain", "--virtual-source", "pattern")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torn final line" in r.stdout and "kept in journal.jsonl.torn-" in r.stdout
    aside = list(cli_session.glob("journal.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == torn  # kept, byte for byte, never deleted
    assert journal.read_bytes().startswith(keep)
    _assert_sound(journal)
    _assert_files_listed(cli_session)

    for args in (("capture", "status", "--session", cli_session),
                 ("capture", "resume", "--session", cli_session, "--plain", "--virtual-source", "pattern")):
        again = run(*args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "ends in a torn line" not in again.stdout and "torn journal line kept" not in again.stdout
    assert "motion-001 " in st.stdout and "complete" in run("capture", "status", "--session", cli_session).stdout


def test_a_damaged_middle_line_is_named_and_repair_cuts_there_after_a_backup(cli_session):
    _motion(cli_session)
    journal = cli_session / "journal.jsonl"
    lines = _lines(journal)
    bad = 6  # a frame record: flip one digit of its size
    assert b'"ev":"frame"' in lines[bad - 1]
    i = lines[bad - 1].index(b'"size":') + 7
    damaged = bytearray(lines[bad - 1])
    damaged[i] = ord("9") if damaged[i] != ord("9") else ord("8")
    lines[bad - 1] = bytes(damaged)
    original = b"".join(lines)
    journal.write_bytes(original)

    for args in (("capture", "status", "--session", cli_session),
                 ("capture", "resume", "--session", cli_session, "--plain", "--virtual-source", "pattern")):
        r = run(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"journal.jsonl:{bad}: corrupt journal line (checksum mismatch)" in r.stderr
        assert "capture repair" in r.stderr
    assert journal.read_bytes() == original  # refusing changes nothing

    r = run("capture", "repair", "--session", cli_session)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"cut at line {bad}" in r.stdout
    backup, = cli_session.glob("journal.jsonl.bak-*")
    cut, = cli_session.glob("journal.jsonl.cut-*")
    assert backup.read_bytes() == original
    assert cut.read_bytes() == b"".join(lines[bad - 1:])
    assert journal.read_bytes().startswith(b"".join(lines[: bad - 1]))
    _assert_sound(journal)

    r = run("capture", "resume", "--session", cli_session, "--plain", "--virtual-source", "pattern")
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_files_listed(cli_session)  # the frames the cut lines recorded are adopted from disk
    doc = json.loads((cli_session / "session.json").read_text())
    assert sum(len(f) for f in doc["takes"]["motion-001"]["captured"].values()) == 24 * FRAMES
    assert run("capture", "repair", "--session", cli_session).stdout.startswith("journal sound")


def test_repair_sets_a_torn_final_line_aside_before_it_writes(cli_session):
    _motion(cli_session)
    journal = cli_session / "journal.jsonl"
    lines = _lines(journal)
    keep, torn = b"".join(lines[:-1]), lines[-1][:40]
    journal.write_bytes(keep + torn)
    r = run("capture", "repair", "--session", cli_session)
    assert r.returncode == 0, r.stdout + r.stderr
    assert flat(r.stdout).startswith("journal sound") and "torn final line was cut off" in flat(r.stdout)
    aside, = cli_session.glob("journal.jsonl.torn-*")
    assert aside.read_bytes() == torn
    _assert_sound(journal)  # repair's own records follow the cut, not the torn bytes
    assert run("capture", "resume", "--session", cli_session, "--plain", "--virtual-source", "pattern"
               ).returncode == 0
    _assert_files_listed(cli_session)


def test_a_damaged_checksum_on_the_first_line_does_not_turn_checksums_off(cli_session):
    _motion(cli_session)
    journal = cli_session / "journal.jsonl"
    lines = _lines(journal)
    lines[0] = lines[0].replace(b'"crc":"', b'"crc":"z', 1)  # not hex any more
    lines[1] = lines[1].replace(b',"crc":"', b',"xrc":"', 1)  # and a line without its checksum
    journal.write_bytes(b"".join(lines))
    r = run("capture", "status", "--session", cli_session)
    assert r.returncode == 2 and "journal.jsonl:1: corrupt journal line" in flat(r.stderr), r.stderr
