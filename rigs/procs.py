"""Child processes that never outlive their parent.

A capture machine that crashes (or a CLI killed with SIGKILL) must not leave
camera workers holding cameras, or render workers writing files, for minutes
afterwards. Pipe EOF alone is not enough: forked siblings inherit the
parent's ends of each other's pipes, so a worker's pipe stays open after the
parent is gone. Every worker therefore asks the kernel to kill it when its
parent dies (Linux ``PR_SET_PDEATHSIG``) as the first thing it does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_libc = None


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits; returns whether it is armed.

    ``parent``: the pid the caller expects as parent. If the parent already
    died before this call (the child was re-parented), the process exits at
    once. On systems without ``prctl`` (not Linux) nothing is armed: the
    workers' pipe EOF is then the only signal.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    return True


__all__ = ["die_with_parent"]
