"""Backups of the pet as plain qcow2 chains, planned as data: the layout, the manifest, which kind of backup comes
next and why, the qemu-img and QMP documents that make it, what retention removes, and how a point is restored.

Layout (documented for users in docs/backups.md)::

    BACKUP_DIR/<hostname>/
        .lock                              held while a backup runs (one at a time, schedule and kubectl exec alike)
        last.json                          the last attempt's figures (status, metrics)
        <chain id>/                        a chain: one full backup and the incrementals after it
            manifest.json                  the points, written atomically after each completed backup
            0000-full.qcow2                a standalone copy of the disk at that instant
            0001-incremental.qcow2         the clusters changed since the point before, backed by it (relative name)
            0000-full.<disk>.qcow2         the same for each data disk (DATA_DISKS), of the same instant
            .0002-incremental.qcow2.partial  a backup in progress (or interrupted): never part of the chain

The pet carries one persistent dirty bitmap named after its chain (``podvm-<chain id>``). An incremental backup is
only taken when that bitmap is there, consistent, and the chain is intact; anything else makes the next backup a
full one, with the reason in the log. Each data disk carries the same bitmap, and every disk is copied by one QMP
transaction (an incremental one grouped: one job failing cancels all), so a point holds all disks of one instant or
none.
"""

import contextlib
import json
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from shared import documents
from shared.errors import ConfigError
from shared.files import list_below, read_small, stat_below
from vmrunner.pet.state import MACHINE, TPM_STATE, UEFI_VARS
from vmrunner.qemu import img
from vmrunner.run.argv import PET_NODE, data_node

Argv = tuple[str, ...]
BITMAP_PREFIX = "podvm-"
JOB_ID = "podvm-backup"
TARGET_NODE = "podvm-backup-target"
# qemu gets the target as a descriptor the runner opened (QMP add-fd into this set), qemu-img as its standard input:
# neither resolves a path on the backup volume, which another pod may write.
TARGET_FDSET = 25
MANIFEST = "manifest.json"
LAST = "last.json"
LOCK = ".lock"
PARTIAL = ".partial"
MANIFEST_MAX = 1 << 20
MANIFEST_VERSION = 1
# File systems whose copy_file_range copies the bytes in the kernel and never shares them (no reflinks).
COPYING_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "tmpfs"})
KINDS = ("full", "incremental")
_CHAIN_ID = re.compile(r"^\d{8}T\d{6}Z(-\d{1,3})?$")
_POINT_FILE = re.compile(r"^(\d{4})-(full|incremental)\.qcow2$")
# a point's copies of the VM's own files: NNNN.<suffix>
OWN_SUFFIX = {MACHINE: "machine.json", UEFI_VARS: "efivars.fd", TPM_STATE: "tpm"}
_OWN_FILE = re.compile(rf"^(\d{{4}})\.({'|'.join(re.escape(s) for s in OWN_SUFFIX.values())})$")
_DATA_FILE = re.compile(r"^(\d{4})-(full|incremental)\.([a-z0-9][a-z0-9_-]{0,19})\.qcow2$")


@dataclass(frozen=True)
class Point:
    """One completed backup: a file of its chain and the figures of the job that wrote it."""

    seq: int
    kind: str  # full or incremental
    file: str  # name inside the chain's directory
    time: str  # UTC, ISO 8601, the instant the backup started (its consistency point)
    unix: float
    copied: int  # bytes the job copied (the whole disk for a full backup, the changed clusters otherwise)
    size: int  # bytes of the file on the backup volume
    seconds: float
    frozen: bool  # the guest's file systems were frozen by its agent for that instant
    own: dict[str, str] = field(default_factory=dict)  # the VM's own files of that instant, by kind (ownstate)
    disks: dict[str, str] = field(default_factory=dict)  # each data disk's file of this point, by name


@dataclass(frozen=True)
class Chain:
    """A full backup and the incrementals after it, as the chain's manifest lists them."""

    id: str
    virtual_size: int
    points: tuple[Point, ...]
    data_sizes: dict[str, int] = field(default_factory=dict)  # each data disk's virtual size, by name

    @property
    def bitmap(self) -> str:
        """The pet's dirty bitmap that follows this chain."""
        return f"{BITMAP_PREFIX}{self.id}"

    def point_id(self, point: Point) -> str:
        """The name users give ``vmrunner restore``: ``<chain id>.<seq>``."""
        return f"{self.id}.{point.seq}"


@dataclass(frozen=True)
class Bitmap:
    """A dirty bitmap of the pet, as QMP reports it."""

    name: str
    inconsistent: bool
    recording: bool


@dataclass(frozen=True)
class Decision:
    """The next backup: its kind, the chain it extends (incremental) and why a full one is needed (full)."""

    kind: str
    reason: str
    chain: Chain | None


@dataclass(frozen=True)
class DataTarget:
    """One data disk's part of a backup: its node, its target file, and the job that copies it."""

    name: str
    node: str  # the data disk's node (data-<name>)
    file: str
    partial: Path
    create: Argv
    attach: dict[str, object]
    job_id: str
    fdset: int
    virtual_size: int
    remove_bitmaps: tuple[str, ...]

    @property
    def target_node(self) -> str:
        """The target's node in qemu while the job runs."""
        return str(self.attach["node-name"])

    @property
    def final(self) -> Path:
        """Where the target is renamed once the jobs completed."""
        return self.partial.parent / self.file


@dataclass(frozen=True)
class BackupPlan:
    """Everything one backup does, in order: remove stale bitmaps, create the target, attach it, start the job in
    one transaction, then (applied once the job completed) rename the target, record the point and remove the
    bitmaps of the chains no longer followed (only then: a failed full backup leaves the last chain extendable)."""

    kind: str
    reason: str
    chain_id: str
    seq: int
    directory: Path
    file: str
    partial: Path
    create: Argv
    attach: dict[str, object]
    transaction: dict[str, object]
    remove_bitmaps: tuple[str, ...]
    virtual_size: int
    previous: tuple[Point, ...]  # the points this backup follows in its chain (none for a full backup)
    data: tuple[DataTarget, ...] = ()  # each data disk's target, in the same transaction

    @property
    def final(self) -> Path:
        """Where the target is renamed once the job completed."""
        return self.directory / self.file

    @property
    def bitmap(self) -> str:
        """The dirty bitmap this backup's chain follows, on the pet and on every data disk."""
        return f"{BITMAP_PREFIX}{self.chain_id}"


def vm_root(backup_dir: Path, hostname: str) -> Path:
    """This VM's directory on the backup volume."""
    return backup_dir / hostname


def new_chain_id(now: datetime, taken: set[str]) -> str:
    """A sortable id from the UTC time of the chain's full backup, suffixed when one is already taken."""
    stem = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate, n = stem, 1
    while candidate in taken:
        candidate, n = f"{stem}-{n}", n + 1
    return candidate


def point_file(seq: int, kind: str) -> str:
    """The file name of a point: its sequence number first, so a directory listing shows the chain in order."""
    return f"{seq:04d}-{kind}.qcow2"


def data_file(seq: int, kind: str, name: str) -> str:
    """The file name of the data disk ``name`` in point ``seq``."""
    return f"{seq:04d}-{kind}.{name}.qcow2"


def own_file(seq: int, kind: str) -> str:
    """The name of point ``seq``'s copy of the VM's own file of ``kind``."""
    return f"{seq:04d}.{OWN_SUFFIX[kind]}"


def manifest_document(chain: Chain) -> bytes:
    """The manifest's JSON."""
    doc = {
        "version": MANIFEST_VERSION,
        "chain": chain.id,
        "bitmap": chain.bitmap,
        "virtual_size": chain.virtual_size,
        "points": [asdict(p) for p in chain.points],
        **({"data_disks": chain.data_sizes} if chain.data_sizes else {}),
    }
    return json.dumps(doc, indent=2).encode()


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0")
    return value


def _point(raw: object, expected_seq: int, data_sizes: Mapping[str, int]) -> Point:
    if not isinstance(raw, dict):
        raise ValueError("a point must be an object")
    try:
        point = Point(**raw)
    except TypeError as err:
        raise ValueError(f"a point has unexpected fields: {err}") from None
    _int(point.seq, "seq")
    _int(point.copied, "copied")
    _int(point.size, "size")
    match = _POINT_FILE.match(point.file) if isinstance(point.file, str) else None
    if point.seq != expected_seq or match is None or int(match.group(1)) != point.seq or match.group(2) != point.kind:
        raise ValueError(f"point {expected_seq}: expected the file {point_file(expected_seq, str(point.kind))}")
    if (point.kind == "full") != (expected_seq == 0):
        raise ValueError(f"point {expected_seq}: a chain is one full backup followed by incrementals")
    if not isinstance(point.time, str) or not isinstance(point.frozen, bool):
        raise ValueError(f"point {expected_seq}: time must be text and frozen true or false")
    if isinstance(point.unix, bool) or not isinstance(point.unix, int | float):
        raise ValueError(f"point {expected_seq}: unix must be a number")
    if isinstance(point.seconds, bool) or not isinstance(point.seconds, int | float):
        raise ValueError(f"point {expected_seq}: seconds must be a number")
    own = point.own
    if not isinstance(own, dict) or any(
        not isinstance(name, str)
        or (found := _OWN_FILE.match(name)) is None
        or OWN_SUFFIX.get(kind) != found.group(2)
        or int(found.group(1)) > point.seq
        for kind, name in own.items()
    ):
        raise ValueError(f"point {expected_seq}: own must name the VM's own files of this point or an earlier one")
    disks = point.disks
    if (
        not isinstance(disks, dict)
        or set(disks) != set(data_sizes)
        or any(disks[name] != data_file(point.seq, point.kind, name) for name in data_sizes)
    ):
        raise ValueError(f"point {expected_seq}: disks must name each data disk's file of this point")
    return point


def parse_manifest(data: bytes, directory_name: str) -> Chain:
    """A chain from its manifest, every field checked (a manifest is read before any file it names is opened).

    :raise ValueError: saying what is wrong.
    """
    doc = documents.parse(data, documents.exactly(MANIFEST_VERSION, "manifest"))
    if doc.get("chain") != directory_name or not _CHAIN_ID.match(directory_name):
        raise ValueError(f"the manifest is of chain {str(doc.get('chain'))[:40]!r}, in directory {directory_name}")
    points = doc.get("points")
    if not isinstance(points, list) or not points:
        raise ValueError("a manifest lists at least the full backup")
    sizes = doc.get("data_disks", {})
    if not isinstance(sizes, dict) or any(
        not isinstance(name, str) or not _DATA_FILE.match(data_file(0, "full", name)) for name in sizes
    ):
        raise ValueError("data_disks must map data disk names to their sizes")
    data_sizes = {name: _int(size, f"data_disks.{name}") for name, size in sizes.items()}
    return Chain(
        directory_name,
        _int(doc.get("virtual_size"), "virtual_size"),
        tuple(_point(raw, seq, data_sizes) for seq, raw in enumerate(points)),
        data_sizes,
    )


def read_chain(directory: Path) -> Chain:
    """The chain in ``directory``.

    :raise ValueError: when its manifest is missing, too large or malformed.
    """
    try:
        data = read_small(directory / MANIFEST, MANIFEST_MAX, root=directory.parent.parent)
    except OSError as err:
        raise ValueError(f"{directory / MANIFEST}: {err.strerror}") from None
    return parse_manifest(data, directory.name)


def read_chains(root: Path) -> tuple[list[Chain], list[Path]]:
    """The complete chains under ``root`` in time order, and the chain directories that have no usable manifest
    (an interrupted first backup, or damage)."""
    chains: list[Chain] = []
    broken: list[Path] = []
    for name in list_below(root.parent, root):
        found = stat_below(root.parent, root / name) if _CHAIN_ID.match(name) else None
        if found is None or not stat.S_ISDIR(found.st_mode):
            continue  # not a chain, or a link planted in the place of one: never followed
        directory = root / name
        try:
            chains.append(read_chain(directory))
        except ValueError:
            broken.append(directory)
    return chains, broken


def parse_bitmaps(nodes: object, node: str = PET_NODE) -> list[Bitmap]:
    """The dirty bitmaps of ``node`` from QMP ``query-named-block-nodes``."""
    out: list[Bitmap] = []
    for entry in nodes if isinstance(nodes, list) else []:
        if not isinstance(entry, dict) or entry.get("node-name") != node:
            continue
        for raw in entry.get("dirty-bitmaps") or []:
            if isinstance(raw, dict) and isinstance(raw.get("name"), str):
                out.append(Bitmap(raw["name"], bool(raw.get("inconsistent")), bool(raw.get("recording", True))))
    return out


def decide(
    chains: list[Chain],
    bitmaps: list[Bitmap],
    virtual_size: int,
    *,
    want_full: bool,
    interrupted: bool,
    chain_length: int,
    missing: tuple[str, ...] = (),
    data: Mapping[str, tuple[int, list[Bitmap]]] | None = None,
) -> Decision:
    """Full or incremental, and why: an incremental only extends the newest chain when the pet's bitmap for that
    chain is there and consistent, the chain is whole, not yet at its length, and no earlier backup into it ended at
    an unknown point (its job may have cleared the bitmap before the file was recorded). Pure, for unit tests.

    ``missing`` lists files of the newest chain that are gone from the volume; ``data`` gives each data disk's
    virtual size and bitmaps: an incremental also needs the same data disks as the chain, each of its size and with
    the chain's bitmap consistent.
    """
    chain = chains[-1] if chains else None
    if want_full:
        return Decision("full", "a full backup was asked for", None)
    if chain is None:
        return Decision("full", "no backup chain yet", None)
    named = {b.name: b for b in bitmaps}
    bitmap = named.get(chain.bitmap)
    if bitmap is None:
        why = "a new or restored disk, qemu stopped before saving it, or a backup failed after its copy"
        return Decision("full", f"the pet has no bitmap {chain.bitmap} ({why})", None)
    if bitmap.inconsistent:
        return Decision(
            "full", f"bitmap {chain.bitmap} is inconsistent: qemu stopped without saving it (a crash or kill)", None
        )
    if not bitmap.recording:
        return Decision("full", f"bitmap {chain.bitmap} is not recording", None)
    disks = dict(data or {})
    if {n: size for n, (size, _) in disks.items()} != chain.data_sizes:
        return Decision("full", f"the data disks changed since chain {chain.id} (names or sizes)", None)
    for name, (_, found) in sorted(disks.items()):
        mark = next((b for b in found if b.name == chain.bitmap), None)
        if mark is None or mark.inconsistent or not mark.recording:
            why = "missing" if mark is None else "inconsistent or not recording"
            return Decision("full", f"the data disk {name}'s bitmap {chain.bitmap} is {why}", None)
    if interrupted:
        return Decision("full", f"an earlier backup into chain {chain.id} was interrupted at an unknown point", None)
    if missing:
        return Decision("full", f"chain {chain.id} lost its files {', '.join(missing)}", None)
    if chain.virtual_size != virtual_size:
        return Decision("full", f"the disk's size changed from {chain.virtual_size} to {virtual_size} bytes", None)
    if len(chain.points) - 1 >= chain_length:
        return Decision("full", f"chain {chain.id} has {chain_length} incrementals (BACKUP_CHAIN_LENGTH)", None)
    return Decision("incremental", f"changes since {chain.point_id(chain.points[-1])}", chain)


def may_offload(fstypes: Iterable[str | None]) -> bool:
    """Whether the backup jobs may copy with copy_file_range, given the file system of each disk's volume: only
    where every one copies the bytes in the kernel (COPYING_FILESYSTEMS). On the backup volume's own file system
    that doubles a full backup (measured on ext4); onto another file system the kernel refuses and qemu reads and
    writes as before. Never where the file system could share the blocks instead (XFS or btrfs reflinks: the guest's
    next writes would fragment its disk, and the backup would be no separate copy), nor where it is unknown."""
    return all(fstype in COPYING_FILESYSTEMS for fstype in fstypes)


def _target_node(node: str, fdset: int) -> dict[str, object]:
    """A backup target as qemu opens it: the file the runner made (an fdset), its backing never opened (the job
    writes only; earlier files of the chain stay closed and unlocked), and its flushes off. qcow2 flushes its file
    before each batch of new metadata, and every such flush waits for all the data copied so far to reach the
    volume, so the job copied at the volume's speed while the guest paid for its copy-before-write the whole time;
    with them off the job runs at the page cache's, and the runner writes the target out with one fsync before it
    enters the chain (an interrupted target is never used, so its order of writes does not matter)."""
    return {
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"},
        "backing": None,
        "cache": {"no-flush": True},
    }


def _tuning(speed: int, offload: bool) -> dict[str, object]:
    """A backup job's speed limit (0: none) and copy method, the same for the pet's and every data disk's."""
    return {**({"speed": speed} if speed else {}), **({"x-perf": {"use-copy-range": True}} if offload else {})}


def plan_backup(
    root: Path,
    decision: Decision,
    virtual_size: int,
    bitmaps: list[Bitmap],
    *,
    chain_id: str,
    speed: int,
    offload: bool = False,
    data: Mapping[str, tuple[int, list[Bitmap]]] | None = None,
) -> BackupPlan:
    """The qemu-img and QMP documents of the backup ``decision`` chose. ``chain_id`` names a new chain (full);
    every other ``podvm-`` bitmap of the pet is removed after a full backup (its chain is no longer followed).
    ``data``: each data disk's virtual size and bitmaps, backed up in the same transaction (grouped); ``offload``:
    the jobs copy with copy_file_range (see :func:`may_offload`)."""
    if decision.kind == "incremental":
        assert decision.chain is not None
        chain = decision.chain
        seq, chain_id = len(chain.points), chain.id
        backing: tuple[str, ...] = ("-F", "qcow2", "-b", chain.points[-1].file)
    else:
        seq, backing = 0, ()
    directory = root / chain_id
    file = point_file(seq, decision.kind)
    partial = directory / f".{file}{PARTIAL}"
    bitmap = f"{BITMAP_PREFIX}{chain_id}"
    # -u: the backing file is named in the header, never opened (the restore checks the chain)
    create = ("qemu-img", "create", "-q", "-u", "-f", "qcow2", *backing, img.STDIN, str(virtual_size))
    attach = _target_node(TARGET_NODE, TARGET_FDSET)
    job: dict[str, object] = {
        "job-id": JOB_ID,
        "device": PET_NODE,
        "target": TARGET_NODE,
        "auto-dismiss": False,  # a finished job stays until dismissed, so its outcome is read, not guessed
        **_tuning(speed, offload),
    }
    actions: list[dict[str, object]] = []
    remove: tuple[str, ...] = ()
    if decision.kind == "full":
        remove = tuple(b.name for b in bitmaps if b.name.startswith(BITMAP_PREFIX) and b.name != bitmap)
        if any(b.name == bitmap for b in bitmaps):
            actions.append({"type": "block-dirty-bitmap-clear", "data": {"node": PET_NODE, "name": bitmap}})
        else:
            actions.append(
                {"type": "block-dirty-bitmap-add", "data": {"node": PET_NODE, "name": bitmap, "persistent": True}}
            )
        job["sync"] = "full"
    else:
        job.update({"sync": "incremental", "bitmap": bitmap, "bitmap-mode": "on-success"})
    actions.append({"type": "blockdev-backup", "data": job})
    targets = tuple(
        _data_target(
            directory,
            decision,
            name=name,
            size=size,
            bitmaps=found,
            seq=seq,
            chain_id=chain_id,
            tuning=_tuning(speed, offload),
            index=index,
            actions=actions,
        )
        for index, (name, (size, found)) in enumerate(sorted((data or {}).items()), start=1)
    )
    transaction: dict[str, object] = {"actions": actions}
    if targets and decision.kind == "incremental":
        # One job failing cancels all, so no disk's bitmap is cleared for a point that is never recorded. (qemu takes
        # no bitmap-add in a grouped transaction; a failed full backup clears no bitmap that a chain follows.)
        transaction["properties"] = {"completion-mode": "grouped"}
    return BackupPlan(
        kind=decision.kind,
        reason=decision.reason,
        chain_id=chain_id,
        seq=seq,
        directory=directory,
        file=file,
        partial=partial,
        create=create,
        attach=attach,
        transaction=transaction,
        remove_bitmaps=remove,
        virtual_size=virtual_size,
        previous=decision.chain.points if decision.chain is not None else (),
        data=targets,
    )


def _data_target(
    directory: Path,
    decision: Decision,
    *,
    name: str,
    size: int,
    bitmaps: list[Bitmap],
    seq: int,
    chain_id: str,
    tuning: dict[str, object],
    index: int,
    actions: list[dict[str, object]],
) -> DataTarget:
    """A data disk's target and its actions (appended to ``actions``), as the pet's."""
    node, bitmap = data_node(name), f"{BITMAP_PREFIX}{chain_id}"
    file = data_file(seq, decision.kind, name)
    backing: tuple[str, ...] = ()
    if decision.kind == "incremental":
        assert decision.chain is not None
        backing = ("-F", "qcow2", "-b", decision.chain.points[-1].disks[name])
    create = ("qemu-img", "create", "-q", "-u", "-f", "qcow2", *backing, img.STDIN, str(size))
    fdset = TARGET_FDSET + index
    attach = _target_node(f"{TARGET_NODE}-{name}", fdset)
    job: dict[str, object] = {"job-id": f"{JOB_ID}-{name}", "device": node, "target": attach["node-name"]}
    job.update({"auto-dismiss": False, **tuning})
    remove: tuple[str, ...] = ()
    if decision.kind == "full":
        remove = tuple(b.name for b in bitmaps if b.name.startswith(BITMAP_PREFIX) and b.name != bitmap)
        verb = "clear" if any(b.name == bitmap for b in bitmaps) else "add"
        extra = {"persistent": True} if verb == "add" else {}
        actions.append({"type": f"block-dirty-bitmap-{verb}", "data": {"node": node, "name": bitmap, **extra}})
        job["sync"] = "full"
    else:
        job.update({"sync": "incremental", "bitmap": bitmap, "bitmap-mode": "on-success"})
    actions.append({"type": "blockdev-backup", "data": job})
    partial = directory / f".{file}{PARTIAL}"
    return DataTarget(name, node, file, partial, create, attach, str(job["job-id"]), fdset, size, remove)


def plan_retention(chains: list[Chain], keep: int) -> list[str]:
    """The chains to remove once a new one is complete: all but the newest ``keep``."""
    return [chain.id for chain in chains[: max(0, len(chains) - keep)]]


def leftovers(root: Path, chains: list[Chain], broken: list[Path]) -> list[Path]:
    """What interrupted backups left: ``.partial`` files in complete chains, and chain directories without a
    usable manifest (removed whole only when they hold nothing but backup files and partials)."""
    out: list[Path] = []
    for chain in chains:
        out += [root / chain.id / n for n in list_below(root, root / chain.id) if n.endswith(PARTIAL)]
    for directory in broken:
        names = list_below(root, directory)
        if all(
            _POINT_FILE.match(n) or _DATA_FILE.match(n) or n.endswith(PARTIAL) or n.startswith(f".{MANIFEST}")
            for n in names
        ):
            out.append(directory)
    return out


def select_point(chains: list[Chain], wanted: str | None) -> tuple[Chain, Point]:
    """The point ``wanted`` names: ``<chain>.<seq>``, a chain id (its newest point), a UTC time (the newest point
    taken at or before it: ``2026-11-28T04:00:00Z`` or a prefix such as ``2026-11-28``), or the newest of all.

    :raise ConfigError: when nothing matches.
    """
    if not chains:
        raise ConfigError("no backup to restore: the backup volume holds no complete chain for this VM")
    if wanted is None:
        return chains[-1], chains[-1].points[-1]
    for chain in chains:
        if wanted == chain.id:
            return chain, chain.points[-1]
        for point in chain.points:
            if wanted == chain.point_id(point):
                return chain, point
    moment = _moment(wanted)
    if moment is None:
        raise ConfigError(f"restore {wanted!r}: no such point; expected CHAIN.SEQ, a chain id or a UTC time")
    found = [(c, p) for c in chains for p in c.points if p.unix <= moment]
    if not found:
        raise ConfigError(f"restore {wanted!r}: no backup was taken at or before that time")
    return max(found, key=lambda cp: cp[1].unix)


def _moment(text: str) -> float | None:
    """Unix time of a UTC time written in ISO 8601 (date, or date and time, ``Z`` optional)."""
    try:
        when = datetime.fromisoformat(text.removesuffix("Z"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if len(text.removesuffix("Z")) == 10:  # a date alone means the end of that day
        return when.timestamp() + 86400 - 1e-6
    return when.timestamp()


def plan_restore(layers: Sequence[str], staging: Path, fmt: str = "qcow2") -> Argv:
    """``qemu-img convert`` of a point into one standalone qcow2 at ``staging``, read through ``layers``: the files
    of its chain newest first (as :func:`expected_backings` lists them), each as the runner opened it
    (``/dev/fd/N``), each one's backing the next, the oldest's none: no backing is ever resolved by a name."""
    image: dict[str, object] | None = None
    for layer in reversed(layers):
        image = {"driver": "qcow2", "file": {"driver": "file", "filename": layer}, "backing": image}
    return ("qemu-img", "convert", "-p", "-O", fmt, f"json:{json.dumps(image)}", str(staging))


def expected_backings(chain: Chain, point: Point, disk: str | None = None) -> list[tuple[str, str | None]]:
    """The files a point is read through (the pet's, or the data disk ``disk``'s), newest first, each with the
    backing name its header must hold: every file is backed by the point before it, in the same directory, and the
    full backup by nothing."""
    files = [p.file if disk is None else p.disks[disk] for p in chain.points[: point.seq + 1]]
    return [(files[i], files[i - 1] if i else None) for i in range(len(files) - 1, -1, -1)]


def read_last(root: Path) -> dict[str, dict[str, object]]:
    """The backup figures record (empty when there is none, or a malformed one)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(read_small(root / LAST, MANIFEST_MAX, root=root.parent))
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k in ("last", "last_success") and isinstance(v, dict)}
    return {}


BOOT_SETTLE = 60.0  # seconds a freshly started guest boots undisturbed (less when BACKUP_INTERVAL is shorter)
RETRY_AFTER = 900.0  # seconds after a failed scheduled backup before the next try (less when BACKUP_INTERVAL is)


def next_backup_in(record: Mapping[str, Mapping[str, object]], now: float, interval: float, *, first: bool) -> float:
    """Seconds until the scheduled backup is due: ``interval`` after the last success, so restarting the pod more
    often than the interval never postpones it; not sooner than a retry pause after a failed attempt, nor while a
    fresh guest boots. Times in the record come from the backup volume: one in the future counts as now, so a bad
    clock or a forged record cannot hold the backups off for longer than ``interval``."""

    def at(entry: Mapping[str, object] | None) -> float | None:
        value = entry.get("time") if entry is not None else None
        return min(float(value), now) if isinstance(value, int | float) and value >= 0 else None

    success = at(record.get("last_success"))
    due = now if success is None else success + interval
    last = record.get("last")
    failed = at(last) if last is not None and last.get("result") == "failed" else None
    if failed is not None:
        due = max(due, failed + min(interval, RETRY_AFTER))
    if first:
        due = max(due, now + min(interval, BOOT_SETTLE))
    return max(0.0, due - now)
