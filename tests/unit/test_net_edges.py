"""The plans at the sidecar's edges, computed without the kernel: the sysctls `prepare` and each link get, the
teardown `down` applies, and the record of what the sidecar made that the probe holds a handshake to."""

import dataclasses
import ipaddress
import itertools
import json
from pathlib import Path

import pytest

from netsidecar import plan, sysctl
from netsidecar.config import PodFacts, Resolv, read_settings
from netsidecar.plan import SysctlChange, build, link_sysctls, prepare_sysctls, record, teardown
from netsidecar.probe.report import Status, judge_handshake
from shared.env import Env
from shared.handshake import Ipv6
from tests.harness import samples

IP4, IP6 = "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"
ACCEPT, AUTOCONF = "net.ipv6.conf.default.accept_ra", "net.ipv6.conf.default.autoconf"
ABSENT = None
POD = PodFacts("eth0", ipaddress.IPv4Address("10.1.2.3"), ipaddress.IPv4Network("10.1.2.3/32"), 1440)


def snapshot(**values: str | None) -> dict[str, str]:
    """Sysctl values by name (dots written as __ in the keyword), the absent ones left out."""
    return {name.replace("__", "."): value for name, value in values.items() if value is not None}


def names(changes: tuple[SysctlChange, ...]) -> list[tuple[str, str]]:
    return [(change.name, change.value) for change in changes]


# ------------------------------------------------------------------------------------------ prepare's sysctls


def test_a_pod_with_everything_already_set_gets_no_change() -> None:
    current = {IP4: "1", IP6: "1", ACCEPT: "0", AUTOCONF: "0", "net.ipv6.conf.eth0.accept_ra": "1"}
    assert prepare_sysctls(current) == ()


def test_a_calico_pod_gets_forwarding_and_no_router_advertisements_on_new_links() -> None:
    current = {IP4: "0", IP6: "0", ACCEPT: "1", AUTOCONF: "1", "net.ipv6.conf.eth0.accept_ra": "0"}
    assert names(prepare_sysctls(current)) == [(IP4, "1"), (IP6, "1"), (ACCEPT, "0"), (AUTOCONF, "0")]


def test_a_pod_without_ipv6_gets_ipv4_forwarding_only() -> None:
    assert names(prepare_sysctls({IP4: "0"})) == [(IP4, "1")]
    assert prepare_sysctls({}) == (), "nothing is written that the kernel does not have"


def test_interfaces_that_take_router_advertisements_keep_them_once_ipv6_forwards() -> None:
    current = {
        IP4: "1",
        IP6: "0",
        "net.ipv6.conf.eth1.accept_ra": "1",
        "net.ipv6.conf.eth0.accept_ra": "1",
        "net.ipv6.conf.eth2.accept_ra": "0",
        "net.ipv6.conf.eth3.accept_ra": "2",
        "net.ipv6.conf.lo.accept_ra": "1",
        "net.ipv6.conf.all.accept_ra": "1",
        ACCEPT: "0",
    }
    got = names(prepare_sysctls(current))
    assert got == [(IP6, "1"), ("net.ipv6.conf.eth0.accept_ra", "2"), ("net.ipv6.conf.eth1.accept_ra", "2")]


def test_accept_ra_is_left_alone_while_ipv6_forwarding_was_already_on() -> None:
    assert prepare_sysctls({IP4: "1", IP6: "1", "net.ipv6.conf.eth0.accept_ra": "1"}) == ()


VALUES = (ABSENT, "0", "1", "2")


@pytest.mark.parametrize(("ip4", "ip6", "accept", "autoconf", "eth0"), list(itertools.product(VALUES, repeat=5)))
def test_every_combination_of_values(
    ip4: str | None, ip6: str | None, accept: str | None, autoconf: str | None, eth0: str | None
) -> None:
    """Each planned change follows from the values alone, in one order: forwarding (IPv4, IPv6), then the pod
    interfaces' accept_ra, then the defaults of new links; nothing absent is ever written, nothing twice."""
    current = snapshot(
        net__ipv4__ip_forward=ip4,
        net__ipv6__conf__all__forwarding=ip6,
        net__ipv6__conf__default__accept_ra=accept,
        net__ipv6__conf__default__autoconf=autoconf,
        net__ipv6__conf__eth0__accept_ra=eth0,
    )
    expected = [(IP4, "1")] if ip4 not in (ABSENT, "1") else []
    if ip6 not in (ABSENT, "1"):
        expected.append((IP6, "1"))
        expected += [("net.ipv6.conf.eth0.accept_ra", "2")] if eth0 == "1" else []
    expected += [(name, "0") for name, value in ((ACCEPT, accept), (AUTOCONF, autoconf)) if value not in (ABSENT, "0")]
    changes = prepare_sysctls(current)
    assert names(changes) == expected
    assert all(change.name in current and change.why for change in changes)


def test_the_snapshot_reads_what_the_plan_needs_from_proc_sys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        IP4: "0",
        ACCEPT: "1",
        "net.ipv6.conf.eth0.accept_ra": "1",
        "net.ipv6.conf.lo.accept_ra": "0",
    }.items():
        path = tmp_path.joinpath(*name.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    monkeypatch.setattr(sysctl, "PROC_SYS", tmp_path)
    got = sysctl.prepare_snapshot()
    assert got == {IP4: "0", ACCEPT: "1", "net.ipv6.conf.eth0.accept_ra": "1", "net.ipv6.conf.lo.accept_ra": "0"}
    assert sysctl.read(IP6) is None and not sysctl.enabled(IP6) and not sysctl.enabled(IP4)
    sysctl.write(prepare_sysctls(got)[0])
    assert sysctl.enabled(IP4), "the applier writes exactly the planned value"


# ------------------------------------------------------------------------------------------ the links' sysctls


@pytest.mark.parametrize("served", [True, False])
def test_a_link_takes_no_router_advertisement_and_ipv6_only_where_served(served: bool) -> None:
    got = names(link_sysctls("podvm0", served))
    assert got == [
        ("net.ipv6.conf.podvm0.accept_ra", "0"),
        ("net.ipv6.conf.podvm0.autoconf", "0"),
        ("net.ipv6.conf.podvm0.disable_ipv6", "0" if served else "1"),
    ]


def test_the_bridge_has_ipv6_where_the_pod_has_it_and_the_tap_never() -> None:
    settings = read_settings(Env({"HOSTNAME": "vm"}))
    dual = dataclasses.replace(POD, ip6=ipaddress.IPv6Address("fd00::5"), network6=ipaddress.IPv6Network("fd00::5/128"))
    for pod, bridge_v6 in ((POD, "1"), (dual, "0")):
        links = build(settings, pod, Resolv((), ())).links
        assert dict(names(links.bridge_sysctls()))["net.ipv6.conf.podvm0.disable_ipv6"] == bridge_v6
        assert dict(names(links.tap_sysctls()))["net.ipv6.conf.podvm-tap0.disable_ipv6"] == "1"
        shown = links.to_dict()["sysctls"]
        assert [(s["name"], s["value"]) for s in shown] == names((*links.bridge_sysctls(), *links.tap_sysctls()))


# ------------------------------------------------------------------------------------------------ the teardown


def test_the_teardown_deletes_every_podvm_table_whether_or_not_it_exists() -> None:
    steps = teardown()
    commands = steps.ruleset["nftables"]
    families = ("ip", "ip6", "netdev", "inet")
    expected = [{verb: {"table": {"family": f, "name": "podvm"}}} for f in families for verb in ("add", "delete")]
    assert commands == expected, "add then delete: one transaction that succeeds whichever tables exist"
    assert steps.links == ("podvm-tap0", "podvm0"), "the tap before the bridge it is a port of"
    assert steps.run_files == ("network.json", "network-figures.json")
    assert steps.state_files == (plan.LEASE_FILE, plan.DHCP_FILE, plan.RECORD_FILE)
    assert json.loads(json.dumps(steps.to_dict())) == {
        "run_files": list(steps.run_files),
        "state_files": list(steps.state_files),
        "ruleset": steps.ruleset,
        "links": list(steps.links),
    }


def test_the_teardown_removes_the_tables_the_run_plan_adds() -> None:
    doc = build(read_settings(Env({"HOSTNAME": "vm"})), POD, Resolv((), ())).ruleset
    added = {json.dumps(c["add"]["table"]) for c in doc["nftables"] if "table" in c.get("add", {})}
    deleted = {json.dumps(c["delete"]["table"]) for c in teardown().ruleset["nftables"] if "delete" in c}
    assert added <= deleted


# ------------------------------------------------------------------------- the record and the handshake's trust

HS = samples.handshake()
IPV6 = Ipv6(vm_ip="fd00::2", gateway="fd00::1", router="fe80::1", prefix=64, pod_ip="fd00:5::5", dns=())
KERNEL = {"bridge_kind": "bridge", "tap_kind": "tun", "tap_master": HS.bridge, "tap_owner": HS.tap_owner}


def test_the_record_holds_the_links_and_addresses_the_probe_acts_on() -> None:
    assert record(HS) == {
        "bridge": HS.bridge,
        "tap": HS.tap,
        "tap_owner": HS.tap_owner,
        "mac": HS.mac,
        "vm_ip": HS.vm_ip,
        "gateway": HS.gateway,
        "pod_ip": HS.pod_ip,
        "vm_ip6": None,
        "gateway6": None,
        "pod_ip6": None,
    }
    six = record(dataclasses.replace(HS, ipv6=IPV6))
    assert (six["vm_ip6"], six["gateway6"], six["pod_ip6"]) == ("fd00::2", "fd00::1", "fd00:5::5")


def test_the_handshake_the_sidecar_made_is_trusted() -> None:
    assert judge_handshake(record(HS), record(HS), KERNEL) is None


FORGED = [
    ("bridge", {"bridge": "eth0"}),
    ("tap", {"tap": "eth0"}),
    ("tap_owner", {"tap_owner": 0}),
    ("mac", {"mac": "52:54:00:00:00:99"}),
    ("vm_ip", {"vm_ip": "10.0.0.1"}),
    ("gateway", {"gateway": "192.168.254.2"}),
    ("pod_ip", {"pod_ip": "10.9.9.9"}),
    ("vm_ip6", {"ipv6": IPV6}),
]


@pytest.mark.parametrize(("field", "change"), FORGED, ids=[field for field, _ in FORGED])
def test_each_forged_field_is_one_failed_check_naming_it(field: str, change: dict[str, object]) -> None:
    check = judge_handshake(record(dataclasses.replace(HS, **change)), record(HS), KERNEL)  # type: ignore[arg-type]
    assert check is not None and (check.probe, check.name, check.status) == ("handshake", "trusted", Status.FAIL)
    assert any(mismatch.startswith(f"{field} ") for mismatch in check.data["mismatches"]), check.data
    assert "no frame sent" in check.detail


def test_a_handshake_naming_the_pod_interface_fails_on_every_count() -> None:
    forged = record(dataclasses.replace(HS, bridge="eth0", vm_ip="10.0.0.1"))
    check = judge_handshake(forged, record(HS), KERNEL)
    assert check is not None
    assert check.data["mismatches"] == [
        f"bridge 'eth0' is not the sidecar's {HS.bridge!r}",
        f"vm_ip '10.0.0.1' is not the sidecar's {HS.vm_ip!r}",
    ]


def test_without_the_sidecar_record_nothing_is_trusted() -> None:
    check = judge_handshake(record(HS), None, None)
    assert check is not None and check.status is Status.FAIL and "NET_STATE_DIR" in check.detail


def test_a_record_with_a_field_the_handshake_lacks_is_a_mismatch() -> None:
    check = judge_handshake(record(HS), {**record(HS), "extra": 1}, KERNEL)
    assert check is not None and check.data["mismatches"] == ["extra None is not the sidecar's 1"]


KERNEL_WRONG = [
    ({"bridge_kind": "veth"}, f"{HS.bridge} is a veth link in the kernel, not a bridge"),
    ({"bridge_kind": None}, f"{HS.bridge} is missing in the kernel, not a bridge"),
    ({"tap_kind": None}, f"{HS.tap} is missing in the kernel, not a tap"),
    ({"tap_kind": "veth"}, f"{HS.tap} is a veth link in the kernel, not a tap"),
    ({"tap_master": "other0"}, f"tap {HS.tap} is a port of other0, not of {HS.bridge}"),
    ({"tap_master": None}, f"tap {HS.tap} is a port of no bridge, not of {HS.bridge}"),
    ({"tap_owner": 0}, f"tap {HS.tap} is owned by uid 0, recorded {HS.tap_owner}"),
    ({"tap_owner": None}, f"tap {HS.tap} is owned by uid None, recorded {HS.tap_owner}"),
]


@pytest.mark.parametrize(("facts", "mismatch"), KERNEL_WRONG)
def test_the_kernel_must_hold_the_recorded_bridge_and_tap(facts: dict[str, object], mismatch: str) -> None:
    check = judge_handshake(record(HS), record(HS), {**KERNEL, **facts})
    assert check is not None and check.data["mismatches"] == [mismatch]


def test_a_root_owned_tap_is_trusted_when_recorded_so() -> None:
    rooted = record(dataclasses.replace(HS, tap_owner=None))
    assert judge_handshake(rooted, rooted, {**KERNEL, "tap_owner": None}) is None
    assert HS.tap_owner is not None, "the sample's tap belongs to the runner"
