"""Getting the bytes of a base image: an HTTP download (resumed, retried, hashed while streaming) or a local copy.

Where the bytes go, and under which lock, is ``vmrunner.cache``'s business: this module only streams them into the
file it is given and returns their digests.
"""

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from shared.errors import ConfigError, PodvmError
from vmrunner.config import Config

if TYPE_CHECKING:
    import requests

log = logging.getLogger("vmrunner.image")
CHUNK = 1 << 20
PROGRESS_EVERY = 5.0
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


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
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        progress.start(offset)
        # read1 hands over whatever has arrived, so a dropped connection loses no byte already received.
        with Sink(out, hashers) as sink:
            while chunk := resp.raw.read1(CHUNK, decode_content=True):
                sink.put(chunk)
                offset += len(chunk)
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
    except FileNotFoundError:
        raise ConfigError(f"IMG_SOURCE={cfg.img_source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"IMG_SOURCE={cfg.img_source}: is a directory, expected an image file") from None
    except PermissionError:
        raise ConfigError(f"IMG_SOURCE={cfg.img_source}: permission denied") from None
    return {name: h.hexdigest() for name, h in hashers.items()}


def fetch_into(cfg: Config, out: IO[bytes]) -> dict[str, str]:
    """Stream the configured image into ``out`` (download or local copy) and return its digests, sha256 always."""
    return _download(cfg, out) if cfg.is_url else _copy(cfg, out)
