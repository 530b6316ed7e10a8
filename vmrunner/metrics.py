"""The runner's figures and the pod's one metrics endpoint (``METRICS_PORT``, served with prometheus_client).

The runner serves because it is the unprivileged container: a bug in an HTTP server here costs less than in the
sidecar. It reports what it knows itself (the VM's state, qemu's CPU and memory from /proc, block I/O from QMP
``query-blockstats``, the image fetch, the pet's boots and past shutdowns) and adds the network figures the sidecar
hands over in ``RUN_DIR`` (read bounded and checked, see :mod:`shared.figures`).

:func:`gather` is the one source: the endpoint calls it at every scrape and ``vmrunner status`` prints its result.
The ``run`` process keeps its state in ``RUN_DIR/vmrunner-state.json`` so that ``status`` (another process) sees the
same figures; queries go to qemu's second QMP monitor, ``status.sock``, so a scrape never delays the shutdown.
Nothing secret is reported: the image by its cache name and digest, never ``IMG_SOURCE`` (which may hold
credentials).
"""

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from shared import figures
from shared.errors import ChildFailed, ImageRejected, PodvmError, StoppedHard
from shared.figures import SHUTDOWN_OUTCOMES, VM_STATES, Figure, figure
from shared.files import read_small, write_atomic
from vmrunner.backup import read_last

log = logging.getLogger("vmrunner")
STATE_FILE = "vmrunner-state.json"
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


@dataclass
class RunState:
    """What only the ``run`` process knows; saved in RUN_DIR at each change for ``vmrunner status``."""

    phase: str = "waiting"
    accel: str = ""
    vm: str = ""
    qemu_pid: int = 0
    started: float = 0.0
    image: ImageFigures = field(default_factory=ImageFigures)


FETCH = ImageFigures()  # filled in by vmrunner.image while it downloads


def _version() -> str:
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


def runs_file(vm_dir: Path, hostname: str) -> Path:
    """The pet's record of boots and shutdowns, beside the pet disk ``<hostname>.qcow2``."""
    return vm_dir / f".{hostname}.runs.json"


class Tracker:
    """The ``run`` process's state: changed by the runner as it goes, saved for ``status``, read by the endpoint."""

    def __init__(self, sources: Sources, vm: str) -> None:
        self.sources = sources
        self.state = RunState(vm=vm, image=FETCH)
        self._cache_size: tuple[float, int] = (0.0, 0)

    def set(self, **changes: Any) -> None:
        """Change fields of the run state and save it (a failure to save is logged; the run goes on)."""
        for key, value in changes.items():
            setattr(self.state, key, value)
        try:
            write_atomic(self.sources.run_dir / STATE_FILE, json.dumps(asdict(self.state)).encode(), mode=0o600)
        except OSError as err:
            log.warning("RUN_DIR=%s: cannot save %s: %s", self.sources.run_dir, STATE_FILE, err.strerror)

    def qemu_started(self, pid: int) -> None:
        """qemu runs: say how the pet's previous run ended when it was not a clean shutdown, count a boot."""
        ended = previous_end(self.sources.runs_file)
        if ended is not None:
            log.warning("%s", ended)
        record_run(self.sources.runs_file, boot=True)
        self.set(phase="running", qemu_pid=pid, started=time.time())

    def finished(self, outcome: str) -> None:
        """qemu has exited; ``outcome`` is clean, hard or crashed."""
        record_run(self.sources.runs_file, outcome=outcome)
        self.set(phase="stopped" if outcome != "crashed" else "error", qemu_pid=0)

    def forget(self) -> None:
        """The run is over: its saved state goes (a status asked later finds no runner)."""
        with contextlib.suppress(OSError):
            (self.sources.run_dir / STATE_FILE).unlink()

    def cache_size(self) -> int:
        """Bytes in IMAGE_DIR, scanned at most once a minute (the cache may be a large network share)."""
        when, size = self._cache_size
        if time.monotonic() - when >= CACHE_SCAN_EVERY or when == 0.0:
            size = directory_size(self.sources.image_dir)
            self._cache_size = (time.monotonic(), size)
        return size


@contextlib.contextmanager
def fetching(tracker: Tracker, name: str) -> Iterator[None]:
    """Time the fetch (with its hashing and vetting) and record the vetting result (refused: the run then ends
    with exit status 3)."""
    image = tracker.state.image
    image.name = name
    started = time.monotonic()
    try:
        yield
    except ImageRejected:
        image.vetting = "refused"
        tracker.set()
        raise
    if image.received:
        image.fetch_seconds = time.monotonic() - started
    image.vetting = "accepted"
    tracker.set()


def base_in_use(tracker: Tracker, hexdigest: str | None) -> None:
    """The base the pet runs on, by its digest (none for a standalone pet)."""
    tracker.state.image.digest = f"sha256:{hexdigest}" if hexdigest else ""
    tracker.set()


@contextlib.contextmanager
def outcome(tracker: Tracker) -> Iterator[None]:
    """Record how the run ended in the pet's record: clean, hard (stopped after the timeout) or crashed."""
    try:
        yield
    except StoppedHard:
        tracker.finished("hard")
        raise
    except ChildFailed:
        tracker.finished("crashed")
        raise
    tracker.finished("clean")


def load_state(run_dir: Path) -> RunState | None:
    """The run state the ``run`` process saved, or None when none (or a malformed one) is there."""
    try:
        data = read_small(run_dir / STATE_FILE, figures.MAX_SIZE)
        raw = json.loads(data)
        image = ImageFigures(**raw.pop("image"))
        state = RunState(**raw, image=image)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return state


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
    """Per-drive figures from QMP ``query-blockstats`` (drives named by their -drive id)."""
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


async def _query(monitor: Path) -> tuple[object, object]:
    from qemu.qmp import QMPClient, QMPError

    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    client = QMPClient("vmrunner-metrics")
    try:
        await client.connect(str(monitor))
        return await client.execute("query-status"), await client.execute("query-blockstats")
    except (QMPError, OSError, EOFError) as err:
        raise PodvmError(f"{monitor}: {err!r}") from None
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


def query_qemu(monitor: Path) -> tuple[object, object] | None:
    """qemu's run state and block statistics, or None when no qemu answers within QMP_TIMEOUT."""
    try:
        return asyncio.run(asyncio.wait_for(_query(monitor), QMP_TIMEOUT))
    except (PodvmError, TimeoutError):
        return None


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


def _values(spec: figures.Spec, sample: Figure) -> list[str]:
    labels = dict(sample.labels)
    return [labels[name] for name in spec.labels]


class Collector:
    """prometheus_client's view of :func:`gather`: one metric family per catalog entry that has samples.

    The endpoint answers anyone who reaches the pod IP, so scrapes are served one at a time and the figures are
    gathered at most once per GATHER_EVERY: a flood of requests costs neither qemu's monitor nor the runner more.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._lock = threading.Lock()
        self._last: tuple[float, list[Figure]] = (0.0, [])

    def _figures(self) -> list[Figure]:
        with self._lock:
            when, items = self._last
            if not items or time.monotonic() - when >= GATHER_EVERY:
                items = gather(self.tracker.state, self.tracker.sources, self.tracker.cache_size())
                self._last = (time.monotonic(), items)
            return items

    def collect(self) -> Iterator[Any]:
        """Families with their help, type and samples, in catalog order."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        items = self._figures()
        by_name: dict[str, list[Figure]] = {}
        for item in items:
            by_name.setdefault(item.name, []).append(item)
        for name, spec in figures.CATALOG.items():
            samples = by_name.get(name)
            if not samples:
                continue
            family: Any
            if spec.kind == "info":
                family = InfoMetricFamily(name, spec.help, labels=spec.labels)
                for sample in samples:
                    family.add_metric(_values(spec, sample), {})
            elif spec.kind == "counter":
                family = CounterMetricFamily(name, spec.help, labels=spec.labels)
                for sample in samples:
                    family.add_metric(_values(spec, sample), sample.value)
            else:
                family = GaugeMetricFamily(name, spec.help, labels=spec.labels)
                for sample in samples:
                    family.add_metric(_values(spec, sample), sample.value)
            yield family


def serve(port: int, tracker: Tracker) -> None:
    """Serve the endpoint on ``port`` of every address of the pod, in a thread of its own.

    :raise PodvmError: when the port cannot be bound.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(tracker))
    try:
        start_http_server(port, addr="0.0.0.0", registry=registry)  # noqa: S104 - scraped on the pod IP
    except OSError as err:
        raise PodvmError(f"METRICS_PORT={port}: cannot listen: {err.strerror}") from None
    log.info("metrics on TCP port %d", port)
