"""Backups applied: the plans of :mod:`vmrunner.backups.plans` carried out through qemu-img and short QMP
calls, one backup at a time (a lock on the VM's backup directory), with a progress line every few seconds and one
result line per backup.

QMP calls are short (one connection per command, bounded by a timeout) so that a backup never holds the monitor
the shutdown needs. A backup whose outcome is unknown (the process killed, qemu gone mid-job) leaves its target
under a ``.partial`` name: the previous chain stays usable, and the next backup removes it and starts a new chain."""

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared import files
from shared.errors import ConfigError, PodvmError
from shared.files import write_atomic
from vmrunner.backups import ownstate, plans
from vmrunner.backups.plans import (
    JOB_ID,
    LAST,
    LOCK,
    MANIFEST,
    TARGET_FDSET,
    TARGET_NODE,
    BackupPlan,
    Chain,
    Point,
)
from vmrunner.config import DATA_DISKS_MAX, Config
from vmrunner.images.layout import mount_of, read_mountinfo
from vmrunner.pet.state import LIVE, own_files
from vmrunner.qemu import img, qmp
from vmrunner.run import agent
from vmrunner.run.argv import PET_NODE, RunPaths, data_node
from vmrunner.run.supervisor import Duty

log = logging.getLogger("vmrunner.backup")


PROGRESS_EVERY = 5.0  # seconds between progress lines
POLL_EVERY = 0.2
QMP_FAILURES = 8  # consecutive failed polls (a few seconds of a silent qemu) that end a backup
ABANDON_TIMEOUT = 3.0  # what a cancelled backup may spend cancelling its job: it must not hold the shutdown
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Result:
    """One backup's outcome, as its result line and ``last.json`` report it."""

    kind: str
    point: str
    copied: int
    size: int
    seconds: float
    frozen: bool
    why_not_frozen: str

    def line(self) -> str:
        """The result line."""
        rate = self.copied / self.seconds / 1e6 if self.seconds > 0 else 0.0
        frozen = "yes" if self.frozen else f"no ({self.why_not_frozen})"
        return (
            f"backup {self.point} done: {self.kind}, copied {mib(self.copied)} (file {mib(self.size)}) "
            f"in {self.seconds:.1f} s, {rate:.1f} MB/s, frozen: {frozen}"
        )


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _refused(cfg: Config, err: OSError) -> PodvmError:
    """A link planted on the backup volume (ELOOP, ENOTDIR below BACKUP_DIR) is a refusal; else the volume's error."""
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        return PodvmError(f"BACKUP_DIR={cfg.backup_dir}: {err.filename}: a symbolic link or no folder; refused")
    return _volume(cfg, err)


def _volume(cfg: Config, err: OSError) -> PodvmError:
    error = ConfigError if isinstance(err, PermissionError) else PodvmError
    return error(f"BACKUP_DIR={cfg.backup_dir}: {err.strerror}: {err.filename}")


@contextlib.contextmanager
def locked(cfg: Config, root: Path) -> Iterator[None]:
    """Hold the VM's backup lock; a second backup (schedule or ``kubectl exec``) is refused, not queued.

    :raise PodvmError: when another backup holds it.
    """
    try:
        cfg.backup_dir.mkdir(parents=True, exist_ok=True)
        with files.locked(root / LOCK, cfg.backup_dir, blocking=False) as held:
            if not held:
                raise PodvmError(f"{root}: another backup is running; this one is not started")
            yield
    except OSError as err:
        raise _refused(cfg, err) from None
    except files.Forged as err:
        raise PodvmError(f"BACKUP_DIR={cfg.backup_dir}: {err}; refused") from None


async def _qmp(cfg: Config, command: str, arguments: dict[str, object] | None = None, timeout: float = 5.0) -> object:
    return await qmp.execute(RunPaths.of(cfg.run_dir).qmp, command, timeout, arguments)


def _ours(name: object, prefix: str) -> bool:
    """The pet's name (``prefix``) or a data disk's (``prefix-<disk>``)."""
    return isinstance(name, str) and (name == prefix or name.startswith(f"{prefix}-"))


async def _leftover_job(cfg: Config) -> None:
    """Cancel and dismiss the jobs and detach the targets an interrupted backup left in this qemu."""
    jobs = await _qmp(cfg, "query-jobs")
    for job in jobs if isinstance(jobs, list) else []:
        if isinstance(job, dict) and _ours(job.get("id"), JOB_ID):
            job_id = str(job.get("id"))
            log.warning("backup: an interrupted backup's job is still in qemu (%s); removing it", job.get("status"))
            if job.get("status") != "concluded":
                with contextlib.suppress(PodvmError):
                    await _qmp(cfg, "job-cancel", {"id": job_id})
                await _wait_concluded(cfg, ABANDON_TIMEOUT * 3)
            with contextlib.suppress(PodvmError):
                await _qmp(cfg, "job-dismiss", {"id": job_id})
    nodes = await _qmp(cfg, "query-named-block-nodes", {"flat": True})
    names = [n.get("node-name") for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []
    for name in names:
        if _ours(name, TARGET_NODE):
            await _qmp(cfg, "blockdev-del", {"node-name": name})
    fdsets = await _qmp(cfg, "query-fdsets")
    ids = [s.get("fdset-id") for s in fdsets if isinstance(s, dict)] if isinstance(fdsets, list) else []
    for fdset in range(TARGET_FDSET, TARGET_FDSET + DATA_DISKS_MAX + 1):
        if fdset in ids:
            await _qmp(cfg, "remove-fd", {"fdset-id": fdset})  # else /dev/fdset would give the old target


async def _detach(cfg: Config, plan: BackupPlan, timeout: float = 5.0) -> None:
    """Detach the targets and drop qemu's descriptors of them."""
    for node, fdset in ((TARGET_NODE, TARGET_FDSET), *((d.target_node, d.fdset) for d in plan.data)):
        await _qmp(cfg, "blockdev-del", {"node-name": node}, timeout=timeout)
        with contextlib.suppress(PodvmError):  # already gone when no monitor was left holding it
            await _qmp(cfg, "remove-fd", {"fdset-id": fdset}, timeout=timeout)


@contextlib.contextmanager
def _target(cfg: Config, plan: BackupPlan) -> Iterator[tuple[int, int, list[int]]]:
    """The chain folder (no link below BACKUP_DIR followed) and the backup's new target files in it (the pet's, then
    each data disk's), created by the runner (``O_EXCL | O_NOFOLLOW``: a name planted there is refused) and held open
    until they are renamed, so qemu-img and qemu write these inodes, whatever another pod does to the names."""
    chain_fd = files.open_below(cfg.backup_dir, plan.directory, create=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.ExitStack() as opened:
        opened.callback(os.close, chain_fd)
        fds: list[int] = []
        for partial in (plan.partial, *(d.partial for d in plan.data)):
            try:
                fd = os.open(partial.name, flags, 0o644, dir_fd=chain_fd)
            except OSError as err:
                err.filename = str(partial)
                raise
            opened.callback(os.close, fd)
            fds.append(fd)
        yield chain_fd, fds[0], fds[1:]


async def _wait_concluded(cfg: Config, timeout: float) -> dict[str, object] | None:
    """The backup job once concluded (every one of them: the pet's is returned, carrying the first error of any),
    or None when one is gone or still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = await _jobs(cfg)
        if not jobs or any(j is None for j in jobs):
            return None
        if all(j is not None and j.get("status") == "concluded" for j in jobs):
            return _joined(jobs)
        await asyncio.sleep(POLL_EVERY)
    return None


def _joined(jobs: list[dict[str, object] | None]) -> dict[str, object]:
    """The pet's job with the first error of any job, and the progress of all."""
    found = [j for j in jobs if j is not None]
    first = dict(found[0])
    errors = [j.get("error") for j in found if j.get("error") is not None]
    if errors:
        first["error"] = errors[0]
    for key in ("current-progress", "total-progress"):
        values = [j.get(key) for j in found]
        if all(isinstance(v, int) for v in values):
            first[key] = sum(v for v in values if isinstance(v, int))
    return first


async def _jobs(cfg: Config) -> list[dict[str, object] | None]:
    """The pet's job, then each data disk's job (None for one that is gone); empty when the pet's is gone."""
    jobs = await _qmp(cfg, "query-jobs", timeout=1.0)
    by_id = {j.get("id"): j for j in jobs if isinstance(j, dict)} if isinstance(jobs, list) else {}
    if JOB_ID not in by_id:
        return []
    return [by_id[JOB_ID], *(by_id.get(f"{JOB_ID}-{d.name}") for d in cfg.data_disks)]


async def _job(cfg: Config) -> dict[str, object] | None:
    """All of the backup's jobs as one: None when one is gone."""
    jobs = await _jobs(cfg)
    if not jobs or any(j is None for j in jobs):
        return None
    joined = _joined(jobs)
    if any(j is not None and j.get("status") != "concluded" for j in jobs):
        joined["status"] = "running"
    return joined


def _virtual_size(nodes: object, node: str = PET_NODE) -> int:
    for entry in nodes if isinstance(nodes, list) else []:
        if isinstance(entry, dict) and entry.get("node-name") == node:
            size = (entry.get("image") or {}).get("virtual-size")
            if isinstance(size, int) and size > 0:
                return size
    what = "the pet disk" if node == PET_NODE else "a data disk"
    raise PodvmError(f"QMP: qemu reports no node {node} ({what}): is this qemu started by vmrunner with DATA_DISKS?")


async def run_backup(cfg: Config, *, want_full: bool = False) -> Result:
    """One backup of the running VM: decide its kind, make and attach the target, freeze the guest, start the job
    in one transaction, thaw, follow the job, then record the point.

    :raise PodvmError: naming what failed; the chains on the volume are as they were before.
    """
    root = plans.vm_root(cfg.backup_dir, cfg.hostname)
    with locked(cfg, root):
        return await _locked_backup(cfg, root, want_full)


async def plan_next(cfg: Config, root: Path, *, want_full: bool) -> tuple[BackupPlan, list[Path]]:
    """The next backup's plan from the volume and qemu's bitmaps, and what interrupted backups left on the volume
    (removed before it runs); reads only, for ``vmrunner backup --plan`` as for the backup itself."""
    chains, broken = plans.read_chains(root)
    newest = root / chains[-1].id if chains else None
    interrupted = newest is not None and any(n.endswith(plans.PARTIAL) for n in files.list_below(root, newest))
    nodes = await _qmp(cfg, "query-named-block-nodes", {"flat": True})
    bitmaps = plans.parse_bitmaps(nodes)
    size = _virtual_size(nodes)
    data = {
        d.name: (_virtual_size(nodes, data_node(d.name)), plans.parse_bitmaps(nodes, data_node(d.name)))
        for d in cfg.data_disks
    }
    names = [name for p in chains[-1].points for name in (p.file, *p.disks.values())] if chains else []
    missing = tuple(name for name in names if files.stat_below(root, root / chains[-1].id / name) is None)
    decision = plans.decide(
        chains,
        bitmaps,
        size,
        want_full=want_full,
        interrupted=interrupted,
        chain_length=cfg.backup_chain_length,
        missing=missing,
        data=data,
    )
    chain_id = plans.new_chain_id(datetime.now(UTC), {c.id for c in chains} | {p.name for p in broken})
    mountinfo = read_mountinfo()
    volumes = (cfg.vm_dir, *(d.directory for d in cfg.data_disks))
    mounts = [mount_of(mountinfo, volume.resolve()) for volume in volumes]
    offload = plans.may_offload(mount.fstype if mount is not None else None for mount in mounts)
    plan = plans.plan_backup(
        root, decision, size, bitmaps, chain_id=chain_id, speed=cfg.backup_speed, offload=offload, data=data
    )
    return plan, plans.leftovers(root, chains, broken)


async def show_plan(cfg: Config, *, want_full: bool) -> dict[str, object]:
    """``vmrunner backup --plan``: the next backup as data, changing nothing."""
    root = plans.vm_root(cfg.backup_dir, cfg.hostname)
    plan, leftovers = await plan_next(cfg, root, want_full=want_full)
    document = asdict(plan)
    document.update(directory=str(plan.directory), partial=str(plan.partial), final=str(plan.final))
    document["data"] = [{**asdict(d), "partial": str(d.partial)} for d in plan.data]
    document["leftovers"] = [str(p) for p in leftovers]
    return document


async def _locked_backup(cfg: Config, root: Path, want_full: bool) -> Result:
    await _leftover_job(cfg)
    plan, leftovers = await plan_next(cfg, root, want_full=want_full)
    for path in leftovers:
        log.info("backup: removing %s, left by an interrupted backup", path)
        files.remove_below(cfg.backup_dir, path)
    log.info("backup: %s backup into %s: %s", plan.kind, plan.directory, plan.reason)
    with _target(cfg, plan) as (chain_fd, target, data_targets):
        return await _attached_backup(cfg, root, plan, chain_fd, target, data_targets=data_targets)


async def _attached_backup(
    cfg: Config, root: Path, plan: BackupPlan, chain_fd: int, target: int, *, data_targets: list[int]
) -> Result:
    volume = f"BACKUP_DIR={cfg.backup_dir}"
    await img.run_async(plan.create, img.Job(str(plan.partial), "creating the backup target", volume), stdin=target)
    for disk, fd in zip(plan.data, data_targets, strict=True):
        await img.run_async(disk.create, img.Job(str(disk.partial), "creating the backup target", volume), stdin=fd)
    attached = [
        (TARGET_FDSET, plan.attach, target),
        *((d.fdset, d.attach, fd) for d, fd in zip(plan.data, data_targets, strict=True)),
    ]
    try:
        for fdset, attach, fd in attached:
            commands: list[qmp.Command] = [("add-fd", {"fdset-id": fdset}), ("blockdev-add", attach)]
            await qmp.session(RunPaths.of(cfg.run_dir).qmp, commands, qmp.TIMEOUT, fd=fd)
    except PodvmError:
        await _abandon(cfg, plan, started=False)
        raise
    sent: list[bool] = []  # set once the transaction is on its way: from then on a job may exist
    try:
        freeze, now, started, own = await _start(cfg, plan, sent)
        job = await _follow(cfg)
    except (asyncio.CancelledError, PodvmError):
        await _abandon(cfg, plan, started=bool(sent))
        raise
    seconds = time.monotonic() - started
    for job_id in (JOB_ID, *(d.job_id for d in plan.data)):
        await _qmp(cfg, "job-dismiss", {"id": job_id})
    await _detach(cfg, plan)
    error = job.get("error")
    if error is not None:
        for partial in (plan.partial, *(d.partial for d in plan.data)):  # failed: the bitmaps kept every change
            files.remove_below(cfg.backup_dir, partial)
        raise PodvmError(f"backup into {plan.partial} failed: {str(error)[:300]}")
    try:
        await _write_out(cfg, plan, [target, *data_targets])
        for disk, fd in zip(plan.data, data_targets, strict=True):
            _rename_file(cfg, disk.partial, disk.final, chain_fd, fd)
        _rename(cfg, plan, chain_fd, target)
        size = os.fstat(target).st_size + sum(os.fstat(fd).st_size for fd in data_targets)
        result = _record(cfg, root, plan, now=now, seconds=seconds, job=job, freeze=freeze, size=size, own=own)
    except (OSError, PodvmError):
        await _forget(cfg, plan)
        raise
    for node, names in ((PET_NODE, plan.remove_bitmaps), *((d.node, d.remove_bitmaps) for d in plan.data)):
        for name in names:
            log.info("backup: removing the bitmap %s of %s (its chain is no longer followed)", name, node)
            await _qmp(cfg, "block-dirty-bitmap-remove", {"node": node, "name": name})
    return result


WRITE_OUT_LOGGED = 1.0  # seconds: a longer write-out of the copies gets its own log line


async def _write_out(cfg: Config, plan: BackupPlan, targets: list[int]) -> None:
    """Write the completed targets out to the volume (qemu wrote them with its flushes off: see
    ``plans._target_node``), in a thread, so the runner's other duties go on meanwhile.

    :raise PodvmError: when the volume cannot take them (the partial files stay: the next backup is a full one).
    """
    begin = time.monotonic()
    for partial, fd in zip((plan.partial, *(d.partial for d in plan.data)), targets, strict=True):
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as err:
            raise PodvmError(f"BACKUP_DIR={cfg.backup_dir}: cannot write {partial} out: {err.strerror}") from None
    took = time.monotonic() - begin
    if took >= WRITE_OUT_LOGGED:
        log.info("backup: the copy was written out to BACKUP_DIR in %.1f s", took)


async def _forget(cfg: Config, plan: BackupPlan) -> None:
    """The job succeeded, so qemu has cleared the changes it copied from the chain's bitmap, but the point never
    entered the chain: remove that bitmap from every disk, so that the next backup is a full one rather than an
    incremental missing those changes. (Kept in qemu, not on the volume, where another pod could undo it.)"""
    kept = []
    for node in (PET_NODE, *(d.node for d in plan.data)):
        try:
            await _qmp(cfg, "block-dirty-bitmap-remove", {"node": node, "name": plan.bitmap})
        except PodvmError as err:
            kept.append(f"{node}: {err}")
    if kept:
        log.error(
            "backup: the point was not recorded and the bitmap %s stays (%s); run `vmrunner backup --full`, "
            "an incremental would miss the changes of that point",
            plan.bitmap,
            "; ".join(kept),
        )
    else:
        log.warning("backup: the point was not recorded; the next backup is a full one")


async def _start(
    cfg: Config, plan: BackupPlan, sent: list[bool]
) -> tuple[agent.Freeze, datetime, float, dict[str, str]]:
    """Freeze the guest (when its agent answers), start the transaction and copy the VM's own files beside the disk
    (the VM paused for that, so all are of one instant), thaw at once, whatever happened; the freeze's outcome, the
    backup's instant (wall clock and monotonic) and the own files' copies."""
    conn, freeze = await agent.freeze(RunPaths.of(cfg.run_dir).agent)
    if not freeze.frozen:
        log.info("backup: not freezing the guest's file systems: %s", freeze.why)
    try:
        async with _paused(cfg, any(own.kind in LIVE for own in own_files(cfg))):
            now, started = datetime.now(UTC), time.monotonic()
            sent.append(True)
            await _qmp(cfg, "transaction", plan.transaction)
            own = ownstate.capture(cfg, plan.directory, plan.seq, plan.previous[-1] if plan.previous else None)
    finally:
        await agent.thaw(conn)
    return freeze, now, started, own


@contextlib.asynccontextmanager
async def _paused(cfg: Config, wanted: bool) -> AsyncIterator[None]:
    """The VM paused for the block when ``wanted`` and it runs (one paused for a full volume stays so)."""
    status = await _qmp(cfg, "query-status") if wanted else None
    running = isinstance(status, dict) and status.get("status") == "running"
    if running:
        await _qmp(cfg, "stop")
    try:
        yield
    finally:
        if running:
            await _qmp(cfg, "cont")


async def _follow(cfg: Config) -> dict[str, object]:
    """Poll the job until it concluded, looking again when it should be done at its pace so far (``qmp.next_look``),
    with a progress line every PROGRESS_EVERY seconds.

    :raise PodvmError: when the job vanished or qemu stopped answering.
    """
    failures, started, delay = 0, time.monotonic(), qmp.FIRST_LOOK
    last_line = started
    while True:
        await asyncio.sleep(delay)
        try:
            job = await _job(cfg)
        except PodvmError as err:
            failures += 1
            if failures >= QMP_FAILURES:
                raise PodvmError(f"backup: qemu stopped answering during the backup: {err}") from None
            delay = POLL_EVERY
            continue
        failures = 0
        if job is None:
            raise PodvmError("backup: the backup job vanished from qemu (qemu restarted?)")
        if job.get("status") == "concluded":
            return job
        done, total = job.get("current-progress"), job.get("total-progress")
        if not (isinstance(done, int) and isinstance(total, int) and total > 0):
            delay = POLL_EVERY
            continue
        now = time.monotonic()
        delay = qmp.next_look(done, total, now - started, POLL_EVERY)
        if now - last_line >= PROGRESS_EVERY:
            last_line = now
            log.info("backup: %d%% (%s of %s)", done * 100 // total, mib(done), mib(total))


async def _abandon(cfg: Config, plan: BackupPlan, *, started: bool) -> None:
    """A backup stopped half-way: cancel its job and detach its target within ABANDON_TIMEOUT. The partial file is
    removed only when no job was started, or the job is known to have ended without completing (its bitmap then
    kept every change); otherwise it stays, and the next backup is a full one."""
    try:
        async with asyncio.timeout(ABANDON_TIMEOUT):
            job: dict[str, object] | None = {"error": "not started"}
            if started:
                for job_id in (JOB_ID, *(d.job_id for d in plan.data)):
                    with contextlib.suppress(PodvmError):
                        await _qmp(cfg, "job-cancel", {"id": job_id}, timeout=1.0)
                job = await _wait_concluded(cfg, ABANDON_TIMEOUT)
            if job is not None and job.get("error") is not None:
                if started:
                    for job_id in (JOB_ID, *(d.job_id for d in plan.data)):
                        with contextlib.suppress(PodvmError):
                            await _qmp(cfg, "job-dismiss", {"id": job_id}, timeout=1.0)
                await _detach(cfg, plan, timeout=1.0)
                for partial in (plan.partial, *(d.partial for d in plan.data)):
                    files.remove_below(cfg.backup_dir, partial)
                if plan.kind == "full":
                    files.remove_below(cfg.backup_dir, plan.directory)
                log.warning("backup: cancelled; the chain ends at its last complete point")
                return
    except (TimeoutError, PodvmError):
        pass
    log.warning("backup: interrupted at an unknown point; %s stays until the next (full) backup", plan.partial)


def _rename(cfg: Config, plan: BackupPlan, chain_fd: int, target: int) -> None:
    """Rename the completed target into the chain, in the folder it was made in; the name renamed must be the very
    file qemu wrote (another pod may have swapped it), else it is removed and the backup fails.

    :raise PodvmError: when another file stood under the target's name.
    """
    _rename_file(cfg, plan.partial, plan.final, chain_fd, target)


def _rename_file(cfg: Config, partial: Path, final: Path, chain_fd: int, target: int) -> None:
    """Rename one target (the pet's or a data disk's) as :func:`_rename` says."""
    os.rename(partial.name, final.name, src_dir_fd=chain_fd, dst_dir_fd=chain_fd)
    now = os.stat(final.name, dir_fd=chain_fd, follow_symlinks=False)
    mine = os.fstat(target)
    if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
        os.unlink(final.name, dir_fd=chain_fd)
        raise PodvmError(
            f"BACKUP_DIR={cfg.backup_dir}: {partial} is not the file qemu wrote (another writer replaced it); "
            "removed it, the chain ends at its last complete point"
        )
    os.fsync(chain_fd)


def _record(
    cfg: Config,
    root: Path,
    plan: BackupPlan,
    *,
    now: datetime,
    seconds: float,
    job: dict[str, object],
    freeze: agent.Freeze,
    size: int,
    own: dict[str, str],
) -> Result:
    """Write the manifest of the renamed target, apply retention, record the figures."""
    copied = job.get("total-progress")
    point = Point(
        seq=plan.seq,
        kind=plan.kind,
        file=plan.file,
        time=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        unix=now.timestamp(),
        copied=copied if isinstance(copied, int) else 0,
        size=size,
        seconds=round(seconds, 3),
        frozen=freeze.frozen,
        own=own,
        disks={d.name: d.file for d in plan.data},
    )
    sizes = {d.name: d.virtual_size for d in plan.data}
    chain = Chain(plan.chain_id, plan.virtual_size, (*plan.previous, point), sizes)
    write_atomic(plan.directory / MANIFEST, plans.manifest_document(chain), root=cfg.backup_dir)
    result = Result(plan.kind, chain.point_id(point), point.copied, point.size, seconds, freeze.frozen, freeze.why)
    if plan.kind == "full":
        for old in plans.plan_retention(plans.read_chains(root)[0], cfg.backup_keep):
            log.info("backup: removing chain %s (BACKUP_KEEP=%d)", old, cfg.backup_keep)
            files.remove_below(cfg.backup_dir, root / old)
    write_last(root, result, ok=True)
    log.info("%s", result.line())
    return result


def write_last(root: Path, result: Result | None, *, ok: bool, error: str = "") -> None:
    """Record the last attempt (and keep the last success) for ``vmrunner status`` and the metrics."""
    record = plans.read_last(root)
    attempt: dict[str, object] = {"time": time.time(), "result": "ok" if ok else "failed", "error": error[:300]}
    if result is not None:
        attempt.update(
            kind=result.kind,
            point=result.point,
            copied=result.copied,
            size=result.size,
            seconds=result.seconds,
            frozen=result.frozen,
        )
    record["last"] = attempt
    if ok:
        record["last_success"] = attempt
    try:
        write_atomic(root / LAST, json.dumps(record).encode(), mode=0o644, root=root.parent)
    except OSError as err:
        log.warning("%s: cannot record the backup's figures: %s", root / LAST, err.strerror)


async def backup_logged(cfg: Config, *, want_full: bool = False) -> Result | None:
    """A backup whose failure is one log line and a failed figure (the schedule's way: it must go on)."""
    try:
        return await run_backup(cfg, want_full=want_full)
    except PodvmError as err:
        log.error("backup failed: %s", err)
        if "another backup is running" not in str(err):
            write_last(plans.vm_root(cfg.backup_dir, cfg.hostname), None, ok=False, error=str(err))
        return None


async def on_demand(cfg: Config, *, want_full: bool) -> Result | None:
    """``vmrunner backup``: SIGTERM or Ctrl-C cancels the backup cleanly (its job cancelled, the chain as it was)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await backup_logged(cfg, want_full=want_full)
    except asyncio.CancelledError:
        log.error("backup interrupted by a signal; the chain ends at its last complete point")
        return None


def schedule(cfg: Config, interval: float) -> Duty:
    """The Supervisor duty of BACKUP_INTERVAL: a backup every ``interval`` seconds while qemu runs, counted from the
    last success recorded on the backup volume (see :func:`vmrunner.backups.plans.next_backup_in`)."""
    root = plans.vm_root(cfg.backup_dir, cfg.hostname)

    async def backup_schedule() -> None:
        first = True
        while True:
            delay = plans.next_backup_in(plans.read_last(root), time.time(), interval, first=first)
            if first:
                log.info("next scheduled backup in %.0fs", delay)
            first = False
            await asyncio.sleep(delay)
            await backup_logged(cfg)

    return backup_schedule
