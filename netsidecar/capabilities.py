"""The capabilities `netsidecar run` needs, checked before anything is changed."""

from pathlib import Path

from netsidecar.config import IPV6
from shared.errors import ConfigError

# What `run` needs, found by taking each away from the real sidecar (docs/security.md), with its bit in
# linux/capability.h. NET_ADMIN: links, tap owner, nftables, dnsmasq's ARP entries; NET_BIND_SERVICE: dnsmasq binds
# port 67 before it drops root; SETUID, SETGID: that drop to nobody; KILL: stopping dnsmasq once it runs as nobody.
RUN_CAPABILITIES = {"KILL": 5, "SETGID": 6, "SETUID": 7, "NET_BIND_SERVICE": 10, "NET_ADMIN": 12}
# NET_RAW as well where the VM gets IPv6: dnsmasq sends router advertisements on a raw ICMPv6 socket.
RUN_CAPABILITIES_IPV6 = {**RUN_CAPABILITIES, "NET_RAW": 13}


def missing_capabilities(status: str, needed: dict[str, int] = RUN_CAPABILITIES) -> list[str]:
    """The capabilities of ``needed`` absent from the effective set in a /proc/PID/status text."""
    effective = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff:"))
    return [name for name, bit in needed.items() if not effective >> bit & 1]


def check_capabilities(families: tuple[str, ...]) -> None:
    """:raise ConfigError: naming every capability `run` lacks for ``families``, before anything is changed."""
    needed = RUN_CAPABILITIES_IPV6 if IPV6 in families else RUN_CAPABILITIES
    missing = missing_capabilities(Path("/proc/self/status").read_text(), needed)
    if missing:
        raise ConfigError(
            f"the net container lacks the capabilities {', '.join(missing)}: add them to its "
            "securityContext.capabilities (deploy/pod.yaml lists what `netsidecar run` needs)"
        )
