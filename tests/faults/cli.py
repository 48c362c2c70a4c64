"""Helpers of the fault tests: the real command line in subprocesses, and the processes it leaves."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

SUBJECT = "subj-042"


def run(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``twinstudio ARGS`` to completion; stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "twinstudio", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"}, **kw)


def start(*args: str, **kw) -> subprocess.Popen:
    """``twinstudio ARGS`` in the background, in its own process group."""
    return subprocess.Popen([sys.executable, "-m", "twinstudio", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "COLUMNS": "200"}, **kw)


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
