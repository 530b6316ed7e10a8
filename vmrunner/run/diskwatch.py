"""The watch on a full VM_DIR (or a data disk's volume): a VM that qemu paused because a disk could not grow is named
in one log line, and resumed by the runner once that volume has room again.

The pet's drive runs with ``werror=enospc`` (:mod:`vmrunner.run.argv`): when a write of the guest cannot get space on
VM_DIR, qemu stops the VM (run state ``io-error``) and keeps the failed request to retry it on ``cont``; the guest
sees a pause, not an I/O error, and its disk stays consistent. Without a watch the VM would stay paused until someone
typed ``cont`` into qemu's monitor. The watch is a Supervisor duty: every few seconds one short QMP call on the
status monitor and one ``statvfs`` of each volume (the fullest is the one named); what to do is decided by
:func:`step`, a pure function. Every data disk's drive has ``werror=enospc`` too, so a full data-disk volume pauses
and resumes the VM in the same way.
"""

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import PodvmError
from vmrunner.qemu import qmp
from vmrunner.run.supervisor import Duty

log = logging.getLogger("vmrunner")
POLL_EVERY = 3.0  # seconds between two looks; a paused VM waits at most this long after space was freed
IO_ERROR = "io-error"  # qemu's run state while werror=enospc holds the VM


@dataclass(frozen=True)
class Seen:
    """What the watch knows from its earlier looks."""

    paused: bool = False  # the VM is paused on a full VM_DIR and the log said so
    resumed_with: int | None = None  # free bytes when the watch last resumed the VM; None before any resume


@dataclass(frozen=True)
class Step:
    """One look's decision: the new knowledge, whether to send ``cont``, and the log lines to write."""

    seen: Seen
    resume: bool
    warnings: tuple[str, ...] = ()
    infos: tuple[str, ...] = ()


def step(seen: Seen, status: str, free: int, resume_free: int, vm_dir: Path, *, setting: str = "VM_DIR") -> Step:
    """Decide from qemu's run state ``status`` and the fullest volume's ``free`` bytes (``vm_dir``, or the volume
    of the data disk ``setting`` names).

    A pause is told once (a line naming VM_DIR and what to do). The VM is resumed once VM_DIR has ``resume_free``
    bytes free; if it fills again at once (a quota or another writer the free space does not show), it is resumed
    again only when there is more room than at that resume (until the watch has seen it run), so a VM_DIR that stays
    full is never a loop of resumes and pauses.
    """
    if status != IO_ERROR:
        if status != "running":
            return Step(seen, False)
        # Seen running: a resume held (or someone else typed ``cont``); the next pause starts afresh.
        return Step(Seen(), False, infos=("the VM runs again",) if seen.paused else ())
    warnings: tuple[str, ...] = ()
    if not seen.paused:
        warnings = (
            f"{setting}={vm_dir} is full ({_mib(free)} free): qemu paused the VM, whose disk could not grow; it is "
            f"intact and resumes by itself once {setting} has {_mib(resume_free)} free (VM_DIR_MIN_FREE): free "
            "space there or grow the volume",
        )
    stuck = seen.resumed_with is not None and free <= seen.resumed_with
    if free < resume_free or stuck:
        return Step(Seen(True, seen.resumed_with), False, warnings=warnings)
    info = f"{setting}={vm_dir} has {_mib(free)} free again: resuming the VM"
    return Step(Seen(False, free), True, warnings=warnings, infos=(info,))


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still allocate on the file system of ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fullest(volumes: Sequence[tuple[str, Path]]) -> tuple[str, Path, int]:
    """The volume with the fewest free bytes: ``(setting, path, free)``."""
    return min(((setting, path, free_bytes(path)) for setting, path in volumes), key=lambda v: v[2])


def watch(monitor: Path, volumes: Sequence[tuple[str, Path]], resume_free: int, every: float = POLL_EVERY) -> Duty:
    """The duty: look every ``every`` seconds until cancelled at ``volumes`` (``(setting, path)``: VM_DIR and each
    data disk's); a look that fails (qemu busy, a volume unreadable) is logged at DEBUG and the next one tries
    again."""

    async def watch_storage() -> None:
        seen = Seen()
        while True:
            await asyncio.sleep(every)
            try:
                answer = await qmp.execute(monitor, "query-status", timeout=1.0)
                status = answer.get("status") if isinstance(answer, dict) else None
                setting, path, free = fullest(volumes)
                decided = step(seen, str(status), free, resume_free, path, setting=setting)
                for line in decided.warnings:
                    log.warning("%s", line)
                if decided.resume:
                    await qmp.execute(monitor, "cont", timeout=1.0)
                for line in decided.infos:
                    log.info("%s", line)
                seen = decided.seen
            except (PodvmError, OSError) as err:
                log.debug("storage watch: %s", err)

    return watch_storage
