"""The links by netlink (pyroute2): the pod's facts, the bridge, the tap and their addresses, as the plan says.

pyroute2 is imported only where netlink is used: its import alone costs a third of a second.
"""

import fcntl
import ipaddress
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from netsidecar import config, sysctl
from netsidecar.config import BRIDGE, TAP, PodFacts, Settings
from netsidecar.plan import Json, LinkPlan, SysctlChange
from shared.errors import ConfigError, PodvmError

log = logging.getLogger("netsidecar")

_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_TUNSETOWNER = 0x400454CC
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def _ipr() -> Any:
    """An IPRoute socket; pyroute2 is imported here because its import alone costs a third of a second."""
    from pyroute2 import IPRoute  # noqa: PLC0415 - costly import, only where netlink is used

    return IPRoute()


def _link(ipr: Any, name: str) -> Any | None:
    links = ipr.link_lookup(ifname=name)
    return ipr.get_links(links[0])[0] if links else None


def pod_facts(settings: Settings) -> PodFacts:
    """Find the pod interface (the default route's of either family, unless POD_IFACE) and its addresses, waiting
    up to POD_WAIT_TIMEOUT until it holds the families IP_FAMILIES asks for (on auto: at least one)."""
    deadline = time.monotonic() + settings.pod_wait_timeout
    with _ipr() as ipr:
        while True:
            facts = _try_pod_facts(ipr, settings)
            if facts is not None:
                return facts
            if time.monotonic() >= deadline:
                what = f"POD_IFACE={settings.pod_iface}" if settings.pod_iface else "the default route's interface"
                wanted = " and ".join(settings.families) or "IPv4 or IPv6"
                raise PodvmError(
                    f"{what}: no {wanted} address after POD_WAIT_TIMEOUT={settings.pod_wait_timeout:g}s"
                    " (IP_FAMILIES chooses the families)"
                )
            time.sleep(0.1)


def _default_route_index(ipr: Any) -> int | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        routes = [r for r in ipr.get_default_routes(family=family) if r.get_attr("RTA_OIF")]
        if routes:
            index: int = routes[0].get_attr("RTA_OIF")
            return index
    return None


def _try_pod_facts(ipr: Any, settings: Settings) -> PodFacts | None:
    if settings.pod_iface:
        found = ipr.link_lookup(ifname=settings.pod_iface)
        index = found[0] if found else None
    else:
        index = _default_route_index(ipr)
    if index is None:
        return None
    link = ipr.get_links(index)[0]
    v4 = [
        ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        for a in ipr.get_addr(index=index, family=socket.AF_INET)
    ]
    # Global addresses only (scope 0); a tentative one counts, it is the pod's once duplicate detection is done.
    v6 = [
        ipaddress.IPv6Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        for a in ipr.get_addr(index=index, family=socket.AF_INET6)
        if a["scope"] == 0
    ]
    return config.pod_from(
        settings, link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU"), v4[0] if v4 else None, v6[0] if v6 else None
    )


def _create_tap(name: str, owner: int | None) -> None:
    """A persistent tap owned by ``owner`` (so an unprivileged runner opens it); the creating fd is then closed."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
        if owner is not None:
            fcntl.ioctl(fd, _TUNSETOWNER, owner)
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


_ADDR_GEN_MODE_NONE = 1
_IFA_F_NODAD = 0x02


def _ipv6_off(ipr: Any, index: int, name: str, changes: tuple[SysctlChange, ...]) -> None:
    """No IPv6 the kernel makes up on a link: no link-local address of its own (netlink works even where /proc/sys
    is read-only), then the link's planned IPv6 sysctls where /proc/sys is writable."""
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 - pyroute2 only where netlink is used

    spec = {"attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", _ADDR_GEN_MODE_NONE)]})]}
    try:
        ipr.link("set", index=index, IFLA_AF_SPEC=spec)
    except NetlinkError as err:
        log.info("%s: IPv6 address generation left as it is (%s)", name, os.strerror(err.code))
    sysctl.write_link(name, changes)


def ensure_links(plan: LinkPlan) -> None:
    """Create the bridge and tap if missing, else keep them (a VM may hold the tap open) and fix their settings."""
    with _ipr() as ipr:
        if _link(ipr, plan.bridge) is None:
            ipr.link("add", ifname=plan.bridge, kind="bridge")
            log.info("bridge %s created", plan.bridge)
        bridge = ipr.link_lookup(ifname=plan.bridge)[0]
        # An address set explicitly pins it: the bridge no longer takes the lowest MAC of its ports.
        ipr.link("set", index=bridge, address=plan.bridge_mac)
        _ipv6_off(ipr, bridge, plan.bridge, plan.bridge_sysctls())
        ipr.link("set", index=bridge, mtu=plan.mtu)
        for family, wanted in (
            (socket.AF_INET, [plan.bridge_address] if plan.bridge_address else []),
            (socket.AF_INET6, list(plan.bridge_addresses6)),
        ):
            _set_addresses(ipr, bridge, family, wanted)
        if _link(ipr, plan.tap) is None:
            _create_tap(plan.tap, plan.tap_owner)
            log.info("tap %s created (owner %s)", plan.tap, "root" if plan.tap_owner is None else plan.tap_owner)
        else:
            log.info("tap %s kept as it is (a VM may hold it open)", plan.tap)
        tap = ipr.link_lookup(ifname=plan.tap)[0]
        _ipv6_off(ipr, tap, plan.tap, plan.tap_sysctls())
        ipr.link("set", index=tap, mtu=plan.mtu, master=bridge, state="up")
        ipr.link("set", index=bridge, state="up")
    addresses = " ".join(filter(None, [plan.bridge_address, *plan.bridge_addresses6]))
    log.info("bridge %s %s mac %s mtu %d, tap %s", plan.bridge, addresses, plan.bridge_mac, plan.mtu, plan.tap)


def _set_addresses(ipr: Any, index: int, family: int, wanted: list[str]) -> None:
    """Exactly ``wanted`` on the link for ``family`` (IPv6 without duplicate detection: a guest's DAD probe must
    never make the bridge give up its address)."""
    have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=family)}
    want = {(str(ipaddress.ip_interface(w).ip), int(w.split("/")[1])) for w in wanted}
    for addr, plen in have - want:
        ipr.addr("del", index=index, address=addr, prefixlen=plen)
    for addr, plen in want - have:
        flags = {"IFA_FLAGS": _IFA_F_NODAD} if family == socket.AF_INET6 else {}
        ipr.addr("add", index=index, address=addr, prefixlen=plen, **flags)


def tap_carrier() -> bool:
    """Whether a VM holds the tap open (the kernel reports carrier only while a queue is attached)."""
    with _ipr() as ipr:
        link = _link(ipr, TAP)
        return bool(link is not None and link.get_attr("IFLA_CARRIER"))


def remove_links(names: tuple[str, ...]) -> None:
    """Delete the links ``names`` (the teardown's) that exist, in that order."""
    with _ipr() as ipr:
        for name in names:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])
                log.info("removed %s", name)


def link_status() -> list[Json]:
    """The bridge and tap as the kernel holds them."""
    out: list[Json] = []
    with _ipr() as ipr:
        for name in (BRIDGE, TAP):
            link = _link(ipr, name)
            if link is None:
                out.append({"name": name, "present": False})
                continue
            addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=link["index"])]
            out.append(
                {
                    "name": name,
                    "present": True,
                    "state": link.get_attr("IFLA_OPERSTATE"),
                    "carrier": bool(link.get_attr("IFLA_CARRIER")),
                    "mtu": link.get_attr("IFLA_MTU"),
                    "mac": link.get_attr("IFLA_ADDRESS"),
                    "master": link.get_attr("IFLA_MASTER"),
                    "addresses": addrs,
                }
            )
    return out


def _info(link: Any, name: str) -> Any:
    """An attribute of a link's IFLA_LINKINFO, or of its kind's data (``IFLA_TUN_*``), or None."""
    info = link.get_attr("IFLA_LINKINFO")
    if info is None:
        return None
    if not name.startswith("IFLA_TUN_"):
        return info.get_attr(name)
    data = info.get_attr("IFLA_INFO_DATA")
    return None if data is None else data.get_attr(name)


def link_facts(bridge: str, tap: str) -> Json:
    """What the kernel says of a bridge and its tap, for the probe to hold a handshake against: each one's kind
    (None: no such link), the tap's master and owner."""
    with _ipr() as ipr:
        found = {name: _link(ipr, name) for name in (bridge, tap)}
        master = None
        tap_link = found[tap]
        if tap_link is not None and tap_link.get_attr("IFLA_MASTER") is not None:
            upper = ipr.get_links(tap_link.get_attr("IFLA_MASTER"))[0]
            master = upper.get_attr("IFLA_IFNAME")
    kinds = {name: None if link is None else _info(link, "IFLA_INFO_KIND") for name, link in found.items()}
    return {
        "bridge_kind": kinds[bridge],
        "tap_kind": kinds[tap],
        "tap_master": master,
        "tap_owner": None if tap_link is None else _info(tap_link, "IFLA_TUN_OWNER"),
    }


def check_tap_device() -> None:
    """A clear message when /dev/net/tun is missing, instead of an errno from deep inside."""
    if not Path("/dev/net/tun").exists():
        raise ConfigError("/dev/net/tun is missing: mount it into the netsidecar container")


def tap_stats() -> dict[str, int] | None:
    """The tap's interface counters (IFLA_STATS64, as the host sees them), or None when there is no tap."""
    with _ipr() as ipr:
        link = _link(ipr, TAP)
        stats = None if link is None else link.get_attr("IFLA_STATS64")
        return None if stats is None else {key: int(value) for key, value in stats.items()}
