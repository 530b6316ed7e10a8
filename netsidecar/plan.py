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


def ruleset(settings: Settings, pod: PodFacts) -> Json:
    """The nftables JSON document: one transaction that replaces table ip podvm as a whole.

    ``add`` then ``delete`` of the table makes the delete succeed whether or not the table exists, so a restart
    never duplicates rules; conntrack is left alone so established flows survive.
    """
    table = {"family": "ip", "name": TABLE}
    pod_ip, vm_ip = str(pod.ip), str(settings.vm_ip)
    to_pod_ip = _match(_field("ip", "daddr"), pod_ip)
    dnat: list[Json] = [{"counter": None}, {"dnat": {"addr": vm_ip}}]

    def chain(name: str, hook: str, prio: int) -> Json:
        return {
            "add": {
                "chain": {**_in_table(), "name": name, "type": "nat", "hook": hook, "prio": prio, "policy": "accept"}
            }
        }

    def _in_table() -> Json:
        return {"family": "ip", "table": TABLE}

    def rule(chain_name: str, expr: list[Json]) -> Json:
        return {"add": {"rule": {**_in_table(), "chain": chain_name, "expr": expr}}}

    from_pod_iface = _match(_meta("iifname"), pod.iface)
    commands: list[Json] = [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        chain("prerouting", "prerouting", -100),
        chain("output", "output", -100),
        chain("postrouting", "postrouting", 100),
    ]
    stays = [] if settings.no_vnc else [_stays_in_pod(VNC_PORT)]
    stays += [_stays_in_pod(port) for port in metrics_ports(settings)]
    commands += [rule("prerouting", [from_pod_iface, to_pod_ip, *keep]) for keep in stays]
    commands.append(rule("prerouting", [from_pod_iface, to_pod_ip, *dnat]))
    commands += [rule("output", [to_pod_ip, *keep]) for keep in stays]
    commands.append(rule("output", [to_pod_ip, *dnat]))
    commands.append(
        rule(
            "postrouting",
            [
                _match(_meta("oifname"), pod.iface),
                _match(_field("ip", "saddr"), vm_ip),
                {"counter": None},
                {"snat": {"addr": pod_ip}},
            ],
        )
    )
    commands += accounting(settings, pod)
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}


ACCOUNTING_CHAIN = "accounting"
NAT_IN = "podvm: nat in"
NAT_OUT = "podvm: nat out"


def metrics_ports(settings: Settings) -> list[int]:
    """The metrics port, which stays in the pod like VNC's (the runner serves it), when one is configured."""
    return [] if settings.metrics_port is None else [settings.metrics_port]


def _stays_in_pod(port: int) -> list[Json]:
    return [_match(_field("tcp", "dport"), port), {"counter": None}, {"return": None}]


def accounting(settings: Settings, pod: PodFacts) -> list[Json]:
    """Counters of every packet the NAT translates, in both directions (the nat chains see only the first packet
    of a connection): a chain after both NATs (postrouting, after SNAT's priority 100) that only counts, its rules
    named by comment for the metrics."""
    table = {"family": "ip", "table": TABLE}
    where = {**table, "chain": ACCOUNTING_CHAIN}
    translated = _match({"ct": {"key": "status"}}, ["snat", "dnat"], "in")
    to_vm = [_match(_meta("oifname"), BRIDGE), _match(_field("ip", "daddr"), str(settings.vm_ip)), translated]
    from_vm = [_match(_meta("iifname"), BRIDGE), _match(_meta("oifname"), pod.iface), translated]
    chain = {
        **table,
        "name": ACCOUNTING_CHAIN,
        "type": "filter",
        "hook": "postrouting",
        "prio": 200,
        "policy": "accept",
    }
    return [
        {"add": {"chain": {**chain, "policy": "accept"}}},
        {"add": {"rule": {**where, "expr": [*to_vm, {"counter": None}], "comment": NAT_IN}}},
        {"add": {"rule": {**where, "expr": [*from_vm, {"counter": None}], "comment": NAT_OUT}}},
    ]


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
