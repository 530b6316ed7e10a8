"""Pure functions that compute what the sidecar will do, as plain data that `plan` prints and `run` applies."""

import ipaddress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from netsidecar.config import BRIDGE, PREFIX, TABLE, TAP, VNC_PORT, PodFacts, Resolv, Settings
from shared.handshake import Handshake

Json = dict[str, Any]
LEASE_FILE = "dnsmasq.leases"
PID_FILE = "dnsmasq.pid"


@dataclass(frozen=True)
class LinkPlan:
    """The bridge and the tap: names, addresses, MTU and who may open the tap."""

    bridge: str
    bridge_address: str
    tap: str
    tap_owner: int | None
    mac: str
    mtu: int


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
            "links": asdict(self.links),
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
# every one of them is loaded. IPv6 is closed as a whole until podvm supports it (see _ipv6_from_tap).
GUARD_MAC = "guest: foreign Ethernet source"
GUARD_DHCP_SERVER = "guest: DHCP server (udp sport 67)"
GUARD_ARP = "guest: ARP for a foreign address"
GUARD_IPV4 = "guest: foreign IPv4 source"
GUARD_RA = "guest: IPv6 router advertisement"
GUARD_IPV6 = "guest: IPv6 (not supported yet)"
GUARD_OTHER = "guest: other Ethernet type"
GUARD_POD_RA = "guest to pod: IPv6 router advertisement"
GUARD_POD_IPV6 = "guest to pod: IPv6 (not supported yet)"
GUARD_POD_SERVICES = "guest to pod: local services"
GUARDS = (
    GUARD_MAC,
    GUARD_DHCP_SERVER,
    GUARD_ARP,
    GUARD_IPV4,
    GUARD_RA,
    GUARD_IPV6,
    GUARD_OTHER,
    GUARD_POD_RA,
    GUARD_POD_IPV6,
    GUARD_POD_SERVICES,
)
TAP_CHAIN = "from-tap"
INPUT_CHAIN = "input"
GUEST_CHAIN = "guest-to-pod"


class _Table:
    """Commands for one table, replaced as a whole: ``add`` then ``delete`` succeeds whether or not it existed."""

    def __init__(self, family: str) -> None:
        self.family = family
        table = {"table": {"family": family, "name": TABLE}}
        self.commands: list[Json] = [{"add": table}, {"delete": table}, {"add": table}]

    def chain(self, name: str, **base: object) -> None:
        """A chain; ``base`` (type, hook, prio, policy, dev) makes it a base chain."""
        self.commands.append({"add": {"chain": {"family": self.family, "table": TABLE, "name": name, **base}}})

    def rule(self, chain: str, expr: list[Json], comment: str | None = None) -> None:
        """A rule at the end of ``chain``; guard rules carry their name as the comment."""
        rule: Json = {"family": self.family, "table": TABLE, "chain": chain, "expr": expr}
        if comment is not None:
            rule["comment"] = comment
        self.commands.append({"add": {"rule": rule}})


def _nat(settings: Settings, pod: PodFacts) -> _Table:
    """1:1 NAT of the pod IP to the VM (except the VNC port while VNC is in the pod); conntrack is left alone."""
    nat = _Table("ip")
    pod_ip, vm_ip = str(pod.ip), str(settings.vm_ip)
    to_pod_ip = _match(_field("ip", "daddr"), pod_ip)
    dnat: list[Json] = [{"counter": None}, {"dnat": {"addr": vm_ip}}]
    for name, hook, prio in (("prerouting", "prerouting", -100), ("output", "output", -100)):
        nat.chain(name, type="nat", hook=hook, prio=prio, policy="accept")
    nat.chain("postrouting", type="nat", hook="postrouting", prio=100, policy="accept")
    from_pod_iface = _match(_meta("iifname"), pod.iface)
    stays = [] if settings.no_vnc else [_stays_in_pod(VNC_PORT)]
    stays += [_stays_in_pod(port) for port in metrics_ports(settings)]
    for keep in stays:
        nat.rule("prerouting", [from_pod_iface, to_pod_ip, *keep])
    nat.rule("prerouting", [from_pod_iface, to_pod_ip, *dnat])
    for keep in stays:
        nat.rule("output", [to_pod_ip, *keep])
    nat.rule("output", [to_pod_ip, *dnat])
    out_pod = [_match(_meta("oifname"), pod.iface), _match(_field("ip", "saddr"), vm_ip)]
    nat.rule("postrouting", [*out_pod, {"counter": None}, {"snat": {"addr": pod_ip}}])
    _accounting(nat, settings, pod)
    return nat


ACCOUNTING_CHAIN = "accounting"
NAT_IN = "podvm: nat in"
NAT_OUT = "podvm: nat out"


def metrics_ports(settings: Settings) -> list[int]:
    """The metrics port, which stays in the pod like VNC's (the runner serves it), when one is configured."""
    return [] if settings.metrics_port is None else [settings.metrics_port]


def _stays_in_pod(port: int) -> list[Json]:
    return [_match(_field("tcp", "dport"), port), {"counter": None}, {"return": None}]


def _accounting(nat: _Table, settings: Settings, pod: PodFacts) -> None:
    """Counters of every packet the NAT translates, in both directions (the nat chains see only the first packet
    of a connection): a chain after both NATs (postrouting, after SNAT's priority 100) that only counts, its rules
    named by comment for the metrics."""
    translated = _match({"ct": {"key": "status"}}, ["snat", "dnat"], "in")
    to_vm = [_match(_meta("oifname"), BRIDGE), _match(_field("ip", "daddr"), str(settings.vm_ip)), translated]
    from_vm = [_match(_meta("iifname"), BRIDGE), _match(_meta("oifname"), pod.iface), translated]
    nat.chain(ACCOUNTING_CHAIN, type="filter", hook="postrouting", prio=200, policy="accept")
    nat.rule(ACCOUNTING_CHAIN, [*to_vm, {"counter": None}], NAT_IN)
    nat.rule(ACCOUNTING_CHAIN, [*from_vm, {"counter": None}], NAT_OUT)


def _ipv6_from_tap(table: _Table) -> None:
    """IPv6 from the guest: closed while podvm has no IPv6. Opening it means replacing the second rule with a
    source check like IPv4's; the router-advertisement drop stays before it."""
    is_ra = _match(_field("icmpv6", "type"), "nd-router-advert")
    table.rule(TAP_CHAIN, [_match(_field("ether", "type"), "ip6"), is_ra, *COUNTED_DROP], GUARD_RA)
    table.rule(TAP_CHAIN, [_match(_field("ether", "type"), "ip6"), *COUNTED_DROP], GUARD_IPV6)


def _from_tap(settings: Settings) -> _Table:
    """What the guest may send into the pod at all, checked at the tap's ingress before the bridge sees a frame:
    its own MAC, its own IPv4 address (0.0.0.0 only for DHCP requests), ARP only about itself, no DHCP server."""
    tap = _Table("netdev")
    vm_ip = str(settings.vm_ip)
    tap.chain(TAP_CHAIN, type="filter", hook="ingress", dev=TAP, prio=-500, policy="drop")
    tap.rule(TAP_CHAIN, [_match(_field("ether", "saddr"), settings.mac, "!="), *COUNTED_DROP], GUARD_MAC)
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
    tap.rule(TAP_CHAIN, [*arp_about_itself, {"accept": None}])
    tap.rule(TAP_CHAIN, [is_arp, *COUNTED_DROP], GUARD_ARP)
    is_ip = _match(_field("ether", "type"), "ip")
    tap.rule(TAP_CHAIN, [is_ip, _match(_field("udp", "sport"), 67), *COUNTED_DROP], GUARD_DHCP_SERVER)
    tap.rule(TAP_CHAIN, [is_ip, _match(_field("ip", "saddr"), vm_ip), {"accept": None}])
    dhcp_client = [
        is_ip,
        _match(_field("ip", "saddr"), "0.0.0.0"),  # noqa: S104 - a DHCP client without an address yet
        _match(_field("udp", "sport"), 68),
        _match(_field("udp", "dport"), 67),
    ]
    tap.rule(TAP_CHAIN, [*dhcp_client, {"accept": None}])
    tap.rule(TAP_CHAIN, [is_ip, *COUNTED_DROP], GUARD_IPV4)
    _ipv6_from_tap(tap)
    tap.rule(TAP_CHAIN, COUNTED_DROP, GUARD_OTHER)
    return tap


def _guest_to_pod(settings: Settings) -> _Table:
    """What the pod's own namespace accepts from the bridge: DHCP, ping to the gateway, replies to connections
    the pod opened, and VM_OPEN_PORTS; every other local service (0.0.0.0 and :: listeners, VNC) is closed."""
    inet = _Table("inet")
    inet.chain(INPUT_CHAIN, type="filter", hook="input", prio=-10, policy="accept")
    inet.chain(GUEST_CHAIN)
    inet.rule(INPUT_CHAIN, [_match(_meta("iifname"), BRIDGE), {"jump": {"target": GUEST_CHAIN}}])
    is_ra = _match(_field("icmpv6", "type"), "nd-router-advert")
    inet.rule(GUEST_CHAIN, [is_ra, *COUNTED_DROP], GUARD_POD_RA)
    inet.rule(GUEST_CHAIN, [_match(_meta("nfproto"), "ipv6"), *COUNTED_DROP], GUARD_POD_IPV6)
    inet.rule(GUEST_CHAIN, [_match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}])
    dhcp = [_match(_field("udp", "sport"), 68), _match(_field("udp", "dport"), 67)]
    inet.rule(GUEST_CHAIN, [*dhcp, {"accept": None}])
    ping = [_match(_field("ip", "daddr"), str(settings.gateway)), _match(_field("icmp", "type"), "echo-request")]
    inet.rule(GUEST_CHAIN, [*ping, {"accept": None}])
    for protocol in ("tcp", "udp"):
        ports = [number for number, proto in settings.open_ports if proto == protocol]
        if ports:
            inet.rule(GUEST_CHAIN, [_match(_field(protocol, "dport"), _set(ports)), {"accept": None}])
    inet.rule(GUEST_CHAIN, COUNTED_DROP, GUARD_POD_SERVICES)
    return inet


def ruleset(settings: Settings, pod: PodFacts) -> Json:
    """The nftables JSON document: one transaction that replaces the NAT table and both guest-isolation tables,
    so the VM is never reachable through the NAT without its isolation (the kernel applies all of it or nothing).
    """
    tables = (_nat(settings, pod), _from_tap(settings), _guest_to_pod(settings))
    commands = [command for table in tables for command in table.commands]
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}


def rule_count(document: Json) -> int:
    """How many rules a ruleset document adds."""
    return sum(1 for command in document["nftables"] if "rule" in command.get("add", {}))


def dnsmasq_argv(settings: Settings, pod: PodFacts, resolv: Resolv) -> list[str]:
    """dnsmasq as a DHCP-only server on the bridge with one static lease for the VM's MAC."""
    netmask = "255.255.255.252"
    network = ipaddress.IPv4Network(f"{settings.vm_ip}/{PREFIX}", strict=False).network_address
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
        # The /30 holds only the VM: no ping before offering its address, so dnsmasq keeps no raw-socket capability.
        "--no-ping",
        f"--dhcp-range={network},static,{netmask}",
        # The name goes in option 12, not in --dhcp-host: there dnsmasq reads a name such as `ignore` as "never
        # answer this MAC" and `12345` or `5m` as a lease time, and the VM would get no lease or no name.
        f"--dhcp-host={settings.mac},{settings.vm_ip},infinite",
        f"--dhcp-option=12,{settings.hostname.split('.')[0]}",
        f"--dhcp-leasefile={settings.state_dir / LEASE_FILE}",
        # No pid file of dnsmasq's own (its default is /run/dnsmasq.pid): the supervisor records the pid.
        "--pid-file",
        f"--dhcp-option=option:router,{settings.gateway}",
        f"--dhcp-option=option:mtu,{pod.mtu}",
    ]
    if resolv.nameservers:
        argv.append("--dhcp-option=option:dns-server," + ",".join(resolv.nameservers))
    if resolv.search:
        argv.append("--dhcp-option=option:domain-search," + ",".join(resolv.search))
    return argv


def build(settings: Settings, pod: PodFacts, resolv: Resolv) -> Plan:
    """The whole plan from validated inputs."""
    links = LinkPlan(BRIDGE, f"{settings.gateway}/{PREFIX}", TAP, settings.tap_owner, settings.mac, pod.mtu)
    handshake = Handshake(
        tap=TAP,
        bridge=BRIDGE,
        mac=settings.mac,
        vm_ip=str(settings.vm_ip),
        gateway=str(settings.gateway),
        prefix=PREFIX,
        mtu=pod.mtu,
        pod_ip=str(pod.ip),
        dns=resolv.nameservers,
        search=resolv.search,
        hostname=settings.hostname,
        vnc_in_pod=not settings.no_vnc,
        tap_owner=settings.tap_owner,
        metrics_port=settings.metrics_port,
    )
    return Plan(links, ruleset(settings, pod), dnsmasq_argv(settings, pod, resolv), handshake)


def pid_file(state_dir: Path) -> Path:
    """Where the supervisor records dnsmasq's pid, so a restarted sidecar finds a stale one."""
    return state_dir / PID_FILE
