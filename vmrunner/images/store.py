"""Bringing a base into the cache: fetched once, hashed while streaming, vetted, then stored under its digest."""

import hashlib
import io
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ImageRejected, PodvmError
from shared.files import write_atomic
from vmrunner.config import Config, redact
from vmrunner.images.download import fetch_into, human
from vmrunner.images.vet import Verdict, vet

if TYPE_CHECKING:
    from typing_extensions import Buffer

from vmrunner.images.layout import Layout, check_locks, locked, utc_now
from vmrunner.images.names import NameRecord, resolve

log = logging.getLogger("vmrunner.cache")


@dataclass(frozen=True)
class Cached:
    """The configured image in the cache: its digest, and its verdict when this runner just fetched and vetted it."""

    hex: str
    fresh: Verdict | None


def ensure_image(cfg: Config) -> Cached:
    """Make the configured image available as ``sha256/<hex>`` and its name point to it.

    A name that still means a present base (matching IMG_CHECKSUM) is used without any network access; otherwise
    one runner fetches while the others wait on the name's lock.

    :raise ImageRejected: when the image fails its checksum or vetting (nothing is left in the cache).
    :raise PodvmError: when it cannot be fetched or stored.
    """
    layout = Layout(cfg.image_dir)
    layout.make()
    check_locks(layout.root)
    found = resolve(cfg, layout)
    if found is not None:
        return Cached(found, None)
    waiting = f"another runner is fetching {cfg.img_target}; waiting for it"
    with locked(layout.name_lock(cfg.img_name), waiting):
        found = resolve(cfg, layout) or _known_digest(cfg, layout)
        if found is not None:
            return Cached(found, None)
        return _fetch(cfg, layout)


def _known_digest(cfg: Config, layout: Layout) -> str | None:
    """With ``IMG_CHECKSUM=sha256:<hex>`` and that base already cached (under another name), no download is needed:
    the base is hashed to be sure and the name is pointed at it."""
    if cfg.img_checksum is None or cfg.img_checksum.algorithm != "sha256":
        return None
    hexdigest = cfg.img_checksum.hexdigest
    base = layout.base(hexdigest)
    if not base.exists() or hash_file(base) != hexdigest:
        return None
    record = NameRecord(f"sha256:{hexdigest}", redact(cfg.img_source), utc_now())
    write_atomic(layout.name(cfg.img_name), json.dumps(asdict(record)).encode(), mode=0o644)
    log.info("%s is sha256:%s, already cached: not fetched", cfg.img_name, hexdigest)
    return hexdigest


class _Writeback(io.FileIO):
    """A download file that asks the kernel to start writing it to disk every few dozen MiB.

    The base must be on disk before its rename (a base half-written after a node crash would corrupt every pet on
    it). Left alone, the kernel writes a whole image only at that final fsync; started early, the writing overlaps
    the download and the fsync finds little left to do. ``POSIX_FADV_DONTNEED`` starts writeback without waiting
    and keeps the page cache free of a file nobody reads soon.
    """

    EVERY = 32 << 20

    def __init__(self, path: Path) -> None:
        super().__init__(path, "wb")
        self.unflushed = 0

    def write(self, data: "Buffer", /) -> int:
        """Write, and start writeback once enough has accumulated."""
        written = super().write(data) or 0
        self.unflushed += written
        if self.unflushed >= self.EVERY:
            self.unflushed = 0
            os.posix_fadvise(self.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return written


def _fetch(cfg: Config, layout: Layout) -> Cached:
    part = layout.tmp / f"{cfg.img_name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    name = redact(cfg.img_source)
    log.info("fetching %s (name %s)", name, cfg.img_name)
    started = time.monotonic()
    try:
        try:
            with _Writeback(part) as out:
                digests = fetch_into(cfg, out)
                out.flush()
                os.fsync(out.fileno())
        except OSError as err:
            raise PodvmError(f"IMAGE_DIR={cfg.image_dir}: cannot store {name}: {err.strerror}") from None
        if cfg.img_checksum and digests[cfg.img_checksum.algorithm] != cfg.img_checksum.hexdigest:
            raise ImageRejected(
                f"IMG_CHECKSUM: {name} has {cfg.img_checksum.algorithm}:{digests[cfg.img_checksum.algorithm]}, "
                f"expected {cfg.img_checksum}; nothing was cached"
            )
        verdict = vet(part, cfg.img_format, cfg.img_max_size, name)
        hexdigest = digests["sha256"]
        os.chmod(part, 0o444)
        _store(layout, part, hexdigest)
    finally:
        part.unlink(missing_ok=True)
    others = {k: v for k, v in digests.items() if k != "sha256"}
    record = NameRecord(f"sha256:{hexdigest}", name, utc_now(), others)
    write_atomic(layout.name(cfg.img_name), json.dumps(asdict(record)).encode(), mode=0o644)
    size = layout.base(hexdigest).stat().st_size
    elapsed = time.monotonic() - started
    log.info(
        "cached %s as sha256:%s (%s in %.1fs, %s/s, %s virtual)",
        cfg.img_name,
        hexdigest,
        human(size),
        elapsed,
        human(int(size / max(elapsed, 1e-6))),
        human(verdict.virtual_size),
    )
    return Cached(hexdigest, verdict)


def hash_file(path: Path) -> str | None:
    """The sha256 of a whole file; None when it is not a regular file (a FIFO or a device planted in the shared cache
    would hang or never end the read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    with open(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return hashlib.file_digest(src, "sha256").hexdigest()


def _store(layout: Layout, part: Path, hexdigest: str) -> None:
    """Rename a complete, vetted download to ``sha256/<hex>``; an existing base is kept unless its bytes changed."""
    target = layout.base(hexdigest)
    with locked(layout.lock(hexdigest)):
        if target.exists():
            if hash_file(target) == hexdigest:
                return
            log.warning("%s no longer holds the bytes of its name; replacing it with the verified download", target)
        os.replace(part, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
