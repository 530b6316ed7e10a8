"""Pure functions that compute what the sidecar will do, as plain data that `plan` prints and `run` applies."""

import ipaddress
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from netsidecar.config import (
    BRIDGE,
    IPV4,
    IPV6,
    LINK_LOCAL,
    PREFIX,
    PREFIX6,
    ROUTER6,
    TABLE,
    TABLE_FAMILIES,
    TAP,
    VNC_PORT,
    PodFacts,
    Resolv,
    Settings,
)
from shared.figures import NETWORK_FILE
from shared.handshake import FILE_NAME, Handshake, Ipv6

Json = dict[str, Any]
LEASE_FILE = "dnsmasq.leases"
PID_FILE = "dnsmasq.pid"
DHCP_FILE = "dhcp-figures.json"
# The sidecar's own record of the links and addresses it made, in NET_STATE_DIR: the probe, root with NET_RAW,
# trusts the handshake in RUN_DIR (which the runner can write) only where it agrees with this record.
RECORD_FILE = "made.json"


@dataclass(frozen=True)
class SysctlChange:
    """One sysctl of the pod's namespace to be written, and why."""

    name: str
    value: str
    why: str


# The forwarding switch of each family.
FORWARDING = {IPV4: "net.ipv4.ip_forward", IPV6: "net.ipv6.conf.all.forwarding"}
# Router advertisements from a bridge port never configure the pod: new links (the bridge, the tap) start with
# these, and forwarding on makes the kernel ignore RAs wherever accept_ra stays 1.
IPV6_DEFAULTS = ("net.ipv6.conf.default.accept_ra", "net.ipv6.conf.default.autoconf")
_NOT_POD_LINKS = ("all", "default", "lo")


def prepare_sysctls(current: Mapping[str, str]) -> tuple[SysctlChange, ...]:
    """What `netsidecar prepare` writes, given the sysctls as they are (``current``; a name the kernel lacks is
    absent): forwarding on for IPv4 and, where the pod has IPv6 at all, IPv6 (Calico leaves it off in pods); new
    links accept no router advertisements.

    IPv6 forwarding, once on, makes the kernel ignore router advertisements where accept_ra is 1: a pod interface
    that takes its IPv6 route from the node's RAs (some bridge-style CNIs do) gets accept_ra=2 so it keeps doing so.
    """
    changes: list[SysctlChange] = []
    for name in FORWARDING.values():
        if current.get(name, "1") == "1":
            continue
        changes.append(SysctlChange(name, "1", "the VM's traffic is routed between the bridge and the pod interface"))
        if name.startswith("net.ipv6"):
            for key, value in sorted(current.items()):
                parts = key.split(".")
                if parts[-1] == "accept_ra" and parts[3] not in _NOT_POD_LINKS and value == "1":
                    changes.append(SysctlChange(key, "2", "keeps taking router advertisements with forwarding on"))
    for name in IPV6_DEFAULTS:
        if current.get(name, "0") != "0":
            changes.append(SysctlChange(name, "0", "links made later never configure themselves from an RA"))
    return tuple(changes)


def link_sysctls(link: str, served: bool) -> tuple[SysctlChange, ...]:
    """A link's IPv6 sysctls: no router advertisement or autoconfiguration taken, and IPv6 off unless ``served``
    (the bridge where the pod has IPv6). The nftables drops are the main defence; these keep the pod from
    configuring itself from a router advertisement if those rules were ever gone."""
    conf = f"net.ipv6.conf.{link}"
    return (
        SysctlChange(f"{conf}.accept_ra", "0", "no router advertisement configures the pod"),
        SysctlChange(f"{conf}.autoconf", "0", "no address made up from an advertised prefix"),
        SysctlChange(f"{conf}.disable_ipv6", "0" if served else "1", "IPv6 only where the VM is served it"),
    )


@dataclass(frozen=True)
class LinkPlan:
    """The bridge and the tap: names, addresses, MACs, MTU and who may open the tap."""

    bridge: str
    bridge_mac: str  # set explicitly, so the bridge never takes a port's MAC and keeps it in every pod
    bridge_address: str | None  # None: the pod has no IPv4 (or IP_FAMILIES leaves it out)
    bridge_addresses6: tuple[str, ...]  # the router's link-local and the gateway; empty: no IPv6 on the bridge
    tap: str
    tap_owner: int | None
    mac: str
    mtu: int
    tap_queues: int = 1  # > 1: made multiqueue (IFF_MULTI_QUEUE)

    def bridge_sysctls(self) -> tuple[SysctlChange, ...]:
        """The bridge's IPv6 sysctls (IPv6 on where it carries IPv6 addresses)."""
        return link_sysctls(self.bridge, bool(self.bridge_addresses6))

    def tap_sysctls(self) -> tuple[SysctlChange, ...]:
        """The tap's IPv6 sysctls (never IPv6 of its own: it is only a bridge port)."""
        return link_sysctls(self.tap, served=False)

    def to_dict(self) -> Json:
        """The links as JSON-ready data, with the sysctls set on them."""
        sysctls = [asdict(change) for change in (*self.bridge_sysctls(), *self.tap_sysctls())]
        return {**asdict(self), "sysctls": sysctls}


@dataclass(frozen=True)
class Teardown:
    """What `down` (and `run` at its end) removes: files, the podvm tables (deleting only those that exist, in one
    transaction), then the links."""

    run_files: tuple[str, ...]
    state_files: tuple[str, ...]
    ruleset: Json
    links: tuple[str, ...]

    def to_dict(self) -> Json:
        """The teardown as JSON-ready data."""
        return asdict(self)


def teardown() -> Teardown:
    """The teardown: it depends on nothing but the names the sidecar always uses."""
    commands = [command for family in TABLE_FAMILIES for command in _Table(family, present=False).commands]
    return Teardown(
        run_files=(FILE_NAME, NETWORK_FILE),
        state_files=(LEASE_FILE, DHCP_FILE, RECORD_FILE),
        ruleset={"nftables": commands},
        links=(TAP, BRIDGE),
    )


def record(hs: Handshake) -> Json:
    """What the probe needs to trust in a handshake, as one comparable record: the sidecar keeps the one of the
    handshake it published in NET_STATE_DIR, and the probe compares it with the one of the handshake it read."""
    ipv6 = hs.ipv6
    return {
        "bridge": hs.bridge,
        "tap": hs.tap,
        "tap_owner": hs.tap_owner,
        "mac": hs.mac,
        "vm_ip": hs.vm_ip,
        "gateway": hs.gateway,
        "pod_ip": hs.pod_ip,
        "vm_ip6": None if ipv6 is None else ipv6.vm_ip,
        "gateway6": None if ipv6 is None else ipv6.gateway,
        "pod_ip6": None if ipv6 is None else ipv6.pod_ip,
    }


@dataclass(frozen=True)
class Plan:
    """Everything `run` puts in place."""

    links: LinkPlan
    ruleset: Json
    dnsmasq: list[str]
    handshake: Handshake

    def to_dict(self) -> Json:
        """The plan as JSON-ready data."""
        return {
            "links": self.links.to_dict(),
            "nftables": self.ruleset,
            "dnsmasq": self.dnsmasq,
            "handshake": self.handshake.to_dict(),
        }


def _match(left: Json, right: object, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _field(protocol: str, name: str) -> Json:
    return {"payload": {"protocol": protocol, "field": name}}


def _set(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else {"set": values}


COUNTED_DROP: list[Json] = [{"counter": None}, {"drop": None}]

# The comment of each guest-isolation drop rule: `status` shows them with their counters, `probe path` checks
# every one of them is loaded. Every guard is loaded whatever families the pod has: a family the pod lacks has no
# allowed source, so all of it meets the source guard.
GUARD_MAC = "guest: foreign Ethernet source"
GUARD_DHCP_SERVER = "guest: DHCP server (udp sport 67)"
GUARD_ARP = "guest: ARP for a foreign address"
GUARD_IPV4 = "guest: foreign IPv4 source"
GUARD_RA = "guest: IPv6 router advertisement or redirect"
GUARD_DHCP6_SERVER = "guest: DHCPv6 server (udp sport 547)"
GUARD_ND = "guest: neighbour advertisement for a foreign address"
GUARD_IPV6 = "guest: foreign IPv6 source"
GUARD_OTHER = "guest: other Ethernet type"
GUARD_POD_RA = "guest to pod: IPv6 router advertisement"
GUARD_POD_SERVICES = "guest to pod: local services"
GUARDS = (
    GUARD_MAC,
    GUARD_DHCP_SERVER,
    GUARD_ARP,
    GUARD_IPV4,
    GUARD_RA,
    GUARD_DHCP6_SERVER,
    GUARD_ND,
    GUARD_IPV6,
    GUARD_OTHER,
    GUARD_POD_RA,
    GUARD_POD_SERVICES,
)
TAP_CHAIN = "from-tap"
INPUT_CHAIN = "input"
GUEST_CHAIN = "guest-to-pod"
FORWARD_CHAIN = "forward"
# ICMPv6 a guest needs towards the pod's namespace: router and neighbour discovery, multicast listener reports.
_ND_TO_POD = [
    "nd-router-solicit",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-report",
    "mld2-listener-report",
]
# ICMPv6 a guest may send before it has an address (source ::): duplicate address detection and MLD.
_FROM_UNSPECIFIED = ["nd-neighbor-solicit", "mld-listener-report", "mld2-listener-report"]


class _Table:
    """Commands for one table, replaced as a whole: ``add`` then ``delete`` succeeds whether or not it existed."""

    def __init__(self, family: str, present: bool = True) -> None:
        """``present=False`` only removes the table (its family is not served)."""
        self.family = family
        table = {"table": {"family": family, "name": TABLE}}
        self.commands: list[Json] = [{"add": table}, {"delete": table}, *([{"add": table}] if present else [])]

    def chain(self, name: str, **base: object) -> None:
        """A chain; ``base`` (type, hook, prio, policy, dev) makes it a base chain."""
        self.commands.append({"add": {"chain": {"family": self.family, "table": TABLE, "name": name, **base}}})

    def rule(self, chain: str, expr: list[Json], comment: str | None = None) -> None:
        """A rule at the end of ``chain``; guard rules carry their name as the comment."""
        rule: Json = {"family": self.family, "table": TABLE, "chain": chain, "expr": expr}
        if comment is not None:
            rule["comment"] = comment
        self.commands.append({"add": {"rule": rule}})


def _nat(family: str, pod_ip: str | None, vm_ip: str, vm_net: str, *, settings: Settings, pod: PodFacts) -> _Table:
    """1:1 NAT of one pod address to the VM (except the VNC port while VNC is in the pod); conntrack is left alone.
    Whatever leaves the pod from the VM's subnet (a /30, or the /64 where a guest may also hold SLAAC or temporary
    addresses) takes the pod's address."""
    nat = _Table(family, present=pod_ip is not None)
    if pod_ip is None:
        return nat
    l3 = "ip" if family == "ip" else "ip6"
    to_pod_ip = _match(_field(l3, "daddr"), pod_ip)
    dnat: list[Json] = [{"counter": None}, {"dnat": {"addr": vm_ip}}]
    for name, hook, prio in (("prerouting", "prerouting", -100), ("output", "output", -100)):
        nat.chain(name, type="nat", hook=hook, prio=prio, policy="accept")
    nat.chain("postrouting", type="nat", hook="postrouting", prio=100, policy="accept")
    from_pod_iface = _match(_meta("iifname"), pod.iface)
    stays = [_stays_in_pod(port) for port in ports_in_pod(settings)]
    for keep in stays:
        nat.rule("prerouting", [from_pod_iface, to_pod_ip, *keep])
    nat.rule("prerouting", [from_pod_iface, to_pod_ip, *dnat])
    for keep in stays:
        nat.rule("output", [to_pod_ip, *keep])
    nat.rule("output", [to_pod_ip, *dnat])
    network, length = vm_net.split("/")
    from_vm: object = {"prefix": {"addr": network, "len": int(length)}}
    out_pod = [_match(_meta("oifname"), pod.iface), _match(_field(l3, "saddr"), from_vm)]
    nat.rule("postrouting", [*out_pod, {"counter": None}, {"snat": {"addr": pod_ip}}])
    _accounting(nat, l3, from_vm, pod)
    return nat


ACCOUNTING_CHAIN = "accounting"
NAT_IN = "podvm: nat in"
NAT_OUT = "podvm: nat out"


def ports_in_pod(settings: Settings) -> list[int]:
    """The TCP ports of the pod IP that stay in the pod for the runner's services: VNC (unless ``NO_VNC``), the
    metrics and the browser console when configured. Every other port and protocol goes to the VM."""
    ports = [] if settings.no_vnc else [VNC_PORT]
    return ports + [port for port in (settings.metrics_port, settings.console_port) if port is not None]


def _stays_in_pod(port: int) -> list[Json]:
    return [_match(_field("tcp", "dport"), port), {"counter": None}, {"return": None}]


def _accounting(nat: _Table, l3: str, vm_net: object, pod: PodFacts) -> None:
    """Counters of every packet the NAT translates, in both directions (the nat chains see only the first packet
    of a connection): a chain after both NATs (postrouting, after SNAT's priority 100) that only counts, its rules
    named by comment for the metrics (the same in both families' tables, which the metrics add up)."""
    translated = _match({"ct": {"key": "status"}}, ["snat", "dnat"], "in")
    to_vm = [_match(_meta("oifname"), BRIDGE), _match(_field(l3, "daddr"), vm_net), translated]
    from_vm = [_match(_meta("iifname"), BRIDGE), _match(_meta("oifname"), pod.iface), translated]
    nat.chain(ACCOUNTING_CHAIN, type="filter", hook="postrouting", prio=200, policy="accept")
    nat.rule(ACCOUNTING_CHAIN, [*to_vm, {"counter": None}], NAT_IN)
    nat.rule(ACCOUNTING_CHAIN, [*from_vm, {"counter": None}], NAT_OUT)


def _prefix(network: ipaddress.IPv6Network) -> Json:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _nd_target(address: ipaddress.IPv6Address, bits: int = 128) -> str:
    """The first ``bits`` of an address as nftables' raw-payload value: nftables 1.0.6 names no ND target field,
    so the target (8 bytes into the ICMPv6 header) is matched as raw transport-header bits."""
    return hex(int(address) >> (128 - bits))


def _ipv4_from_tap(tap: _Table, settings: Settings, served: bool) -> None:
    """IPv4 and ARP from the guest: its own address only (0.0.0.0 for DHCP requests), ARP only about itself; no
    DHCP server. On a pod without IPv4 nothing is the guest's, so every frame meets the guards."""
    vm_ip = str(settings.vm_ip)
    is_arp = _match(_field("ether", "type"), "arp")
    arp_about_itself = [
        is_arp,
        _match(_field("arp", "htype"), 1),
        _match(_field("arp", "ptype"), "ip"),
        _match(_field("arp", "hlen"), 6),
        _match(_field("arp", "plen"), 4),
        _match(_field("arp", "saddr ether"), settings.mac),
        _match(_field("arp", "saddr ip"), _set(["0.0.0.0", vm_ip])),  # noqa: S104 - sender of an ARP probe
    ]
    if served:
        tap.rule(TAP_CHAIN, [*arp_about_itself, {"accept": None}])
    tap.rule(TAP_CHAIN, [is_arp, *COUNTED_DROP], GUARD_ARP)
    is_ip = _match(_field("ether", "type"), "ip")
    tap.rule(TAP_CHAIN, [is_ip, _match(_field("udp", "sport"), 67), *COUNTED_DROP], GUARD_DHCP_SERVER)
    if served:
        tap.rule(TAP_CHAIN, [is_ip, _match(_field("ip", "saddr"), vm_ip), {"accept": None}])
        dhcp_client = [
            is_ip,
            _match(_field("ip", "saddr"), "0.0.0.0"),  # noqa: S104 - a DHCP client without an address yet
            _match(_field("udp", "sport"), 68),
            _match(_field("udp", "dport"), 67),
        ]
        tap.rule(TAP_CHAIN, [*dhcp_client, {"accept": None}])
    tap.rule(TAP_CHAIN, [is_ip, *COUNTED_DROP], GUARD_IPV4)


def _ipv6_from_tap(tap: _Table, settings: Settings, served: bool) -> None:
    """IPv6 from the guest: never a router (RA, redirect) or a DHCPv6 server, neighbour advertisements only for
    its own addresses, and as source only addresses of its link-local /64 and VM_IP6_PREFIX other than the
    bridge's (any interface identifier: stable-privacy and temporary addresses are the guest's too, the link is
    its alone), or :: for duplicate address detection and MLD. On a pod without IPv6 no source is the guest's."""
    is_ip6 = _match(_field("ether", "type"), "ip6")
    router = _match(_field("icmpv6", "type"), _set(["nd-router-advert", "nd-redirect"]))
    tap.rule(TAP_CHAIN, [is_ip6, router, *COUNTED_DROP], GUARD_RA)
    tap.rule(TAP_CHAIN, [is_ip6, _match(_field("udp", "sport"), 547), *COUNTED_DROP], GUARD_DHCP6_SERVER)
    bridge = [ROUTER6, settings.gateway6]
    is_na = _match(_field("icmpv6", "type"), "nd-neighbor-advert")
    target = {"payload": {"base": "th", "offset": 64, "len": 128}}
    target_net = {"payload": {"base": "th", "offset": 64, "len": 64}}
    tap.rule(TAP_CHAIN, [is_ip6, is_na, _match(target, _set([_nd_target(a) for a in bridge])), *COUNTED_DROP], GUARD_ND)
    own_nets = _set([_nd_target(net.network_address, 64) for net in (LINK_LOCAL, settings.prefix6)])
    tap.rule(TAP_CHAIN, [is_ip6, is_na, _match(target_net, own_nets, "!="), *COUNTED_DROP], GUARD_ND)
    if served:
        unspecified = [_match(_field("ip6", "saddr"), "::"), _match(_field("icmpv6", "type"), _set(_FROM_UNSPECIFIED))]
        tap.rule(TAP_CHAIN, [is_ip6, *unspecified, {"accept": None}])
        not_bridge = _match(_field("ip6", "saddr"), _set([str(a) for a in bridge]), "!=")
        own = _match(_field("ip6", "saddr"), _set([_prefix(LINK_LOCAL), _prefix(settings.prefix6)]))
        tap.rule(TAP_CHAIN, [is_ip6, not_bridge, own, {"accept": None}])
    tap.rule(TAP_CHAIN, [is_ip6, *COUNTED_DROP], GUARD_IPV6)


def _from_tap(settings: Settings, pod: PodFacts) -> _Table:
    """What the guest may send into the pod at all, checked at the tap's ingress before the bridge sees a frame:
    its own MAC, then per family its own addresses and nothing that would make it the link's router or server."""
    tap = _Table("netdev")
    tap.chain(TAP_CHAIN, type="filter", hook="ingress", dev=TAP, prio=-500, policy="drop")
    tap.rule(TAP_CHAIN, [_match(_field("ether", "saddr"), settings.mac, "!="), *COUNTED_DROP], GUARD_MAC)
    _ipv4_from_tap(tap, settings, pod.ip is not None)
    _ipv6_from_tap(tap, settings, pod.ip6 is not None)
    tap.rule(TAP_CHAIN, COUNTED_DROP, GUARD_OTHER)
    return tap


def _guest_to_pod(settings: Settings, pod: PodFacts) -> _Table:
    """What the pod's own namespace accepts from the bridge: DHCP and DHCPv6, router and neighbour discovery, ping
    to the gateway, replies to connections the pod opened, and VM_OPEN_PORTS; every other local service (0.0.0.0
    and :: listeners, VNC) is closed. Also the forward chain that clamps TCP's MSS to the route's MTU both ways, for
    guests that ignore the MTU they are given."""
    inet = _Table("inet")
    inet.chain(INPUT_CHAIN, type="filter", hook="input", prio=-10, policy="accept")
    inet.chain(GUEST_CHAIN)
    inet.rule(INPUT_CHAIN, [_match(_meta("iifname"), BRIDGE), {"jump": {"target": GUEST_CHAIN}}])
    is_ra = _match(_field("icmpv6", "type"), "nd-router-advert")
    inet.rule(GUEST_CHAIN, [is_ra, *COUNTED_DROP], GUARD_POD_RA)
    inet.rule(GUEST_CHAIN, [_match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}])
    if pod.ip is not None:
        dhcp = [_match(_field("udp", "sport"), 68), _match(_field("udp", "dport"), 67)]
        inet.rule(GUEST_CHAIN, [*dhcp, {"accept": None}])
        ping = [_match(_field("ip", "daddr"), str(settings.gateway)), _match(_field("icmp", "type"), "echo-request")]
        inet.rule(GUEST_CHAIN, [*ping, {"accept": None}])
    if pod.ip6 is not None:
        inet.rule(GUEST_CHAIN, [_match(_field("icmpv6", "type"), _set(_ND_TO_POD)), {"accept": None}])
        dhcp6 = [_match(_field("udp", "sport"), 546), _match(_field("udp", "dport"), 547)]
        inet.rule(GUEST_CHAIN, [*dhcp6, {"accept": None}])
        gateways = _set([str(ROUTER6), str(settings.gateway6)])
        ping6 = [_match(_field("ip6", "daddr"), gateways), _match(_field("icmpv6", "type"), "echo-request")]
        inet.rule(GUEST_CHAIN, [*ping6, {"accept": None}])
    for protocol in ("tcp", "udp"):
        ports = [number for number, proto in settings.open_ports if proto == protocol]
        if ports:
            inet.rule(GUEST_CHAIN, [_match(_field(protocol, "dport"), _set(ports)), {"accept": None}])
    inet.rule(GUEST_CHAIN, COUNTED_DROP, GUARD_POD_SERVICES)
    inet.chain(FORWARD_CHAIN, type="filter", hook="forward", prio=-150, policy="accept")
    syn = _match(_field("tcp", "flags"), "syn", "in")
    clamp = {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": {"rt": {"key": "mtu"}}}}
    for iface in ("iifname", "oifname"):
        inet.rule(FORWARD_CHAIN, [_match(_meta(iface), BRIDGE), syn, clamp])
    return inet


def ruleset(settings: Settings, pod: PodFacts) -> Json:
    """The nftables JSON document: one transaction that replaces the NAT table and both guest-isolation tables,
    so the VM is never reachable through the NAT without its isolation (the kernel applies all of it or nothing).
    """
    vm_net = f"{settings.vm_ip}/32"
    ip4 = None if pod.ip is None else str(pod.ip)
    ip6 = None if pod.ip6 is None else str(pod.ip6)
    tables = (
        _nat("ip", ip4, str(settings.vm_ip), vm_net, settings=settings, pod=pod),
        _nat("ip6", ip6, str(settings.vm_ip6), str(settings.prefix6), settings=settings, pod=pod),
        _from_tap(settings, pod),
        _guest_to_pod(settings, pod),
    )
    commands = [command for table in tables for command in table.commands]
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}


def rule_count(document: Json) -> int:
    """How many rules a ruleset document adds."""
    return sum(1 for command in document["nftables"] if "rule" in command.get("add", {}))


def dnsmasq_argv(settings: Settings, pod: PodFacts, resolv: Resolv) -> list[str]:
    """dnsmasq as a DHCP-only server on the bridge with one static lease for the VM's MAC per family served, and
    router advertisements when IPv6 is."""
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",
        "--log-facility=-",
        "--log-dhcp",
        f"--interface={BRIDGE}",
        "--bind-interfaces",
        "--dhcp-authoritative",
        f"--dhcp-leasefile={settings.state_dir / LEASE_FILE}",
        # No pid file of dnsmasq's own (its default is /run/dnsmasq.pid): the supervisor records the pid.
        "--pid-file",
    ]
    if pod.ip is not None:
        network = ipaddress.IPv4Network(f"{settings.vm_ip}/{PREFIX}", strict=False).network_address
        argv += [
            # The name goes in option 12, not in --dhcp-host: there dnsmasq reads a name such as `ignore` as "never
            # answer this MAC" and `12345` or `5m` as a lease time, and the VM would get no lease or no name.
            f"--dhcp-option=12,{settings.hostname.split('.')[0]}",
            # The /30 holds only the VM: no ping before offering its address, so dnsmasq keeps no raw socket.
            "--no-ping",
            f"--dhcp-range={network},static,255.255.255.252",
            f"--dhcp-host={settings.mac},{settings.vm_ip},infinite",
            f"--dhcp-option=option:router,{settings.gateway}",
            f"--dhcp-option=option:mtu,{pod.mtu}",
        ]
        if resolv.nameservers:
            argv.append("--dhcp-option=option:dns-server," + ",".join(resolv.nameservers))
        if resolv.search:
            argv.append("--dhcp-option=option:domain-search," + ",".join(resolv.search))
    if pod.ip6 is not None:
        argv += _dhcp6_argv(settings, pod, resolv)
    return argv


def _dhcp6_argv(settings: Settings, pod: PodFacts, resolv: Resolv) -> list[str]:
    """Router advertisements (managed flag, autonomous flag, router lifetime, MTU, RDNSS, DNSSL) and DHCPv6 with
    the VM's exact address by its MAC. The prefix carries the A flag so a guest doing only SLAAC gets an address
    too: an EUI-64 guest forms exactly ``vm_ip6``; a stable-privacy or temporary address can go out, but only
    ``vm_ip6`` is reachable through the pod's IPv6 address."""
    argv = [
        "--enable-ra",
        f"--dhcp-range={settings.prefix6.network_address},static,slaac,{PREFIX6},infinite",
        f"--dhcp-host={settings.mac},[{settings.vm_ip6}],infinite",
        # Every 60 s at most between unsolicited RAs, and a router lifetime of 30 min (it is re-announced long
        # before then; a guest that loses it loses its default route).
        f"--ra-param={BRIDGE},mtu:{pod.mtu},60,1800",
    ]
    if resolv.nameservers6:
        argv.append("--dhcp-option=option6:dns-server," + ",".join(f"[{ns}]" for ns in resolv.nameservers6))
    if resolv.search:
        argv.append("--dhcp-option=option6:domain-search," + ",".join(resolv.search))
    return argv


def build(settings: Settings, pod: PodFacts, resolv: Resolv) -> Plan:
    """The whole plan from validated inputs."""
    bridge4 = f"{settings.gateway}/{PREFIX}" if pod.ip is not None else None
    bridge6 = (f"{ROUTER6}/64", f"{settings.gateway6}/{PREFIX6}") if pod.ip6 is not None else ()
    links = LinkPlan(
        BRIDGE, settings.gw_mac, bridge4, bridge6, TAP, settings.tap_owner, settings.mac, pod.mtu, settings.tap_queues
    )
    ipv6 = None
    if pod.ip6 is not None:
        ipv6 = Ipv6(
            vm_ip=str(settings.vm_ip6),
            gateway=str(settings.gateway6),
            router=str(ROUTER6),
            prefix=PREFIX6,
            pod_ip=str(pod.ip6),
            dns=resolv.nameservers6,
        )
    handshake = Handshake(
        tap=TAP,
        bridge=BRIDGE,
        mac=settings.mac,
        vm_ip=str(settings.vm_ip) if pod.ip is not None else None,
        gateway=str(settings.gateway) if pod.ip is not None else None,
        prefix=PREFIX,
        mtu=pod.mtu,
        pod_ip=str(pod.ip) if pod.ip is not None else None,
        dns=resolv.nameservers if pod.ip is not None else (),
        search=resolv.search,
        hostname=settings.hostname,
        vnc_in_pod=not settings.no_vnc,
        tap_owner=settings.tap_owner,
        tap_queues=settings.tap_queues,
        metrics_port=settings.metrics_port,
        console_port=settings.console_port,
        families=pod.families,
        ipv6=ipv6,
    )
    return Plan(links, ruleset(settings, pod), dnsmasq_argv(settings, pod, resolv), handshake)


def pid_file(state_dir: Path) -> Path:
    """Where the supervisor records dnsmasq's pid, so a restarted sidecar finds a stale one."""
    return state_dir / PID_FILE
