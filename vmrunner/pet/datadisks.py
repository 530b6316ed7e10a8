"""The VM's data disks (DATA_DISKS): each made once on a volume of its own, grown but never shrunk, bound to its VM
by an owner record beside it, and locked while the runner runs, so two VMs never open one disk.

The volume may be written by other pods: every file is opened below the volume's descriptor without following a
link or waiting on a FIFO (:mod:`shared.files`), and qemu-img works on the descriptor the runner opened (its
standard input), never on a path. A disk whose header names a backing or an external data file is refused: a disk
the runner made has neither, and one planted on the volume would make qemu read a file of the runner's.

The owner record ``.<name>.owner`` says which VM the disk belongs to and whether it was made: it is written before
the disk is made (``made: false``) and again once the disk is in place, so a disk is never made twice, a disk that
vanished is never silently replaced by an empty one, and a disk without a record (or another VM's) is refused.
"""

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from shared import files
from shared.errors import ConfigError, PodvmError, escape_controls
from vmrunner.config import Config, DataDisk
from vmrunner.qemu import img

log = logging.getLogger("vmrunner.datadisks")
Argv = tuple[str, ...]
OWNER_MAX = 1024  # bytes of an owner record: a hostname and a flag


@dataclass(frozen=True)
class Owner:
    """What a disk's owner record says: the VM's hostname and whether its disk was made."""

    vm: str
    made: bool


@dataclass(frozen=True)
class Ready:
    """A data disk checked for this start: its virtual size as qemu will see it."""

    disk: DataDisk
    virtual_size: int


def parse_owner(data: bytes | None) -> Owner | None:
    """The owner record, None when missing or unreadable (treated as no record: the disk is then refused)."""
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("vm"), str) or not isinstance(doc.get("made"), bool):
        return None
    return Owner(doc["vm"], doc["made"])


def owner_document(hostname: str, made: bool) -> bytes:
    return json.dumps({"vm": hostname, "made": made}).encode()


def judge(disk: DataDisk, owner: Owner | None, exists: bool, hostname: str) -> str | None:
    """What to do with the disk: ``"create"``, ``"use"``; or raise the refusal. Pure, for unit tests.

    :raise ConfigError: for another VM's disk, a disk without a record, or one that vanished after it was made.
    """
    if owner is not None and owner.vm != hostname:
        raise ConfigError(
            f"{disk.setting}: {disk.path} belongs to the VM {escape_controls(owner.vm)!r} ({disk.owner_path.name}), "
            f"not to HOSTNAME={hostname}; refused"
        )
    if exists:
        if owner is None:
            raise ConfigError(
                f"{disk.setting}: {disk.path} has no owner record {disk.owner_path.name}; a disk of unknown origin is "
                f'refused (to adopt it, write {{"vm": "{hostname}", "made": true}} there)'
            )
        return "use"
    if owner is not None and owner.made:
        raise ConfigError(
            f"{disk.setting}: {disk.path} is missing, but {disk.owner_path.name} says it was made; not making an empty "
            "disk in its place: restore it (vmrunner restore), or remove the record to start afresh"
        )
    return "create"


def plan_create(disk: DataDisk) -> Argv:
    """qemu-img create of the disk on the new file the runner opened (its standard input)."""
    return ("qemu-img", "create", "-q", "-f", disk.format, img.STDIN, str(disk.size))


def plan_grow(disk: DataDisk, current: int) -> Argv | None:
    """Grow the disk to its DATA_DISKS size; None when it is that size or larger (never shrunk, said once)."""
    if disk.size <= current:
        if disk.size < current:
            log.warning(
                "%s: %s is %d bytes, larger than the %d asked: disks are never shrunk",
                disk.setting,
                disk.path,
                current,
                disk.size,
            )
        return None
    return ("qemu-img", "resize", "-q", "-f", disk.format, img.STDIN, str(disk.size))


def plan_info(disk: DataDisk) -> Argv:
    """qemu-img info of the open disk (``-U``: also while a qemu holds it, for ``status``)."""
    return ("qemu-img", "info", "-U", "-f", disk.format, "--output=json", img.STDIN)


def header_problem(info: object) -> str | None:
    """Why the disk's header is refused (a backing or external data file), None when it is plain. Pure."""
    if not isinstance(info, dict) or not isinstance(info.get("virtual-size"), int):
        return "qemu-img info printed no usable JSON"
    if info.get("backing-filename") or info.get("full-backing-filename"):
        return f"its header names the backing file {str(info.get('backing-filename'))[:200]!r}"
    data = ((info.get("format-specific") or {}).get("data") or {}) if isinstance(info, dict) else {}
    if isinstance(data, dict) and data.get("data-file"):
        return f"its header names the external data file {str(data.get('data-file'))[:200]!r}"
    return None


def _job(disk: DataDisk, doing: str) -> img.Job:
    return img.Job(str(disk.path), doing, f"{disk.setting} ({disk.directory})")


def _read_owner(disk: DataDisk) -> Owner | None:
    return parse_owner(files.read_record(disk.owner_path, OWNER_MAX, disk.directory))


def _write_owner(disk: DataDisk, hostname: str, made: bool) -> None:
    files.write_atomic(disk.owner_path, owner_document(hostname, made), 0o600, root=disk.directory)


def _create(cfg: Config, disk: DataDisk) -> None:
    """Make the disk under a new name beside it, then link it into place (never over a disk that appeared)."""
    _write_owner(disk, cfg.hostname, False)
    directory = files.open_below(disk.directory, disk.directory)
    staging = f".{disk.path.name}.{secrets.token_hex(6)}.tmp"
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(staging, flags, 0o600, dir_fd=directory)
        try:
            img.run(plan_create(disk), _job(disk, f"creating the data disk {disk.name}"), stdin=fd)
            os.fsync(fd)
            try:
                os.link(staging, disk.path.name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)
            except FileExistsError:
                raise PodvmError(f"{disk.setting}: {disk.path} appeared while it was being made; refused") from None
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging, dir_fd=directory)
        os.fsync(directory)
    finally:
        os.close(directory)
    _write_owner(disk, cfg.hostname, True)
    log.info("created data disk %s: %s (%s, %d bytes, %s)", disk.name, disk.path, disk.format, disk.size, disk.bus)


def inspect(disk: DataDisk) -> int:
    """The disk's virtual size, its header checked through a descriptor opened without following a link.

    :raise PodvmError: when it is not a regular file, or its header names another file.
    """
    try:
        fd = files.open_file(disk.path, disk.directory)
    except (OSError, files.Forged) as err:
        raise PodvmError(f"{disk.setting}: {disk.path} cannot be opened as a regular file: {err}") from None
    try:
        out = img.run(plan_info(disk), _job(disk, f"reading the data disk {disk.name}"), stdin=fd)
    finally:
        os.close(fd)
    try:
        info = json.loads(out)
    except ValueError:
        info = None
    problem = header_problem(info)
    if problem is not None:
        raise PodvmError(f"{disk.setting}: {disk.path}: {problem}; refused")
    assert isinstance(info, dict)
    return int(info["virtual-size"])


def _prepare(cfg: Config, disk: DataDisk) -> Ready:
    exists = files.stat_below(disk.directory, disk.path) is not None
    owner = _read_owner(disk)
    if judge(disk, owner, exists, cfg.hostname) == "create":
        _create(cfg, disk)
    elif owner is not None and not owner.made:  # made, then stopped before its record said so
        _write_owner(disk, cfg.hostname, True)
    size = inspect(disk)
    grow = plan_grow(disk, size)
    if grow is not None:
        fd = files.open_file(disk.path, disk.directory, writable=True)
        try:
            img.run(grow, _job(disk, f"growing the data disk {disk.name}"), stdin=fd)
        finally:
            os.close(fd)
        log.info("grew data disk %s (%s) from %d to %d bytes", disk.name, disk.path, size, disk.size)
        size = inspect(disk)
    return Ready(disk, size)


@contextlib.contextmanager
def held(cfg: Config) -> Iterator[tuple[Ready, ...]]:
    """Lock every data disk (refused at once when another runner holds one), then make, check and grow each; the
    locks are held until the block ends (the runner's whole run).

    :raise ConfigError: for a disk of another VM, or one in use by another runner.
    :raise PodvmError: for a volume that cannot be written, or a forged disk.
    """
    with contextlib.ExitStack() as stack:
        ready: list[Ready] = []
        for disk in cfg.data_disks:
            if not disk.directory.is_dir():
                raise ConfigError(f"{disk.setting}: {disk.directory} is not a directory (mount its volume there)")
            try:
                locked = stack.enter_context(files.locked(disk.lock_path, disk.directory, blocking=False))
            except files.Forged as err:
                raise PodvmError(f"{disk.setting}: {err}; refused") from None
            except OSError as err:
                raise PodvmError(f"{disk.setting}: cannot lock {disk.lock_path}: {err.strerror}") from None
            if not locked:
                raise ConfigError(
                    f"{disk.setting}: {disk.path} is in use by another VM (its lock {disk.lock_path.name} is held)"
                )
            try:
                ready.append(_prepare(cfg, disk))
            except OSError as err:
                raise PodvmError(f"{disk.setting} ({disk.directory}): {err.strerror}: {err.filename}") from None
        yield tuple(ready)


def describe(cfg: Config) -> list[dict[str, object]]:
    """Each data disk for ``plan`` and ``status``: where, its settings, its owner and size now (read-only)."""
    shown: list[dict[str, object]] = []
    for disk in cfg.data_disks:
        exists = disk.path.exists()
        owner = _read_owner(disk) if disk.directory.is_dir() else None
        size: int | None = None
        problem = None
        if exists:
            try:
                size = inspect(disk)
            except PodvmError as err:
                problem = str(err)
        try:
            next_start = judge(disk, owner, exists, cfg.hostname)
        except ConfigError as err:
            next_start, problem = "refused", problem or str(err)
        grow = size is not None and disk.size > size
        shown.append({
            "name": disk.name,
            "path": str(disk.path),
            "bus": disk.bus,
            "format": disk.format,
            "size": disk.size,
            "exists": exists,
            "virtual_size": size,
            "owner": owner.vm if owner is not None else None,
            "next_start": "grow" if next_start == "use" and grow else next_start,
            "problem": problem,
        })  # fmt: skip
    return shown
