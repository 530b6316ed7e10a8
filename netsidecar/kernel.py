"""Thin code that applies a plan to the kernel: links by netlink (pyroute2), rules by libnftables' JSON API."""

import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from netsidecar import config
from netsidecar.config import BRIDGE, IPV6, TABLE, TABLE_FAMILIES, TAP, PodFacts, Settings
from netsidecar.plan import Json, LinkPlan
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


_FORWARDING = {
    "net.ipv4.ip_forward": Path("/proc/sys/net/ipv4/ip_forward"),
    "net.ipv6.conf.all.forwarding": Path("/proc/sys/net/ipv6/conf/all/forwarding"),
}
# Router advertisements from a bridge port never configure the pod: new links (the bridge, the tap) start with
# these, and forwarding on makes the kernel ignore RAs wherever accept_ra stays 1.
_IPV6_DEFAULTS = {
    "net.ipv6.conf.default.accept_ra": Path("/proc/sys/net/ipv6/conf/default/accept_ra"),
    "net.ipv6.conf.default.autoconf": Path("/proc/sys/net/ipv6/conf/default/autoconf"),
}


def forwarding_enabled(name: str = "net.ipv4.ip_forward") -> bool:
    """Whether the pod's namespace routes ``name``'s family between interfaces (the VM's traffic crosses the
    bridge and the pod's interface); False where the kernel has no IPv6."""
    try:
        return _FORWARDING[name].read_text().strip() == "1"
    except FileNotFoundError:
        return False


def _write(name: str, path: Path, value: str) -> None:
    what = "turn on forwarding" if name in _FORWARDING else f"set {name}={value}"
    try:
        path.write_text(f"{value}\n")
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot {what} ({err.strerror}): `netsidecar prepare` needs a privileged container, "
            f"or set {name}={value} in the pod's securityContext.sysctls"
        ) from err
    log.info("%s set to %s", name, value)


def enable_forwarding() -> None:
    """Turn on forwarding for IPv4 and, where the pod has IPv6 at all, IPv6 in the pod's namespace (Calico leaves
    it off in pods), and keep new links from accepting router advertisements.

    /proc/sys is read-only in a container without privileges, so this is `netsidecar prepare`'s job, run once by a
    privileged init container; the long-running sidecar only checks it.

    :raise ConfigError: when /proc/sys cannot be written.
    """
    for name, path in _FORWARDING.items():
        if not path.exists():
            log.info("%s: the pod has no IPv6 (no %s)", name, path)
        elif forwarding_enabled(name):
            log.info("%s is already 1", name)
        else:
            _write(name, path, "1")
            if name.startswith("net.ipv6"):
                _keep_accepting_ra()
    for name, path in _IPV6_DEFAULTS.items():
        if path.exists() and path.read_text().strip() != "0":
            _write(name, path, "0")


def _keep_accepting_ra() -> None:
    """IPv6 forwarding, just turned on, makes the kernel ignore router advertisements where accept_ra is 1: a pod
    interface that takes its IPv6 route from the node's RAs (some bridge-style CNIs do) gets accept_ra=2 so it keeps
    doing so. Links the sidecar makes later start with _IPV6_DEFAULTS (0)."""
    conf = Path("/proc/sys/net/ipv6/conf")
    for path in sorted(conf.glob("*/accept_ra")):
        if path.parent.name not in ("all", "default", "lo") and path.read_text().strip() == "1":
            _write(f"net.ipv6.conf.{path.parent.name}.accept_ra", path, "2")


def check_forwarding(families: tuple[str, ...]) -> None:
    """:raise ConfigError: when forwarding is off for a family the VM is given, naming the two ways to turn it on."""
    names = {config.IPV4: "net.ipv4.ip_forward", IPV6: "net.ipv6.conf.all.forwarding"}
    for name in (names[family] for family in families):
        if not forwarding_enabled(name):
            raise ConfigError(
                f"{name} is 0 in the pod: run `netsidecar prepare` in a privileged init container before "
                "`netsidecar run`, or set it in the pod's securityContext.sysctls (see deploy/README.md)"
            )


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


def _ipv6_off(ipr: Any, index: int, name: str, served: bool) -> None:
    """No IPv6 the kernel makes up on a link: no link-local address of its own (netlink works even where /proc/sys
    is read-only), then accept_ra and autoconf off, and disable_ipv6 as ``served`` requires, where /proc/sys is
    writable. The nftables drops are the main defence; this keeps the pod from configuring itself from a router
    advertisement if those rules were ever gone."""
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 - pyroute2 only where netlink is used

    spec = {"attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", _ADDR_GEN_MODE_NONE)]})]}
    try:
        ipr.link("set", index=index, IFLA_AF_SPEC=spec)
    except NetlinkError as err:
        log.info("%s: IPv6 address generation left as it is (%s)", name, os.strerror(err.code))
    conf = Path("/proc/sys/net/ipv6/conf") / name
    for key, value in (("accept_ra", "0"), ("autoconf", "0"), ("disable_ipv6", "0" if served else "1")):
        try:
            (conf / key).write_text(f"{value}\n")
        except OSError as err:
            log.info("%s: IPv6 %s not set (%s); the nftables rules still drop IPv6 from the guest", name, key, err)
            return


def ensure_links(plan: LinkPlan) -> None:
    """Create the bridge and tap if missing, else keep them (a VM may hold the tap open) and fix their settings."""
    with _ipr() as ipr:
        if _link(ipr, plan.bridge) is None:
            ipr.link("add", ifname=plan.bridge, kind="bridge")
            log.info("bridge %s created", plan.bridge)
        bridge = ipr.link_lookup(ifname=plan.bridge)[0]
        _ipv6_off(ipr, bridge, plan.bridge, bool(plan.bridge_addresses6))
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
        _ipv6_off(ipr, tap, plan.tap, served=False)
        ipr.link("set", index=tap, mtu=plan.mtu, master=bridge, state="up")
        ipr.link("set", index=bridge, state="up")
    addresses = " ".join(filter(None, [plan.bridge_address, *plan.bridge_addresses6]))
    log.info("bridge %s %s mtu %d, tap %s", plan.bridge, addresses, plan.mtu, plan.tap)


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


def remove_links() -> None:
    """Delete the tap and the bridge if they exist."""
    with _ipr() as ipr:
        for name in (TAP, BRIDGE):
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


def _nft() -> Any:
    import nftables  # noqa: PLC0415 - loads libnftables, only where rules are touched

    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
    return nft


def apply_ruleset(document: Json) -> None:
    """Replace the podvm tables (NAT and guest isolation) in one transaction; on error the kernel keeps what it had."""
    nft = _nft()
    rc, _out, err = nft.json_cmd(document)
    if rc != 0:
        raise PodvmError(f"nftables refused the ruleset: {err.strip()}")


def remove_ruleset() -> None:
    """Delete the podvm tables that exist, all in one transaction."""
    nft = _nft()
    tables = [{"table": {"family": family, "name": TABLE}} for family in TABLE_FAMILIES]
    commands = [command for table in tables for command in ({"add": table}, {"delete": table})]
    nft.json_cmd({"nftables": commands})


def ruleset_status() -> list[Json]:
    """The podvm tables' rules with their counters (guest-isolation drops carry their name as comment)."""
    nft = _nft()
    rules: list[Json] = []
    for family in TABLE_FAMILIES:
        rc, out, _err = nft.cmd(f"list table {family} {TABLE}")
        if rc == 0:
            rules += [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]
    return rules


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
