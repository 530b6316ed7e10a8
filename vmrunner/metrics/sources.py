"""Every figure the runner reports, gathered from its state, /proc, qemu's monitor, the backups and the sidecar."""

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from shared import figures
from shared.errors import PodvmError
from shared.figures import SHUTDOWN_OUTCOMES, VM_STATES, Figure, figure
from vmrunner.metrics.runs import read_runs
from vmrunner.metrics.state import RunState
from vmrunner.qemu import qmp

log = logging.getLogger("vmrunner")

QMP_TIMEOUT = 1.0
CACHE_SCAN_EVERY = 60.0
GATHER_EVERY = 1.0
CACHE_SCAN_LIMIT = 10_000


# QMP run states as podvm reports them; any other is a state the VM cannot go on from by itself.
_QMP_STATES = {
    "running": "running",
    "io-error": "paused",  # werror=enospc: VM_DIR is full (podvm_vm_io_error_paused says so)
    "shutdown": "shutting_down",
    **dict.fromkeys(("paused", "suspended", "prelaunch", "debug", "inmigrate", "postmigrate"), "paused"),
    **dict.fromkeys(("finish-migrate", "save-vm", "restore-vm", "colo", "watchdog"), "paused"),
}


def _version() -> str:
    from importlib import metadata  # at the first scrape, not on the way to qemu (about 15 ms)

    try:
        return metadata.version("podvm")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Sources:
    """Where :func:`gather` reads from."""

    run_dir: Path
    image_dir: Path
    runs_file: Path  # the pet's record of boots and shutdowns, in VM_DIR
    monitor: Path  # the QMP monitor queried for the state and block statistics
    backups: Path | None = None  # the VM's directory on the backup volume (its last.json)


def directory_size(root: Path) -> int:
    """Bytes of the regular files under ``root``, never following a symbolic link, at most CACHE_SCAN_LIMIT."""
    total, seen = 0, 0
    stack = [root]
    while stack and seen < CACHE_SCAN_LIMIT:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                seen += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def process_figures(pid: int) -> list[Figure]:
    """qemu's CPU seconds and resident memory from /proc; none when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return []
    ticks = os.sysconf("SC_CLK_TCK")
    user, system = int(fields[11]) / ticks, int(fields[12]) / ticks
    return [
        figure("podvm_vm_cpu_usage_seconds_total", user + system),
        figure("podvm_vm_cpu_user_usage_seconds_total", user),
        figure("podvm_vm_cpu_system_usage_seconds_total", system),
        figure("podvm_vm_memory_resident_bytes", rss_pages * os.sysconf("SC_PAGE_SIZE")),
    ]


_BLOCK = {
    "rd_bytes": ("podvm_vm_storage_read_traffic_bytes_total", 1),
    "wr_bytes": ("podvm_vm_storage_write_traffic_bytes_total", 1),
    "rd_operations": ("podvm_vm_storage_iops_read_total", 1),
    "wr_operations": ("podvm_vm_storage_iops_write_total", 1),
    "rd_total_time_ns": ("podvm_vm_storage_read_times_seconds_total", 1e-9),
    "wr_total_time_ns": ("podvm_vm_storage_write_times_seconds_total", 1e-9),
    "flush_operations": ("podvm_vm_storage_flush_requests_total", 1),
    "flush_total_time_ns": ("podvm_vm_storage_flush_times_seconds_total", 1e-9),
}


def block_figures(blockstats: object) -> list[Figure]:
    """Per-drive figures from QMP ``query-blockstats`` (drives named by their -drive id; a data disk, which has
    none, by its node: ``data-<name>``)."""
    out: list[Figure] = []
    for entry in blockstats if isinstance(blockstats, list) else []:
        drive = entry.get("device") or entry.get("node-name") or entry.get("qdev") if isinstance(entry, dict) else None
        stats = entry.get("stats") if isinstance(entry, dict) else None
        if not isinstance(drive, str) or not isinstance(stats, dict):
            continue
        for key, (name, scale) in _BLOCK.items():
            value = stats.get(key)
            if isinstance(value, int) and value >= 0:
                out.append(figure(name, value * scale, drive=drive[: figures.MAX_LABEL_LENGTH]))
    return out


def query_qemu(monitor: Path) -> tuple[object, object] | None:
    """qemu's run state and block statistics, or None when no qemu answers within QMP_TIMEOUT."""
    commands: list[qmp.Command] = [("query-status", None), ("query-blockstats", None)]
    try:
        status, blockstats = asyncio.run(qmp.session(monitor, commands, QMP_TIMEOUT, wait=False))
    except PodvmError:
        return None
    return status, blockstats


def _qmp_status(qmp_status: object) -> object:
    return qmp_status.get("status") if isinstance(qmp_status, dict) else None


def vm_state(phase: str, qmp_status: object) -> str:
    """The VM's state: the runner's phase, refined by qemu's own run state while qemu runs."""
    if phase != "running":
        return phase
    status = _qmp_status(qmp_status)
    if status is None:
        return "running"
    return _QMP_STATES.get(str(status), "error")


def _one_hot(name: str, label: str, current: str, choices: tuple[str, ...]) -> list[Figure]:
    return [figure(name, 1 if choice == current else 0, **{label: choice}) for choice in choices]


def runner_figures(state: RunState, sources: Sources, cache_size: int) -> list[Figure]:
    """Every figure the runner knows, querying qemu and /proc now."""
    answer = query_qemu(sources.monitor) if state.phase in ("running", "shutting_down") else None
    qmp_status, blockstats = answer if answer is not None else (None, None)
    current = vm_state(state.phase, qmp_status)
    runs = read_runs(sources.runs_file)
    image = state.image
    out = [
        figure("podvm_build", 1, version=_version(), accel=state.accel, runner="vmrunner", vm=state.vm),
        figure("podvm_vm_accel_fallback", 1 if state.accel_fallback else 0),
        figure("podvm_vm_boot_refused", 1 if state.boot_refused else 0),
        *_one_hot("podvm_vm_state", "state", current, VM_STATES),
        figure("podvm_vm_io_error_paused", 1 if _qmp_status(qmp_status) == "io-error" else 0),
        figure("podvm_vm_boots_total", runs["boots"]),
        *[figure("podvm_vm_shutdowns_total", runs[outcome], outcome=outcome) for outcome in SHUTDOWN_OUTCOMES],
        figure("podvm_image_fetched_bytes_total", image.received),
        figure("podvm_image_fetch_duration_seconds", image.fetch_seconds),
        figure("podvm_image_fetch_retries_total", image.retries),
        figure("podvm_image_fetch_resumes_total", image.resumes),
        *_one_hot("podvm_image_vetting", "result", image.vetting, ("pending", "accepted", "refused")),
        figure("podvm_image_cache_size_bytes", cache_size),
    ]
    if image.name:
        out.append(figure("podvm_image_base", 1, name=image.name, digest=image.digest))
    if state.started and state.qemu_pid:
        out.append(figure("podvm_vm_start_time_seconds", state.started))
        out.append(figure("podvm_vm_uptime_seconds", max(0.0, time.time() - state.started)))
        out += process_figures(state.qemu_pid)
    return out + block_figures(blockstats)


def _number(record: dict[str, object], key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else 0.0


def backup_figures(root: Path | None) -> list[Figure]:
    """The last backup attempt and the last success, from ``last.json`` on the backup volume; none before the
    first backup."""
    if root is None:
        return []
    from vmrunner.backups.plans import read_last  # at a scrape: the start does not need the backup plans

    record = read_last(root)
    out: list[Figure] = []
    last = record.get("last")
    if last is not None:
        out.append(figure("podvm_backup_last_attempt_timestamp_seconds", _number(last, "time")))
        out += _one_hot("podvm_backup_last_result", "result", str(last.get("result")), ("ok", "failed"))
    success = record.get("last_success")
    if success is not None:
        out += [
            figure("podvm_backup_last_success_timestamp_seconds", _number(success, "time")),
            *_one_hot("podvm_backup_last_success_kind", "kind", str(success.get("kind")), ("full", "incremental")),
            figure("podvm_backup_last_success_copied_bytes", _number(success, "copied")),
            figure("podvm_backup_last_success_size_bytes", _number(success, "size")),
            figure("podvm_backup_last_success_duration_seconds", _number(success, "seconds")),
            figure("podvm_backup_last_success_frozen", 1 if success.get("frozen") is True else 0),
        ]
    return out


def network_figures(run_dir: Path) -> list[Figure]:
    """The sidecar's figures from RUN_DIR; none (and a debug line) when absent or malformed."""
    try:
        _when, items = figures.read_document(run_dir / figures.NETWORK_FILE, figures.NETWORK_NAMES)
    except figures.FiguresError as err:
        log.debug("no network figures: %s", err)
        return []
    return items


def gather(state: RunState, sources: Sources, cache_size: int) -> list[Figure]:
    """All the pod's figures: the runner's (its backups' too) and the sidecar's."""
    return (
        runner_figures(state, sources, cache_size) + backup_figures(sources.backups) + network_figures(sources.run_dir)
    )
