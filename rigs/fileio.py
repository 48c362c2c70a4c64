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


#: ``ioctl`` request of Linux's FICLONE: a copy-on-write clone of a whole file (btrfs, XFS, bcachefs)
_FICLONE = 0x40049409


def copy_file(src: Path | str, dst: Path | str) -> str:
    """Put a private copy of ``src`` at ``dst``; returns how: ``"kept"``, ``"clone"`` or ``"copy"``.

    Never a hard link: what is exported or delivered shares no inode with the
    studio's files, so changing one can never change the other. Where the file
    system offers copy-on-write clones the copy is a clone (instant, no extra
    space until either side changes), else the bytes are copied. The parent
    folder is created. An existing ``dst`` is kept only when it is a separate
    file with the same content (sha256), so a re-export after the source
    changed never keeps a stale file. Written to a temp name and renamed.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        a, b = src.stat(), dst.stat()
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) and a.st_size == b.st_size \
                and sha256_file(src) == sha256_file(dst):
            return "kept"
    tmp = dst.with_name(dst.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    how = "clone"
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        try:
            import fcntl

            fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
        except (OSError, ImportError):
            how = "copy"
    if how == "copy":
        shutil.copyfile(src, tmp)  # sendfile(2) on Linux: in the kernel, no Python buffers
    shutil.copystat(src, tmp)
    os.replace(tmp, dst)
    return how


def sha256_file(path: Path | str) -> str:
    """sha256 (hex) of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
