"""The shared cache of base images: fetched once, checked while streaming, vetted, then immutable.

Several pods may start at once on the same cache: an ``flock`` on ``.<target>.lock`` lets one of them download while
the others wait and reuse the result. The download goes to ``.<target>.part`` and is renamed into place only after
its checksum and vetting passed, so the cache never holds half an image or a refused one. Beside each image,
``.<target>.vetted`` records the verdict and digests, so a restart with a cached image runs no qemu-img and reads no
image bytes.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from shared.errors import ConfigError, ImageRejected, PodvmError
from shared.files import write_atomic
from vmrunner.config import Config
from vmrunner.metrics import FETCH
from vmrunner.vet import Verdict, vet

if TYPE_CHECKING:
    import requests

log = logging.getLogger("vmrunner.image")
CHUNK = 1 << 20
PROGRESS_EVERY = 5.0
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Record:
    """The verdict stored beside a cached image, valid while the file's identity is unchanged."""

    format: str
    virtual_size: int
    size: int
    mtime_ns: int
    inode: int
    digests: dict[str, str]


class _Transient(Exception):
    """A failure worth retrying (connection lost, 5xx, short body)."""


class Progress:
    """Logs percent, rate and time left at most every ``every`` seconds."""

    def __init__(self, name: str, every: float = PROGRESS_EVERY) -> None:
        self.name, self.every = name, every
        self.started = self.last = time.monotonic()
        self.first_offset = 0

    def start(self, offset: int) -> None:
        """A new stretch of transfer begins at ``offset`` (rates count only this run's bytes)."""
        self.started = self.last = time.monotonic()
        self.first_offset = offset

    def tick(self, done: int, total: int | None) -> None:
        """Report if enough time has passed since the last line."""
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = (done - self.first_offset) / max(now - self.started, 1e-6)
        if total:
            left = (total - done) / rate if rate > 0 else float("inf")
            log.info(
                "fetching %s: %.0f%% of %s, %s/s, %s left",
                self.name,
                100 * done / total,
                human(total),
                human(int(rate)),
                f"{left:.0f}s",
            )
        else:
            log.info("fetching %s: %s, %s/s", self.name, human(done), human(int(rate)))


def human(size: int) -> str:
    """``1.5 GiB`` style size for log lines."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class Sink:
    """Writes and hashes chunks on two threads while the caller goes on reading.

    File writes and hashing release the GIL, so the three run side by side: a checksummed fetch keeps up with a plain
    ``curl -o``. Leaving the ``with`` block waits until every chunk is written and hashed.
    """

    def __init__(self, out: IO[bytes], hashers: dict[str, "hashlib._Hash"]) -> None:
        self.errors: list[BaseException] = []
        self.queues: list[queue.Queue[bytes | None]] = [queue.Queue(maxsize=64), queue.Queue(maxsize=64)]

        def hash_chunk(chunk: bytes) -> None:
            for h in hashers.values():
                h.update(chunk)

        self.threads = [
            threading.Thread(target=self._consume, args=(q, work), daemon=True)
            for q, work in zip(self.queues, (out.write, hash_chunk), strict=True)
        ]
        for thread in self.threads:
            thread.start()

    def _consume(self, chunks: "queue.Queue[bytes | None]", work: Callable[[bytes], object]) -> None:
        while (chunk := chunks.get()) is not None:
            if not self.errors:
                try:
                    work(chunk)
                except BaseException as err:
                    self.errors.append(err)

    def put(self, chunk: bytes) -> None:
        """Queue ``chunk`` for writing and hashing; raises a writer's error (e.g. disk full) as soon as it is seen."""
        if self.errors:
            raise self.errors[0]
        for chunks in self.queues:
            chunks.put(chunk)

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        for chunks in self.queues:
            chunks.put(None)
        for thread in self.threads:
            thread.join()
        if self.errors and exc[0] is None:
            raise self.errors[0]


def _hashers(cfg: Config) -> dict[str, "hashlib._Hash"]:
    names = {"sha256"} | ({cfg.img_checksum.algorithm} if cfg.img_checksum else set())
    return {name: hashlib.new(name) for name in sorted(names)}


def _download(cfg: Config, out: IO[bytes]) -> dict[str, str]:
    """Stream ``IMG_SOURCE`` into ``out``, resuming with Range and retrying with back-off; return the digests."""
    import requests
    import urllib3

    url = cfg.img_source
    hashers = _hashers(cfg)
    progress = Progress(cfg.img_target)
    offset, attempt = 0, 0
    with requests.Session() as session:
        while True:
            started_at = offset
            try:
                offset, hashers = _one_request(session, url, out, offset=offset, hashers=hashers, progress=progress)
                return {name: h.hexdigest() for name, h in hashers.items()}
            except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as err:
                reason = f"{type(err).__name__}: {err}"
            except _Transient as err:
                reason = str(err)
            offset = out.tell()
            attempt = 1 if offset > started_at else attempt + 1
            if attempt > cfg.fetch_retries:
                raise PodvmError(f"IMG_SOURCE={url}: download failed after {attempt} attempts: {reason}")
            FETCH.retries += 1
            delay = min(30.0, 0.5 * 2 ** (attempt - 1))
            log.warning(
                "fetching %s: %s; retry %d in %.1fs from byte %d", cfg.img_target, reason, attempt, delay, offset
            )
            time.sleep(delay)


def _one_request(
    session: "requests.Session",
    url: str,
    out: IO[bytes],
    *,
    offset: int,
    hashers: dict[str, "hashlib._Hash"],
    progress: Progress,
) -> tuple[int, dict[str, "hashlib._Hash"]]:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, stream=True, timeout=(10, 60), headers=headers) as resp:
        if resp.status_code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code not in (200, 206):
            raise PodvmError(f"IMG_SOURCE={url}: HTTP {resp.status_code} {resp.reason}")
        content_range = resp.headers.get("Content-Range", "")
        if offset and not (resp.status_code == 206 and content_range.startswith(f"bytes {offset}-")):
            log.info("fetching %s: the server does not resume; starting over", url)
            out.seek(0)
            out.truncate()
            offset = 0
            hashers = {name: hashlib.new(name) for name in hashers}
        if offset:
            FETCH.resumes += 1  # the server went on where the broken transfer stopped
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        progress.start(offset)
        # read1 hands over whatever has arrived, so a dropped connection loses no byte already received.
        with Sink(out, hashers) as sink:
            while chunk := resp.raw.read1(CHUNK, decode_content=True):
                sink.put(chunk)
                offset += len(chunk)
                FETCH.received += len(chunk)
                progress.tick(offset, total)
        if total is not None and offset < total:
            raise _Transient(f"connection closed after {offset} of {total} bytes")
    return offset, hashers


def _copy(cfg: Config, out: IO[bytes]) -> dict[str, str]:
    """Copy a local ``IMG_SOURCE`` into ``out`` and return its digests."""
    hashers = _hashers(cfg)
    try:
        with open(cfg.img_source, "rb") as src, Sink(out, hashers) as sink:
            while chunk := src.read(CHUNK):
                sink.put(chunk)
                FETCH.received += len(chunk)
    except FileNotFoundError:
        raise ConfigError(f"IMG_SOURCE={cfg.img_source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"IMG_SOURCE={cfg.img_source}: is a directory, expected an image file") from None
    except PermissionError:
        raise ConfigError(f"IMG_SOURCE={cfg.img_source}: permission denied") from None
    return {name: h.hexdigest() for name, h in hashers.items()}


def _hash_file(path: Path, algorithm: str) -> str:
    with open(path, "rb") as src:
        return hashlib.file_digest(src, algorithm).hexdigest()


def _record_path(cfg: Config) -> Path:
    return cfg.image_dir / f".{cfg.img_target}.vetted"


def _write_record(cfg: Config, verdict: Verdict, digests: dict[str, str]) -> None:
    st = cfg.base_path.stat()
    record = Record(verdict.format, verdict.virtual_size, st.st_size, st.st_mtime_ns, st.st_ino, digests)
    write_atomic(_record_path(cfg), json.dumps(asdict(record)).encode(), mode=0o644)


def _read_record(cfg: Config) -> Record | None:
    """The stored verdict if it still describes the cached file, else None."""
    try:
        record = Record(**json.loads(_record_path(cfg).read_text()))
        st = cfg.base_path.stat()
    except (OSError, ValueError, TypeError):
        return None
    same = (record.size, record.mtime_ns, record.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)
    return record if same and record.format == cfg.img_format else None


@contextlib.contextmanager
def _locked(cfg: Config) -> Iterator[None]:
    """Hold the cache lock of this image: one runner fetches, the others wait and then reuse."""
    with open(cfg.image_dir / f".{cfg.img_target}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another runner is fetching %s; waiting for it", cfg.img_target)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _reuse(cfg: Config) -> Verdict:
    """Accept the cached base: its stored verdict when still valid, else vet it again; it is never changed."""
    record = _read_record(cfg)
    name = str(cfg.base_path)
    if record is None:
        log.info("vetting cached %s", name)
        verdict = vet(cfg.base_path, cfg.img_format, cfg.img_max_size, name)
        digests: dict[str, str] = {}
    else:
        verdict, digests = Verdict(record.format, record.virtual_size), dict(record.digests)
        if verdict.virtual_size > cfg.img_max_size:
            raise ImageRejected(f"{name}: virtual size {verdict.virtual_size} bytes exceeds IMG_MAX_SIZE; refused")
    if cfg.img_checksum:
        algorithm = cfg.img_checksum.algorithm
        if algorithm not in digests:
            digests[algorithm] = _hash_file(cfg.base_path, algorithm)
        if digests[algorithm] != cfg.img_checksum.hexdigest:
            raise ImageRejected(
                f"{name}: the cached image does not match IMG_CHECKSUM ({algorithm}:{digests[algorithm]}); "
                "left untouched: use another IMG_TARGET or remove it"
            )
    if record is None or digests != record.digests:
        with contextlib.suppress(OSError):
            _write_record(cfg, verdict, digests)
    return verdict


def ensure_base(cfg: Config) -> Verdict:
    """Make the vetted base image available in the cache and return its verdict.

    :raise ImageRejected: when the image fails its checksum or vetting (nothing is left in the cache).
    :raise PodvmError: when it cannot be fetched.
    """
    try:
        cfg.image_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cfg):
            if cfg.base_path.exists():
                return _reuse(cfg)
            return _fetch_locked(cfg)
    except PermissionError as err:
        raise ConfigError(f"IMAGE_DIR={cfg.image_dir}: {err.strerror}: {err.filename}") from None


def _fetch_locked(cfg: Config) -> Verdict:
    part = cfg.image_dir / f".{cfg.img_target}.part"
    name = cfg.img_source
    log.info("fetching %s into %s", name, cfg.base_path)
    started = time.monotonic()
    try:
        with open(part, "wb") as out:
            digests = _download(cfg, out) if cfg.is_url else _copy(cfg, out)
            out.flush()
            os.fsync(out.fileno())
        if cfg.img_checksum and digests[cfg.img_checksum.algorithm] != cfg.img_checksum.hexdigest:
            raise ImageRejected(
                f"IMG_CHECKSUM: {name} has {cfg.img_checksum.algorithm}:{digests[cfg.img_checksum.algorithm]}, "
                f"expected {cfg.img_checksum}; nothing was cached"
            )
        verdict = vet(part, cfg.img_format, cfg.img_max_size, name)
        os.chmod(part, 0o444)
        os.replace(part, cfg.base_path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _write_record(cfg, verdict, digests)
    size = cfg.base_path.stat().st_size
    elapsed = time.monotonic() - started
    log.info(
        "cached %s (%s in %.1fs, %s/s, %s virtual)",
        cfg.base_path,
        human(size),
        elapsed,
        human(int(size / max(elapsed, 1e-6))),
        human(verdict.virtual_size),
    )
    return verdict
