"""The links: the pod's facts, the bridge, the tap and their addresses, as the plan says.

The start (the pod's facts, making the links) talks to the kernel through iproute2's ``ip -json`` and ``ip -batch``:
a few of its processes cost a few milliseconds, where importing pyroute2 costs 90-200 ms before the first message.
What runs after the handshake (status, figures, probes, the drain and teardown) reads through pyroute2, imported
there.
"""

import fcntl
import ipaddress
import json
import logging
import os
import struct
import subprocess
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
_IFF_MULTI_QUEUE = 0x0100


def _ipr() -> Any:
    """An IPRoute socket; pyroute2 is imported here because its import alone costs a third of a second."""
    from pyroute2 import IPRoute  # noqa: PLC0415 - costly import, only where netlink is used

    return IPRoute()


def _link(ipr: Any, name: str) -> Any | None:
    links = ipr.link_lookup(ifname=name)
    return ipr.get_links(links[0])[0] if links else None


def _ip(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    """One ``ip`` command (``-batch -`` reads ``script``), its output as text; never raises on its status."""
    try:
        return subprocess.run(["ip", *args], input=script, capture_output=True, text=True, check=False)
    except OSError as err:
        raise PodvmError(f"ip (iproute2) cannot run: {err.strerror}") from err


def _ip_json(args: list[str]) -> list[Json]:
    """``ip -json ARGS``: the objects it lists; a missing device lists none."""
    done = _ip(["-json", *args])
    if done.returncode != 0:
        if "does not exist" in done.stderr:
            return []
        raise PodvmError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    listed: list[Json] = json.loads(done.stdout or "[]")
    return listed


def _ip_batch(script: list[str]) -> None:
    """Run ``script`` (one ``ip`` command a line) in one process; it stops at the first error, which is raised."""
    done = _ip(["-batch", "-"], "".join(f"{line}\n" for line in script))
    if done.returncode != 0:
        raise PodvmError(f"ip -batch: {done.stderr.strip()}")


def pod_facts(settings: Settings) -> PodFacts:
    """Find the pod interface (the default route's of either family, unless POD_IFACE) and its addresses, waiting
    up to POD_WAIT_TIMEOUT until it holds the families IP_FAMILIES asks for (on auto: at least one)."""
    deadline = time.monotonic() + settings.pod_wait_timeout
    while True:
        facts = _try_pod_facts(settings)
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


def _default_route_iface() -> str | None:
    for family in ("-4", "-6"):
        routes = [r for r in _ip_json([family, "route", "show", "default"]) if r.get("dev")]
        if routes:
            return str(routes[0]["dev"])
    return None


def _try_pod_facts(settings: Settings) -> PodFacts | None:
    name = settings.pod_iface or _default_route_iface()
    if name is None:
        return None
    found = _ip_json(["address", "show", "dev", name])
    if not found:
        return None
    link = found[0]
    addrs = link.get("addr_info", [])
    v4 = [ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}") for a in addrs if a.get("family") == "inet"]
    # Global addresses only; a tentative one counts, it is the pod's once duplicate detection is done.
    v6 = [
        ipaddress.IPv6Interface(f"{a['local']}/{a['prefixlen']}")
        for a in addrs
        if a.get("family") == "inet6" and a.get("scope") == "global"
    ]
    return config.pod_from(
        settings, str(link["ifname"]), int(link["mtu"]), v4[0] if v4 else None, v6[0] if v6 else None
    )


def _create_tap(name: str, owner: int | None, multi_queue: bool) -> None:
    """A persistent tap owned by ``owner`` (so an unprivileged runner opens it), multiqueue when asked; the creating
    fd is then closed."""
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_MULTI_QUEUE if multi_queue else 0)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        if owner is not None:
            fcntl.ioctl(fd, _TUNSETOWNER, owner)
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def ensure_links(plan: LinkPlan) -> int:
    """Create the bridge and tap if missing, else keep them (a VM may hold the tap open) and fix their settings; the
    queue pairs the tap takes (a kept tap stays what it is: a VM may hold its queues)."""
    have = {str(link["ifname"]): link for link in _ip_json(["-details", "address", "show"])}
    queues = plan.tap_queues
    if plan.tap not in have:
        _create_tap(plan.tap, plan.tap_owner, queues > 1)
        owner = "root" if plan.tap_owner is None else plan.tap_owner
        log.info("tap %s created (owner %s, %s)", plan.tap, owner, _queues_text(queues))
    else:
        queues = kept_queues(have[plan.tap], plan.tap_queues)
        log.info("tap %s kept as it is (a VM may hold it open; %s)", plan.tap, _queues_text(queues))
    script = []
    if plan.bridge not in have:
        script.append(f"link add name {plan.bridge} type bridge")
    # An address set explicitly pins it: the bridge no longer takes the lowest MAC of its ports.
    script.append(f"link set dev {plan.bridge} address {plan.bridge_mac} mtu {plan.mtu}")
    old = have.get(plan.bridge, {}).get("addr_info", [])
    script += _address_changes(plan.bridge, "inet", old, [plan.bridge_address] if plan.bridge_address else [])
    script += _address_changes(plan.bridge, "inet6", old, list(plan.bridge_addresses6))
    script.append(f"link set dev {plan.tap} mtu {plan.mtu} master {plan.bridge}")
    _ip_batch(script)
    if plan.bridge not in have:
        log.info("bridge %s created", plan.bridge)
    _ipv6_off(((plan.bridge, plan.bridge_sysctls()), (plan.tap, plan.tap_sysctls())))
    _ip_batch([f"link set dev {plan.tap} up", f"link set dev {plan.bridge} up"])
    addresses = " ".join(filter(None, [plan.bridge_address, *plan.bridge_addresses6]))
    log.info("bridge %s %s mac %s mtu %d, tap %s", plan.bridge, addresses, plan.bridge_mac, plan.mtu, plan.tap)
    return queues


def _queues_text(queues: int) -> str:
    return "single-queue" if queues == 1 else f"multiqueue, up to {queues} queue pairs"


def kept_queues(link: Json, planned: int) -> int:
    """The queue pairs a tap made by an earlier sidecar takes, from ``ip -details``: a single-queue tap takes 1
    whatever VM_NET_QUEUES says now; a multiqueue one the planned number, at least 2 (its opener must ask for
    several: the kernel refuses a single-queue open of a multiqueue tap)."""
    data = (link.get("linkinfo") or {}).get("info_data") or {}
    multi = bool(data.get("multi_queue"))
    if multi != (planned > 1):
        log.warning(
            "tap %s is %s from an earlier start, VM_NET_QUEUES asks %d: kept (a VM may hold it), the handshake says so",
            link.get("ifname"),
            "multiqueue" if multi else "single-queue",
            planned,
        )
    return max(planned, 2) if multi else 1


def _ipv6_off(links: tuple[tuple[str, tuple[SysctlChange, ...]], ...]) -> None:
    """No IPv6 the kernel makes up on the links before they come up: no link-local address of their own (netlink
    works even where /proc/sys is read-only; a kernel without IPv6 refuses it, which is logged), then their
    planned IPv6 sysctls where /proc/sys is writable."""
    done = _ip(["-force", "-batch", "-"], "".join(f"link set dev {name} addrgenmode none\n" for name, _ in links))
    if done.returncode != 0:
        log.info("IPv6 address generation left as it is (%s)", done.stderr.strip())
    for name, changes in links:
        sysctl.write_link(name, changes)


def _address_changes(name: str, family: str, have: list[Json], wanted: list[str]) -> list[str]:
    """The ``ip`` lines that leave exactly ``wanted`` on the link for ``family`` (IPv6 without duplicate
    detection: a guest's DAD probe must never make the bridge give up its address)."""
    old = {f"{a['local']}/{a['prefixlen']}" for a in have if a.get("family") == family}
    new = {f"{ipaddress.ip_interface(w).ip}/{w.split('/')[1]}" for w in wanted}
    nodad = " nodad" if family == "inet6" else ""
    return [f"address del {a} dev {name}" for a in sorted(old - new)] + [
        f"address add {a} dev {name}{nodad}" for a in sorted(new - old)
    ]


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
