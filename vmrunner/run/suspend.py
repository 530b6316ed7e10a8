"""Suspend on stop and resume on start: the running VM's devices and RAM saved to VM_DIR with qemu's own migration
stream, and taken up by the next start, wherever the volume is attached then.

A saved state is single use and bound to exactly what it was taken with: the VM's own files (disk, UEFI variables,
TPM state: :func:`vmrunner.pet.state.own_files`) by inode, size, mtime and ctime as they were once qemu had closed
them, the hardware (qemu's argv without what differs between two pods of one VM) and the stream's own digest. A
start whose files or hardware differ in any of these, or whose stream does not hash to the record, boots cold with
one line saying why, and the state is removed: RAM resumed on a disk written since would corrupt the guest's file
systems. The argv runs on the machine type pinned when the pet was first started (:mod:`vmrunner.run.machine`), so a
newer qemu in an upgraded image loads the stream on the machine it was taken on (qemu's compatibility rule); a qemu
that still refuses it boots cold.

Files on VM_DIR: ``<hostname>.suspended`` (the stream) with ``<hostname>.suspended.json`` (its record, written
last: a state without a record is no state), ``.<hostname>.suspending`` while a save runs (qemu writes it through
a descriptor the runner opened, never by path), ``.<hostname>.resuming`` once a start has claimed the state.
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from shared import documents, files
from shared.errors import PodvmError
from vmrunner.config import Config
from vmrunner.pet.state import MACHINE, SUSPENDED, own_files
from vmrunner.qemu import qmp
from vmrunner.run.argv import QemuPlan

log = logging.getLogger("vmrunner")
RECORD_VERSION = 1
RECORD_MAX = 64 << 10
# argv options whose value differs between two pods of one VM and does not reach the guest's devices
_VOLATILE = ("-name", "-vnc", "-chardev", "-mon", "-incoming")
STREAM_FD = "podvm-suspend"  # the name qemu knows the save's descriptor by
SAVE_POLL = 0.1  # seconds between two looks at a save's or a resume's progress
# qemu caps a migration at 128 MiB/s by default, a limit meant for live migration over a shared network: a save of a
# paused VM to its own volume should run at the volume's speed (measured: a 1 GiB guest's save 10.2 s -> 3.5 s).
SAVE_BANDWIDTH = 1 << 40


def stream_path(cfg: Config) -> Path:
    """The saved state: ``<hostname>.suspended`` beside the pet."""
    return cfg.vm_dir / f"{cfg.hostname}.suspended"


def record_path(cfg: Config) -> Path:
    """The saved state's record, written last."""
    return cfg.vm_dir / f"{cfg.hostname}.suspended.json"


def saving_path(cfg: Config) -> Path:
    """Where a save in progress writes."""
    return cfg.vm_dir / f".{cfg.hostname}.suspending"


def claimed_path(cfg: Config) -> Path:
    """A state a start has taken: never used again, whatever happens next."""
    return cfg.vm_dir / f".{cfg.hostname}.resuming"


@dataclass(frozen=True)
class Record:
    """What a saved state is bound to."""

    version: int
    sha256: str  # of the stream
    size: int
    hardware: str  # digest of qemu's argv without its volatile options and the machine type
    machine: str  # ``-machine`` as the argv had it, options included (``pc-q35-7.2,smm=on``)
    pinned: str  # its versioned type alone (``pc-q35-7.2``); an alias in ``machine`` was resolved to it
    saved: float  # unix time of the save
    seconds: float  # how long the save took
    own: dict[str, list[int]] = field(default_factory=dict)  # path name -> [inode, size, mtime_ns, ctime_ns]


def hardware_digest(argv: tuple[str, ...]) -> tuple[str, str]:
    """``(digest, machine)``: what the guest's devices are made of, without the machine type (compared apart, as
    a state saved on an alias resumes on its versioned name) and the options that differ between two pods of one
    VM."""
    kept: list[str] = []
    machine = ""
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in _VOLATILE or arg == "-S":
            skip = arg != "-S"
            continue
        if arg == "-machine" and i + 1 < len(argv):
            machine, skip = argv[i + 1], True
            continue
        # vhost-net is the host's way of moving the NIC's packets, not a device the guest sees: a state saved with it
        # resumes in a pod without /dev/vhost-net and the other way round.
        kept.append(arg.replace(",vhost=on", "") if argv[i - 1 : i] == ("-netdev",) else arg)
    return hashlib.sha256("\0".join(kept).encode()).hexdigest(), machine


def runs_on(record: Record) -> str:
    """The ``-machine`` value a state was taken on: its versioned type with the options the argv had."""
    return record.pinned + "".join(record.machine.partition(",")[1:])


def fingerprints(cfg: Config) -> dict[str, list[int]]:
    """Each of the VM's own files (a folder's regular files one by one) as ``[inode, size, mtime_ns, ctime_ns]``:
    a write, a restore, a rebase or a copy changes at least one of them (ctime cannot be set back)."""
    found: dict[str, list[int]] = {}
    for own in own_files(cfg):
        if own.kind in (SUSPENDED, MACHINE):  # the machine type is compared on its own (judge)
            continue
        info = files.stat_below(own.root(cfg.vm_dir), own.path)
        if info is None:
            continue
        if own.volume is not None:  # a data disk: its full path, as its name may be the name of a file on VM_DIR
            found[str(own.path)] = _print(info)
        elif stat.S_ISDIR(info.st_mode):
            for name in files.list_below(cfg.vm_dir, own.path):
                inner = files.stat_below(cfg.vm_dir, own.path / name)
                if inner is not None and stat.S_ISREG(inner.st_mode):
                    found[f"{own.path.name}/{name}"] = _print(inner)
        else:
            found[own.path.name] = _print(info)
    return found


def _print(info: os.stat_result) -> list[int]:
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def judge(record: Record, now_own: dict[str, list[int]], hardware: str, machine: str) -> str | None:
    """Why the state cannot be resumed on what is there now; None when it can. Pure."""
    if record.own != now_own:
        changed = sorted(set(record.own) ^ set(now_own) | {k for k in record.own if now_own.get(k) != record.own[k]})
        return f"{', '.join(changed)} changed since the save (written, restored or rebased)"
    if machine not in (record.machine, runs_on(record)):
        return f"the machine is {machine!r} now, the state was saved on {runs_on(record)!r}"
    if record.hardware != hardware:
        return "the VM's hardware settings changed since the save (memory, CPUs, devices or firmware)"
    return None


def parse_record(data: bytes) -> Record:
    """A record from its JSON, every field checked.

    :raise ValueError: saying what is wrong.
    """
    doc = documents.parse(data, documents.exactly(RECORD_VERSION, "suspended state record"))
    try:
        record = Record(**doc)
    except TypeError as err:
        raise ValueError(f"unexpected fields: {err}") from None
    if not isinstance(record.own, dict) or not all(
        isinstance(v, list) and len(v) == 4 and all(isinstance(n, int) for n in v) for v in record.own.values()
    ):
        raise ValueError("own must map each file to four whole numbers")
    if not isinstance(record.sha256, str) or len(record.sha256) != 64 or not isinstance(record.size, int):
        raise ValueError("sha256 and size must describe the stream")
    return record


def record_document(record: Record) -> bytes:
    """The record's JSON."""
    return json.dumps(asdict(record), indent=2).encode()


def discard(cfg: Config, why: str) -> None:
    """Remove a saved (or claimed) state, saying why when there was one."""
    existed = False
    for path in (record_path(cfg), stream_path(cfg), claimed_path(cfg)):
        if files.stat_below(cfg.vm_dir, path) is not None:
            existed = True
            files.remove_below(cfg.vm_dir, path)
    if existed:
        files.fsync_directory(cfg.vm_dir)
        if why:
            log.warning("suspended state of %s discarded: %s; booting cold", cfg.hostname, why)


def release(cfg: Config) -> None:
    """The claimed state is spent (resumed, or refused by qemu): never taken up again."""
    files.remove_below(cfg.vm_dir, claimed_path(cfg))


@dataclass(frozen=True)
class Claim:
    """A saved state a start took: the stream's descriptor (qemu reads it) and the machine to resume with."""

    fd: int
    record: Record


def _load(cfg: Config) -> tuple[Record | None, str]:
    """The saved state's record, or None and why ("" when there is no state at all)."""
    raw = files.read_record(record_path(cfg), RECORD_MAX, cfg.vm_dir)
    if raw is None:
        stream = files.stat_below(cfg.vm_dir, stream_path(cfg))
        return None, "" if stream is None else "it has no record (the save did not finish)"
    try:
        return parse_record(raw), ""
    except ValueError as err:
        return None, f"its record is unusable ({err})"


def saved(cfg: Config) -> Record | None:
    """The saved state's record as it stands, not yet judged (None without one): what machine it was taken on."""
    return _load(cfg)[0]


def verdict(cfg: Config, argv: tuple[str, ...]) -> tuple[Record | None, str]:
    """The saved state's record when it may be resumed on this start's files and ``argv``, else None and why
    ("" when there is no state at all). Reads only."""
    record, missing = _load(cfg)
    if record is None:
        return None, missing
    hardware, machine = hardware_digest(argv)
    why = judge(record, fingerprints(cfg), hardware, machine)
    return (record, "") if why is None else (None, why)


def describe(cfg: Config, argv: tuple[str, ...]) -> dict[str, object] | None:
    """What the next start does with a saved state (for ``vmrunner plan``): None without one."""
    record, why = verdict(cfg, argv)
    if record is None and not why:
        return None
    if record is None:
        return {"resumes": False, "why": why}
    return {"resumes": True, "saved": record.saved, "size": record.size, "machine": runs_on(record)}


def claim(cfg: Config, argv: tuple[str, ...]) -> Claim | None:
    """The saved state, when :func:`verdict` allows it: renamed out of reach first (never used twice), its record
    removed, the stream hashed against the record. Otherwise None, the state removed with one line saying why."""
    record, why = verdict(cfg, argv)
    if record is None:
        discard(cfg, why)
        return None
    parent = files.open_below(cfg.vm_dir, cfg.vm_dir)
    try:
        os.rename(stream_path(cfg).name, claimed_path(cfg).name, src_dir_fd=parent, dst_dir_fd=parent)
        os.unlink(record_path(cfg).name, dir_fd=parent)
        os.fsync(parent)
    finally:
        os.close(parent)
    fd = files.open_file(claimed_path(cfg), cfg.vm_dir)
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
        size += len(chunk)
    if (digest.hexdigest(), size) != (record.sha256, record.size):
        os.close(fd)
        discard(cfg, f"the stream is damaged ({size} bytes, expected {record.size}, or its digest differs)")
        return None
    os.lseek(fd, 0, os.SEEK_SET)
    log.info("resuming the VM saved %s ago (%d MiB)", _ago(record.saved), record.size >> 20)
    return Claim(fd, record)


def _ago(when: float) -> str:
    seconds = max(0, int(time.time() - when))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


@dataclass(frozen=True)
class Saver:
    """What a run that may be suspended keeps ready: the file a save writes and the cold argv (on the pinned
    machine type) the state will be bound to."""

    cfg: Config
    fd: int
    cold_argv: tuple[str, ...]


def resumed_plan(plan: QemuPlan, taken: Claim) -> QemuPlan:
    """The cold plan made to take up the claimed state: paused (``-S``) until the stream is in, the stream on an
    inherited descriptor."""
    argv = (*plan.argv, "-S", "-incoming", f"fd:{taken.fd}")
    return replace(plan, argv=argv, incoming=taken.fd, pass_fds=(*plan.pass_fds, taken.fd))


def open_saving(cfg: Config) -> int:
    """The file a save will write, made empty (0600, never through a link) at the start: qemu gets it by
    descriptor when SIGTERM comes, so nothing on VM_DIR is resolved by path then."""
    parent = files.open_below(cfg.vm_dir, cfg.vm_dir)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(saving_path(cfg).name, dir_fd=parent)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(saving_path(cfg).name, flags, 0o600, dir_fd=parent)
    finally:
        os.close(parent)


async def save(monitor: Path, fd: int, budget: float) -> float:
    """Pause the VM, stop any block job (a backup), and write devices and RAM through ``fd`` with qemu's
    migration, within ``budget`` seconds; the seconds it took. Made durable before it returns.

    :raise PodvmError: saying why the state is not saved (the caller resumes the guest and shuts it down).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + budget
    await qmp.execute(monitor, "stop")
    jobs = await qmp.execute(monitor, "query-jobs")
    for job in jobs if isinstance(jobs, list) else []:
        if isinstance(job, dict) and job.get("status") not in ("concluded", "null"):
            log.info("suspend: cancelling the running %s job %s first", job.get("type"), job.get("id"))
            with contextlib.suppress(PodvmError):
                await qmp.execute(monitor, "job-cancel", arguments={"id": job["id"]})
    commands: list[qmp.Command] = [
        ("getfd", {"fdname": STREAM_FD}),
        ("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH}),
        ("migrate", {"uri": f"fd:{STREAM_FD}"}),
    ]
    await qmp.session(monitor, commands, qmp.TIMEOUT, fd=fd)
    delay = qmp.FIRST_LOOK
    while True:
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))  # a look at the deadline, not past it
        info = await qmp.execute(monitor, "query-migrate")
        delay = _next_look(info, loop.time() - started)
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            break
        if status in ("failed", "cancelled") or status is None:
            why = info.get("error-desc", status) if isinstance(info, dict) else status
            raise PodvmError(f"qemu could not save the VM: {why}")
        if loop.time() > deadline:
            with contextlib.suppress(PodvmError):
                await qmp.execute(monitor, "migrate_cancel")
            raise PodvmError(f"SUSPEND_TIMEOUT={budget:g}s: the save did not finish in time")
    os.fsync(fd)
    return loop.time() - started


def _next_look(info: object, elapsed: float) -> float:
    """When a save ``query-migrate`` answered ``info`` about is worth another look: when it should end at its pace."""
    ram = info.get("ram") if isinstance(info, dict) else None
    total, left = (ram.get("total"), ram.get("remaining")) if isinstance(ram, dict) else (None, None)
    if not (isinstance(total, int) and isinstance(left, int)):
        return SAVE_POLL
    return qmp.next_look(total - left, total, elapsed, SAVE_POLL)


async def undo(monitor: Path) -> None:
    """After a failed save: no migration left, and the guest running again (it is then shut down as usual)."""
    with contextlib.suppress(PodvmError):
        await qmp.execute(monitor, "migrate_cancel")
    with contextlib.suppress(PodvmError):
        await qmp.execute(monitor, "cont")


def commit(cfg: Config, fd: int, cold_argv: tuple[str, ...], seconds: float) -> Record:
    """Once qemu has exited after a save: the stream renamed into place, then its record written (last).

    :raise OSError: when VM_DIR refuses either (no state is then left that a start could take).
    """
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    size = 0
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
        size += len(chunk)
    parent = files.open_below(cfg.vm_dir, cfg.vm_dir)
    try:
        os.rename(saving_path(cfg).name, stream_path(cfg).name, src_dir_fd=parent, dst_dir_fd=parent)
        os.fsync(parent)
    finally:
        os.close(parent)
    hardware, machine = hardware_digest(cold_argv)
    record = Record(
        RECORD_VERSION,
        digest.hexdigest(),
        size,
        hardware,
        machine,
        machine.split(",", 1)[0],
        time.time(),
        round(seconds, 3),
        fingerprints(cfg),
    )
    files.write_atomic(record_path(cfg), record_document(record), 0o600, root=cfg.vm_dir)
    return record


async def resumed(monitor: Path, stream: int, exited: "asyncio.Task[int]") -> float:
    """Wait until qemu has read the stream (or exited refusing it), then let the guest run; the seconds it took.
    qemu reads through a descriptor that shares its offset with ``stream``, so the read's pace says when to look.

    :raise ResumeRefused: when qemu exits while reading it.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    size = os.fstat(stream).st_size
    while not exited.done():
        try:
            status = await qmp.execute(monitor, "query-status")
        except PodvmError:
            if exited.done():
                break
            raise
        if isinstance(status, dict) and status.get("status") not in ("inmigrate", None):
            await qmp.execute(monitor, "cont")
            return loop.time() - started
        read = os.lseek(stream, 0, os.SEEK_CUR)
        await asyncio.sleep(qmp.next_look(read, size, loop.time() - started, SAVE_POLL))
    raise ResumeRefused("qemu exited while reading the saved state")


class ResumeRefused(PodvmError):
    """qemu would not take up the saved state; the runner boots cold."""
