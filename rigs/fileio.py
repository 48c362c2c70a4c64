"""Atomic, hashed file writes shared by every stage.

A file is written to a temporary name in the same folder, optionally
fsynced, then renamed over the final name: readers see the old file or the
whole new one, never half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

#: suffix of files being written; anything ending so after a crash is garbage
TMP_SUFFIX = ".partial"
_CHUNK = 1 << 20


def atomic_write_bytes(path: Path | str, data: bytes, *, fsync: bool = True) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256 (hex)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def atomic_write_json(path: Path | str, obj: Any, *, fsync: bool = True) -> str:
    """Write ``obj`` as indented JSON atomically; returns its sha256."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def fsync_dir(path: Path | str) -> None:
    """fsync a directory so that a rename in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """Put ``src`` at ``dst`` as a hard link (a copy across file systems); the source is never rewritten.

    The parent folder is created; a ``dst`` of the same size is taken to be
    the same file already placed there (re-runs), any other is replaced.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if dst.stat().st_size == src.stat().st_size:
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sha256_file(path: Path | str) -> str:
    """sha256 (hex) of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
