"""Atomic file writes: readers see the old file or the new one, never half of one.

The directory may be shared with a less trusted writer (``RUN_DIR`` is writable by the runner, and so by a guest
that escaped qemu), so the write never follows a path that writer could swap: the directory is opened once without
following a symbolic link, the temporary file is created inside it with ``O_EXCL | O_NOFOLLOW``, its mode is set
through its descriptor, and the rename is relative to the directory's descriptor.
"""

import contextlib
import os
import secrets
import stat
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_directory(path: Path) -> int:
    """A descriptor of the directory ``path`` itself; OSError (ENOTDIR) if it is a symbolic link.

    Only the last component is checked: the ones above it belong to whoever set up the mount.
    """
    return os.open(path, _DIR_FLAGS)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a new temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    :raise OSError: when the directory is a symbolic link (ENOTDIR) or cannot be written.
    """
    dir_fd = open_directory(path.parent)
    try:
        tmp = f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fchmod(out.fileno(), mode)
                os.fsync(out.fileno())
            os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as err:
            # unlink never follows a symbolic link: at worst it removes what another writer put under our name.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(err, OSError) and err.filename is None:
                err.filename = str(path)  # a failed write() names no file: the log line must say which one
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_small(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, read without following a symbolic link and without
    blocking on a FIFO: for files in a directory a less trusted writer shares.

    :raise OSError: when it cannot be opened (ELOOP for a symbolic link).
    :raise ValueError: when it is not a regular file or is larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes")
    return data
