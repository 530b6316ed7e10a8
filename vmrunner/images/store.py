"""Bringing a base into the cache: fetched once, hashed while streaming, vetted, then stored under its digest."""

import contextlib
import errno
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

from shared import files
from shared.errors import BaseMismatch, ImageRejected, PodvmError
from shared.files import open_below, write_atomic
from vmrunner.config import Config, redact
from vmrunner.images import ova
from vmrunner.images.download import fetch_into, human
from vmrunner.images.vet import ADDRESS_SPACE, NO_LIMIT, Verdict, vet
from vmrunner.qemu import img

if TYPE_CHECKING:
    from typing_extensions import Buffer

from vmrunner.images.layout import Layout, check_locks, locked, utc_now
from vmrunner.images.names import NameRecord, conversion_key, read_name, resolve

log = logging.getLogger("vmrunner.cache")
# CPU seconds and address space of a conversion: a large disk takes long, and qemu-img convert's I/O threads each
# reserve a stack and a malloc arena (1 GiB, vetting's limit, made thread creation fail at random)
CONVERT_LIMITS = (int(img.COPY), 16 * ADDRESS_SPACE)


@dataclass(frozen=True)
class Cached:
    """The configured image in the cache: its digest, and its verdict when this runner just fetched and vetted it."""

    hex: str
    fresh: Verdict | None
    identity: os.stat_result | None = None  # with ``fresh``: the fstat of the very file hashed, vetted and stored


def ensure_image(cfg: Config, *, anew: bool = False) -> Cached:
    """Make the configured image available as ``sha256/<hex>`` and its name point to it.

    A name that still means a present base (matching IMG_CHECKSUM) is used without any network access; otherwise
    one runner fetches while the others wait on the name's lock. ``anew`` asks the source whatever the names say
    (a pet whose own base is missing must know what the source gives now, not what it gave before).

    :raise ImageRejected: when the image fails its checksum or vetting (nothing is left in the cache).
    :raise PodvmError: when it cannot be fetched or stored.
    """
    layout = Layout(cfg.image_dir)
    layout.make()
    check_locks(layout.root)
    found = None if anew else resolve(cfg, layout)
    if found is not None:
        return Cached(found, None)
    waiting = f"another runner is fetching {cfg.img_target}; waiting for it"
    with locked(layout.name_lock(cfg.img_name), waiting):
        found = None if anew else resolve(cfg, layout) or _known_digest(cfg, layout)
        if found is not None:
            return Cached(found, None)
        return _fetch(cfg, layout)


def _known_digest(cfg: Config, layout: Layout) -> str | None:
    """With ``IMG_CHECKSUM=sha256:<hex>`` and that base already cached (under another name), no download is needed:
    the base is hashed to be sure and the name is pointed at it."""
    if cfg.img_checksum is None or cfg.img_checksum.algorithm != "sha256":
        return None
    hexdigest, converted = cfg.img_checksum.hexdigest, {}
    if cfg.conversion is not None:  # the checksum is the source's: the base is what converting it gave
        earlier = read_name(layout, conversion_key(cfg.conversion, hexdigest))
        if earlier is None or not _same_source(earlier, cfg.conversion, hexdigest):
            return None
        hexdigest, converted = earlier.hex, earlier.converted
    base = layout.base(hexdigest)
    if layout.stored(hexdigest) is None or hash_file(base, cfg.image_dir) != hexdigest:
        return None
    _point(cfg, layout, NameRecord(f"sha256:{hexdigest}", redact(cfg.img_source), utc_now(), {}, converted))
    log.info("%s is sha256:%s, already cached: not fetched", cfg.img_name, hexdigest)
    return hexdigest


class Writeback(io.FileIO):
    """A download file that asks the kernel to start writing it to disk every few dozen MiB.

    The base must be on disk before its rename (a base half-written after a node crash would corrupt every pet on
    it). Left alone, the kernel writes a whole image only at that final fsync; started early, the writing overlaps
    the download and the fsync finds little left to do. ``POSIX_FADV_DONTNEED`` starts writeback without waiting
    and keeps the page cache free of a file nobody reads soon.
    """

    EVERY = 32 << 20

    def __init__(self, fd: int) -> None:
        super().__init__(fd, "wb", closefd=False)
        self.unflushed = 0

    def write(self, data: "Buffer", /) -> int:
        """Write all of ``data`` (a raw file's write may take only part of it, silently when the disk fills up with
        the last chunk: the rest is written again, and raises ENOSPC), and start writeback once enough has
        accumulated."""
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += super().write(view[written:]) or 0
        self.unflushed += written
        if self.unflushed >= self.EVERY:
            self.unflushed = 0
            os.posix_fadvise(self.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return written


class _Private:
    """The download's own file in ``tmp/``: unnamed (``O_TMPFILE``) where the volume allows, else a fresh name made
    with ``O_EXCL``; either way held open from creation to rename, so its digest is bound to its inode, not to a path
    another pod could swap."""

    def __init__(self, layout: Layout, key: str) -> None:
        self.layout = layout
        self.dir_fd = open_below(layout.root, layout.tmp)
        self.name = f"{key}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
            self.named = False
        except OSError:  # a volume without O_TMPFILE (NFS, some FUSE)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.name, flags, 0o600, dir_fd=self.dir_fd)
            self.named = True

    @property
    def path(self) -> Path:
        """The file itself, for qemu-img: a magic link to the open inode, whatever its name now points to."""
        return Path(f"/proc/{os.getpid()}/fd/{self.fd}")

    def close(self) -> None:
        """Forget the file (its name, if it still has one here, goes too)."""
        if self.named:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self.dir_fd)
        os.close(self.fd)
        os.close(self.dir_fd)


def _private(cfg: Config, layout: Layout, name: str) -> "_Private":
    try:
        return _Private(layout, cfg.img_name)
    except OSError as err:
        raise PodvmError(f"IMAGE_DIR={cfg.image_dir}: cannot store {name}: {err.strerror}: {err.filename}") from None


def _fetch(cfg: Config, layout: Layout) -> Cached:
    name = redact(cfg.img_source)
    log.info("fetching %s (name %s)", name, cfg.img_name)
    started = time.monotonic()
    part = _private(cfg, layout, name)
    try:
        try:
            with Writeback(part.fd) as out:
                digests = fetch_into(cfg, out)
                out.flush()
                os.fsync(out.fileno())
        except OSError as err:
            raise PodvmError(f"IMAGE_DIR={cfg.image_dir}: cannot store {name}: {err.strerror}") from None
        if cfg.img_checksum and digests[cfg.img_checksum.algorithm] != cfg.img_checksum.hexdigest:
            raise ImageRejected(
                f"{cfg.checksum_setting}: {name} has "
                f"{cfg.img_checksum.algorithm}:{digests[cfg.img_checksum.algorithm]}, "
                f"expected {cfg.img_checksum}; nothing was cached"
            )
        if cfg.conversion is not None:
            return _import(cfg, layout, part, digests, started)
        verdict = vet(part.path, cfg.img_format, cfg.img_max_size, name)
        hexdigest = digests["sha256"]
        os.fchmod(part.fd, 0o444)
        identity = _store(layout, part, hexdigest)
    finally:
        part.close()
    others = {k: v for k, v in digests.items() if k != "sha256"}
    _point(cfg, layout, NameRecord(f"sha256:{hexdigest}", name, utc_now(), others))
    _cached(cfg, layout, hexdigest, verdict, started)
    return Cached(hexdigest, verdict, identity)


def _point(cfg: Config, layout: Layout, record: NameRecord, key: str | None = None) -> None:
    """Point a name (the configured one unless ``key``) at a base."""
    write_atomic(layout.name(key or cfg.img_name), json.dumps(asdict(record)).encode(), mode=0o644)


def _cached(cfg: Config, layout: Layout, hexdigest: str, verdict: Verdict, started: float) -> None:
    size = getattr(layout.stored(hexdigest), "st_size", 0)
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


def _import(cfg: Config, layout: Layout, source: _Private, digests: dict[str, str], started: float) -> Cached:
    """A foreign source, fetched and checked against IMG_CHECKSUM: converted once into a qcow2 base, unless these
    very bytes were converted before (the conversion's own name then points to the base)."""
    assert cfg.conversion is not None
    name = redact(cfg.img_source)
    converted = {"from": cfg.conversion, **digests}
    key = conversion_key(cfg.conversion, digests["sha256"])
    earlier = read_name(layout, key)
    if (
        earlier is not None
        and _same_source(earlier, cfg.conversion, digests["sha256"])
        and layout.stored(earlier.hex) is not None
    ):
        log.info("%s (sha256:%s) was converted before: sha256:%s; not converted again", name, digests["sha256"],
                 earlier.hex)  # fmt: skip
        _point(cfg, layout, NameRecord(earlier.digest, name, utc_now(), {}, {**earlier.converted, **converted}))
        return Cached(earlier.hex, None)
    fmt = "vmdk" if cfg.img_format == "ova" else cfg.img_format
    disk = _private(cfg, layout, name) if cfg.img_format == "ova" else source
    base = _private(cfg, layout, name)
    try:
        if disk is not source:
            with open(source.fd, "rb", closefd=False) as archive, Writeback(disk.fd) as out:
                archive.seek(0)
                chosen = ova.extract_disk(archive, out, cfg.img_ova_disk, cfg.img_max_size, name)
            log.info("%s: system disk %s (%s) taken from the OVA", name, chosen.disk_id, chosen.href)
        vet(disk.path, fmt, cfg.img_max_size, name)
        convert(disk.path, fmt, base.path, name)
        os.fsync(base.fd)
        with open(base.fd, "rb", closefd=False) as out:
            hexdigest = hashlib.file_digest(out, "sha256").hexdigest()
        verdict = vet(base.path, "qcow2", cfg.img_max_size, name)
        os.fchmod(base.fd, 0o444)
        identity = _store(layout, base, hexdigest)
    finally:
        base.close()
        if disk is not source:
            disk.close()
    record = NameRecord(f"sha256:{hexdigest}", name, utc_now(), {}, converted)
    _point(cfg, layout, record, key)
    _point(cfg, layout, record)
    _cached(cfg, layout, hexdigest, verdict, started)
    return Cached(hexdigest, verdict, identity)


def _same_source(record: NameRecord, conversion: str, source_hex: str) -> bool:
    """True when ``record`` says it is the conversion ``conversion`` of the source bytes ``source_hex``."""
    return record.converted.get("from") == conversion and record.converted.get("sha256") == source_hex


def convert(src: Path, fmt: str, out: Path, name: str) -> None:
    """``qemu-img convert -f FMT -O qcow2`` of a vetted source, under vetting's limits (more CPU time: a large disk
    takes long) and a timeout, with a progress line every few seconds.

    :raise ImageRejected: when qemu-img fails or runs past its time.
    """
    started = time.monotonic()
    progress = img.percent_lines(lambda percent: log.info("converting %s from %s: %s%%", name, fmt, percent))
    job = img.Job(name, f"converting from {fmt}", timeout=img.COPY, error=ImageRejected, limits=CONVERT_LIMITS)
    log.info("converting %s from %s to a qcow2 base", name, fmt)
    img.run(["qemu-img", "convert", "-p", "-f", fmt, "-O", "qcow2", str(src), str(out)], job, progress)
    log.info("converted %s from %s in %.1fs", name, fmt, time.monotonic() - started)


def hash_file(path: Path, root: Path) -> str | None:
    """The sha256 of a whole file on the volume ``root``; None when it is not a regular file reached without a link
    (a FIFO or a device planted in the shared cache would hang or never end the read, a link would hash another
    file).

    :raise FileNotFoundError: when it is missing.
    """
    try:
        fd = files.open_file(path, root)
    except files.Forged:
        return None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            return None
        raise
    with open(fd, "rb") as src:
        return hashlib.file_digest(src, "sha256").hexdigest()


def adopt(layout: Layout, fd: int, hexdigest: str, fmt: str, name: str) -> None:
    """Store the open file ``fd`` (hashed as ``hexdigest`` by the caller) as ``sha256/<hex>``: its inode itself,
    linked through the descriptor (never through a name another pod could swap), else a private copy hashed again as
    it is copied, stored as a download is.

    :raise BaseMismatch: when the copy's bytes are not ``hexdigest``'s.
    """
    if layout.stored(hexdigest) is not None:
        return  # stored already; binding checks its bytes
    vet(Path(f"/proc/{os.getpid()}/fd/{fd}"), fmt, NO_LIMIT, name)
    part = _Private(layout, f"adopt.{hexdigest[:16]}")
    try:
        if part.named:  # a volume without O_TMPFILE: the name is wanted for the link, the file stays open for a copy
            os.unlink(part.name, dir_fd=part.dir_fd)
            part.named = False
        try:
            os.link(f"/proc/self/fd/{fd}", part.name, dst_dir_fd=part.dir_fd, follow_symlinks=True)
        except OSError:  # another file system under tmp/, or a base another uid owns (fs.protected_hardlinks)
            _copy_hashed(fd, part, hexdigest, name)
        else:
            os.close(part.fd)
            part.fd, part.named = os.dup(fd), True
        _store(layout, part, hexdigest)
    finally:
        part.close()


def _copy_hashed(fd: int, part: _Private, hexdigest: str, name: str) -> None:
    hasher = hashlib.sha256()
    with open(fd, "rb", closefd=False) as src, Writeback(part.fd) as out:
        src.seek(0)
        while chunk := src.read(1 << 20):
            hasher.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if hasher.hexdigest() != hexdigest:
        raise BaseMismatch(f"{name}: changed while it was copied into the cache; not starting the VM")
    os.fchmod(part.fd, 0o444)


def _store(layout: Layout, part: _Private, hexdigest: str) -> os.stat_result:
    """Rename a complete, vetted download to ``sha256/<hex>``; an existing base is kept unless its bytes changed.

    The rename is by name, so it is checked against the descriptor: ``sha256/<hex>`` must then be the very inode
    hashed and vetted, else it is removed and the start refused.

    :return: the fstat of the file now stored under the digest.
    """
    target = layout.base(hexdigest)
    with locked(layout.lock(hexdigest)):
        bases = open_below(layout.root, target.parent)
        try:
            kept = _hashed(bases, hexdigest)
            if kept is not None:
                return kept
            if not part.named:
                os.link(f"/proc/self/fd/{part.fd}", part.name, dst_dir_fd=part.dir_fd, follow_symlinks=True)
                part.named = True
            os.rename(part.name, hexdigest, src_dir_fd=part.dir_fd, dst_dir_fd=bases)
            part.named = False
            mine = os.fstat(part.fd)
            now = os.stat(hexdigest, dir_fd=bases, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                os.unlink(hexdigest, dir_fd=bases)
                raise PodvmError(
                    f"IMAGE_DIR={layout.root}: {target} is not the file downloaded (another writer replaced it before "
                    "the rename); removed it, nothing cached"
                )
            os.fsync(bases)
            return mine
        finally:
            os.close(bases)


def _hashed(bases: int, hexdigest: str) -> os.stat_result | None:
    """The fstat of an existing base that holds the bytes of its digest (hashed through the same descriptor)."""
    try:
        fd = os.open(hexdigest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=bases)
    except FileNotFoundError:
        return None
    except OSError:
        fd = -1
    try:
        if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
            with open(fd, "rb", closefd=False) as src:
                if hashlib.file_digest(src, "sha256").hexdigest() == hexdigest:
                    return os.fstat(fd)
    finally:
        if fd >= 0:
            os.close(fd)
    log.warning("sha256/%s no longer holds the bytes of its name; replacing it with the verified download", hexdigest)
    return None
