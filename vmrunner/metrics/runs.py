"""The pet's record of its runs on VM_DIR: boots and how each run ended, kept across pods."""

import contextlib
import json
import logging
from pathlib import Path

from shared import figures
from shared.figures import SHUTDOWN_OUTCOMES
from shared.files import read_small, write_atomic

log = logging.getLogger("vmrunner")


def runs_file(vm_dir: Path, hostname: str) -> Path:
    """The pet's record of boots and shutdowns, beside the pet disk ``<hostname>.qcow2``."""
    return vm_dir / f".{hostname}.runs.json"


RUNNING = "running"  # the record's ``last`` while qemu runs: still there at the next start, the run never ended
_UNCLEAN = {
    RUNNING: "ended without a shutdown (qemu, the runner or the node was killed while the VM ran)",
    "crashed": "ended when qemu died",
    "hard": "ended in a hard stop: the guest ignored the ACPI power-down until SHUTDOWN_TIMEOUT",
}


def record_run(path: Path, *, boot: bool = False, outcome: str | None = None) -> None:
    """Count a boot or a shutdown outcome in the pet's record beside its disk (lost figures are only logged).

    The record's ``last`` is ``running`` from a boot until its outcome is counted, so a run that never counted
    one (SIGKILL, a node lost) shows at the next start (:func:`previous_end`).
    """
    counts = read_runs(path)
    if boot:
        counts["boots"] += 1
    if outcome is not None:
        counts[outcome] += 1
    record = {**counts, "last": outcome or RUNNING}
    try:
        write_atomic(path, json.dumps(record).encode(), mode=0o600)
    except OSError as err:
        log.warning("%s: cannot record the VM's boots and shutdowns: %s", path, err.strerror)


def read_runs(path: Path) -> dict[str, int]:
    """The pet's boots and shutdown outcomes; zeros when there is no record yet (or a malformed one)."""
    record = dict.fromkeys(("boots", *SHUTDOWN_OUTCOMES), 0)
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(read_small(path, figures.MAX_SIZE))
        if isinstance(saved, dict):
            for key in record:
                value = saved.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    record[key] = value
    return record


def previous_end(path: Path) -> str | None:
    """One line on how the pet's previous run ended, when that was not a clean shutdown; None otherwise (also for
    a first boot, or a record older than the ``last`` field)."""
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(read_small(path, figures.MAX_SIZE))
        last = saved.get("last") if isinstance(saved, dict) else None
        if isinstance(last, str) and last in _UNCLEAN:
            return (
                f"{path}: the previous run of this pet {_UNCLEAN[last]}; the guest did not shut down cleanly: what "
                "it had flushed is on the disk, what it had not may be lost (its file systems replay their journals)"
            )
    return None
