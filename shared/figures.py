"""The figures podvm reports: one catalog of names, one document format, one checked reader.

Both containers gather figures; the runner serves them all on one Prometheus endpoint (``METRICS_PORT``), and the
``status`` commands print the same documents as JSON. The sidecar hands its network figures to the runner as a
small document in ``RUN_DIR`` (written atomically); the runner reads it through :func:`read_document`, which follows
no symbolic link, reads at most :data:`MAX_SIZE` bytes and keeps only figures of the catalog with the declared
labels. The sidecar, which runs with network privileges, never reads a file the runner can write.

A document is ``{"version": 1, "time": <unix seconds>, "figures": [{"name", "labels", "value"}, ...]}``.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import documents
from shared.files import read_small

VERSION = 1
NETWORK_FILE = "network-figures.json"
MAX_SIZE = 64 * 1024
MAX_FIGURES = 500
MAX_LABEL_LENGTH = 128


@dataclass(frozen=True)
class Spec:
    """One metric: its name (Prometheus conventions, unit in the name), type, help text and label names."""

    name: str
    kind: str  # counter, gauge or info
    help: str
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Figure:
    """One sample: a catalog name, its label values and a number."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: labels as an object."""
        return {"name": self.name, "labels": dict(self.labels), "value": self.value}


def figure(metric: str, value: float, /, **labels: str) -> Figure:
    """A figure with labels given as keywords."""
    return Figure(metric, tuple(sorted(labels.items())), float(value))


def _tap(direction: str, what: str, unit: str, help_what: str) -> Spec:
    side = "received by" if direction == "receive" else "sent by"
    return Spec(
        f"podvm_network_{direction}_{what}{unit}_total",
        "counter",
        f"{help_what} {side} the VM on its tap (the tap's counters seen from the guest, as KubeVirt reports them)",
        ("interface",),
    )


NETWORK: tuple[Spec, ...] = (
    _tap("receive", "", "bytes", "Bytes"),
    _tap("transmit", "", "bytes", "Bytes"),
    _tap("receive", "", "packets", "Packets"),
    _tap("transmit", "", "packets", "Packets"),
    _tap("receive", "", "errors", "Errors on packets"),
    _tap("transmit", "", "errors", "Errors on packets"),
    _tap("receive", "packets_", "dropped", "Packets dropped instead of being"),
    _tap("transmit", "packets_", "dropped", "Packets dropped instead of being"),
    Spec(
        "podvm_nat_packets_total",
        "counter",
        "Packets translated by the pod IP's NAT: in = to the VM, out = from the VM to the pod network",
        ("direction",),
    ),
    Spec(
        "podvm_nat_bytes_total",
        "counter",
        "Bytes translated by the pod IP's NAT (see podvm_nat_packets_total)",
        ("direction",),
    ),
    Spec(
        "podvm_nat_connections_total",
        "counter",
        "Connections that took a NAT rule (nat chains see the first packet of each connection only)",
        ("rule",),
    ),
    Spec(
        "podvm_guard_dropped_packets_total",
        "counter",
        "Packets from the guest dropped by an isolation guard, by the guard's rule comment",
        ("guard",),
    ),
    Spec("podvm_guard_dropped_bytes_total", "counter", "Bytes dropped by an isolation guard", ("guard",)),
    Spec("podvm_dhcp_leases_total", "counter", "DHCP acknowledgements sent to the VM (leases handed out or renewed)"),
    Spec("podvm_dhcp_last_lease_timestamp_seconds", "gauge", "Unix time of the last DHCP acknowledgement"),
    Spec("podvm_dnsmasq_restarts_total", "counter", "Times the sidecar restarted a dnsmasq that had died"),
    Spec("podvm_network_figures_timestamp_seconds", "gauge", "Unix time at which the sidecar gathered these figures"),
)

VM_STATES = ("waiting", "fetching", "starting", "running", "paused", "shutting_down", "stopped", "error")
SHUTDOWN_OUTCOMES = ("clean", "hard", "crashed", "suspended")


def _storage(what: str, help_text: str) -> Spec:
    return Spec(f"podvm_vm_storage_{what}", "counter", f"{help_text} (QMP query-blockstats)", ("drive",))


RUNNER: tuple[Spec, ...] = (
    Spec(
        "podvm_build",
        "info",
        "podvm's version, the accelerator in use, the runner and the VM's name",
        ("version", "accel", "runner", "vm"),
    ),
    Spec(
        "podvm_vm_accel_fallback",
        "gauge",
        "1 when ACCEL=auto found KVM unusable (missing, or a device the container may not open) and runs under TCG",
    ),
    Spec(
        "podvm_vm_boot_refused",
        "gauge",
        "1 when the firmware refused the guest's boot option (Secure Boot and an unsigned bootloader): no guest runs",
    ),
    Spec(
        "podvm_vm_state",
        "gauge",
        f"1 for the VM's current state, 0 for the others ({', '.join(VM_STATES)})",
        ("state",),
    ),
    Spec(
        "podvm_vm_io_error_paused",
        "gauge",
        "1 while qemu holds the VM paused because its disk could not grow (VM_DIR full), else 0",
    ),
    Spec("podvm_vm_boots_total", "counter", "qemu starts on this pet disk, recorded beside it in VM_DIR"),
    Spec(
        "podvm_vm_shutdowns_total",
        "counter",
        "How earlier runs on this pet disk ended: clean, hard or crashed",
        ("outcome",),
    ),
    Spec("podvm_vm_start_time_seconds", "gauge", "Unix time at which qemu started"),
    Spec("podvm_vm_uptime_seconds", "gauge", "Seconds since qemu started"),
    Spec("podvm_vm_cpu_usage_seconds_total", "counter", "CPU time of the qemu process (user and system)"),
    Spec("podvm_vm_cpu_user_usage_seconds_total", "counter", "User CPU time of the qemu process"),
    Spec("podvm_vm_cpu_system_usage_seconds_total", "counter", "System CPU time of the qemu process"),
    Spec("podvm_vm_memory_resident_bytes", "gauge", "Resident memory of the qemu process"),
    _storage("read_traffic_bytes_total", "Bytes the guest read from the drive"),
    _storage("write_traffic_bytes_total", "Bytes the guest wrote to the drive"),
    _storage("iops_read_total", "Read operations on the drive"),
    _storage("iops_write_total", "Write operations on the drive"),
    _storage("read_times_seconds_total", "Time spent on reads"),
    _storage("write_times_seconds_total", "Time spent on writes"),
    _storage("flush_requests_total", "Flush operations on the drive"),
    _storage("flush_times_seconds_total", "Time spent on flushes"),
    Spec("podvm_image_fetched_bytes_total", "counter", "Bytes of the base image this runner downloaded or copied"),
    Spec("podvm_image_fetch_duration_seconds", "gauge", "How long this runner's fetch of the base image took"),
    Spec("podvm_image_fetch_retries_total", "counter", "Download attempts that failed and were retried"),
    Spec("podvm_image_fetch_resumes_total", "counter", "Retries that resumed where the download broke off"),
    Spec(
        "podvm_image_vetting",
        "gauge",
        "1 for the base image's vetting result (accepted, refused, pending)",
        ("result",),
    ),
    Spec(
        "podvm_image_base",
        "info",
        "The base image in use: its name in the cache and its digest (empty for a standalone pet disk)",
        ("name", "digest"),
    ),
    Spec("podvm_image_cache_size_bytes", "gauge", "Bytes of regular files in the shared image cache"),
    Spec("podvm_backup_last_attempt_timestamp_seconds", "gauge", "Unix time at which the last backup ended"),
    Spec(
        "podvm_backup_last_result",
        "gauge",
        "1 for the outcome of the last backup attempt (ok, failed), 0 for the other",
        ("result",),
    ),
    Spec("podvm_backup_last_success_timestamp_seconds", "gauge", "Unix time at which the last successful backup ended"),
    Spec(
        "podvm_backup_last_success_kind",
        "gauge",
        "1 for the kind of the last successful backup (full, incremental), 0 for the other",
        ("kind",),
    ),
    Spec("podvm_backup_last_success_copied_bytes", "gauge", "Bytes the last successful backup copied from the disk"),
    Spec("podvm_backup_last_success_size_bytes", "gauge", "Bytes of the last successful backup's file"),
    Spec("podvm_backup_last_success_duration_seconds", "gauge", "How long the last successful backup took"),
    Spec("podvm_backup_last_success_frozen", "gauge", "1 when the guest's file systems were frozen for it"),
)

CATALOG: dict[str, Spec] = {spec.name: spec for spec in NETWORK + RUNNER}
NETWORK_NAMES = frozenset(spec.name for spec in NETWORK)


def sample_name(spec: Spec) -> str:
    """The name the sample line carries: ``_info`` is appended to an info metric, as Prometheus clients do."""
    return f"{spec.name}_info" if spec.kind == "info" else spec.name


def document(figures: list[Figure], when: float) -> dict[str, Any]:
    """The JSON document of ``figures`` gathered at unix time ``when``."""
    return {"version": VERSION, "time": when, "figures": [f.to_dict() for f in figures]}


class FiguresError(ValueError):
    """A figures document that cannot be used; the caller reports it and goes on without those figures."""


def _valid_figure(item: object, allowed: frozenset[str]) -> Figure:
    if not isinstance(item, dict) or set(item) != {"name", "labels", "value"}:
        raise FiguresError("a figure must be an object with name, labels and value")
    name, labels, value = item["name"], item["labels"], item["value"]
    if not isinstance(name, str) or name not in allowed:
        raise FiguresError(f"unknown figure {str(name)[:MAX_LABEL_LENGTH]!r}")
    spec = CATALOG[name]
    if not isinstance(labels, dict) or set(labels) != set(spec.labels):
        raise FiguresError(f"{name}: expected the labels {list(spec.labels)}")
    for key, text in labels.items():
        if not isinstance(text, str) or len(text) > MAX_LABEL_LENGTH or not text.isprintable():
            raise FiguresError(f"{name}: label {key} must be printable text of at most {MAX_LABEL_LENGTH} characters")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise FiguresError(f"{name}: value must be a finite number >= 0")
    return Figure(name, tuple(sorted(labels.items())), float(value))


def parse_document(data: bytes, allowed: frozenset[str]) -> tuple[float, list[Figure]]:
    """The time and figures of a document, each checked against the catalog (only ``allowed`` names, no
    duplicate series).

    :raise FiguresError: when anything in it is malformed; nothing of a bad document is used.
    """
    try:
        doc = documents.parse(data, documents.exactly(VERSION, "figures document"))
    except documents.DocumentError as err:
        raise FiguresError(str(err)) from None
    when, items = doc.get("time"), doc.get("figures")
    if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when) or when < 0:
        raise FiguresError("time must be a unix time")
    if not isinstance(items, list) or len(items) > MAX_FIGURES:
        raise FiguresError(f"figures must be a list of at most {MAX_FIGURES}")
    figures = [_valid_figure(item, allowed) for item in items]
    if len({(f.name, f.labels) for f in figures}) != len(figures):
        raise FiguresError("the same figure appears twice")
    return float(when), figures


def read_document(path: Path, allowed: frozenset[str]) -> tuple[float, list[Figure]]:
    """Read and check a figures document written by the other container.

    :raise FiguresError: when it is missing, not a regular file, a symbolic link, larger than MAX_SIZE or malformed.
    """
    try:
        data = read_small(path, MAX_SIZE)
    except OSError as err:
        raise FiguresError(f"{path}: {err.strerror}") from None
    except ValueError as err:
        raise FiguresError(str(err)) from None
    return parse_document(data, allowed)
