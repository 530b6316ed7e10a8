"""Where the sidecar writes, checked so that nothing it (root) or dnsmasq writes follows a path another user controls.

``RUN_DIR`` is shared with the runner (uid 10001, and so with a guest that escaped qemu): the sidecar only publishes
the handshake there (``shared.files.write_atomic``, which follows no path the runner could swap) and unlinks it,
which never follows a symbolic link. Everything else (dnsmasq's pid and lease files) lives in ``NET_STATE_DIR``, a
directory only the sidecar can write: owned by it, not writable by anyone else, and reached only through
directories no one else can change.
"""

import logging
import os
import stat
from pathlib import Path

from shared.errors import ConfigError
from shared.files import open_directory

log = logging.getLogger("netsidecar")


def _writable_by_others(st: os.stat_result) -> bool:
    """Group- or world-writable, except by the root group (which only root-like users hold)."""
    return bool(st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0))


def _check_ancestors(name: str, path: Path) -> None:
    """Every directory above ``path`` (as written and as resolved) can be changed only by root or by us.

    A sticky world-writable directory such as /tmp is fine: others cannot rename or delete what we own in it.
    """
    resolved = Path(os.path.realpath(path.parent))
    for above in sorted({*path.parents, resolved, *resolved.parents}):
        try:
            st = os.lstat(above)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue  # whoever could replace the link must write its parent, which is checked too
        if st.st_uid not in (0, os.geteuid()) or (_writable_by_others(st) and not st.st_mode & stat.S_ISVTX):
            raise ConfigError(
                f"{name}={path}: {above} above it can be changed by others (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}); choose a directory only root can reach"
            )


def _open_private(name: str, path: Path) -> int:
    """A descriptor of ``path``, refused when it is a symbolic link or not a directory."""
    try:
        return open_directory(path)
    except OSError as err:
        if os.path.islink(path):
            raise ConfigError(f"{name}={path}: is a symbolic link; it must be a directory of its own") from err
        raise ConfigError(f"{name}={path}: cannot open it: {err.strerror}") from err


def _check_private(name: str, path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{name}={path}: owned by uid {st.st_uid}, not by the sidecar (uid {os.geteuid()})")
    if _writable_by_others(st):
        raise ConfigError(
            f"{name}={path}: writable by others (mode {stat.S_IMODE(st.st_mode):04o}); it must be a directory "
            "only the sidecar can write (mode 0700, made by `netsidecar prepare`)"
        )


def state_dir(path: Path, create: bool) -> bool:
    """Check NET_STATE_DIR (creating it with mode 0700 when ``create``); whether it exists.

    :raise ConfigError: when it is a symbolic link, not ours, writable by others, or below a directory others can
        change.
    """
    name = "NET_STATE_DIR"
    _check_ancestors(name, path)
    if create and not os.path.lexists(path):
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile: checked below like any other
        except OSError as err:
            raise ConfigError(f"{name}={path}: cannot create it: {err.strerror}") from err
    elif not os.path.lexists(path):
        return False
    fd = _open_private(name, path)
    try:
        _check_private(name, path, os.fstat(fd))
    finally:
        os.close(fd)
    return True


def claim_state_dir(path: Path) -> None:
    """Make NET_STATE_DIR private for `netsidecar prepare`: create it, or tighten a fresh (empty) volume to 0700.

    A Kubernetes emptyDir is created world-writable; the one-shot init step that runs before anything else in the
    pod turns it into the sidecar's own. A directory that already holds files is never tightened, only refused.
    """
    name = "NET_STATE_DIR"
    if not os.path.lexists(path):
        state_dir(path, create=True)
        return
    _check_ancestors(name, path)
    fd = _open_private(name, path)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and _writable_by_others(st) and not os.listdir(fd):
            os.fchmod(fd, 0o700)
            if os.listdir(fd):
                raise ConfigError(f"{name}={path}: files appeared in it while it was made private; not using it")
            log.info("%s=%s: made private (mode %04o -> 0700)", name, path, stat.S_IMODE(st.st_mode))
            st = os.fstat(fd)
        _check_private(name, path, st)
    finally:
        os.close(fd)


def check_run_dir(path: Path) -> None:
    """RUN_DIR, created if missing; refused when it is a symbolic link (the handshake must land in the volume)."""
    name = "RUN_DIR"
    if not os.path.lexists(path):
        try:
            path.mkdir(mode=0o755, parents=True)
        except FileExistsError:
            pass
        except OSError as err:
            raise ConfigError(f"{name}={path}: cannot create it: {err.strerror}") from err
    os.close(_open_private(name, path))
