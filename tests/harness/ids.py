"""Test bed ids: namespaces are named ``pv<id>-node`` and addresses are ``10.<id>.x.x``, so two beds alive at once
must never share an id, neither in one process nor in two pytest processes run side by side.

Each id is a byte of one lock file, locked (``fcntl.lockf``) by the process that holds it: the kernel drops the
lock when that process ends, so a crashed run frees its ids. Within a process the held ids are remembered (record
locks do not conflict with the owner's own).
"""

import fcntl
import os
from pathlib import Path

LOCK_FILE = Path("/tmp/podvm-bed-ids.lock")
FIRST, LAST = 1, 250  # 10.<id>.x.x stays a valid address

_held: set[int] = set()
_fd: list[int] = []


def _lock_fd() -> int:
    if not _fd:
        _fd.append(os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666))
    return _fd[0]


def claim(ident: int) -> bool:
    """Hold ``ident`` for this process; False when this or another process holds it."""
    if ident in _held:
        return False
    try:
        fcntl.lockf(_lock_fd(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, ident)
    except OSError:
        return False
    _held.add(ident)
    return True


def held(ident: int) -> bool:
    """True while this process holds ``ident``."""
    return ident in _held


def release(ident: int) -> None:
    """Give ``ident`` back (nothing happens when it is not held)."""
    if ident in _held:
        fcntl.lockf(_lock_fd(), fcntl.LOCK_UN, 1, ident)
        _held.discard(ident)


def fresh_id() -> int:
    """An id no live bed uses, held until ``release``; the search starts at a pid-based place so concurrent
    processes rarely probe the same ids."""
    span = LAST - FIRST + 1
    start = os.getpid() * 7 % span
    for step in range(span):
        ident = FIRST + (start + step) % span
        if claim(ident):
            return ident
    raise RuntimeError(f"{LOCK_FILE}: all {span} test bed ids are in use")
