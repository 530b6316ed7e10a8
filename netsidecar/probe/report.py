"""The pure half of the probes: parsing the command line, judging findings and rendering verdicts.

Kept apart from scapy and the kernel so every verdict can be unit-tested without root.
"""

import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from netsidecar import nft
from shared.arguments import Arguments

PROBES = ("dhcp", "arp", "ra", "nd", "port", "path", "all")
USAGE = "dhcp|arp|ra|nd|path|all [--json] | port PORT[/udp] [--json]"
_PORT = re.compile(r"^(\d{1,5})(?:/(tcp|udp))?$")


class Status(enum.Enum):
    """How a check came out; only FAIL makes the probe exit non-zero."""

    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One verdict line: which probe, what was checked, the outcome, and the facts behind it."""

    probe: str
    name: str
    status: Status
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """What the user asked for: a probe, its port (for ``port``) and the output format."""

    probe: str
    port: int | None = None
    protocol: str = "tcp"
    as_json: bool = False


def parse(args: Sequence[str]) -> Request:
    """Parse ``probe`` arguments; a ConfigError naming the usage on anything unexpected (exit status 2)."""
    parser = Arguments("netsidecar probe", USAGE)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("probe", choices=PROBES)
    parser.add_argument("port", nargs="?")
    parsed = parser.parse(args)
    if parsed.probe != "port":
        if parsed.port is not None:
            parser.error(f"unexpected argument {parsed.port!r}")
        return Request(parsed.probe, as_json=parsed.json)
    if parsed.port is None:
        parser.error("port needs exactly one PORT[/udp]")
    match = _PORT.match(parsed.port)
    if not match or not 1 <= int(match.group(1)) <= 65535:
        parser.error(f"port {parsed.port!r}: expected a number from 1 to 65535, optionally followed by /udp or /tcp")
    return Request("port", int(match.group(1)), match.group(2) or "tcp", parsed.json)


def exit_status(checks: Iterable[Check]) -> int:
    """0 when no check failed, 1 otherwise."""
    return 1 if any(check.status is Status.FAIL for check in checks) else 0


def render(checks: Sequence[Check]) -> str:
    """A table a person reads in ``kubectl exec`` output: probe, check, verdict, detail."""
    rows = [("PROBE", "CHECK", "VERDICT", "DETAIL")]
    rows += [(c.probe, c.name, c.status.value.upper(), c.detail) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
    verdict = "unhealthy" if exit_status(checks) else "healthy"
    return "\n".join([*lines, f"overall: {verdict}"]) + "\n"


def to_json(checks: Sequence[Check]) -> str:
    """The machine-readable form: the overall verdict and every check with its data."""
    return json.dumps(
        {
            "healthy": exit_status(checks) == 0,
            "checks": [
                {"probe": c.probe, "check": c.name, "status": c.status.value, "detail": c.detail, "data": dict(c.data)}
                for c in checks
            ],
        },
        indent=2,
    )


def decode_domain_search(raw: bytes) -> list[str]:
    """Decode DHCP option 119 (RFC 3397): DNS names in wire format, with compression pointers."""
    names: list[str] = []
    offset = 0
    while offset < len(raw):
        labels: list[str] = []
        cursor, jumps = offset, 0
        end: int | None = None
        while True:
            if cursor >= len(raw):
                raise ValueError("option 119 ends inside a name")
            length = raw[cursor]
            if length == 0:
                end = cursor + 1 if end is None else end
                break
            if length & 0xC0 == 0xC0:
                if cursor + 1 >= len(raw) or jumps > len(raw):
                    raise ValueError("option 119 has a broken compression pointer")
                end = cursor + 2 if end is None else end
                cursor, jumps = ((length & 0x3F) << 8) | raw[cursor + 1], jumps + 1
                continue
            labels.append(raw[cursor + 1 : cursor + 1 + length].decode("ascii", "replace"))
            cursor += 1 + length
        names.append(".".join(labels))
        offset = end
    return names


@dataclass(frozen=True)
class Offer:
    """What a DHCP server offered the VM's MAC."""

    server: str
    address: str
    netmask: str | None
    router: str | None
    dns: tuple[str, ...]
    search: tuple[str, ...]
    mtu: int | None
    hostname: str | None
    lease: int | None


@dataclass(frozen=True)
class Expected:
    """What the handshake says the VM should be told."""

    vm_ip: str
    gateway: str
    prefix: int
    dns: tuple[str, ...]
    search: tuple[str, ...]
    mtu: int
    hostname: str


def _netmask(prefix: int) -> str:
    bits = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    return ".".join(str((bits >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def _lease(seconds: int | None) -> str:
    """Lease time as DHCP means it: 0xffffffff is an infinite lease (RFC 2131)."""
    if seconds is None:
        return "-"
    return "infinite" if seconds == 0xFFFFFFFF else f"{seconds}s"


def judge_offer(offer: Offer | None, expected: Expected) -> list[Check]:
    """Compare a DHCP offer with the handshake: one check for the offer, one per field that differs."""
    if offer is None:
        return [Check("dhcp", "offer", Status.FAIL, "no DHCP offer for the VM's MAC (is dnsmasq running?)")]
    data = {
        "server": offer.server,
        "address": offer.address,
        "netmask": offer.netmask,
        "router": offer.router,
        "dns": list(offer.dns),
        "search": list(offer.search),
        "mtu": offer.mtu,
        "hostname": offer.hostname,
        "lease": offer.lease,
    }
    told = (
        f"{offer.address} via {offer.router} dns {','.join(offer.dns) or '-'} search {','.join(offer.search) or '-'}"
        f" mtu {offer.mtu} lease {_lease(offer.lease)} from {offer.server}"
    )
    wanted: list[tuple[str, object, object]] = [
        ("address", offer.address, expected.vm_ip),
        ("netmask", offer.netmask, _netmask(expected.prefix)),
        ("router", offer.router, expected.gateway),
        ("dns", offer.dns, expected.dns),
        ("search", offer.search, expected.search),
        ("mtu", offer.mtu, expected.mtu),
        ("hostname", offer.hostname, expected.hostname),
    ]
    checks = [Check("dhcp", "offer", Status.OK, told, data)]
    for name, got, want in wanted:
        if got != want:
            checks.append(Check("dhcp", name, Status.FAIL, f"offered {got!r}, handshake says {want!r}"))
    return checks


def judge_arp(answers: Sequence[str], vm_ip: str, vm_mac: str, probe: str = "arp") -> Check:
    """Who answered ARP (or, for ``nd``, neighbour solicitation) for the VM's address: nobody (fail), the VM's MAC
    (ok), or someone else too (warn: a duplicate)."""
    macs = sorted(set(answers))
    data = {"macs": macs, "vm_mac": vm_mac}
    if not macs:
        return Check(probe, vm_ip, Status.FAIL, f"nobody answers for {vm_ip} on the bridge (is the VM up?)", data)
    if macs == [vm_mac]:
        return Check(probe, vm_ip, Status.OK, f"{vm_ip} is at {vm_mac}, the VM's MAC", data)
    return Check(probe, vm_ip, Status.WARN, f"{vm_ip} answered by {', '.join(macs)}, not the VM's MAC {vm_mac}", data)


@dataclass(frozen=True)
class Advert:
    """A router advertisement as a guest on the bridge receives it."""

    router_lifetime: int
    managed: bool
    prefixes: tuple[tuple[str, int, bool], ...]  # (prefix, length, autonomous flag)
    mtu: int | None
    rdnss: tuple[str, ...]
    dnssl: tuple[str, ...]


def judge_ra(
    advert: Advert | None, prefix: str, mtu: int, dns: tuple[str, ...], search: tuple[str, ...]
) -> list[Check]:
    """The RA must make the bridge the guest's default router, send it to DHCPv6 (M), offer the VM's /64 for
    SLAAC (A), and carry the pod's MTU, nameservers (RDNSS) and search list (DNSSL)."""
    if advert is None:
        return [Check("ra", "advert", Status.FAIL, "no router advertisement answers a router solicitation")]
    network, length = prefix.split("/")
    checks = [
        Check(
            "ra",
            "router",
            Status.OK if advert.router_lifetime > 0 else Status.FAIL,
            f"router lifetime {advert.router_lifetime}s" + ("" if advert.router_lifetime else ": no default route"),
        ),
        Check(
            "ra",
            "managed",
            Status.OK if advert.managed else Status.FAIL,
            "M flag set: DHCPv6 gives the address" if advert.managed else "M flag clear: guests will not ask DHCPv6",
        ),
    ]
    slaac = (network, int(length), True) in advert.prefixes
    checks.append(
        Check(
            "ra",
            "prefix",
            Status.OK if slaac else Status.FAIL,
            f"prefixes {list(advert.prefixes)}, expected {prefix} with A",
        )
    )
    for name, got, want in (("mtu", advert.mtu, mtu), ("rdnss", advert.rdnss, dns), ("dnssl", advert.dnssl, search)):
        same = got == want or (name != "mtu" and not want and not got)
        checks.append(
            Check("ra", name, Status.OK if same else Status.FAIL, f"{got!r}" + ("" if same else f", expected {want!r}"))
        )
    return checks


class PortState(enum.Enum):
    """What a probe packet to the guest drew back."""

    OPEN = "open"
    CLOSED = "closed"
    NO_ANSWER = "no answer"


def judge_port(state: PortState, port: int, protocol: str) -> Check:
    """Open is healthy; closed and silence are failures (UDP silence may mean open but quiet)."""
    name = f"{port}/{protocol}"
    data = {"port": port, "protocol": protocol, "state": state.value}
    if state is PortState.OPEN:
        return Check("port", name, Status.OK, "open: the guest answers", data)
    if state is PortState.CLOSED:
        return Check("port", name, Status.FAIL, "closed: the guest refuses it (nothing listens)", data)
    hint = " (a UDP service may be open but silent)" if protocol == "udp" else " (guest down or filtering)"
    return Check("port", name, Status.FAIL, f"no answer{hint}", data)


@dataclass(frozen=True)
class Rule:
    """The parts of one nftables rule the path probe cares about."""

    table: str
    chain: str
    dnat_to: str | None
    nat_out: bool
    packets: int | None
    comment: str | None = None


def rules_from_ruleset(document: Mapping[str, Any]) -> list[Rule]:
    """Pick the rules out of ``nft -j list ruleset`` output (the nftables JSON API's document)."""
    return [_rule(rule) for rule in nft.rules(document)]


def _rule(rule: dict[str, Any]) -> Rule:
    """The probe's view of one listed rule, read by the one parser of nftables rules."""
    counter = nft.counter(rule)
    comment = rule.get("comment")
    return Rule(
        f"{rule.get('family')} {rule.get('table')}",
        str(rule.get("chain")),
        nft.dnat_address(rule),
        bool(nft.verdicts(rule) & {"masquerade", "snat"}),
        None if counter is None else counter["packets"],
        comment if isinstance(comment, str) else None,
    )


def judge_rules(rules: Sequence[Rule], vm_ip: str, suffix: str = "") -> list[Check]:
    """The VM's table must DNAT to the VM and masquerade/SNAT what it sends; counters are shown as found. ``suffix``
    tells the families apart in the check names (``6`` for IPv6)."""
    dnat = [rule for rule in rules if rule.dnat_to == vm_ip]
    if not dnat:
        return [Check("path", f"nft dnat{suffix}", Status.FAIL, f"no nftables rule DNATs to {vm_ip}")]
    table = dnat[0].table
    own = [rule for rule in rules if rule.table == table]
    counted = sum(rule.packets or 0 for rule in dnat)
    checks = [
        Check(
            "path",
            f"nft dnat{suffix}",
            Status.OK,
            f"table {table}: {len(dnat)} DNAT rule(s) to {vm_ip}, {counted} packets",
            {"table": table, "rules": len(own), "dnat_rules": len(dnat), "dnat_packets": counted},
        )
    ]
    snat = [rule for rule in own if rule.nat_out]
    if snat:
        packets = sum(rule.packets or 0 for rule in snat)
        detail = f"{len(snat)} SNAT/masquerade rule(s), {packets} packets"
        checks.append(Check("path", f"nft snat{suffix}", Status.OK, detail))
    else:
        checks.append(Check("path", f"nft snat{suffix}", Status.FAIL, f"table {table} has no SNAT/masquerade rule"))
    return checks


def judge_isolation(rules: Sequence[Rule], guards: Sequence[str]) -> Check:
    """Every guest-isolation drop rule (named by its comment) must be loaded; their drop counters are reported."""
    drops = {rule.comment: rule.packets or 0 for rule in rules if rule.comment in guards}
    missing = [guard for guard in guards if guard not in drops]
    data = {"drops": drops, "missing": missing}
    if missing:
        return Check("path", "isolation", Status.FAIL, f"guest isolation rule(s) missing: {'; '.join(missing)}", data)
    dropped = ", ".join(f"{name}: {count}" for name, count in drops.items() if count)
    detail = f"{len(guards)} guest-isolation drop rules loaded; dropped so far: {dropped or 'nothing'}"
    return Check("path", "isolation", Status.OK, detail, data)


def _kernel_mismatches(recorded: Mapping[str, Any], kernel: Mapping[str, Any]) -> list[str]:
    """Where the kernel differs from what the sidecar recorded making: a bridge, a tap as its port, the tap's owner."""
    bridge, tap = recorded.get("bridge"), recorded.get("tap")
    out = []
    if kernel.get("bridge_kind") != "bridge":
        out.append(f"{bridge} is {_kind(kernel.get('bridge_kind'))} in the kernel, not a bridge")
    if kernel.get("tap_kind") != "tun":
        out.append(f"{tap} is {_kind(kernel.get('tap_kind'))} in the kernel, not a tap")
    elif kernel.get("tap_master") != bridge:
        out.append(f"tap {tap} is a port of {kernel.get('tap_master') or 'no bridge'}, not of {bridge}")
    if kernel.get("tap_kind") == "tun" and kernel.get("tap_owner") != recorded.get("tap_owner"):
        out.append(f"tap {tap} is owned by uid {kernel.get('tap_owner')}, recorded {recorded.get('tap_owner')}")
    return out


def _kind(kind: object) -> str:
    return "missing" if kind is None else f"a {kind} link"


def judge_handshake(
    claimed: Mapping[str, Any], recorded: Mapping[str, Any] | None, kernel: Mapping[str, Any] | None
) -> Check | None:
    """Whether the probe may act on a handshake: RUN_DIR is writable by the runner, so the handshake's links and
    addresses (``claimed``, as :func:`netsidecar.plan.record` gives them) must equal the sidecar's own record in
    NET_STATE_DIR (``recorded``; None: there is none), and the kernel's facts of the recorded links (``kernel``)
    must show the bridge, its tap and the tap's owner as recorded. None when all agree; else one failed check that
    names every mismatch, and no probe sends a frame."""
    if recorded is None:
        detail = "the sidecar has no record of its links in NET_STATE_DIR (is `netsidecar run` running?)"
        return Check("handshake", "trusted", Status.FAIL, detail)
    keys = sorted({*claimed, *recorded})
    mismatches = [
        f"{key} {claimed.get(key)!r} is not the sidecar's {recorded.get(key)!r}"
        for key in keys
        if claimed.get(key) != recorded.get(key)
    ]
    mismatches += _kernel_mismatches(recorded, kernel or {})
    if not mismatches:
        return None
    detail = f"the handshake is not what the sidecar made, no frame sent: {'; '.join(mismatches)}"
    return Check("handshake", "trusted", Status.FAIL, detail, {"mismatches": mismatches})
