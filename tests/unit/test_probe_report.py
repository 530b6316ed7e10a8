"""The probes' pure half: argument parsing, verdicts, option 119 decoding and rendering."""

import dataclasses
import json

import pytest

from netsidecar.figures import rule_figures
from netsidecar.probe.report import (
    Advert,
    Check,
    Expected,
    Offer,
    PortState,
    Request,
    Rule,
    Status,
    decode_domain_search,
    exit_status,
    judge_arp,
    judge_isolation,
    judge_offer,
    judge_port,
    judge_ra,
    judge_rules,
    parse,
    render,
    rules_from_ruleset,
    to_json,
)
from shared.errors import ConfigError

EXPECTED = Expected("192.168.254.2", "192.168.254.1", 30, ("10.0.0.10",), ("a.example", "example"), 1450, "vm-0")
GOOD = Offer("192.168.254.1", "192.168.254.2", "255.255.255.252", "192.168.254.1", ("10.0.0.10",),
             ("a.example", "example"), 1450, "vm-0", 3600)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "request_"),
    [
        (["dhcp"], Request("dhcp")),
        (["all", "--json"], Request("all", as_json=True)),
        (["port", "80"], Request("port", 80, "tcp")),
        (["--json", "port", "53/udp"], Request("port", 53, "udp", True)),
        (["port", "22/tcp"], Request("port", 22, "tcp")),
        (["ra"], Request("ra")),
        (["nd", "--json"], Request("nd", as_json=True)),
    ],
)
def test_parse_accepts(args: list[str], request_: Request) -> None:
    assert parse(args) == request_


@pytest.mark.parametrize(
    "args", [[], ["ping"], ["dhcp", "extra"], ["port"], ["port", "0"], ["port", "70000"], ["port", "80/sctp"]]
)
def test_parse_refuses(args: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"usage|port"):
        parse(args)


def test_domain_search_with_compression_pointer() -> None:
    # "a.example" then "example" as a pointer to offset 2 (RFC 3397's own style)
    raw = b"\x01a\x07example\x00\xc0\x02"
    assert decode_domain_search(raw) == ["a.example", "example"]


def test_domain_search_truncated_is_an_error() -> None:
    with pytest.raises(ValueError, match="ends inside"):
        decode_domain_search(b"\x07exam")


def test_offer_matching_handshake_is_healthy() -> None:
    checks = judge_offer(GOOD, EXPECTED)
    assert [c.status for c in checks] == [Status.OK]
    assert exit_status(checks) == 0
    assert "lease 3600s" in checks[0].detail


def test_infinite_lease_is_named() -> None:
    forever = Offer(**{**GOOD.__dict__, "lease": 0xFFFFFFFF})
    assert "lease infinite" in judge_offer(forever, EXPECTED)[0].detail


def test_offer_differences_are_each_flagged() -> None:
    bad = Offer("192.168.254.1", "192.168.254.2", "255.255.255.0", "192.168.254.1", (), ("a.example",), 1500, None, 60)
    checks = judge_offer(bad, EXPECTED)
    assert {c.name for c in checks if c.status is Status.FAIL} == {"netmask", "dns", "search", "mtu", "hostname"}
    assert exit_status(checks) == 1


def test_no_offer_fails() -> None:
    assert judge_offer(None, EXPECTED)[0].status is Status.FAIL


def test_arp_verdicts() -> None:
    mac = "52:54:00:00:00:01"
    assert judge_arp([], "192.168.254.2", mac).status is Status.FAIL
    assert judge_arp([mac, mac], "192.168.254.2", mac).status is Status.OK
    other = judge_arp(["02:00:00:00:00:09"], "192.168.254.2", mac)
    assert other.status is Status.WARN
    assert "02:00:00:00:00:09" in other.detail


def test_port_verdicts() -> None:
    assert judge_port(PortState.OPEN, 80, "tcp").status is Status.OK
    assert judge_port(PortState.CLOSED, 81, "tcp").status is Status.FAIL
    silent = judge_port(PortState.NO_ANSWER, 53, "udp")
    assert silent.status is Status.FAIL
    assert "silent" in silent.detail


RULESET = {
    "nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "ip", "name": "podvm"}},
        {"rule": {"family": "ip", "table": "podvm", "chain": "pre", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}},
            {"counter": {"packets": 7, "bytes": 420}},
            {"dnat": {"addr": "192.168.254.2"}},
        ]}},
        {"rule": {"family": "ip", "table": "podvm", "chain": "post", "expr": [
            {"counter": {"packets": 3, "bytes": 180}},
            {"masquerade": None},
        ]}},
    ]
}  # fmt: skip


def test_rules_from_ruleset_and_judge() -> None:
    rules = rules_from_ruleset(RULESET)
    assert rules == [
        Rule("ip podvm", "pre", "192.168.254.2", False, 7),
        Rule("ip podvm", "post", None, True, 3),
    ]
    checks = judge_rules(rules, "192.168.254.2")
    assert [c.status for c in checks] == [Status.OK, Status.OK]
    assert "7 packets" in checks[0].detail


def test_missing_rules_fail() -> None:
    rules = rules_from_ruleset(RULESET)
    assert judge_rules(rules[1:], "192.168.254.2")[0].status is Status.FAIL
    assert judge_rules(rules[:1], "192.168.254.2")[1].status is Status.FAIL


def test_isolation_rules_present_with_counters_or_missing() -> None:
    guards = ("guest: a", "guest: b")
    loaded = [
        Rule("netdev podvm", "from-tap", None, False, 4, "guest: a"),
        Rule("inet podvm", "guest-to-pod", None, False, 0, "guest: b"),
        Rule("ip podvm", "pre", "192.168.254.2", False, 7),
    ]
    ok = judge_isolation(loaded, guards)
    assert (ok.status, ok.data["drops"], ok.data["missing"]) == (Status.OK, {"guest: a": 4, "guest: b": 0}, [])
    assert "guest: a: 4" in ok.detail and "guest: b" not in ok.detail
    gone = judge_isolation(loaded[1:], guards)
    assert (gone.status, gone.data["missing"]) == (Status.FAIL, ["guest: a"])
    assert "guest: a" in gone.detail


def test_rule_comments_are_read() -> None:
    listed = {"nftables": [{"rule": {"family": "netdev", "table": "podvm", "chain": "c", "comment": "guest: a",
                                     "expr": [{"counter": {"packets": 2, "bytes": 9}}, {"drop": None}]}}]}  # fmt: skip
    assert rules_from_ruleset(listed) == [Rule("netdev podvm", "c", None, False, 2, "guest: a")]


def test_render_and_json() -> None:
    checks = [Check("arp", "192.168.254.2", Status.OK, "fine"), Check("path", "tap", Status.FAIL, "down")]
    table = render(checks)
    assert table.splitlines()[0].split() == ["PROBE", "CHECK", "VERDICT", "DETAIL"]
    assert "FAIL" in table
    assert table.endswith("overall: unhealthy\n")
    data = json.loads(to_json(checks))
    assert data["healthy"] is False
    assert [c["status"] for c in data["checks"]] == ["ok", "fail"]


PREFIX6 = "fd70:6f64:766d::/64"
GOOD_RA = Advert(1800, True, (("fd70:6f64:766d::", 64, True),), 1450, ("fd00::10",), ("a.example", "example"))


def judge_good(advert: Advert | None) -> dict[str, Status]:
    return {c.name: c.status for c in judge_ra(advert, PREFIX6, 1450, ("fd00::10",), ("a.example", "example"))}


def test_ra_matching_handshake_is_healthy() -> None:
    assert set(judge_good(GOOD_RA).values()) == {Status.OK}
    assert judge_good(None) == {"advert": Status.FAIL}


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"router_lifetime": 0}, "router"),  # a guest would get no default route
        ({"managed": False}, "managed"),  # DHCPv6 guests would not ask
        ({"prefixes": (("fd70:6f64:766d::", 64, False),)}, "prefix"),  # SLAAC-only guests would get nothing
        ({"prefixes": (("2001:db8::", 64, True),)}, "prefix"),
        ({"mtu": None}, "mtu"),
        ({"rdnss": ()}, "rdnss"),
        ({"dnssl": ("other.example",)}, "dnssl"),
    ],
)
def test_ra_differences_are_each_flagged(change: dict[str, object], failed: str) -> None:
    got = judge_good(dataclasses.replace(GOOD_RA, **change))  # type: ignore[arg-type]
    assert {name for name, status in got.items() if status is Status.FAIL} == {failed}


def test_nd_verdicts_report_duplicates() -> None:
    mac = "52:54:00:00:00:01"
    assert judge_arp([mac], "fd00::1", mac, "nd").status is Status.OK
    duplicate = judge_arp([mac, "02:de:ad:be:ef:01"], "fd00::1", mac, "nd")
    assert (duplicate.probe, duplicate.status) == ("nd", Status.WARN) and "02:de:ad:be:ef:01" in duplicate.detail
    assert judge_arp([], "fd00::1", mac, "nd").status is Status.FAIL


def test_ipv6_rules_are_named_apart() -> None:
    rules = [Rule("ip6 podvm", "prerouting", "fd00::2", False, 3), Rule("ip6 podvm", "postrouting", None, True, 1)]
    assert [c.name for c in judge_rules(rules, "fd00::2", "6")] == ["nft dnat6", "nft snat6"]


def test_the_probe_and_the_figures_read_a_guard_counter_alike() -> None:
    """One parser of nftables rules serves both: the probe's drop count is the figure the metrics serve."""
    rule = {"family": "netdev", "table": "podvm", "chain": "from-tap", "comment": "guest: a",
            "expr": [{"counter": {"packets": 5, "bytes": 300}}, {"drop": None}]}  # fmt: skip
    (probed,) = rules_from_ruleset({"nftables": [{"rule": rule}]})
    served = {f.name: f.value for f in rule_figures([rule])}
    assert probed.packets == served["podvm_guard_dropped_packets_total"] == 5
    assert served["podvm_guard_dropped_bytes_total"] == 300
