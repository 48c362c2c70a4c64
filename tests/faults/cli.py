"""Helpers of the fault tests: the real command line in subprocesses, and the processes it leaves."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

SUBJECT = "subj-042"


def _env(home: Path | None) -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "250"}
    if home is not None:  # else the test's own (tests/conftest.py gives every test one)
        env["TWINSTUDIO_HOME"] = str(home)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # the process's own defaults, as a user's shell has them
    return env


def run(*args, home: Path | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """``twinstudio ARGS`` to completion (with studio home ``home``); stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "twinstudio", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(home), **kw)


def start(*args, home: Path | None = None, **kw) -> subprocess.Popen:
    """``twinstudio ARGS`` in the background, in its own process group."""
    return subprocess.Popen([sys.executable, "-m", "twinstudio", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env=_env(home), **kw)


def flat(text: str) -> str:
    """``text`` with every run of whitespace (rich's line wrapping included) made one space."""
    return " ".join(text.split())


def file_ids(root: Path) -> dict[tuple[int, int], str]:
    """``{(st_dev, st_ino): relative path}`` of every regular file under ``root`` (symlinks not followed)."""
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink():
            out[(st.st_dev, st.st_ino)] = p.relative_to(root).as_posix()
    return out


def add_consent(session: Path, subject: str = SUBJECT, scopes=("capture", "train", "generate", "share"),
                until: dt.date | None = None, frm: dt.date | None = None) -> subprocess.CompletedProcess:
    until = until or dt.date.today() + dt.timedelta(days=365)
    args = ["consent", "add", "--session", session, "--subject", subject, "--agency", "Nova Models",
            "--purpose", "e-commerce", "--market", "EU", "--valid-until", until.isoformat(),
            "--compensation", "INV-1", "--document-sha256", "a" * 64]
    if frm is not None:
        args += ["--valid-from", frm.isoformat()]
    for sc in scopes:
        args += ["--scope", sc]
    return run(*args)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parents[int(d.name)] = int(fields[1])
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.update(kids)
        todo.extend(kids)
    return out


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    left = set()
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            left.add(p)
    return left
