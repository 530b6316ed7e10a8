"""Getting the bytes of a base image: an HTTP download (resumed, retried, hashed while streaming) or a local copy.

Where the bytes go, and under which lock, is :mod:`vmrunner.images.store`'s business: this module only streams
them into the file it is given and returns their digests.
"""

import contextlib
import errno
import hashlib
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from shared import files
from shared.errors import ConfigError, ImageRejected, PodvmError
from vmrunner.config import ISO_FORMAT, Config, redact

if TYPE_CHECKING:
    import requests

log = logging.getLogger("vmrunner.image")
CHUNK = 1 << 20
PROGRESS_EVERY = 5.0
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass
class ImageFigures:
    """The base image as this runner fetched, vetted and chose it."""

    received: int = 0
    fetch_seconds: float = 0.0
    retries: int = 0
    resumes: int = 0
    vetting: str = "pending"
    name: str = ""
    digest: str = ""  # sha256:<hex> of the base the pet is on; empty for a standalone pet


FETCH = ImageFigures()  # what this process fetched: filled in while it downloads, reported by vmrunner.metrics


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


class WriteFailed(Exception):
    """Writing the download into IMAGE_DIR failed (disk full, quota, I/O error): reported, never retried."""

    def __init__(self, err: OSError) -> None:
        super().__init__(err.strerror or str(err))


class Sink:
    """Writes and hashes chunks on two threads while the caller goes on reading.

    File writes and hashing release the GIL, so the three run side by side: a checksummed fetch keeps up with a plain
    ``curl -o``. Leaving the ``with`` block waits until every queued chunk is written and hashed, so the file and the
    hashers hold the same bytes whenever no Sink is open; a write error is raised then even when another error
    (a dropped connection) is leaving the block, so a disk fault is never mistaken for something to retry.
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

    def _raise_first(self) -> None:
        err = self.errors[0]
        raise WriteFailed(err) if isinstance(err, OSError) else err

    def put(self, chunk: bytes) -> None:
        """Queue ``chunk`` for writing and hashing; raises a writer's error (e.g. disk full) as soon as it is seen."""
        if self.errors:
            self._raise_first()
        for chunks in self.queues:
            chunks.put(chunk)

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        for chunks in self.queues:
            chunks.put(None)
        for thread in self.threads:
            thread.join()
        if self.errors:
            self._raise_first()


class Part:
    """The download so far. Its file and its hashers always hold the same bytes: they only ever start over together.

    ``entity`` is what the answer that started the file said about it; a resume must prove it is still that file.
    """

    def __init__(self, out: IO[bytes], algorithms: Iterable[str]) -> None:
        self.out, self.algorithms = out, tuple(algorithms)
        self.size = 0
        self.entity: Entity | None = None
        self.hashers = {name: hashlib.new(name) for name in self.algorithms}

    def restart(self, entity: "Entity | None") -> None:
        """Empty the file and the hashers together, for a new answer that starts at byte 0."""
        try:
            self.out.seek(0)
            self.out.truncate()
        except OSError as err:
            raise WriteFailed(err) from None
        self.hashers = {name: hashlib.new(name) for name in self.algorithms}
        self.size, self.entity = 0, entity

    @contextlib.contextmanager
    def appending(self, limit: int, too_large: str) -> Iterator[Callable[[bytes], None]]:
        """Yield a function that appends a chunk; one that would take the file past ``limit`` bytes is refused."""
        with Sink(self.out, self.hashers) as sink:

            def append(chunk: bytes) -> None:
                if self.size + len(chunk) > limit:
                    raise ImageRejected(too_large)
                sink.put(chunk)
                self.size += len(chunk)

            yield append

    def finish(self) -> dict[str, str]:
        """Flush the file to disk and return its digests."""
        try:
            self.out.flush()
            os.fsync(self.out.fileno())
        except OSError as err:
            raise WriteFailed(err) from None
        return {name: h.hexdigest() for name, h in self.hashers.items()}


@contextlib.contextmanager
def _writing_into(cfg: Config) -> Iterator[None]:
    """A failed write into the cache becomes one line naming IMAGE_DIR (the caller removes the partial file)."""
    try:
        yield
    except WriteFailed as err:
        message = f"IMAGE_DIR={cfg.image_dir}: cannot write {cfg.img_target}: {err}; nothing was cached"
        raise PodvmError(message) from None


def _algorithms(cfg: Config) -> set[str]:
    return {"sha256"} | ({cfg.img_checksum.algorithm} if cfg.img_checksum else set())


@dataclass(frozen=True)
class Entity:
    """What a whole-file (200) answer said about the file: its length and the validators that identify it."""

    length: int | None  # Content-Length
    etag: str | None  # a strong ETag only: a weak one (W/) does not promise the same bytes
    last_modified: str | None

    @property
    def validator(self) -> str | None:
        """What If-Range carries: the server then sends the rest of *this* file, or all of the one it has now."""
        return self.etag or self.last_modified

    @property
    def resumable(self) -> bool:
        """A resume can be checked only against a known length and a validator."""
        return self.length is not None and self.validator is not None


_DIGITS = re.compile(r"[0-9]{1,19}")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")


def entity_of(headers: Mapping[str, str]) -> Entity:
    """The Entity a 200 answer describes."""
    length = headers.get("Content-Length", "").strip()
    etag = headers.get("ETag", "").strip()
    return Entity(
        int(length) if _DIGITS.fullmatch(length) else None,
        etag if etag and not etag.startswith("W/") else None,
        headers.get("Last-Modified", "").strip() or None,
    )


class NotTheSameFile(_Transient):
    """A 206 answer that does not prove it continues the partial file: the download starts over from byte 0."""


def judge_answer(part: Entity | None, offset: int, status: int, headers: Mapping[str, str]) -> Entity | None:
    """What a 200 or 206 answer means for a partial file of ``offset`` bytes taken from the entity ``part``.

    ``part`` is None when the request asked for the whole file. Pure, so every case is unit-tested.

    :return: the answer's Entity when it starts the file over (200), None when it continues ``part`` (206).
    :raise NotTheSameFile: when a 206 is not the rest of the same file: another range, size or validator.
    """
    if status == 200:
        return entity_of(headers)
    if part is None or part.length is None or not offset:
        raise NotTheSameFile("HTTP 206 to a request for the whole file")
    match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
    if match is None:
        raise NotTheSameFile("HTTP 206 without a Content-Range of bytes")
    expected = (offset, part.length - 1, part.length)
    if tuple(map(int, match.groups())) != expected:
        raise NotTheSameFile(
            f"HTTP 206 for bytes {match.group(1)}-{match.group(2)}/{match.group(3)}, "
            f"asked bytes {expected[0]}-{expected[1]}/{expected[2]}: not the same file"
        )
    length = headers.get("Content-Length")
    if length is not None and length.strip() != str(part.length - offset):
        raise NotTheSameFile(f"HTTP 206 with a Content-Length other than the {part.length - offset} bytes asked")
    if part.etag is not None and headers.get("ETag", "").strip() != part.etag:
        raise NotTheSameFile("HTTP 206 under another ETag: the file changed on the server")
    last_modified = headers.get("Last-Modified")
    if part.etag is None and last_modified is not None and last_modified.strip() != part.last_modified:
        raise NotTheSameFile("HTTP 206 with another Last-Modified: the file changed on the server")
    return None


def _download(cfg: Config, out: IO[bytes]) -> dict[str, str]:
    """Stream ``IMG_SOURCE`` into ``out``, resuming only the same file and retrying with back-off; return digests."""
    import requests
    import urllib3

    # urllib3's debug and warning lines quote whole URLs, credentials and presigned tokens included.
    logging.getLogger("urllib3").setLevel(logging.CRITICAL)
    retried = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    source = redact(cfg.img_source)
    part = Part(out, _algorithms(cfg))
    progress = Progress(cfg.img_target)
    attempt, furthest = 0, 0
    with requests.Session() as session, _writing_into(cfg):
        while True:
            try:
                _one_request(session, cfg, part, progress)
                return part.finish()
            except (*retried, urllib3.exceptions.HTTPError) as err:
                reason = redact(f"{type(err).__name__}: {err}")
            except _Transient as err:
                reason = str(err)
            except requests.RequestException as err:
                raise PodvmError(f"{cfg.source_setting}={source}: {redact(f'{type(err).__name__}: {err}')}") from None
            # Only a try that took the file further than ever before restarts the count: a server that keeps
            # answering with a changed file or dropping early cannot keep the runner busy for ever.
            attempt = 1 if part.size > furthest else attempt + 1
            furthest = max(furthest, part.size)
            if attempt > cfg.fetch_retries:
                raise PodvmError(f"{cfg.source_setting}={source}: download failed after {attempt} attempts: {reason}")
            FETCH.retries += 1
            delay = min(30.0, 0.5 * 2 ** (attempt - 1))
            log.warning(
                "fetching %s: %s; retry %d in %.1fs from byte %d", cfg.img_target, reason, attempt, delay, part.size
            )
            time.sleep(delay)


def _one_request(session: "requests.Session", cfg: Config, part: Part, progress: Progress) -> None:
    """One GET: continue ``part`` when the server proves it is the same file, else start it over; stream into it."""
    # identity: Range offsets, Content-Length, the cap and the digest then all count the bytes as they are stored.
    headers = {"Accept-Encoding": "identity"}
    asked = part.entity if part.size and part.entity is not None and part.entity.resumable else None
    if asked is not None:
        headers |= {"Range": f"bytes={part.size}-", "If-Range": str(asked.validator)}
    elif part.size:
        log.info("fetching %s: no length and strong validator to resume safely; starting over", cfg.img_target)
        part.restart(None)
    source = redact(cfg.img_source)
    with session.get(cfg.img_source, stream=True, timeout=(10, 60), headers=headers) as resp:
        if resp.status_code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code not in (200, 206):
            raise PodvmError(f"{cfg.source_setting}={source}: HTTP {resp.status_code} {resp.reason}")
        try:
            fresh = judge_answer(asked, part.size, resp.status_code, resp.headers)
        except NotTheSameFile:
            part.restart(None)
            raise
        if fresh is not None:
            if fresh.length is not None and fresh.length > cfg.img_max_size:
                raise ImageRejected(
                    f"{cfg.source_setting}={source}: {fresh.length} bytes announced, more than IMG_MAX_SIZE "
                    f"({cfg.img_max_size}); refused, nothing was cached"
                )
            if part.size:
                log.info("fetching %s: the server sent the whole file; starting over from byte 0", cfg.img_target)
            part.restart(fresh)
        elif part.size:
            FETCH.resumes += 1  # the server goes on where the broken transfer stopped
        total = part.entity.length if part.entity is not None else None
        if total is None:
            limit, too_large = cfg.img_max_size, f"more than IMG_MAX_SIZE ({cfg.img_max_size}) bytes"
        else:
            limit, too_large = total, f"more than the {total} bytes announced"
        progress.start(part.size)
        # read1 hands over whatever has arrived, so a dropped connection loses no byte already received.
        with part.appending(
            limit, f"{cfg.source_setting}={source}: {too_large}; refused, nothing was cached"
        ) as append:
            while chunk := resp.raw.read1(CHUNK, decode_content=False):
                append(chunk)
                FETCH.received += len(chunk)
                progress.tick(part.size, total)
        if total is not None and part.size < total:
            raise _Transient(f"connection closed after {part.size} of {total} bytes")


def _copy(cfg: Config, out: IO[bytes]) -> dict[str, str]:
    """Copy a local ``IMG_SOURCE`` into ``out``, no more than IMG_MAX_SIZE bytes, and return its digests."""
    part = Part(out, _algorithms(cfg))
    source = cfg.img_source
    too_large = (
        f"{cfg.source_setting}={source}: more than IMG_MAX_SIZE ({cfg.img_max_size}) bytes; refused, nothing was cached"
    )
    with _writing_into(cfg):
        try:
            with _open_local(cfg) as src, part.appending(cfg.img_max_size, too_large) as append:
                while chunk := src.read(CHUNK):
                    append(chunk)
                    FETCH.received += len(chunk)
        except FileNotFoundError:
            raise ConfigError(f"{cfg.source_setting}={source}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{cfg.source_setting}={source}: is a directory, expected an image file") from None
        except PermissionError:
            raise ConfigError(f"{cfg.source_setting}={source}: permission denied") from None
        except files.Forged:
            raise ConfigError(f"{cfg.source_setting}={source}: not a regular file (a FIFO, device or folder)") from None
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise PodvmError(f"{cfg.source_setting}={source}: cannot read: {err.strerror}") from None
            raise ConfigError(f"{cfg.source_setting}={source}: a symbolic link; refused") from None
        return part.finish()


def _open_local(cfg: Config) -> IO[bytes]:
    """The local source, read-only. An ISO (a file mounted in the runner, perhaps by another tenant) is opened without
    following a link in its last component and without waiting on a FIFO, and must be a regular file.

    :raise files.Forged: when it is not a regular file; OSError (ELOOP for a link) when it cannot be opened.
    """
    if cfg.img_format != ISO_FORMAT:
        return open(cfg.img_source, "rb")
    path = Path(cfg.img_source)
    return open(files.open_file(path, path.parent), "rb")


def fetch_into(cfg: Config, out: IO[bytes]) -> dict[str, str]:
    """Stream the configured image into ``out`` (download or local copy) and return its digests, sha256 always."""
    return _download(cfg, out) if cfg.is_url else _copy(cfg, out)
