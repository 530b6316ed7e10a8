"""Atomic file writes: readers see the old file or the new one, never half of one.

The directory may be shared with a less trusted writer (``RUN_DIR`` is writable by the runner, and so by a guest
that escaped qemu), so the write never follows a path that writer could swap: the directory is opened once without
following a symbolic link, the temporary file is created inside it with ``O_EXCL | O_NOFOLLOW``, its mode is set
through its descriptor, and the rename is relative to the directory's descriptor.
"""

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("podvm.files")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_directory(path: Path) -> int:
    """A descriptor of the directory ``path`` itself; OSError (ENOTDIR) if it is a symbolic link.

    Only the last component is checked: the ones above it belong to whoever set up the mount.
    """
    return os.open(path, _DIR_FLAGS)


_WALK_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Forged(ValueError):
    """A path of a shared volume that is a link, a FIFO, a device, a folder or too large where a record should be:
    it is treated as missing (another pod on the volume may have planted it)."""


def _components(root: Path, path: Path) -> tuple[str, ...]:
    parts = path.relative_to(root).parts
    if any(part in ("", ".", "..") for part in parts):
        raise Forged(f"{path}: not a plain path under {root}")
    return parts


def open_below(root: Path, path: Path, *, create: bool = False) -> int:
    """A descriptor of the directory ``path`` under the volume ``root``: the root is opened once, then each component
    below it with ``openat(O_DIRECTORY | O_NOFOLLOW)`` (made 0755 when ``create``), so no link planted on the volume is
    followed.

    :raise OSError: ENOTDIR or ELOOP for a component that is a link or no folder, ENOENT when missing.
    """
    fd = os.open(root, _WALK_FLAGS)
    here = root
    try:
        for part in _components(root, path):
            here = here / part
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, _WALK_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException as err:
        os.close(fd)
        if isinstance(err, OSError):
            err.filename = str(here)  # the component at fault, named in full
        raise
    return fd


def _parent(path: Path, root: Path | None, *, create: bool = False) -> int:
    return open_directory(path.parent) if root is None else open_below(root, path.parent, create=create)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, root: Path | None = None) -> None:
    """Write ``data`` to a new temporary file beside ``path``, flush it to disk, then rename it over ``path``; with
    ``root`` (a shared volume) no component below it is followed if it is a link.

    :raise OSError: when the directory is a symbolic link (ENOTDIR) or cannot be written.
    """
    dir_fd = _parent(path, root)
    try:
        tmp = f".{path.name}.{os.urandom(8).hex()}.tmp"
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


def fsync_directory(path: Path, root: Path | None = None) -> None:
    """Make a rename or a creation in the folder ``path`` durable: the one directory fsync of podvm."""
    fd = open_directory(path) if root is None else open_below(root, path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_small(path: Path, limit: int, *, root: Path | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, read without following a symbolic link (any component
    below ``root`` when given) and without blocking on a FIFO: for files in a directory a less trusted writer shares.

    :raise OSError: when it cannot be opened (ELOOP for a symbolic link).
    :raise ValueError: (:class:`Forged`) when it is not a regular file or is larger than ``limit``.
    """
    dir_fd = _parent(path, root)
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Forged(f"{path}: not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise Forged(f"{path}: larger than {limit} bytes")
    return data


def open_file(path: Path, root: Path, *, writable: bool = False) -> int:
    """A read-only (``writable``: read-write) descriptor of the regular file ``path``, with no link followed at any
    component below ``root`` and no wait on a FIFO: for a large file on a shared volume (a base image, a data disk)
    that is hashed, checked or grown, not read whole into memory.

    :raise OSError: when it cannot be opened (ELOOP or ENOTDIR for a link, ENOENT when it is missing).
    :raise ValueError: (:class:`Forged`) when it is not a regular file.
    """
    dir_fd = _parent(path, root)
    try:
        access = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path.name, access | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Forged(f"{path}: not a regular file")
    return fd


def read_record(path: Path, limit: int, root: Path) -> bytes | None:
    """A small record on a shared volume, or None when it is missing or forged (a link anywhere below ``root``, a
    FIFO, a device, a folder, more than ``limit`` bytes): a forged one is one warning naming it, never a hang."""
    try:
        return read_small(path, limit, root=root)
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("%s: missing or forged (%s); treated as missing", path, err.strerror)
    except Forged as err:
        log.warning("%s; treated as missing or forged", err)
    return None


def list_below(root: Path, path: Path) -> list[str]:
    """The names in the folder ``path`` of a shared volume (none when it is missing, a link or no folder)."""
    try:
        fd = open_below(root, path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        log.warning("%s: missing or forged (%s); treated as empty", path, err.strerror)
        return []
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def remove_below(root: Path, path: Path) -> None:
    """Remove ``path`` on a shared volume, a folder with all it holds (a link is removed, never followed, at any
    depth: the tree is walked by descriptors); nothing when it is missing."""
    try:
        dir_fd = open_below(root, path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        info = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path.name, dir_fd=dir_fd)
        else:
            os.unlink(path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


def rename_below(root: Path, path: Path, name: str) -> None:
    """Rename ``path`` on a shared volume to ``name`` in the same folder, through the folder's descriptor, and make
    it durable.

    :raise FileNotFoundError: when ``path`` is missing.
    """
    dir_fd = open_below(root, path.parent)
    try:
        os.rename(path.name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def stat_below(root: Path, path: Path) -> os.stat_result | None:
    """``lstat`` of ``path`` on a shared volume through its folder's descriptor; None when missing."""
    try:
        dir_fd = open_below(root, path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path: Path, root: Path, *, blocking: bool = True, waiting: str = "") -> Iterator[bool]:
    """Hold ``flock`` on the lock file ``path`` of a shared volume; yields False (holding nothing) when ``blocking``
    is false and it is busy. The one lock of podvm.

    The file is opened without following a link below ``root`` and without blocking, and must be a regular file. The
    holder may remove the lock file (gc does, with
    its base), so after ``flock`` the path must still name the file locked; if not, start over on the new file.

    :raise OSError: ENOLCK when the volume has no locks, ELOOP for a link; another error naming ``path``.
    :raise Forged: when a FIFO, a device or a folder stands in its place.
    """
    for _ in range(100):
        dir_fd = open_below(root, path.parent, create=True)
        try:
            fd = os.open(path.name, _LOCK_FLAGS, 0o644, dir_fd=dir_fd)
        except OSError as err:
            os.close(dir_fd)
            err.filename = str(path)
            if err.errno in (errno.EISDIR, errno.ENXIO):
                raise Forged(f"{path}: not a regular file") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Forged(f"{path}: not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if waiting:
                    log.info("%s", waiting)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)
            os.close(dir_fd)
    raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(path))
