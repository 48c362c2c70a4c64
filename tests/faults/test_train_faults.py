"""Faults of the training doors, through the real CLI (``python -m twinstudio train ...`` in subprocesses).

- Every door checks (item 5): expired, revoked, train-less consent and a
  record of another subject stop ``train export``, ``train run`` and
  ``train eval`` with exit 4, before anything is written.
- An export shares nothing with the studio (item 11): no inode of the
  dataset is one of the session's, and a re-export after a take image changed
  (same size, same mtime, other bytes) does not keep the stale copy.
- Loading a run folder runs no code (item 14): a crafted config.yml and a
  crafted checkpoint are refused with exit 2 by ``train eval`` and by a
  resuming ``train run``, and their payloads never run.
- No NaN in any file (item 8): a run folder whose metrics.json holds NaN is
  re-evaluated into strict JSON; a resumed run with no step left writes None
  with a reason where it has no figure.

One small real session (virtual-ring-24 stills at 1/10 scale, captured through
the CLI, the virtual studio's cameras and masks standing in for the
reconstruction) with a 10-step CPU twin serves every test; each test works on
its own copy.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.faults.cli import file_ids, flat, run as twinstudio

pytest.importorskip("nerfstudio")

SUBJECT = "subj-042"
TRAIN = ("--device", "cpu", "--downscale", "2", "--no-exports", "--plain")


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime ns)}`` of every file and folder under ``root``."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _strict_json(path: Path):
    """The file's JSON, failing on NaN / Infinity (which Python's json module reads by default)."""
    def refuse(word):
        raise AssertionError(f"{path} holds {word}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(session, studio home): captured through the CLI, consent for capture and train, a 10-step twin 'twin'."""
    from reconstruct.inputs import GroundTruth, write_cameras

    tmp = tmp_path_factory.mktemp("train-faults")
    home, s = tmp / "home", tmp / "session"
    _ok(twinstudio("capture", "start", "--session", s, "--rig", "virtual-ring-24", "--subject", SUBJECT, home=home))
    _ok(twinstudio("consent", "add", "--session", s, "--subject", SUBJECT, "--agency", "Nova Models",
                   "--scope", "capture", "--scope", "train", "--purpose", "e-commerce", "--market", "EU",
                   "--valid-until", (dt.date.today() + dt.timedelta(days=30)).isoformat(),
                   "--compensation", "INV-1", "--document-sha256", "a" * 64, home=home))
    _ok(twinstudio("capture", "stills", "--session", s, "--render-scale", "0.1", "--plain", home=home))
    gt = GroundTruth.find(s)
    write_cameras(s / "recon" / "cameras.json", gt.cameras().values(), method="ground-truth")
    for src in gt.take_dir("stills-001").glob("cam*/*.mask.png"):
        dst = s / "recon" / "masks" / "stills-001" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    _ok(twinstudio("train", "run", s, "--iterations", "10", *TRAIN, home=home))  # exports the dataset too
    assert (s / "train" / "twin" / "nerfstudio_models" / "step-000000009.ckpt").is_file()
    return s, home


@pytest.fixture
def session(trained, tmp_path) -> tuple[Path, Path]:
    """A private copy of the trained session, and a studio home of its own."""
    s = tmp_path / "session"
    shutil.copytree(trained[0], s, symlinks=True)
    return s, tmp_path / "home"


# ----------------------------------------------------------------------------- item 5: every door checks


def _consent_doc(s: Path) -> dict:
    return json.loads((s / "consent.json").read_text())


def _break_consent(s: Path, home: Path, case: str) -> str:
    """Make the session's consent unusable for training in one way; returns what the refusal must say."""
    doc = _consent_doc(s)
    rec = doc["records"][0]
    today = dt.date.today()
    if case == "revoked":
        _ok(twinstudio("consent", "revoke", "--session", s, "--reason", "withdrawn by the subject", home=home))
        return "was revoked"
    if case == "expired":
        rec["valid_from"] = (today - dt.timedelta(days=60)).isoformat()
        rec["valid_until"] = (today - dt.timedelta(days=1)).isoformat()
        expect = f"expired on {today - dt.timedelta(days=1)}"
    elif case == "train-less":
        rec["scopes"] = ["capture", "share"]
        expect = "does not cover 'train'"
    else:  # another subject's record, written by hand: 'consent add' refuses it
        rec["subject_id"] = "somebody-else"
        expect = f"is for subject 'somebody-else', not this session's '{SUBJECT}'"
    (s / "consent.json").write_text(json.dumps(doc))
    return expect


CASES = ("expired", "revoked", "train-less", "other-subject")


@pytest.mark.parametrize("case", CASES)
def test_every_train_door_checks_consent_and_writes_nothing(session, tmp_path, case):
    s, home = session
    shutil.rmtree(s / "train" / "dataset")  # export from scratch: a door that forgot the gate would write it
    expect = _break_consent(s, home, case)
    before = _snapshot(s)
    out = tmp_path / "elsewhere"
    for args in (("train", "export", s),
                 ("train", "export", s, "--out", out),
                 ("train", "run", s, "--iterations", "20", *TRAIN),
                 ("train", "run", s, "--run", "fresh", "--iterations", "5", *TRAIN),
                 ("train", "eval", s, "--device", "cpu", "--plain")):
        r = twinstudio(*args, home=home)
        assert r.returncode == 4, (args, r.stdout[-2000:], r.stderr[-2000:])
        assert "no consent in force covers 'train'" in flat(r.stderr), (args, r.stderr)
        assert expect in flat(r.stderr), (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert _snapshot(s) == before  # nothing new, nothing changed: not a dataset, a run folder or a checkpoint
    assert not out.exists()


def test_the_doors_open_again_with_consent_in_force(session):
    """The control of the test above: the same session, its consent intact, exports (exit 0)."""
    s, home = session
    r = twinstudio("train", "export", s, "--out", s.parent / "ds", home=home)
    _ok(r)
    doc = json.loads((s.parent / "ds" / "transforms.json").read_text())
    assert doc["twinstudio"]["consent"]["subject_id"] == SUBJECT
    assert doc["twinstudio"]["consent"]["consent_id"] == _consent_doc(s)["records"][0]["consent_id"]


def test_a_run_on_a_dataset_of_a_session_without_consent_is_refused(session, tmp_path):
    """The run's own session has consent, the dataset it would read came from one that has not."""
    s, home = session
    other = tmp_path / "other"
    shutil.copytree(s, other, symlinks=True)
    _break_consent(other, home, "train-less")
    doc = json.loads((s / "train" / "dataset" / "transforms.json").read_text())
    doc["twinstudio"]["source"] = str(other.resolve())  # as if exported from the other session
    (s / "train" / "dataset" / "transforms.json").write_text(json.dumps(doc))
    before = _snapshot(s)
    r = twinstudio("train", "run", s, "--run", "fresh", "--iterations", "5", *TRAIN, home=home)
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    assert "does not cover 'train'" in flat(r.stderr)
    assert _snapshot(s) == before


# ----------------------------------------------------------------------------- item 11: a private copy


def test_export_shares_no_inode_and_a_changed_image_is_not_kept(session, tmp_path):
    s, home = session
    out = tmp_path / "ds"
    _ok(twinstudio("train", "export", s, "--out", out, home=home))
    shared = file_ids(out).keys() & file_ids(s).keys()
    assert not shared, sorted(file_ids(out)[k] for k in shared)[:10]
    src = s / "takes" / "stills-001" / "cam01" / "000000.jpg"
    assert src.stat().st_nlink == 1
    # the export writes the unmixed subject (RGBA PNG), never a link to or a copy of the take's file
    copy = out / "images" / "cam01_stills-001_000000.png"
    first = copy.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first != src.read_bytes()

    # an exported image changes by hand: same size, same mtime, other bytes
    st = copy.stat()
    copy.write_bytes(first[:-20] + bytes(b ^ 0x5A for b in first[-20:]))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert copy.stat().st_size == st.st_size and copy.read_bytes() != first
    _ok(twinstudio("train", "export", s, "--out", out, home=home))
    assert copy.read_bytes() == first, f"{copy} kept the stale image"  # same size is not same file
    assert not file_ids(out).keys() & file_ids(s).keys()


def test_export_leaves_out_a_take_image_that_no_longer_matches_the_session(session, tmp_path):
    s, home = session
    src = s / "takes" / "stills-001" / "cam01" / "000000.jpg"
    old = src.read_bytes()
    src.write_bytes(old[:14] + bytes([old[14] ^ 0x01, old[15] ^ 0x48]) + old[16:])  # same size, other bytes
    out = tmp_path / "ds"
    r = twinstudio("train", "export", s, "--out", out, home=home)
    _ok(r)
    assert "stills-001/cam01/000000: left out: sha256" in flat(r.stdout)
    doc = json.loads((out / "transforms.json").read_text())
    assert "images/cam01_stills-001_000000.jpg" not in {f["file_path"] for f in doc["frames"]}
    assert not (out / "images" / "cam01_stills-001_000000.jpg").exists()


# ----------------------------------------------------------------------------- item 14: a run folder runs no code


class _Payload:
    """Unpickled with ``weights_only=False``, this creates ``marker`` (stands for any code at all)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _evil_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint as nerfstudio writes one (torch.save), with the payload where the weights belong."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 9, "pipeline": {"means": torch.zeros(2, 3), "x": _Payload(marker)}, "optimizers": {},
                "schedulers": {}, "scalers": {}}, path)


def _evil_config(text: str, marker: Path) -> str:
    """A real config.yml with one value replaced by a tag that would run a shell command."""
    line = next(x for x in text.splitlines() if x.startswith("project_name:"))
    return text.replace(line, f"project_name: !!python/object/apply:os.system ['touch {marker}']")


def test_the_payloads_are_live(tmp_path, trained):
    """What the tests below refuse would run if loaded the old way (yaml.Loader, weights_only=False)."""
    import yaml

    import torch

    a, b = tmp_path / "a", tmp_path / "b"
    _evil_checkpoint(tmp_path / "evil.ckpt", a)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    yaml.load(_evil_config((trained[0] / "train" / "twin" / "config.yml").read_text(), b), Loader=yaml.Loader)
    assert a.exists() and b.exists()


def test_eval_refuses_a_crafted_config_and_runs_none_of_it(session, tmp_path):
    s, home = session
    marker, marker2 = tmp_path / "config-ran", tmp_path / "checkpoint-ran"
    run = s / "train" / "evil"
    shutil.copytree(s / "train" / "twin", run)
    (run / "config.yml").write_text(_evil_config((run / "config.yml").read_text(), marker))
    _evil_checkpoint(run / "nerfstudio_models" / "step-000000009.ckpt", marker2)
    before = _snapshot(s)
    r = twinstudio("train", "eval", s, "--run", "evil", "--device", "cpu", "--plain", home=home)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = flat(r.stderr)
    line = 1 + next(i for i, x in enumerate((run / "config.yml").read_text().splitlines()) if "os.system" in x)
    assert f"evil/config.yml:{line}:15: not read: refused 'os.system'" in err, err
    assert "Traceback" not in r.stderr
    assert not marker.exists() and not marker2.exists()
    assert _snapshot(s) == before


def test_eval_refuses_a_crafted_checkpoint_and_runs_none_of_it(session, tmp_path):
    s, home = session
    marker = tmp_path / "checkpoint-ran"
    run = s / "train" / "evil"
    shutil.copytree(s / "train" / "twin", run)  # its real config.yml: the checkpoint is the fault
    _evil_checkpoint(run / "nerfstudio_models" / "step-000000009.ckpt", marker)
    before = _snapshot(s)
    r = twinstudio("train", "eval", s, "--run", "evil", "--device", "cpu", "--plain", home=home)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = flat(r.stderr)
    assert "step-000000009.ckpt: refused: a checkpoint may hold only tensors and plain values" in err, err
    assert re.search(r"Unsupported global: GLOBAL (io|builtins)\.open was not an allowed global", err), err
    assert not marker.exists()
    assert _snapshot(s) == before


def test_resume_refuses_a_crafted_checkpoint_and_runs_none_of_it(session, tmp_path):
    s, home = session
    marker = tmp_path / "checkpoint-ran"
    ckpt = s / "train" / "twin" / "nerfstudio_models" / "step-000000009.ckpt"
    _evil_checkpoint(ckpt, marker)
    before = _snapshot(s)
    r = twinstudio("train", "run", s, "--iterations", "20", *TRAIN, home=home)  # resumes from the latest
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "step-000000009.ckpt: refused" in flat(r.stderr)
    assert "Traceback" not in r.stderr
    assert not marker.exists()
    assert _snapshot(s) == before  # refused before anything was written (config.yml included)


# ----------------------------------------------------------------------------- item 8: no NaN in any file


def test_eval_of_a_run_whose_metrics_hold_nan_writes_strict_json(session):
    s, home = session
    run = s / "train" / "twin"
    text = (run / "metrics.json").read_text()
    doc = json.loads(text)
    doc["loss_last"] = float("nan")
    doc["train_psnr_last"] = float("inf")
    (run / "metrics.json").write_text(json.dumps(doc))  # Python writes NaN / Infinity unless told not to
    assert "NaN" in (run / "metrics.json").read_text()
    r = twinstudio("train", "eval", s, "--device", "cpu", "--plain", home=home)
    _ok(r)
    m = _strict_json(run / "metrics.json")
    assert m["loss_last"] is None and m["train_psnr_last"] is None
    assert m["undefined"]["loss_last"] == "not finite (nan)"
    assert m["undefined"]["train_psnr_last"] == "not finite (inf)"
    ev = _strict_json(run / "eval" / "eval.json")
    assert ev["summary"]["images"] == 32 and ev["summary"]["psnr"] > 5
    # LPIPS has no weights on this machine: None, and the file says why
    assert ev["summary"]["lpips"] is None and "AlexNet" in ev["summary"]["undefined"]["lpips"]
    assert all(row["lpips"] is None for row in ev["images"])
    assert m["eval"]["lpips"] is None
    assert "lpips: - (not computed" in flat(r.stdout)


def test_a_resumed_run_with_no_step_left_writes_none_with_reasons(session):
    s, home = session
    r = twinstudio("train", "run", s, "--iterations", "10", "--no-evaluate", *TRAIN, home=home)
    _ok(r)
    m = _strict_json(s / "train" / "twin" / "metrics.json")
    assert m["start_step"] == 10 and m["steps_this_run"] == 0 and m["history"] == []
    for key in ("iterations_per_s", "loss_first", "loss_last", "train_psnr_last"):
        assert m[key] is None and m["undefined"][key] == "no step ran in this run", key
    assert "twin trained" in r.stdout
