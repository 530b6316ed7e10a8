"""The one reader and writer of the pod namespace's sysctls (/proc/sys), for `prepare`, `run`, the plan and the probes.

Which sysctl gets which value is decided in :mod:`netsidecar.plan`; this module only reads and writes them.
"""

import logging
from pathlib import Path

from netsidecar.plan import FORWARDING, IPV6_DEFAULTS, SysctlChange
from shared.errors import ConfigError

log = logging.getLogger("netsidecar")
PROC_SYS = Path("/proc/sys")
_CONF6 = "net.ipv6.conf"


def path(name: str) -> Path:
    """The file of the sysctl ``name`` (dots separate the levels; an interface name holds none: the kernel refuses
    dots in the names the sidecar uses)."""
    return PROC_SYS.joinpath(*name.split("."))


def read(name: str) -> str | None:
    """The value of ``name``, or None where the kernel has no such sysctl (no IPv6, no such link)."""
    try:
        return path(name).read_text().strip()
    except FileNotFoundError:
        return None


def enabled(name: str) -> bool:
    """Whether ``name`` is 1 (a forwarding switch); False where the kernel has no such sysctl."""
    return read(name) == "1"


def prepare_snapshot() -> dict[str, str]:
    """The values `prepare`'s plan depends on, as they are now: the forwarding switches, the defaults new links
    start with, and every interface's accept_ra (absent sysctls are left out)."""
    names = [*FORWARDING.values(), *IPV6_DEFAULTS]
    names += [f"{_CONF6}.{conf.parent.name}.accept_ra" for conf in sorted(path(_CONF6).glob("*/accept_ra"))]
    return {name: value for name in names if (value := read(name)) is not None}


def write(change: SysctlChange) -> None:
    """Apply one planned change.

    :raise ConfigError: when /proc/sys cannot be written, naming the two ways to set it.
    """
    what = "turn on forwarding" if change.name in FORWARDING.values() else f"set {change.name}={change.value}"
    try:
        path(change.name).write_text(f"{change.value}\n")
    except OSError as err:
        raise ConfigError(
            f"{path(change.name)}: cannot {what} ({err.strerror}): `netsidecar prepare` needs a privileged "
            f"container, or set {change.name}={change.value} in the pod's securityContext.sysctls"
        ) from err
    log.info("%s set to %s", change.name, change.value)


def write_link(link: str, changes: tuple[SysctlChange, ...]) -> None:
    """Apply a link's IPv6 sysctls until one cannot be written (a read-only /proc/sys): the nftables rules still
    drop IPv6 from the guest, so that is logged, not refused."""
    for change in changes:
        try:
            path(change.name).write_text(f"{change.value}\n")
        except OSError as err:
            key = change.name.rsplit(".", 1)[1]
            log.info("%s: IPv6 %s not set (%s); the nftables rules still drop IPv6 from the guest", link, key, err)
            return


def check_forwarding(families: tuple[str, ...]) -> None:
    """:raise ConfigError: when forwarding is off for a family the VM is given, naming the two ways to turn it on."""
    for name in (FORWARDING[family] for family in families):
        if not enabled(name):
            raise ConfigError(
                f"{name} is 0 in the pod: run `netsidecar prepare` in a privileged init container before "
                "`netsidecar run`, or set it in the pod's securityContext.sysctls (see deploy/README.md)"
            )
