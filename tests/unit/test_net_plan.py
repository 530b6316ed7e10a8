"""The sidecar's plan: nftables document, dnsmasq arguments, links and handshake, computed without the kernel."""

import ipaddress
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from netsidecar import cli, plan
from netsidecar.config import GW_MAC_LABEL, PodFacts, Resolv, derive_mac, read_settings
from netsidecar.links import kept_queues
from netsidecar.plan import build, rule_count, ruleset
from shared.env import Env
from shared.errors import ConfigError
from shared.handshake import Handshake

POD = PodFacts("eth0", ipaddress.IPv4Address("10.1.2.3"), ipaddress.IPv4Network("10.1.2.3/32"), 1440)
RESOLV = Resolv(("10.96.0.10", "10.96.0.11"), ("ns.svc.cluster.local", "cluster.local"))


def rules(doc: dict[str, Any], chain: str) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in doc["nftables"] if c.get("add", {}).get("rule", {}).get("chain") == chain]


def has_vnc_exception(exprs: list[dict[str, Any]]) -> bool:
    return any(e.get("match", {}).get("right") == 5900 for e in exprs) and {"return": None} in exprs


def test_ruleset_replaces_the_table_in_one_document() -> None:
    doc = ruleset(read_settings(Env({"HOSTNAME": "vm"})), POD)
    table = {"table": {"family": "ip", "name": "podvm"}}
    assert doc["nftables"][1:4] == [{"add": table}, {"delete": table}, {"add": table}]
    assert rule_count(doc) == 7 + GUARD_RULES, "2 VNC exceptions, 2 DNAT, 1 SNAT, 2 accounting, the guards"
    pre, out, post = rules(doc, "prerouting"), rules(doc, "output"), rules(doc, "postrouting")
    assert has_vnc_exception(pre[0]) and has_vnc_exception(out[0])
    assert {"dnat": {"addr": "192.168.254.2"}} in pre[1] and {"dnat": {"addr": "192.168.254.2"}} in out[1]
    assert {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}} in pre[1]
    assert {"snat": {"addr": "10.1.2.3"}} in post[0]
    json.dumps(doc)


def test_no_vnc_sends_5900_to_the_vm() -> None:
    doc = ruleset(read_settings(Env({"HOSTNAME": "vm", "NO_VNC": "true"})), POD)
    assert rule_count(doc) == 5 + GUARD_RULES
    assert not any(has_vnc_exception(e) for chain in ("prerouting", "output") for e in rules(doc, chain))


def test_metrics_port_stays_in_the_pod_like_vnc() -> None:
    doc = ruleset(read_settings(Env({"HOSTNAME": "vm", "METRICS_PORT": "9100"})), POD)
    for chain in ("prerouting", "output"):
        exprs = rules(doc, chain)
        kept = [e for e in exprs if {"return": None} in e]
        ports = [m["match"]["right"] for e in kept for m in e if m.get("match", {}).get("left", {}).get("payload")]
        assert 9100 in ports and 5900 in ports, chain
        assert {"dnat": {"addr": "192.168.254.2"}} in exprs[-1], "the exceptions come before the DNAT"
    handshake = build(read_settings(Env({"HOSTNAME": "vm", "METRICS_PORT": "9100"})), POD, RESOLV).handshake
    assert handshake.metrics_port == 9100 and handshake.version == "1.4"
    assert build(read_settings(Env({"HOSTNAME": "vm"})), POD, RESOLV).handshake.metrics_port is None


def test_accounting_counts_translated_packets_after_both_nats() -> None:
    doc = ruleset(read_settings(Env({"HOSTNAME": "vm"})), POD)
    chain = next(
        c["add"]["chain"] for c in doc["nftables"] if c.get("add", {}).get("chain", {}).get("name") == "accounting"
    )
    assert (chain["type"], chain["hook"], chain["policy"]) == ("filter", "postrouting", "accept")
    assert chain["prio"] > 100, "after SNAT (100), so a connection's first packet already has its snat status"
    accounted = [
        c["add"]["rule"] for c in doc["nftables"] if c.get("add", {}).get("rule", {}).get("chain") == "accounting"
    ]
    assert [r["comment"] for r in accounted] == ["podvm: nat in", "podvm: nat out"]
    for rule in accounted:
        assert {"counter": None} in rule["expr"] and {"drop": None} not in rule["expr"], "it only counts"
        assert {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": ["snat", "dnat"]}} in rule["expr"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"METRICS_PORT": "5900"}, "METRICS_PORT=5900: VNC has that port"),
        ({"METRICS_PORT": "0"}, "METRICS_PORT=0"),
        ({"METRICS_PORT": "http"}, "METRICS_PORT='http'"),
        ({"METRICS_INTERVAL": "100ms"}, "METRICS_INTERVAL='100ms'"),
    ],
)
def test_bad_metrics_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_settings(Env({"HOSTNAME": "vm", **env}))


def test_the_console_port_stays_in_the_pod_only_when_set() -> None:
    def kept(env: dict[str, str]) -> list[int]:
        exprs = rules(ruleset(read_settings(Env({"HOSTNAME": "vm", **env})), POD), "prerouting")
        return [m["match"]["right"] for e in exprs if {"return": None} in e for m in e if "tcp" in str(m)]

    assert kept({}) == [5900]
    assert kept({"CONSOLE_POD_PORT": "6080", "METRICS_PORT": "9100"}) == [5900, 9100, 6080]
    assert kept({"CONSOLE_POD_PORT": "5900", "NO_VNC": "1"}) == [5900], "5900 is free for it without VNC"
    settings = read_settings(Env({"HOSTNAME": "vm", "CONSOLE_POD_PORT": "6080"}))
    assert build(settings, POD, RESOLV).handshake.console_port == 6080


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CONSOLE_POD_PORT": "5900"}, "CONSOLE_POD_PORT=5900: VNC has that port; choose another"),
        ({"CONSOLE_POD_PORT": "9100", "METRICS_PORT": "9100"}, "CONSOLE_POD_PORT=9100: METRICS_PORT has that port"),
        ({"CONSOLE_POD_PORT": "70000"}, "CONSOLE_POD_PORT=70000: expected a number from 1 to 65535"),
    ],
)
def test_a_console_port_taken_by_another_service_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_settings(Env({"HOSTNAME": "vm", **env}))


def test_metrics_port_5900_is_free_without_vnc() -> None:
    assert read_settings(Env({"HOSTNAME": "vm", "NO_VNC": "1", "METRICS_PORT": "5900"})).metrics_port == 5900


def test_dnsmasq_is_dhcp_only_with_one_static_lease() -> None:
    s = read_settings(Env({"HOSTNAME": "vm-a.example", "RUN_DIR": "/r", "NET_STATE_DIR": "/s"}))
    argv = build(s, POD, RESOLV).dnsmasq
    assert argv[0] == "dnsmasq" and "--port=0" in argv and "--interface=podvm0" in argv
    assert "--conf-file=/dev/null" in argv and "--log-facility=-" in argv
    assert f"--dhcp-host={s.mac},192.168.254.2,infinite" in argv
    assert "--dhcp-option=12,vm-a" in argv
    assert "--dhcp-range=192.168.254.0,static,255.255.255.252" in argv
    assert "--dhcp-option=option:router,192.168.254.1" in argv
    assert "--dhcp-option=option:mtu,1440" in argv
    assert "--dhcp-option=option:dns-server,10.96.0.10,10.96.0.11" in argv
    assert "--dhcp-option=option:domain-search,ns.svc.cluster.local,cluster.local" in argv
    assert "--dhcp-leasefile=/s/dnsmasq.leases" in argv, "dnsmasq's files live where only the sidecar writes"
    assert "--pid-file" in argv, "no pid file of dnsmasq's own (by default /run/dnsmasq.pid)"
    assert not [a for a in argv if "/r/" in a or a.endswith("/r")], "nothing of dnsmasq's in RUN_DIR"


@pytest.mark.parametrize("name", ["ignore", "12345", "5m", "2d", "infinite", "id", "set", "tag", "vm-a"])
def test_hostname_never_reaches_dhcp_hosts_keyword_parser(name: str) -> None:
    """In --dhcp-host dnsmasq reads `ignore` as "never answer", digits (with an optional unit) as a lease time."""
    s = read_settings(Env({"HOSTNAME": f"{name}.example"}))
    argv = build(s, POD, RESOLV).dnsmasq
    hosts = [a for a in argv if a.startswith("--dhcp-host=")]
    assert hosts == [f"--dhcp-host={s.mac},192.168.254.2,infinite"]
    assert f"--dhcp-option=12,{name}" in argv


def test_no_dns_options_without_nameservers_or_search() -> None:
    argv = build(read_settings(Env({"HOSTNAME": "vm"})), POD, Resolv((), ())).dnsmasq
    assert not [a for a in argv if "dns-server" in a or "domain-search" in a]


def test_links_and_handshake_carry_the_pod_mtu_and_validate() -> None:
    plan = build(read_settings(Env({"HOSTNAME": "vm", "TAP_OWNER": "root"})), POD, RESOLV)
    assert (plan.links.mtu, plan.links.bridge_address, plan.links.tap_owner) == (1440, "192.168.254.1/30", None)
    data = json.loads(json.dumps(plan.to_dict()))
    back = Handshake.from_dict(data["handshake"])
    assert back == plan.handshake and back.mtu == 1440 and back.vnc_in_pod and back.pod_ip == "10.1.2.3"


def test_the_plan_pins_the_bridges_mac_the_gateways_and_routers() -> None:
    s = read_settings(Env({"HOSTNAME": "vm"}))
    data = json.loads(json.dumps(build(s, DUAL, RESOLV6).to_dict()))
    assert data["links"]["bridge_mac"] == s.gw_mac == derive_mac("vm", GW_MAC_LABEL) != data["links"]["mac"]
    other = read_settings(Env({"HOSTNAME": "vm", "GW_MAC": "02:00:00:00:01:01"}))
    assert build(other, POD, RESOLV).links.bridge_mac == "02:00:00:00:01:01"


def test_netsidecar_plan_shows_the_bridges_mac(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "HOSTNAME": "vm-b",
        "POD_IFACE": "eth0",
        "POD_IP": "10.1.2.3",
        "POD_MTU": "1440",
        "RESOLV_CONF": "/nonexistent",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.command(["plan"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["links"]["bridge_mac"] == derive_mac("vm-b", GW_MAC_LABEL)


# ------------------------------------------------------------------------------------------- guest isolation
# The rules are judged by what they do: a small evaluator of the nftables JSON subset the plan uses runs packets
# (dicts of "protocol field" -> value) through the chains, as the kernel would, and reports the verdict and the
# comment of the rule that decided (the guard's name for a drop).

GUARD_RULES = 21  # netdev: 13, inet: 6 and 2 in forward (no VM_OPEN_PORTS, an IPv4-only pod)
VM_MAC, VM_IP, GW = "02:00:00:00:00:aa", "192.168.254.2", "192.168.254.1"
ENV = {"HOSTNAME": "vm", "VM_MAC": VM_MAC}


def chains(doc: dict[str, Any], family: str) -> dict[str, Any]:
    """name -> {"base": chain attributes, "rules": [rule, ...]} of one family's table."""
    out: dict[str, Any] = {}
    for command in doc["nftables"]:
        added = command.get("add", {})
        if added.get("chain", {}).get("family") == family:
            out[added["chain"]["name"]] = {"base": added["chain"], "rules": []}
        if added.get("rule", {}).get("family") == family:
            out[added["rule"]["chain"]]["rules"].append(added["rule"])
    return out


def _value(left: dict[str, Any], packet: dict[str, Any]) -> Any:
    if "payload" in left:
        return packet.get(f"{left['payload']['protocol']} {left['payload']['field']}")
    if "meta" in left:
        return packet.get(left["meta"]["key"])
    return packet.get(f"ct {left['ct']['key']}")


def _matches(match: dict[str, Any], packet: dict[str, Any]) -> bool:
    got, right = _value(match["left"], packet), match["right"]
    if got is None:
        return False  # nftables: a header the packet does not have never matches
    if match["op"] == "in":
        return bool(set(got) & set(right))
    wanted = right["set"] if isinstance(right, dict) else [right]
    return bool((got in wanted) == (match["op"] == "=="))


Matcher = Callable[[dict[str, Any], dict[str, Any]], bool]


def verdict(
    table: dict[str, Any], chain: str, packet: dict[str, Any], matches: Matcher = _matches
) -> tuple[str, str | None]:
    """(accept|drop|continue, comment of the deciding rule) for ``packet`` in ``chain``; ``matches`` reads one match
    expression (IPv6 rules need :func:`_matches6`). Mangle statements (MSS clamping) do not decide."""
    for rule in table[chain]["rules"]:
        exprs = rule["expr"]
        if not all(matches(e["match"], packet) for e in exprs if "match" in e):
            continue
        if {"counter": None} in exprs:
            assert {"drop": None} in exprs, "only drops are counted"
        for e in exprs:
            if "jump" in e:
                result = verdict(table, e["jump"]["target"], packet, matches)
                if result[0] != "continue":
                    return result
            elif "accept" in e or "drop" in e:
                assert ("drop" not in e) or {"counter": None} in exprs, f"uncounted drop: {rule}"
                return ("accept" if "accept" in e else "drop"), rule.get("comment")
    return table[chain]["base"].get("policy", "continue"), None


def from_tap(packet: dict[str, Any], env: dict[str, str] | None = None) -> tuple[str, str | None]:
    doc = ruleset(read_settings(Env({**ENV, **(env or {})})), POD)
    return verdict(chains(doc, "netdev"), plan.TAP_CHAIN, packet)


def to_pod(packet: dict[str, Any], env: dict[str, str] | None = None) -> tuple[str, str | None]:
    doc = ruleset(read_settings(Env({**ENV, **(env or {})})), POD)
    return verdict(chains(doc, "inet"), plan.INPUT_CHAIN, packet)


def ipv4(src: str = VM_IP, /, **fields: object) -> dict[str, Any]:
    return {"ether saddr": VM_MAC, "ether type": "ip", "ip saddr": src, "ip daddr": "10.9.9.9", **fields}


def arp(sender_ip: str, sender_mac: str = VM_MAC, **fields: object) -> dict[str, Any]:
    header = {"arp htype": 1, "arp ptype": "ip", "arp hlen": 6, "arp plen": 4}
    return {
        "ether saddr": VM_MAC,
        "ether type": "arp",
        **header,
        "arp saddr ether": sender_mac,
        "arp saddr ip": sender_ip,
        **fields,
    }


def test_isolation_tables_ride_in_the_nat_transaction_and_are_replaced_whole() -> None:
    doc = ruleset(read_settings(Env(ENV)), POD)
    tables = [c[v]["table"] for c in doc["nftables"] for v in ("add", "delete") if "table" in c.get(v, {})]
    expected = [(f, "podvm") for f in ("ip", "ip6", "netdev", "inet") for _ in ("ad" if f == "ip6" else "ada")]
    assert [(t["family"], t["name"]) for t in tables] == expected, "ip6 only removed: the pod has no IPv6"
    tap = chains(doc, "netdev")[plan.TAP_CHAIN]["base"]
    assert (tap["type"], tap["hook"], tap["dev"], tap["policy"]) == ("filter", "ingress", "podvm-tap0", "drop")
    entry = chains(doc, "inet")[plan.INPUT_CHAIN]["base"]
    assert (entry["type"], entry["hook"], entry["policy"]) == ("filter", "input", "accept")
    comments = [c["add"]["rule"].get("comment") for c in doc["nftables"] if "rule" in c.get("add", {})]
    named = Counter(c for c in comments if c)
    nat_tables = sum(
        1 for c in doc["nftables"] if c.get("add", {}).get("chain", {}).get("name") == plan.ACCOUNTING_CHAIN
    )
    guards = {g: 2 if g == plan.GUARD_ND else 1 for g in plan.GUARDS}
    assert named == {**guards, plan.NAT_IN: nat_tables, plan.NAT_OUT: nat_tables}, "each guard, the NAT's counters"


def test_every_drop_is_counted_and_named() -> None:
    doc = ruleset(read_settings(Env({**ENV, "VM_OPEN_PORTS": "80,53/udp"})), POD)
    for command in doc["nftables"]:
        rule = command.get("add", {}).get("rule")
        if rule and {"drop": None} in rule["expr"]:
            assert {"counter": None} in rule["expr"] and rule.get("comment") in plan.GUARDS, rule


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (ipv4(), ("accept", None)),
        (ipv4(**{"udp sport": 68, "udp dport": 67}), ("accept", None)),
        (ipv4("0.0.0.0", **{"udp sport": 68, "udp dport": 67}), ("accept", None)),
        (arp(VM_IP), ("accept", None)),
        (arp("0.0.0.0"), ("accept", None)),
        ({**ipv4(), "ether saddr": "02:00:00:00:00:bb"}, ("drop", plan.GUARD_MAC)),
        ({**arp(VM_IP), "ether saddr": "02:00:00:00:00:bb"}, ("drop", plan.GUARD_MAC)),
        (ipv4("192.168.254.3"), ("drop", plan.GUARD_IPV4)),
        (ipv4(GW), ("drop", plan.GUARD_IPV4)),
        (ipv4("10.1.2.3"), ("drop", plan.GUARD_IPV4)),
        (ipv4("0.0.0.0", **{"tcp sport": 68, "tcp dport": 67}), ("drop", plan.GUARD_IPV4)),
        (ipv4("0.0.0.0", **{"udp sport": 68, "udp dport": 53}), ("drop", plan.GUARD_IPV4)),
        (ipv4("0.0.0.0"), ("drop", plan.GUARD_IPV4)),
        (ipv4(**{"udp sport": 67, "udp dport": 68}), ("drop", plan.GUARD_DHCP_SERVER)),
        (ipv4(GW, **{"udp sport": 67, "udp dport": 68}), ("drop", plan.GUARD_DHCP_SERVER)),
        (arp(GW), ("drop", plan.GUARD_ARP)),
        (arp(VM_IP, "02:00:00:00:00:bb"), ("drop", plan.GUARD_ARP)),
        ({**arp(VM_IP), "arp hlen": 8}, ("drop", plan.GUARD_ARP)),
        ({**arp(VM_IP), "arp ptype": "ip6"}, ("drop", plan.GUARD_ARP)),
        ({"ether saddr": VM_MAC, "ether type": "ip6", "icmpv6 type": "nd-router-advert"}, ("drop", plan.GUARD_RA)),
        ({"ether saddr": VM_MAC, "ether type": "ip6", "tcp dport": 22}, ("drop", plan.GUARD_IPV6)),
        ({"ether saddr": VM_MAC, "ether type": "vlan"}, ("drop", plan.GUARD_OTHER)),
        ({"ether saddr": VM_MAC, "ether type": 0x88CC}, ("drop", plan.GUARD_OTHER)),
    ],
)
def test_what_the_tap_lets_in(packet: dict[str, Any], expected: tuple[str, str | None]) -> None:
    assert from_tap(packet) == expected


def pod_bound(**fields: object) -> dict[str, Any]:
    return {"iifname": "podvm0", "nfproto": "ipv4", "ct state": ["new"], "ip daddr": GW, **fields}


@pytest.mark.parametrize(
    ("packet", "env", "expected"),
    [
        (pod_bound(**{"udp sport": 68, "udp dport": 67}), {}, ("accept", None)),
        (pod_bound(**{"icmp type": "echo-request"}), {}, ("accept", None)),
        (pod_bound(**{"ct state": ["established"], "tcp sport": 9}), {}, ("accept", None)),
        (pod_bound(**{"ct state": ["related"], "icmp type": "destination-unreachable"}), {}, ("accept", None)),
        (pod_bound(**{"tcp dport": 8080}), {"VM_OPEN_PORTS": "8080,53/udp"}, ("accept", None)),
        (pod_bound(**{"udp dport": 53}), {"VM_OPEN_PORTS": "8080,53/udp"}, ("accept", None)),
        (pod_bound(**{"tcp dport": 53}), {"VM_OPEN_PORTS": "8080,53/udp"}, ("drop", plan.GUARD_POD_SERVICES)),
        (pod_bound(**{"tcp dport": 8080}), {}, ("drop", plan.GUARD_POD_SERVICES)),
        (pod_bound(**{"tcp dport": 5900}), {}, ("drop", plan.GUARD_POD_SERVICES)),
        (pod_bound(**{"ip daddr": "10.1.2.3", "tcp dport": 22}), {}, ("drop", plan.GUARD_POD_SERVICES)),
        (pod_bound(**{"ip daddr": "10.1.2.3", "icmp type": "echo-request"}), {}, ("drop", plan.GUARD_POD_SERVICES)),
        (pod_bound(**{"udp sport": 53, "udp dport": 67}), {}, ("drop", plan.GUARD_POD_SERVICES)),
        (pod_bound(**{"ct state": ["invalid"], "tcp dport": 80}), {}, ("drop", plan.GUARD_POD_SERVICES)),
        (pod_bound(nfproto="ipv6", **{"icmpv6 type": "nd-router-advert"}), {}, ("drop", plan.GUARD_POD_RA)),
        ({**pod_bound(**{"tcp dport": 22}), "iifname": "eth0"}, {}, ("accept", None)),
    ],
)
def test_what_the_pod_accepts_from_the_bridge(
    packet: dict[str, Any], env: dict[str, str], expected: tuple[str, str | None]
) -> None:
    assert to_pod(packet, env) == expected


@pytest.mark.parametrize(
    ("raw", "ports"),
    [("", ()), ("8080", ((8080, "tcp"),)), (" 8080 , 53/udp,53/tcp,8080", ((8080, "tcp"), (53, "udp"), (53, "tcp")))],
)
def test_vm_open_ports(raw: str, ports: tuple[tuple[int, str], ...]) -> None:
    assert read_settings(Env({**ENV, "VM_OPEN_PORTS": raw})).open_ports == ports


@pytest.mark.parametrize("raw", ["0", "65536", "http", "80/icmp", "80,", "80;53", "-1", "80/UDP/x"])
def test_vm_open_ports_refuses_bad_values(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^VM_OPEN_PORTS=.*expected a comma-separated list such as 8080,53/udp"):
        read_settings(Env({**ENV, "VM_OPEN_PORTS": raw}))


# ------------------------------------------------------------------------------------------------------ IPv6
POD6 = ipaddress.IPv6Address("fd00:10:244::5")
DUAL = PodFacts("eth0", POD.ip, POD.network, 1440, POD6, ipaddress.IPv6Network(f"{POD6}/128"))
V6ONLY = PodFacts("eth0", None, None, 1440, POD6, ipaddress.IPv6Network("fd00:10:244::/64"))
VM_IP6 = "fd70:6f64:766d::ff:fe00:aa"  # EUI-64 of VM_MAC in the default prefix
VM_LL = "fe80::ff:fe00:aa"
GW6 = "fd70:6f64:766d::1"
RESOLV6 = Resolv(RESOLV.nameservers, RESOLV.search, ("fd00::10",))


def _raw(left: dict[str, Any], packet: dict[str, Any]) -> Any:
    """A raw transport-header payload: the ND target address (8 bytes into ICMPv6), cut to the bits asked for."""
    payload = left["payload"]
    assert (payload["base"], payload["offset"]) == ("th", 64), payload
    target = packet.get("nd target")
    return None if target is None else hex(int(ipaddress.IPv6Address(target)) >> (128 - payload["len"]))


def _in(got: Any, element: Any) -> bool:
    if isinstance(element, dict) and "prefix" in element:
        network = ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}")
        return ipaddress.ip_address(got) in network
    return bool(got == element)


def _matches6(match: dict[str, Any], packet: dict[str, Any]) -> bool:
    """_matches with prefixes in sets and raw payloads, as the IPv6 rules use them."""
    left, right = match["left"], match["right"]
    got = _raw(left, packet) if "base" in left.get("payload", {}) else _value(left, packet)
    if got is None:
        return False
    if match["op"] == "in":
        return bool(set(got) & set(right)) if isinstance(got, list) else bool(got == right)
    wanted = right["set"] if isinstance(right, dict) and "set" in right else [right]
    return bool(any(_in(got, w) for w in wanted) == (match["op"] == "=="))


def verdict6(table: dict[str, Any], chain: str, packet: dict[str, Any]) -> tuple[str, str | None]:
    """verdict() for chains with IPv6 rules."""
    return verdict(table, chain, packet, _matches6)


def doc6(pod: PodFacts = DUAL, env: dict[str, str] | None = None) -> dict[str, Any]:
    return ruleset(read_settings(Env({**ENV, **(env or {})})), pod)


def ip6(src: str = VM_IP6, /, **fields: object) -> dict[str, Any]:
    return {"ether saddr": VM_MAC, "ether type": "ip6", "ip6 saddr": src, "ip6 daddr": "fd0c::2", **fields}


def na(target: str, src: str = VM_LL) -> dict[str, Any]:
    return ip6(src, **{"icmpv6 type": "nd-neighbor-advert", "nd target": target})


def test_vm_ipv6_address_is_the_eui64_of_its_mac() -> None:
    assert str(read_settings(Env(ENV)).vm_ip6) == VM_IP6


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (ip6(), ("accept", None)),
        (ip6(VM_LL), ("accept", None)),
        (ip6("fd70:6f64:766d::1234:5678:9abc:def0"), ("accept", None)),  # stable-privacy / temporary: the guest's
        (ip6("fe80::1234:5678:9abc:def0"), ("accept", None)),  # a stable-privacy link-local
        (ip6("::", **{"icmpv6 type": "nd-neighbor-solicit", "nd target": VM_IP6}), ("accept", None)),  # DAD
        (ip6("::", **{"icmpv6 type": "mld2-listener-report"}), ("accept", None)),
        (ip6(VM_LL, **{"udp sport": 546, "udp dport": 547}), ("accept", None)),  # DHCPv6 client
        (ip6(VM_LL, **{"icmpv6 type": "nd-router-solicit"}), ("accept", None)),
        (na(VM_IP6), ("accept", None)),
        (na(VM_LL), ("accept", None)),
        (ip6("::", **{"tcp dport": 80}), ("drop", plan.GUARD_IPV6)),
        (ip6(GW6), ("drop", plan.GUARD_IPV6)),
        (ip6("fe80::1"), ("drop", plan.GUARD_IPV6)),
        (ip6(str(POD6)), ("drop", plan.GUARD_IPV6)),
        (ip6("fd0e::9"), ("drop", plan.GUARD_IPV6)),
        (ip6("fd70:6f64:766e::5"), ("drop", plan.GUARD_IPV6)),  # next /64
        (ip6(VM_LL, **{"icmpv6 type": "nd-router-advert"}), ("drop", plan.GUARD_RA)),
        (ip6(VM_LL, **{"icmpv6 type": "nd-redirect"}), ("drop", plan.GUARD_RA)),
        (ip6(VM_LL, **{"udp sport": 547, "udp dport": 546}), ("drop", plan.GUARD_DHCP6_SERVER)),
        (na("fe80::1"), ("drop", plan.GUARD_ND)),
        (na(GW6), ("drop", plan.GUARD_ND)),
        (na(str(POD6)), ("drop", plan.GUARD_ND)),
        (na("fd0c::2"), ("drop", plan.GUARD_ND)),
        ({**ip6(), "ether saddr": "02:00:00:00:00:bb"}, ("drop", plan.GUARD_MAC)),
        (ipv4(), ("accept", None)),
    ],
)
def test_what_the_tap_lets_in_on_a_dual_stack_pod(packet: dict[str, Any], expected: tuple[str, str | None]) -> None:
    assert verdict6(chains(doc6(), "netdev"), plan.TAP_CHAIN, packet) == expected


@pytest.mark.parametrize(
    ("pod", "packet", "expected"),
    [
        (POD, ip6(), ("drop", plan.GUARD_IPV6)),  # IPv4-only pod: no IPv6 source is the guest's
        (POD, ip6("::", **{"icmpv6 type": "nd-neighbor-solicit"}), ("drop", plan.GUARD_IPV6)),
        (POD, ip6(VM_LL, **{"icmpv6 type": "nd-router-advert"}), ("drop", plan.GUARD_RA)),
        (V6ONLY, ipv4(), ("drop", plan.GUARD_IPV4)),  # IPv6-only pod: no IPv4 at all
        (V6ONLY, ipv4("0.0.0.0", **{"udp sport": 68, "udp dport": 67}), ("drop", plan.GUARD_IPV4)),
        (V6ONLY, arp(VM_IP), ("drop", plan.GUARD_ARP)),
        (V6ONLY, ip6(), ("accept", None)),
    ],
)
def test_a_family_the_pod_lacks_is_closed_at_the_tap(
    pod: PodFacts, packet: dict[str, Any], expected: tuple[str, str | None]
) -> None:
    assert verdict6(chains(doc6(pod), "netdev"), plan.TAP_CHAIN, packet) == expected


def pod_bound6(daddr: str = GW6, /, **fields: object) -> dict[str, Any]:
    return {"iifname": "podvm0", "nfproto": "ipv6", "ct state": ["new"], "ip6 daddr": daddr, **fields}


@pytest.mark.parametrize(
    ("pod", "packet", "expected"),
    [
        (DUAL, pod_bound6("ff02::2", **{"icmpv6 type": "nd-router-solicit"}), ("accept", None)),
        (DUAL, pod_bound6("ff02::1:ff00:1", **{"icmpv6 type": "nd-neighbor-solicit"}), ("accept", None)),
        (DUAL, pod_bound6("fe80::1", **{"icmpv6 type": "nd-neighbor-advert"}), ("accept", None)),
        (DUAL, pod_bound6("ff02::16", **{"icmpv6 type": "mld2-listener-report"}), ("accept", None)),
        (DUAL, pod_bound6("ff02::1:2", **{"udp sport": 546, "udp dport": 547}), ("accept", None)),
        (DUAL, pod_bound6(**{"icmpv6 type": "echo-request"}), ("accept", None)),
        (DUAL, pod_bound6("fe80::1", **{"icmpv6 type": "echo-request"}), ("accept", None)),
        (DUAL, pod_bound6(str(POD6), **{"icmpv6 type": "echo-request"}), ("drop", plan.GUARD_POD_SERVICES)),
        (DUAL, pod_bound6(**{"tcp dport": 5900}), ("drop", plan.GUARD_POD_SERVICES)),
        (DUAL, pod_bound6("fe80::1", **{"tcp dport": 22}), ("drop", plan.GUARD_POD_SERVICES)),
        (DUAL, pod_bound6(**{"udp sport": 546, "udp dport": 53}), ("drop", plan.GUARD_POD_SERVICES)),
        (DUAL, pod_bound6("ff02::1", **{"icmpv6 type": "nd-router-advert"}), ("drop", plan.GUARD_POD_RA)),
        (POD, pod_bound6("ff02::2", **{"icmpv6 type": "nd-router-solicit"}), ("drop", plan.GUARD_POD_SERVICES)),
        (V6ONLY, pod_bound(**{"udp sport": 68, "udp dport": 67}), ("drop", plan.GUARD_POD_SERVICES)),
    ],
)
def test_what_the_pod_accepts_from_the_bridge_over_ipv6(
    pod: PodFacts, packet: dict[str, Any], expected: tuple[str, str | None]
) -> None:
    assert verdict6(chains(doc6(pod), "inet"), plan.INPUT_CHAIN, packet) == expected


def test_ipv6_nat_rides_in_the_same_transaction() -> None:
    doc = doc6()
    families = [c["add"]["table"]["family"] for c in doc["nftables"] if "table" in c.get("add", {})]
    assert families.count("ip") == families.count("ip6") == 2, "both NAT tables replaced in one document"
    nat6 = chains(doc, "ip6")
    pre, out, post = (nat6[name]["rules"] for name in ("prerouting", "output", "postrouting"))
    assert has_vnc_exception(pre[0]["expr"]) and has_vnc_exception(out[0]["expr"])
    assert {"dnat": {"addr": VM_IP6}} in pre[1]["expr"] and {"dnat": {"addr": VM_IP6}} in out[1]["expr"]
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": str(POD6)}} in (
        pre[1]["expr"]
    )
    source = {"prefix": {"addr": "fd70:6f64:766d::", "len": 64}}
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": source}} in (
        post[0]["expr"]
    ), "every address of the guest's /64 leaves as the pod (SLAAC and temporary ones too)"
    assert {"snat": {"addr": str(POD6)}} in post[0]["expr"]
    no_vnc = chains(doc6(env={"NO_VNC": "true"}), "ip6")
    assert not any(has_vnc_exception(r["expr"]) for c in ("prerouting", "output") for r in no_vnc[c]["rules"])


def test_an_ipv6_only_pod_has_no_ipv4_nat_and_an_ipv4_pod_no_ipv6_nat() -> None:
    for pod, gone, kept in ((V6ONLY, "ip", "ip6"), (POD, "ip6", "ip")):
        doc = doc6(pod)
        commands = [
            (v, c[v]["table"]["family"]) for c in doc["nftables"] for v in ("add", "delete") if "table" in c.get(v, {})
        ]
        assert [x for x in commands if x[1] == gone] == [("add", gone), ("delete", gone)], "removed, not re-made"
        assert [x for x in commands if x[1] == kept] == [("add", kept), ("delete", kept), ("add", kept)]


@pytest.mark.parametrize("pod", [POD, DUAL, V6ONLY])
def test_mss_is_clamped_to_the_route_mtu_both_ways_through_the_bridge(pod: PodFacts) -> None:
    forward = chains(doc6(pod), "inet")[plan.FORWARD_CHAIN]
    assert (forward["base"]["hook"], forward["base"]["policy"]) == ("forward", "accept")
    clamp = {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": {"rt": {"key": "mtu"}}}}
    syn = {"match": {"op": "in", "left": {"payload": {"protocol": "tcp", "field": "flags"}}, "right": "syn"}}
    sides = sorted(r["expr"][0]["match"]["left"]["meta"]["key"] for r in forward["rules"])
    assert sides == ["iifname", "oifname"] and all(r["expr"][1:] == [syn, clamp] for r in forward["rules"])
    assert not any("drop" in e or "accept" in e for r in forward["rules"] for e in r["expr"]), "clamps only"


def test_dnsmasq_sends_ras_and_gives_the_exact_ipv6_address_by_mac() -> None:
    s = read_settings(Env({**ENV, "NET_STATE_DIR": "/s"}))
    argv = build(s, DUAL, RESOLV6).dnsmasq
    assert "--enable-ra" in argv
    assert "--dhcp-range=fd70:6f64:766d::,static,slaac,64,infinite" in argv, "managed + autonomous flags, no pool"
    assert f"--dhcp-host={VM_MAC},[{VM_IP6}],infinite" in argv
    assert "--ra-param=podvm0,mtu:1440,60,1800" in argv, "MTU option, RA interval, router lifetime"
    assert "--dhcp-option=option6:dns-server,[fd00::10]" in argv
    assert "--dhcp-option=option6:domain-search,ns.svc.cluster.local,cluster.local" in argv
    assert f"--dhcp-host={VM_MAC},{VM_IP},infinite" in argv, "IPv4 as before"
    only6 = build(s, V6ONLY, RESOLV6).dnsmasq
    assert not [a for a in only6 if a.startswith("--dhcp-option=option:") or "192.168.254" in a or a == "--no-ping"]
    assert "--enable-ra" in only6
    ipv4_only = build(s, POD, RESOLV6).dnsmasq
    assert not [a for a in ipv4_only if a.startswith(("--enable-ra", "--ra-param")) or "option6" in a or "[" in a]


def test_links_carry_ipv6_only_where_the_pod_has_it() -> None:
    s = read_settings(Env(ENV))
    assert build(s, DUAL, RESOLV6).links.bridge_addresses6 == ("fe80::1/64", f"{GW6}/64")
    assert build(s, POD, RESOLV6).links.bridge_addresses6 == ()
    assert build(s, V6ONLY, RESOLV6).links.bridge_address is None


def test_handshake_1_1_carries_the_ipv6_side() -> None:
    s = read_settings(Env(ENV))
    hs = build(s, DUAL, RESOLV6).handshake
    assert hs.version == "1.4" and hs.families == ("ipv4", "ipv6"), (
        "1.1 brought IPv6; 1.2, 1.3 two ports; 1.4 the queues"
    )
    assert hs.ipv6 is not None and (hs.ipv6.vm_ip, hs.ipv6.gateway, hs.ipv6.router) == (VM_IP6, GW6, "fe80::1")
    assert (hs.ipv6.pod_ip, hs.ipv6.prefix, hs.ipv6.dns) == (str(POD6), 64, ("fd00::10",))
    assert hs.vm_ip == VM_IP and hs.dns == RESOLV.nameservers
    assert Handshake.from_dict(json.loads(json.dumps(hs.to_dict()))) == hs
    only6 = build(s, V6ONLY, RESOLV6).handshake
    assert (only6.vm_ip, only6.gateway, only6.pod_ip, only6.dns, only6.families) == (None, None, None, (), ("ipv6",))
    assert Handshake.from_dict(json.loads(json.dumps(only6.to_dict()))) == only6
    assert build(s, POD, RESOLV6).handshake.ipv6 is None


@pytest.mark.parametrize(
    ("values", "queues"),
    [({}, 1), ({"VM_CPUS": "4"}, 4), ({"VM_CPUS": "32"}, 8), ({"VM_NET_QUEUES": "3"}, 3),
     ({"VM_NET_QUEUES": "1", "VM_CPUS": "4"}, 1), ({"VM_NET_QUEUES": "AUTO", "VM_CPUS": "2"}, 2)],
)  # fmt: skip
def test_the_tap_gets_one_queue_pair_per_vcpu_up_to_8_unless_vm_net_queues_says(
    values: dict[str, str], queues: int
) -> None:
    planned = build(read_settings(Env({**ENV, **values})), POD, RESOLV)
    assert planned.links.tap_queues == planned.handshake.tap_queues == queues
    assert planned.links.to_dict()["tap_queues"] == queues, "netsidecar plan shows it"


@pytest.mark.parametrize("bad", ["0", "17", "many"])
def test_a_bad_vm_net_queues_is_one_line_naming_it(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^VM_NET_QUEUES="):
        read_settings(Env({**ENV, "VM_NET_QUEUES": bad}))


def test_a_kept_tap_stays_what_it_is_and_the_handshake_says_so() -> None:
    single = {"ifname": "podvm-tap0", "linkinfo": {"info_kind": "tun", "info_data": {"multi_queue": False}}}
    multi = {"ifname": "podvm-tap0", "linkinfo": {"info_kind": "tun", "info_data": {"multi_queue": True}}}
    assert kept_queues(single, 1) == 1 and kept_queues(single, 4) == 1
    assert kept_queues(multi, 4) == 4 and kept_queues(multi, 1) == 2, "a multiqueue tap is opened with 2 or more"
