"""The handshake: the file with which the network sidecar tells a VM runner that the VM's network is ready.

The sidecar writes ``$RUN_DIR/network.json`` atomically once the bridge, tap, rules and DHCP server are in place;
a runner waits for it, checks it against ``handshake.schema.json`` (the contract's source of truth, shipped beside
this module) and refuses a major version it does not know. ``docs/runner-contract.md`` explains each field.
"""

import ipaddress
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared import documents
from shared.errors import HandshakeError
from shared.files import read_small, write_atomic

VERSION = "1.4"
MAJOR = 1
FILE_NAME = "network.json"
MAX_SIZE = 64 * 1024

_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "boolean": bool,
    "null": type(None),
}


def schema() -> dict[str, Any]:
    """The handshake's JSON Schema, shipped beside this module (read as a file: importlib.resources would cost the
    runner's start about 5 ms, and the package is never installed zipped)."""
    text = Path(__file__).with_name("handshake.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _type_ok(value: object, names: str | list[str]) -> bool:
    for name in [names] if isinstance(names, str) else names:
        expected = _TYPES[name]
        if isinstance(value, expected) and not (name == "integer" and isinstance(value, bool)):
            return True
    return False


def _check(value: object, rule: dict[str, Any], where: str) -> None:
    """Validate ``value`` against the subset of JSON Schema the handshake schema uses."""
    if "type" in rule and not _type_ok(value, rule["type"]):
        raise HandshakeError(f"{where}: expected {rule['type']}, got {type(value).__name__}")
    if isinstance(value, str):
        if "pattern" in rule and not re.search(rule["pattern"], value):
            raise HandshakeError(f"{where}: {value!r} does not match {rule['pattern']}")
        if len(value) < rule.get("minLength", 0):
            raise HandshakeError(f"{where}: must not be empty")
        if rule.get("format") in ("ipv4", "ipv6"):
            kind = ipaddress.IPv4Address if rule["format"] == "ipv4" else ipaddress.IPv6Address
            try:
                kind(value)
            except ValueError:
                name = "IPv4" if rule["format"] == "ipv4" else "IPv6"
                raise HandshakeError(f"{where}: {value!r} is not an {name} address") from None
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not rule.get("minimum", value) <= value <= rule.get("maximum", value)
    ):
        raise HandshakeError(f"{where}: {value} is out of range")
    if isinstance(value, list) and "items" in rule:
        for index, item in enumerate(value):
            _check(item, rule["items"], f"{where}[{index}]")
    if isinstance(value, dict):
        for name in rule.get("required", []):
            if name not in value:
                raise HandshakeError(f"{where}: missing field {name!r}")
        for name, sub in rule.get("properties", {}).items():
            if name in value:
                _check(value[name], sub, f"{where}.{name}")


# --- version 1.1: IPv6 -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ipv6:
    """The VM's IPv6 side (handshake 1.1), present when the pod has IPv6 (see handshake.schema.json)."""

    vm_ip: str
    gateway: str
    router: str
    prefix: int
    pod_ip: str
    dns: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Ipv6":
        """From schema-checked data."""
        return cls(**{**{name: data[name] for name in cls.__dataclass_fields__}, "dns": tuple(data["dns"])})


# ------------------------------------------------------------------------------------------------------------------


def version_problem(version: object) -> str | None:
    """What is wrong with a handshake's ``version`` for this side (a major version it does not speak), or None."""
    if not isinstance(version, str) or not re.fullmatch(r"[0-9]{1,9}\.[0-9]{1,9}", version):
        return "missing or malformed 'version' (expected MAJOR.MINOR)"
    if int(version.split(".")[0]) != MAJOR:
        return f"handshake version {version} is not supported (this side speaks {MAJOR}.x)"
    return None


@dataclass(frozen=True)
class Handshake:
    """What a runner needs to know about the VM's network (see handshake.schema.json for each field)."""

    tap: str
    bridge: str
    mac: str
    vm_ip: str | None  # None (1.1) on a pod without IPv4: a 1.0 runner refuses such a handshake
    gateway: str | None
    prefix: int
    mtu: int
    pod_ip: str | None
    dns: tuple[str, ...]
    search: tuple[str, ...]
    hostname: str
    vnc_in_pod: bool
    tap_owner: int | None
    version: str = VERSION
    # --- 1.1: IPv6 (absent from a 1.0 handshake: IPv4 only) ---
    families: tuple[str, ...] = ("ipv4",)
    ipv6: Ipv6 | None = None
    # --- 1.2: the metrics port (absent before: no metrics endpoint) ---
    metrics_port: int | None = None
    # --- 1.3: the browser console's port on the pod IP (absent before: the console is not exposed there) ---
    console_port: int | None = None
    # --- 1.4: a multiqueue tap (absent before: a single-queue tap) ---
    tap_queues: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The handshake as JSON-ready data, lists in place of tuples."""
        data = asdict(self)
        data["dns"] = list(self.dns)
        data["search"] = list(self.search)
        data["families"] = list(self.families)
        if self.ipv6 is not None:
            data["ipv6"]["dns"] = list(self.ipv6.dns)
        return data

    @classmethod
    def from_dict(cls, data: object, source: str = "handshake") -> "Handshake":
        """Validate ``data`` against the schema and build a Handshake.

        :raise HandshakeError: when the major version is unknown or a field is missing or malformed.
        """
        if not isinstance(data, dict):
            raise HandshakeError(f"{source}: expected a JSON object")
        problem = version_problem(data.get("version"))
        if problem is not None:
            raise HandshakeError(f"{source}: {problem}")
        _check(data, schema(), source)
        # Fields a minor version added are absent from older handshakes: the dataclass's default stands for them.
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        fields["dns"] = tuple(fields["dns"])
        fields["search"] = tuple(fields["search"])
        if "families" in fields:
            fields["families"] = tuple(fields["families"])
        if fields.get("ipv6") is not None:
            fields["ipv6"] = Ipv6.from_dict(fields["ipv6"])
        return cls(**fields)

    def write(self, run_dir: Path) -> Path:
        """Publish the handshake atomically in ``run_dir`` and return its path."""
        path = run_dir / FILE_NAME
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode(), mode=0o644)
        return path


def read(path: Path) -> Handshake:
    """Read and validate a handshake file.

    :raise HandshakeError: when it cannot be read or parsed, or does not follow the schema.
    """
    try:
        # RUN_DIR is writable by the runner and ``netsidecar probe`` reads the handshake as root: no link, no FIFO.
        raw = read_small(path, MAX_SIZE)
    except OSError as err:
        raise HandshakeError(f"{path}: cannot read the handshake: {err.strerror}") from err
    except ValueError as err:
        raise HandshakeError(f"{err}, not a handshake") from err
    try:
        data = documents.parse(raw, version_problem)
    except documents.DocumentError as err:
        raise HandshakeError(f"{path}: {err}") from err
    return Handshake.from_dict(data, str(path))


def wait(run_dir: Path, timeout: float, poll: float = 0.1) -> Handshake:
    """Wait up to ``timeout`` seconds for the sidecar's handshake in ``run_dir`` and return it.

    :raise HandshakeError: when it has not appeared in time, or is invalid.
    """
    path = run_dir / FILE_NAME
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            raise HandshakeError(
                f"{path}: no network handshake after {timeout:g}s; is the netsidecar container running?"
            )
        time.sleep(poll)
    return read(path)
