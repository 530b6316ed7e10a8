"""Where things live in the shared image cache, and the locks that serialise pods on it."""

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared import files
from shared.errors import ConfigError, PodvmError

log = logging.getLogger("vmrunner.cache")


HEX64 = re.compile(r"^[0-9a-f]{64}$")
VOLUME_FILE = ".podvm-volume"
RECORD_MAX = 64 << 10  # a name or a reference is a few hundred bytes; a larger one is forged
_LOCAL_LOCK_OPTIONS = ("nolock", "local_lock=all", "local_lock=flock")
TMP_MIN_AGE = 3600.0  # a download in progress is never this old without a write: it was killed


def utc_now() -> str:
    """RFC 3339 UTC, second precision: the time stamps stored in names and references."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Layout:
    """The paths of one cache; the one place they are spelled out."""

    root: Path

    def base(self, hexdigest: str) -> Path:
        """A base image, named by the sha256 of its bytes."""
        return self.root / "sha256" / hexdigest

    def stored(self, hexdigest: str) -> os.stat_result | None:
        """``lstat`` of the base through the cache's walked folders; None when it is missing (a link or a FIFO there
        is reported as it is, and refused where the base is opened)."""
        return files.stat_below(self.root, self.base(hexdigest))

    def name(self, key: str) -> Path:
        """What a configured image name points to."""
        return self.root / "names" / key

    def refs(self, hexdigest: str) -> Path:
        """One file per pet made on the base."""
        return self.root / "refs" / hexdigest

    def lock(self, hexdigest: str) -> Path:
        """Held to add or remove the base or one of its references."""
        return self.root / "locks" / f"{hexdigest}.lock"

    def name_lock(self, key: str) -> Path:
        """Held while fetching for a name: one download, the other pods wait."""
        return self.root / "locks" / f"name.{key}.lock"

    @property
    def tmp(self) -> Path:
        """Downloads in progress."""
        return self.root / "tmp"

    def digest_of(self, backing: str) -> str | None:
        """The digest when ``backing`` is a base of this cache, else None."""
        path = Path(backing)
        if path.parent == self.root / "sha256" and HEX64.match(path.name):
            return path.name
        return None

    def make(self) -> None:
        """Create the cache's folders (idempotent).

        :raise ConfigError: when IMAGE_DIR is not writable.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for sub in ("sha256", "names", "refs", "locks", "tmp"):
                os.close(files.open_below(self.root, self.root / sub, create=True))
        except OSError as err:
            raise ConfigError(f"IMAGE_DIR={self.root}: cannot create the cache's folders: {err.strerror}") from None


@dataclass(frozen=True)
class Mount:
    """The mount that holds a path: its file system type and its options (the mount's and the super block's)."""

    point: str
    fstype: str
    options: tuple[str, ...]


def mount_of(mountinfo: str, path: Path) -> Mount | None:
    """The mount holding ``path`` (resolved) in ``/proc/self/mountinfo``'s text: the longest mount point above it,
    the last mounted of equal ones (it hides the others); None when no line parses."""
    best: Mount | None = None
    target = str(path)
    for line in mountinfo.splitlines():
        head, _, tail = line.partition(" - ")
        fields, tail_fields = head.split(), tail.split()
        if len(fields) < 6 or len(tail_fields) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.point)):
            best = Mount(point, tail_fields[0], (*fields[5].split(","), *tail_fields[2].split(",")))
    return best


def read_mountinfo() -> str:
    """This process's mount table, or "" where it cannot be read (every lookup then finds no mount)."""
    try:
        return Path("/proc/self/mountinfo").read_text()
    except OSError:
        return ""


def lock_problem(mountinfo: str, path: Path) -> str | None:
    """Why flock on ``path`` would not exclude other nodes, from ``/proc/self/mountinfo``'s text; None if it would.

    Pure so each mount kind has a unit test. An NFS mount with ``nolock`` (``local_lock=all``) or
    ``local_lock=flock`` takes flock locks on this node only: two nodes would both "hold" the lock.
    """
    mount = mount_of(mountinfo, path)
    if mount is None or not mount.fstype.startswith("nfs"):
        return None
    local = [o for o in _LOCAL_LOCK_OPTIONS if o in mount.options]
    if local:
        return f"it is an NFS mount with {local[0]}, so locks hold on this node only"
    return None


def check_locks(root: Path) -> None:
    """Refuse a cache whose locks would not exclude other nodes.

    :raise ConfigError: naming IMAGE_DIR and the mount option at fault.
    """
    problem = lock_problem(read_mountinfo(), root.resolve())
    if problem:
        raise ConfigError(
            f"IMAGE_DIR={root}: {problem}; the shared cache needs working locks (NFSv4, or NFSv3 with lockd)"
        )


@contextlib.contextmanager
def locked(path: Path, waiting: str = "", *, blocking: bool = True) -> Iterator[bool]:
    """Hold the cache lock ``path`` (:func:`shared.files.locked`, below IMAGE_DIR); yields False when ``blocking`` is
    false and it is busy.

    :raise ConfigError: when the volume does not support locks (ENOLCK).
    """
    root = path.parent.parent
    try:
        with files.locked(path, root, blocking=blocking, waiting=waiting) as held:
            yield held
    except files.Forged as err:
        raise PodvmError(f"IMAGE_DIR: {err}; refused") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PodvmError(f"IMAGE_DIR: {path} is a symbolic link; refused") from None
        if err.errno == errno.ENOLCK:
            raise ConfigError(
                f"IMAGE_DIR: {path}: the volume does not support file locks (ENOLCK); the shared cache "
                "needs working locks (NFSv4, or NFSv3 with lockd)"
            ) from None
        if err.errno == errno.ENOTDIR:
            raise PodvmError(f"IMAGE_DIR: {path}: a symbolic link or no folder on the way; refused") from None
        raise
