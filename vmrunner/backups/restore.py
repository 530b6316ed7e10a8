"""Restores applied: a standalone pet disk in VM_DIR made from a backup point, and each data disk of the same point
on its own volume, never over a disk in use."""

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from shared import files
from shared.errors import ConfigError, PodvmError
from shared.files import fsync_directory
from vmrunner.backups import plans
from vmrunner.backups.job import NAME, PROGRESS_EVERY, mib
from vmrunner.backups.ownstate import restore_own
from vmrunner.backups.plans import Chain, Point
from vmrunner.config import Config, DataDisk
from vmrunner.pet import datadisks
from vmrunner.pet.binding import trust_path_of
from vmrunner.qemu import img
from vmrunner.run import suspend

log = logging.getLogger("vmrunner.backup")
# One file of a chain, read through the runner's descriptor (its standard input), its backing file never opened.
INFO = ("qemu-img", "info", "-f", "qcow2", "--output=json", img.STDIN)
CHECK = (
    "qemu-img",
    "check",
    "-q",
    "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {"filename": img.STDIN}}),
)


@contextlib.contextmanager
def _checked_chain(
    cfg: Config, chain_dir: Path, chain: Chain, point: Point, disk: str | None = None
) -> Iterator[list[int]]:
    """Descriptors of every file the point is read through, newest first, each opened below BACKUP_DIR without a
    link or a FIFO, passing ``qemu-img check`` and backed by exactly the point before it in the same directory (a
    tampered header cannot make the restore read another file); held open, so the copy reads what was checked.

    :raise PodvmError: naming the file at fault.
    """
    with contextlib.ExitStack() as opened:
        fds: list[int] = []
        for name, backing in plans.expected_backings(chain, point, disk):
            path = chain_dir / name
            try:
                fd = files.open_file(path, cfg.backup_dir)
            except (OSError, files.Forged):
                raise PodvmError(
                    f"{path}: missing from the backup volume; point {chain.point_id(point)} cannot be read"
                ) from None
            opened.callback(os.close, fd)
            fds.append(fd)
            _check_file(path, fd, f"point {chain.point_id(point)}", backing)
        yield fds


def _check_file(path: Path, fd: int, point: str, backing: str | None) -> None:
    try:
        out = img.run(INFO, img.Job(str(path), f"reading {point}"), stdin=fd)
        info = json.loads(out)
    except (PodvmError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise PodvmError(f"{path}: not a readable qcow2; {point} cannot be restored")
    got = info.get("backing-filename")
    fmt = info.get("backing-filename-format")
    if got != backing or (backing is not None and fmt != "qcow2") or info.get("data-file"):
        raise PodvmError(f"{path}: its header names the backing file {got!r}, expected {backing!r}; refused")
    img.run(CHECK, img.Job(str(path), f"checking {point}"), stdin=fd)


def restore(cfg: Config, wanted: str | None, name: str | None, overwrite: bool) -> Path:
    """Make a standalone pet from a backup point: into VM_DIR as ``<hostname>.qcow2`` (or ``<name>.qcow2``),
    never over an existing disk unless ``overwrite``.

    :raise ConfigError: for an unknown point, a bad name, or an existing disk without ``overwrite``.
    :raise PodvmError: for a damaged chain, a disk in use, or a failed copy.
    """
    if name is not None and not NAME.match(name):
        raise ConfigError(f"restore --name {name!r}: expected up to 63 letters, digits and '-'")
    root = plans.vm_root(cfg.backup_dir, cfg.hostname)
    chains, _ = plans.read_chains(root)
    chain, point = plans.select_point(chains, wanted)
    chain_dir = root / chain.id
    dest = cfg.vm_dir / f"{name or cfg.hostname}.qcow2"
    if dest.exists() and not overwrite:
        raise ConfigError(
            f"{dest} exists: restore beside it with --name NAME, or replace it with --overwrite (with the VM stopped)"
        )
    disks = _data_disks(cfg, point, name, overwrite)
    with contextlib.ExitStack() as held:
        for disk in disks:  # a runner holds them while its VM runs: never restored under it
            _lock(held, disk)
        layers = held.enter_context(_checked_chain(cfg, chain_dir, chain, point))
        data_layers = [held.enter_context(_checked_chain(cfg, chain_dir, chain, point, d.name)) for d in disks]
        _restore(cfg, dest, chain, point, layers, overwrite=overwrite)  # every file checked before any is written
        for disk, fds in zip(disks, data_layers, strict=True):
            _restore_data(cfg, disk, chain, point, fds)
    for own in restore_own(cfg, chain_dir, chain, point, name or cfg.hostname):
        log.info("restore: %s of the same point", own)
    if name in (None, cfg.hostname):
        suspend.discard(cfg, "the disk was restored from a backup")  # its RAM would not match the restored disk
    return dest


def _data_disks(cfg: Config, point: Point, name: str | None, overwrite: bool) -> list[DataDisk]:
    """The data disks of the point, each one DATA_DISKS names, restored with the pet (checked before anything is
    written).

    :raise ConfigError: for a point's data disk DATA_DISKS does not name, a restore beside the VM (``--name``) of a
    point with data disks, or an existing data disk without ``overwrite``.
    """
    if not point.disks:
        return []
    if name not in (None, cfg.hostname):
        raise ConfigError(
            f"restore --name {name}: the point holds data disks ({', '.join(sorted(point.disks))}), which are restored "
            "in place only: restore with --overwrite, the VM stopped"
        )
    configured = {d.name: d for d in cfg.data_disks}
    unknown = sorted(set(point.disks) - set(configured))
    if unknown:
        raise ConfigError(
            f"restore: the point holds the data disks {', '.join(unknown)}, which DATA_DISKS does not name"
        )
    for extra in sorted(set(configured) - set(point.disks)):
        log.warning("restore: the data disk %s is not in this point; it is left as it is", extra)
    disks = [configured[n] for n in sorted(point.disks)]
    for disk in disks:
        if disk.path.exists() and not overwrite:
            raise ConfigError(f"{disk.setting}: {disk.path} exists: replace it with --overwrite (with the VM stopped)")
        if not disk.directory.is_dir():
            raise ConfigError(f"{disk.setting}: {disk.directory} is not a directory (mount its volume there)")
    return disks


def _lock(held: contextlib.ExitStack, disk: DataDisk) -> None:
    try:
        locked = held.enter_context(files.locked(disk.lock_path, disk.directory, blocking=False))
    except (OSError, files.Forged) as err:
        raise PodvmError(f"{disk.setting}: cannot lock {disk.lock_path}: {err}") from None
    if not locked:
        raise ConfigError(f"{disk.setting}: {disk.path} is in use by a running VM; stop it before restoring")


def _restore_data(cfg: Config, disk: DataDisk, chain: Chain, point: Point, layers: list[int]) -> None:
    """The data disk of the point into its volume, in its format, replacing the old one whole; bound to this VM."""
    staging = disk.directory / f".{disk.path.name}.restore.tmp"
    files.remove_below(disk.directory, staging)
    log.info("restore: data disk %s of point %s into %s", disk.name, chain.point_id(point), disk.path)
    argv = plans.plan_restore([f"/dev/fd/{fd}" for fd in layers], staging, disk.format)
    try:
        progress = img.percent_lines(lambda percent: log.info("restore: %s %s%%", disk.name, percent), PROGRESS_EVERY)
        volume = f"{disk.setting} ({disk.directory})"
        img.run(argv, img.Job(str(disk.path), "restoring", volume, img.COPY), progress, pass_fds=layers)
        fd = files.open_file(staging, disk.directory)  # the file qemu-img made, never a link planted in its place
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        os.rename(staging, disk.path)
        fsync_directory(disk.directory)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    files.write_atomic(disk.owner_path, datadisks.owner_document(cfg.hostname, True), 0o600, root=disk.directory)


def _restore(cfg: Config, dest: Path, chain: Chain, point: Point, layers: list[int], *, overwrite: bool) -> None:
    if dest.exists():  # qemu-img's own lock says whether a qemu holds it; a disk it cannot read is replaced
        try:
            img.run(("qemu-img", "info", "-f", "qcow2", str(dest)), img.Job(str(dest), "restoring over it"))
        except img.InUse:
            raise
        except PodvmError:
            log.info("restore: %s is not a readable qcow2; it is replaced", dest)
    staging = cfg.vm_dir / f".{dest.name}.restore.tmp"
    log.info("restore: point %s (%s, taken %s) into %s", chain.point_id(point), point.kind, point.time, dest)
    started = time.monotonic()
    try:
        _convert(plans.plan_restore([f"/dev/fd/{fd}" for fd in layers], staging), dest, layers)
        os.rename(staging, dest)
        fsync_directory(dest.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    if overwrite:
        trust_path_of(dest).unlink(missing_ok=True)  # the old disk's record of its base
    log.info(
        "restore done: %s from point %s in %.1f s (%s); boot it with vmrunner run",
        dest,
        chain.point_id(point),
        time.monotonic() - started,
        mib(dest.stat().st_size),
    )


def _convert(argv: tuple[str, ...], dest: Path, layers: list[int]) -> None:
    """Run ``qemu-img convert -p`` with a progress line every PROGRESS_EVERY seconds."""
    progress = img.percent_lines(lambda percent: log.info("restore: %s%%", percent), PROGRESS_EVERY)
    img.run(argv, img.Job(str(dest), "restoring", f"VM_DIR={dest.parent}", img.COPY), progress, pass_fds=layers)
