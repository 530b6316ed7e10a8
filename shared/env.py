"""Typed, validated reading of environment variables.

Each reader returns a Python value or raises :class:`~shared.errors.ConfigError` with one line that names the
variable and says what is wrong with its value, so a misconfigured pod fails before it changes anything.
"""

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_SIZE = re.compile(r"^(\d+)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$")
PATH_MAX = 4095  # bytes of a path the kernel accepts, and of one name in it
NAME_MAX = 255
_DURATION_FACTOR = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """Bytes from ``1024``, ``512M``, ``20G``, ``20GiB`` (binary multiples); ValueError if malformed."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(text)
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * _SIZE_FACTOR[unit]


@dataclass(frozen=True)
class Env:
    """A read-only view of the environment with validating readers."""

    values: Mapping[str, str]

    def _raw(self, name: str) -> str | None:
        value = self.values.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def text(self, name: str, default: str) -> str:
        """The variable's value, or ``default`` when it is unset or empty."""
        raw = self._raw(name)
        return default if raw is None else raw

    def optional(self, name: str) -> str | None:
        """The variable's value, or None when it is unset or empty."""
        return self._raw(name)

    def required(self, name: str, what: str) -> str:
        """The variable's value; a ConfigError saying what it should hold when it is missing."""
        raw = self._raw(name)
        if raw is None:
            raise ConfigError(f"{name} is required: set it to {what}")
        return raw

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean written as true/false, yes/no, on/off or 1/0; unset or empty means ``default``."""
        raw = self.values.get(name)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False if lowered else default
        raise ConfigError(f"{name}={raw!r}: expected true or false")

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        """A whole number within ``[minimum, maximum]``."""
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw, 10)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
        if not minimum <= value <= maximum:
            raise ConfigError(f"{name}={value}: expected a number from {minimum} to {maximum}")
        return value

    def size(self, name: str, default: int, minimum: int = 0) -> int:
        """A size in bytes, written as ``1024``, ``512M``, ``20G`` or ``20GiB``."""
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = parse_size(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a size such as 512M or 20G") from None
        if value < minimum:
            raise ConfigError(f"{name}={raw!r}: must be at least {minimum} bytes")
        return value

    def duration(self, name: str, default: float) -> float:
        """Seconds, written as ``30``, ``30s``, ``500ms``, ``2m`` or ``1h``."""
        raw = self._raw(name)
        if raw is None:
            return default
        match = _DURATION.match(raw)
        if not match:
            raise ConfigError(f"{name}={raw!r}: expected a duration such as 30s, 500ms or 2m")
        return float(match.group(1)) * _DURATION_FACTOR[match.group(2) or ""]

    def ipv4(self, name: str, default: str) -> ipaddress.IPv4Address:
        """An IPv4 address in dotted form."""
        raw = self.text(name, default)
        try:
            return ipaddress.IPv4Address(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an IPv4 address such as {default}") from None

    def path(self, name: str, default: str, max_bytes: int = PATH_MAX - NAME_MAX - 1) -> Path:
        """An absolute path of at most ``max_bytes`` (by default, room is left for a file name inside it)."""
        raw = self.text(name, default)
        if not raw.startswith("/"):
            raise ConfigError(f"{name}={raw!r}: expected an absolute path")
        encoded = os.fsencode(raw)
        if len(encoded) > max_bytes or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
            raise ConfigError(f"{name}={raw!r}: too long; at most {max_bytes} bytes, {NAME_MAX} per name")
        return Path(raw)

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        """One of a fixed set of words (compared in lower case)."""
        allowed = tuple(choices)
        raw = self.text(name, default).lower()
        if raw not in allowed:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
        return raw


_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def pod_hostname(env: Env) -> str:
    """The pod's hostname (``HOSTNAME``, else the kernel's): it names the pet disk and is handed to the guest."""
    name = env.text("HOSTNAME", socket.gethostname()).lower()
    # 63: a pod's hostname never exceeds it (Linux allows 64), and "<hostname>.qcow2" and its temporary name must fit
    # the 255 bytes of a file name on the VM's volume
    if len(name) > 63 or not _HOSTNAME.match(name):
        raise ConfigError(f"HOSTNAME={name!r}: expected a DNS name of at most 63 letters, digits, '-' and '.'")
    return name


def _port_in_pod(env: Env, name: str, no_vnc: bool, example: int, taken: dict[str, int | None]) -> int | None:
    """A TCP port on the pod IP kept in the pod for one of the runner's services; unset means that service is off.
    Each such port is the runner's alone: not VNC's 5900 (while VNC is in the pod), not another service's."""
    if env.optional(name) is None:
        return None
    port = env.integer(name, 0, 1, 65535)
    owners = {"VNC": None if no_vnc else 5900, **taken}
    for owner, used in owners.items():
        if port == used:
            raise ConfigError(f"{name}={port}: {owner} has that port; choose another (e.g. {example})")
    return port


def metrics_port(env: Env, no_vnc: bool) -> int | None:
    """METRICS_PORT: the TCP port of the metrics endpoint, which stays in the pod; unset means no metrics."""
    return _port_in_pod(env, "METRICS_PORT", no_vnc, 9100, {})


def console_pod_port(env: Env, no_vnc: bool) -> int | None:
    """CONSOLE_POD_PORT: the TCP port where the browser console is also served on the pod IP, which stays in the
    pod; unset means the console is reached only through ``kubectl port-forward`` (localhost)."""
    return _port_in_pod(env, "CONSOLE_POD_PORT", no_vnc, 6080, {"METRICS_PORT": metrics_port(env, no_vnc)})
