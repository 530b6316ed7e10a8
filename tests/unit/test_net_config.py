"""Validation of the sidecar's environment and of the pod's resolv.conf."""

import ipaddress

import pytest

from netsidecar.config import (
    GW_MAC_LABEL,
    PodFacts,
    Settings,
    check_overlap,
    derive_mac,
    parse_resolv,
    pod_from,
    read_settings,
)
from shared.env import Env
from shared.errors import ConfigError

BASE = {"HOSTNAME": "vm-a"}


def settings(**extra: str) -> Settings:
    return read_settings(Env({**BASE, **extra}))


def test_defaults() -> None:
    s = settings()
    assert (str(s.vm_ip), str(s.gateway), s.no_vnc, s.tap_owner) == ("192.168.254.2", "192.168.254.1", False, 10001)
    assert str(s.run_dir) == "/run/podvm" and s.pod_wait_timeout == 30 and s.drain_timeout == 66
    assert str(s.state_dir) == "/run/netsidecar"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"VM_IP": "300.1.1.1"}, "VM_IP"),
        ({"VM_IP": "192.168.254.3"}, "VM_IP"),  # broadcast of its /30
        ({"VM_IP": "192.168.254.0"}, "VM_IP"),  # network of its /30
        ({"VM_GW": "192.168.254.5"}, "VM_GW"),  # another /30
        ({"VM_GW": "192.168.254.2"}, "VM_GW"),  # same as VM_IP
        ({"VM_GW": "gw"}, "VM_GW"),
        ({"NO_VNC": "maybe"}, "NO_VNC"),
        ({"VM_MAC": "01:00:00:00:00:01"}, "VM_MAC"),  # multicast
        ({"VM_MAC": "zz:00:00:00:00:01"}, "VM_MAC"),
        ({"GW_MAC": "03:00:00:00:00:01"}, "GW_MAC"),  # multicast
        ({"GW_MAC": "02:00:00:00:00"}, "GW_MAC"),
        ({"GW_MAC": "02:00:00:00:00:aa", "VM_MAC": "02-00-00-00-00-AA"}, "GW_MAC"),  # the VM's own
        ({"VM_MAC": derive_mac("vm-a", GW_MAC_LABEL)}, "VM_MAC"),  # the gateway's derived one
        ({"TAP_OWNER": "-1"}, "TAP_OWNER"),
        ({"TAP_OWNER": "bob"}, "TAP_OWNER"),
        ({"RUN_DIR": "run"}, "RUN_DIR"),
        ({"RESOLV_CONF": "resolv.conf"}, "RESOLV_CONF"),
        ({"POD_WAIT_TIMEOUT": "soon"}, "POD_WAIT_TIMEOUT"),
        ({"SHUTDOWN_TIMEOUT": "-3"}, "SHUTDOWN_TIMEOUT"),
        ({"POD_IFACE": "a-name-far-too-long"}, "POD_IFACE"),
        ({"POD_IP": "10.0.0"}, "POD_IP"),
        ({"POD_MTU": "100"}, "POD_MTU"),
        ({"HOSTNAME": "Not_A_Name"}, "HOSTNAME"),
        ({"NET_STATE_DIR": "state"}, "NET_STATE_DIR"),
        ({"NET_STATE_DIR": "/run/podvm"}, "NET_STATE_DIR"),  # the runner can write RUN_DIR
        ({"NET_STATE_DIR": "/run/podvm/net"}, "NET_STATE_DIR"),
        ({"NET_STATE_DIR": "/run/podvm/x/../net"}, "NET_STATE_DIR"),
        ({"NET_STATE_DIR": "/run", "RUN_DIR": "/run/podvm"}, "NET_STATE_DIR"),
        ({"VM_IP6_PREFIX": "fd70::/48"}, "VM_IP6_PREFIX"),  # SLAAC needs a /64
        ({"VM_IP6_PREFIX": "fd70::1/64"}, "VM_IP6_PREFIX"),  # host bits
        ({"VM_IP6_PREFIX": "fe80::/64"}, "VM_IP6_PREFIX"),
        ({"VM_IP6_PREFIX": "ff02::/64"}, "VM_IP6_PREFIX"),
        ({"VM_IP6_PREFIX": "10.0.0.0/24"}, "VM_IP6_PREFIX"),
        ({"POD_IP6": "fd00::zz"}, "POD_IP6"),
        ({"POD_IP6": "fe80::5"}, "POD_IP6"),
        ({"POD_IP6": "10.0.0.5"}, "POD_IP6"),
        ({"IP_FAMILIES": "ipv5"}, "IP_FAMILIES"),
    ],
)
def test_every_bad_value_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=f"^{named}"):
        settings(**env)


def test_tap_owner_root_or_empty_means_none() -> None:
    assert settings(TAP_OWNER="root").tap_owner is None
    assert settings(TAP_OWNER="").tap_owner is None
    assert settings(TAP_OWNER="0").tap_owner is None
    assert settings(TAP_OWNER="1234").tap_owner == 1234


def test_mac_is_stable_local_unicast_and_overridable() -> None:
    mac = derive_mac("vm-a")
    assert mac == derive_mac("vm-a") != derive_mac("vm-b")
    first = int(mac[:2], 16)
    assert first & 2 and not first & 1
    assert settings().mac == mac
    assert settings(VM_MAC="02-AA-BB-CC-DD-EE").mac == "02:aa:bb:cc:dd:ee"


def test_gateway_mac_is_stable_per_hostname_local_unicast_apart_from_the_vms_and_overridable() -> None:
    gw = derive_mac("vm-a", GW_MAC_LABEL)
    assert gw == derive_mac("vm-a", GW_MAC_LABEL) != derive_mac("vm-b", GW_MAC_LABEL)
    assert gw != derive_mac("vm-a"), "a label of its own: never the VM's MAC"
    assert derive_mac("vm-a") == "02:9f:5f:9c:a7:be", "the VM's MAC is derived as it always was"
    assert gw == "02:3f:cf:38:d4:d5", "the gateway's is fixed for good: a resumed guest's caches hold it"
    first = int(gw[:2], 16)
    assert first & 2 and not first & 1
    assert (settings().gw_mac, settings(HOSTNAME="vm-b").gw_mac) == (gw, derive_mac("vm-b", GW_MAC_LABEL))
    assert settings(GW_MAC="02-AA-BB-CC-DD-01").gw_mac == "02:aa:bb:cc:dd:01"
    assert settings(VM_MAC=gw, GW_MAC="02:aa:bb:cc:dd:01").mac == gw, "free once the gateway has another"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"GW_MAC": "02:00:00:00:00:aa", "VM_MAC": "02:00:00:00:00:AA"},
            "GW_MAC='02:00:00:00:00:aa': the VM and its gateway would share the MAC 02:00:00:00:00:aa; set GW_MAC to"
            " another one",
        ),
        ({"GW_MAC": "01:00:5e:00:00:01"}, "GW_MAC='01:00:5e:00:00:01': a multicast address cannot be a NIC's"),
    ],
)
def test_gateway_mac_refusals_are_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings(**env)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_vm_net_must_not_overlap_the_pod() -> None:
    s = settings()
    ok = PodFacts("eth0", ipaddress.IPv4Address("10.1.2.3"), ipaddress.IPv4Network("10.1.2.3/32"), 1440)
    check_overlap(s, ok)
    clash = PodFacts("eth0", ipaddress.IPv4Address("192.168.254.9"), ipaddress.IPv4Network("192.168.254.0/24"), 1440)
    with pytest.raises(ConfigError, match=r"^VM_IP"):
        check_overlap(s, clash)


def test_ipv6_defaults_eui64_of_the_mac_in_a_ula_outside_fd00_16() -> None:
    s = settings(VM_MAC="52:54:00:12:34:56")
    assert str(s.prefix6) == "fd70:6f64:766d::/64" and not s.prefix6.overlaps(ipaddress.IPv6Network("fd00::/16"))
    assert str(s.vm_ip6) == "fd70:6f64:766d:0:5054:ff:fe12:3456", "RFC 4291: U/L bit flipped, ff:fe in the middle"
    assert str(s.gateway6) == "fd70:6f64:766d::1" and s.families == ()
    other = settings(VM_MAC="52:54:00:12:34:56", VM_IP6_PREFIX="fd12:3456:789a:1::/64")
    assert str(other.vm_ip6) == "fd12:3456:789a:1:5054:ff:fe12:3456"


V4 = ipaddress.IPv4Interface("10.1.2.3/32")
V6 = ipaddress.IPv6Interface("fd00:10:244::5/64")


@pytest.mark.parametrize(
    ("env", "v4", "v6", "families"),
    [
        ({}, V4, V6, ("ipv4", "ipv6")),
        ({}, V4, None, ("ipv4",)),
        ({}, None, V6, ("ipv6",)),  # an IPv6-only pod does not wait for IPv4
        ({}, None, None, None),  # nothing yet: keep waiting
        ({"IP_FAMILIES": "ipv4"}, V4, V6, ("ipv4",)),
        ({"IP_FAMILIES": "ipv6"}, V4, V6, ("ipv6",)),
        ({"IP_FAMILIES": "dual"}, V4, None, None),  # asked for both: wait for IPv6 too
        ({"IP_FAMILIES": "ipv6"}, V4, None, None),
        ({"IP_FAMILIES": "dual", "POD_IP6": "fd00::9"}, V4, None, ("ipv4", "ipv6")),
    ],
)
def test_families_come_from_the_pod_addresses_unless_overridden(
    env: dict[str, str], v4: ipaddress.IPv4Interface | None, v6: ipaddress.IPv6Interface | None, families: object
) -> None:
    pod = pod_from(settings(**env), "eth0", 1440, v4, v6)
    assert (pod.families if pod else None) == families


def test_pod_facts_keep_the_subnet_and_overrides_count_as_single_addresses() -> None:
    pod = pod_from(settings(POD_MTU="1400"), "eth0", 1440, V4, V6)
    assert pod is not None and (pod.network6, pod.mtu) == (ipaddress.IPv6Network("fd00:10:244::/64"), 1400)
    pod = pod_from(settings(POD_IP6="fd00:99::5"), "eth0", 1440, V4, V6)
    assert pod is not None and pod.network6 == ipaddress.IPv6Network("fd00:99::5/128")


def test_vm_prefix6_must_not_overlap_the_pod() -> None:
    s = settings(VM_IP6_PREFIX="fd00:10:244::/64")
    pod = pod_from(s, "eth0", 1440, None, V6)
    assert pod is not None
    with pytest.raises(ConfigError, match=r"^VM_IP6_PREFIX=fd00:10:244::/64: overlaps the pod's fd00:10:244::5/64"):
        check_overlap(s, pod)
    check_overlap(settings(), pod)


RESOLV = """\
# generated by kubelet
nameserver 10.96.0.10
nameserver fd00::10
nameserver 10.96.0.11 ; trailing comment
nameserver 10.96.0.10
nameserver
junk line here
search ns.svc.cluster.local svc.cluster.local cluster.local bad_domain.example corp.example. a.example b.example
options ndots:5 timeout:1
"""


def test_resolv_keeps_nameservers_of_each_family_and_valid_search_domains(caplog: pytest.LogCaptureFixture) -> None:
    got = parse_resolv(RESOLV + "nameserver fe80::1%eth0\nnameserver fd00::10\nnameserver fd00::11\n")
    assert got.nameservers == ("10.96.0.10", "10.96.0.11")
    assert got.nameservers6 == ("fd00::10", "fd00::11")
    assert "fe80::1%eth0 is link-local" in caplog.text
    assert got.search == (
        "ns.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
        "corp.example",
        "a.example",
        "b.example",
    )


def test_search_list_fits_option_119(caplog: pytest.LogCaptureFixture) -> None:
    long = [f"{'x' * 60}{i}.example.com" for i in range(7)]
    got = parse_resolv("search " + " ".join(long) + "\n")
    encoded = sum(sum(len(label) + 1 for label in d.split(".")) + 1 for d in got.search)
    assert 0 < len(got.search) < 7 and encoded <= 255
    assert "dropped" in caplog.text


def test_last_search_or_domain_line_wins() -> None:
    assert parse_resolv("search a.example\ndomain b.example\n").search == ("b.example",)


def test_a_leftover_net_drain_timeout_is_said_to_be_unused(caplog: pytest.LogCaptureFixture) -> None:
    settings = read_settings(Env({"HOSTNAME": "vm", "NET_DRAIN_TIMEOUT": "30s", "SHUTDOWN_TIMEOUT": "60s"}))
    assert settings.drain_timeout > 60, "the network outlasts the runner's shutdown, whatever the old variable says"
    assert "NET_DRAIN_TIMEOUT is no longer read" in caplog.text
