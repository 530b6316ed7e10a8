"""The shared, content-addressed cache of base images (docs/runner-contract.md, "The image cache").

Bases live under ``sha256/<hex>`` and are never written again; ``names/<name>`` says which digest a configured image
means now; ``refs/<hex>/<pet-id>`` keeps a base alive while a pet is made on it; ``locks/`` serialises downloads and
references across pods and nodes. Nothing here is trusted when a pet starts: every pod shares the cache's uid, so the
pet's own volume keeps the record its start is checked against (see ``vmrunner.binding``).
"""

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ConfigError, ImageRejected, PodvmError
from shared.files import write_atomic
from vmrunner.config import Config, redact
from vmrunner.image import fetch_into, human
from vmrunner.vet import Verdict, vet

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("vmrunner.cache")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
VOLUME_FILE = ".podvm-volume"
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
            for sub in ("sha256", "names", "refs", "locks", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"IMAGE_DIR={self.root}: cannot create the cache's folders: {err.strerror}") from None


# ------------------------------------------------------------------------------------------------------ locks


def lock_problem(mountinfo: str, path: Path) -> str | None:
    """Why flock on ``path`` would not exclude other nodes, from ``/proc/self/mountinfo``'s text; None if it would.

    Pure so each mount kind has a unit test. An NFS mount with ``nolock`` (``local_lock=all``) or
    ``local_lock=flock`` takes flock locks on this node only: two nodes would both "hold" the lock.
    """
    best: tuple[int, str, str] | None = None
    target = str(path)
    for line in mountinfo.splitlines():
        head, _, tail = line.partition(" - ")
        fields, tail_fields = head.split(), tail.split()
        if len(fields) < 6 or len(tail_fields) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), tail_fields[0], f"{fields[5]},{tail_fields[2]}")
    if best is None or not best[1].startswith("nfs"):
        return None
    options = best[2].split(",")
    local = [o for o in _LOCAL_LOCK_OPTIONS if o in options]
    if local:
        return f"it is an NFS mount with {local[0]}, so locks hold on this node only"
    return None


def check_locks(root: Path) -> None:
    """Refuse a cache whose locks would not exclude other nodes.

    :raise ConfigError: naming IMAGE_DIR and the mount option at fault.
    """
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    problem = lock_problem(mountinfo, root.resolve())
    if problem:
        raise ConfigError(
            f"IMAGE_DIR={root}: {problem}; the shared cache needs working locks (NFSv4, or NFSv3 with lockd)"
        )


@contextlib.contextmanager
def locked(path: Path, waiting: str = "", *, blocking: bool = True) -> Iterator[bool]:
    """Hold ``flock`` on ``path``; yields False (holding nothing) when ``blocking`` is false and it is busy.

    gc removes a lock file with its base while holding it, so after ``flock`` the path must still name the file
    locked; if not, start over on the new file.

    :raise ConfigError: when the volume does not support locks (ENOLCK).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:  # never follow a symlink planted in the shared cache (it could point into this pod's own volumes)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise PodvmError(f"IMAGE_DIR: {path} is a symbolic link; refused") from None
            raise
        with open(fd, "r+b") as lock:
            try:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not blocking:
                        yield False
                        return
                    if waiting:
                        log.info("%s", waiting)
                    fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno == errno.ENOLCK:
                    raise ConfigError(
                        f"IMAGE_DIR: {path}: the volume does not support file locks (ENOLCK); the shared cache "
                        "needs working locks (NFSv4, or NFSv3 with lockd)"
                    ) from None
                raise
            try:
                same = os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return


# ------------------------------------------------------------------------------------------------------ names


@dataclass(frozen=True)
class NameRecord:
    """``names/<name>``: the digest a configured image means now, and where it came from."""

    digest: str  # sha256:<hex>
    source: str
    fetched_at: str
    checksums: dict[str, str] = field(default_factory=dict)  # other algorithms' digests, for IMG_CHECKSUM

    @property
    def hex(self) -> str:
        """The sha256 digest's hex digits."""
        return self.digest.removeprefix("sha256:")


def read_name(layout: Layout, key: str) -> NameRecord | None:
    """The name's record, or None when missing or unreadable (it is then fetched again)."""
    try:
        record = NameRecord(**json.loads(layout.name(key).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return record if record.digest.startswith("sha256:") and HEX64.match(record.hex) else None


def matches_checksum(cfg: Config, record: NameRecord) -> bool:
    """True when ``record`` satisfies IMG_CHECKSUM (or none is set)."""
    if cfg.img_checksum is None:
        return True
    known = {"sha256": record.hex, **record.checksums}
    return known.get(cfg.img_checksum.algorithm) == cfg.img_checksum.hexdigest


def resolve(cfg: Config, layout: Layout) -> str | None:
    """The digest the configured image names, when it can be used without fetching; None otherwise."""
    record = read_name(layout, cfg.img_name)
    if record is None or not matches_checksum(cfg, record) or not layout.base(record.hex).exists():
        return None
    return record.hex


def lookup(layout: Layout, wanted: str) -> str | None:
    """``sha256:<hex>``, ``<hex>`` or a name, as a digest; None when it names nothing."""
    hexdigest = wanted.removeprefix("sha256:")
    if HEX64.match(hexdigest):
        return hexdigest
    if "/" in wanted or wanted.startswith("."):
        return None
    record = read_name(layout, wanted)
    return record.hex if record else None


# ------------------------------------------------------------------------------------------------------ fetching


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


# ------------------------------------------------------------------------------------------------------ references


@dataclass(frozen=True)
class Ref:
    """``refs/<hex>/<pet-id>``: a pet made on the base."""

    pet: str
    volume: str
    hostname: str
    since: str


def volume_id(vm_dir: Path) -> str:
    """The VM volume's random id (``VM_DIR/.podvm-volume``), made on first use."""
    path = vm_dir / VOLUME_FILE
    try:
        found = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{16}", found):
            return found
    except FileNotFoundError:
        pass
    except OSError as err:
        raise PodvmError(f"VM_DIR={vm_dir}: cannot read {path}: {err.strerror}") from None
    new = secrets.token_hex(8)
    try:
        write_atomic(path, f"{new}\n".encode(), mode=0o644)
    except OSError as err:
        raise PodvmError(f"VM_DIR={vm_dir}: cannot write {path}: {err.strerror}") from None
    return new


def pet_id(cfg: Config) -> str:
    """This pet's reference file name: unique across pods and volumes sharing the cache."""
    return f"{cfg.hostname}.{volume_id(cfg.vm_dir)}"


def claim(cfg: Config, hexdigest: str) -> bool:
    """Record this pet's reference to the base, under its lock; False when the base is not (any more) there."""
    layout = Layout(cfg.image_dir)
    layout.make()
    check_locks(layout.root)
    ref_name = pet_id(cfg)
    with locked(layout.lock(hexdigest)):
        if not layout.base(hexdigest).exists():
            return False
        path = layout.refs(hexdigest) / ref_name
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            ref = Ref(str(cfg.pet_path), ref_name.rsplit(".", 1)[1], cfg.hostname, utc_now())
            write_atomic(path, json.dumps(asdict(ref)).encode(), mode=0o644)
    return True


def release(cfg: Config, hexdigest: str) -> None:
    """Remove this pet's reference to the base."""
    layout = Layout(cfg.image_dir)
    with locked(layout.lock(hexdigest)):
        (layout.refs(hexdigest) / pet_id(cfg)).unlink(missing_ok=True)


def references(layout: Layout, hexdigest: str) -> dict[str, Ref | None]:
    """The base's references by pet id (None: unreadable, still counted)."""
    found: dict[str, Ref | None] = {}
    try:
        entries = list(layout.refs(hexdigest).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in sorted(entries):
        if entry.name.startswith("."):
            continue  # a reference being written
        try:
            found[entry.name] = Ref(**json.loads(entry.read_text()))
        except (OSError, ValueError, TypeError):
            found[entry.name] = None
    return found


# ------------------------------------------------------------------------------------------------------ gc


@dataclass(frozen=True)
class DigestFacts:
    """What gc observed about one base: when it was cached, its references, when one was last removed."""

    hex: str
    base_ctime: float
    refs: dict[str, Ref | None]
    refs_mtime: float | None  # the refs folder's mtime: the last reference added or removed
    stale: frozenset[str]  # references whose volume gc sees and whose pet is gone
    names: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """What gc does with one base."""

    hex: str
    drop_refs: tuple[str, ...]
    remove: bool
    why: str


def judge_digest(facts: DigestFacts, now: float, grace: float) -> Decision:
    """Keep or remove one base; pure, so every rule has a unit test."""
    live = [name for name in facts.refs if name not in facts.stale]
    drop = tuple(sorted(facts.stale))
    if live:
        return Decision(facts.hex, drop, False, f"referenced by {', '.join(live)}")
    claimed = max(facts.base_ctime, facts.refs_mtime or 0.0)
    if drop:
        claimed = now  # dropping a reference now starts the grace period
    idle = now - claimed
    if idle < grace:
        return Decision(facts.hex, drop, False, f"unreferenced for {idle:.0f}s, under the grace period")
    return Decision(facts.hex, drop, True, f"unreferenced for {idle:.0f}s")


def _stale(ref: Ref | None) -> bool:
    """A reference whose pet is provably gone: its volume is visible here (same id) and the pet file is not."""
    if ref is None:
        return False
    pet = Path(ref.pet)
    try:
        return (pet.parent / VOLUME_FILE).read_text().strip() == ref.volume and not pet.exists()
    except OSError:
        return False


def observe(layout: Layout, hexdigest: str) -> DigestFacts | None:
    """Facts about one base, or None when it is gone."""
    try:
        base_ctime = layout.base(hexdigest).stat().st_ctime
    except FileNotFoundError:
        return None
    refs = references(layout, hexdigest)
    try:
        refs_mtime: float | None = layout.refs(hexdigest).stat().st_mtime
    except FileNotFoundError:
        refs_mtime = None
    names = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted((layout.root / "names").iterdir()):
            record = read_name(layout, entry.name)
            if record is not None and record.hex == hexdigest:
                names.append(entry.name)
    stale = frozenset(name for name, ref in refs.items() if _stale(ref))
    return DigestFacts(hexdigest, base_ctime, refs, refs_mtime, stale, tuple(names))


def _remove(layout: Layout, decision: Decision, names: tuple[str, ...]) -> None:
    """Apply one decision while holding the digest's lock."""
    for ref in decision.drop_refs:
        (layout.refs(decision.hex) / ref).unlink(missing_ok=True)
    if not decision.remove:
        return
    for name in names:
        record = read_name(layout, name)
        if record is not None and record.hex == decision.hex:
            layout.name(name).unlink(missing_ok=True)
    layout.base(decision.hex).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError, OSError):
        layout.refs(decision.hex).rmdir()
    layout.lock(decision.hex).unlink(missing_ok=True)


@dataclass
class GcReport:
    """What one gc run did (or would do, with ``dry_run``); printed as JSON."""

    dry_run: bool
    removed: list[dict[str, object]] = field(default_factory=list)  # digest, names, why
    kept: list[dict[str, object]] = field(default_factory=list)
    dropped_refs: list[str] = field(default_factory=list)
    tmp_removed: list[str] = field(default_factory=list)

    def removed_digests(self) -> list[str]:
        """``sha256:<hex>`` of each removed base."""
        return [str(entry["digest"]) for entry in self.removed]


def collect(root: Path, grace: float, dry_run: bool) -> GcReport:
    """Remove bases no reference has claimed for ``grace`` seconds, and stale downloads; return what was done.

    Each base is judged again while its lock is held; a base whose lock is busy is being claimed and is skipped.
    """
    layout = Layout(root)
    report = GcReport(dry_run)
    if not (root / "sha256").is_dir():
        return report
    check_locks(root)
    now = time.time()
    for entry in sorted((root / "sha256").iterdir()):
        if not HEX64.match(entry.name):
            continue
        guard = contextlib.nullcontext(True) if dry_run else locked(layout.lock(entry.name), blocking=False)
        with guard as held:
            if not held:
                report.kept.append({"digest": f"sha256:{entry.name}", "why": "being claimed (its lock is busy)"})
                continue
            facts = observe(layout, entry.name)
            if facts is None:
                continue
            decision = judge_digest(facts, now, grace)
            if not dry_run:
                _remove(layout, decision, facts.names)
        report.dropped_refs += [f"sha256:{decision.hex}/{ref}" for ref in decision.drop_refs]
        summary: dict[str, object] = {
            "digest": f"sha256:{decision.hex}",
            "names": list(facts.names),
            "why": decision.why,
        }
        (report.removed if decision.remove else report.kept).append(summary)
        for ref in decision.drop_refs:
            log.info("%s reference %s to sha256:%s: its pet is gone", _verb(dry_run, "dropped"), ref, decision.hex)
        if decision.remove:
            log.info("%s sha256:%s (%s)", _verb(dry_run, "removed"), decision.hex, decision.why)
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(layout.tmp.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime >= max(grace, TMP_MIN_AGE):
                    if not dry_run:
                        entry.unlink()
                    report.tmp_removed.append(entry.name)
    return report


def _verb(dry_run: bool, done: str) -> str:
    return f"would have {done}" if dry_run else done
