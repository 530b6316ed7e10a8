"""The sidecar's plan: nftables document, dnsmasq arguments, links and handshake, computed without the kernel."""

import ipaddress
import json
from typing import Any

import pytest

from netsidecar.config import PodFacts, Resolv, read_settings
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
    assert rule_count(doc) == 7, "2 VNC exceptions, 2 DNAT, 1 SNAT, 2 accounting"
    pre, out, post = rules(doc, "prerouting"), rules(doc, "output"), rules(doc, "postrouting")
    assert has_vnc_exception(pre[0]) and has_vnc_exception(out[0])
    assert {"dnat": {"addr": "192.168.254.2"}} in pre[1] and {"dnat": {"addr": "192.168.254.2"}} in out[1]
    assert {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}} in pre[1]
    assert {"snat": {"addr": "10.1.2.3"}} in post[0]
    json.dumps(doc)


def test_no_vnc_sends_5900_to_the_vm() -> None:
    doc = ruleset(read_settings(Env({"HOSTNAME": "vm", "NO_VNC": "true"})), POD)
    assert rule_count(doc) == 5
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
    assert handshake.metrics_port == 9100 and handshake.version == "1.1"
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
        assert {"counter": None} in rule["expr"] and not {"drop": None} in rule["expr"], "it only counts"
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
