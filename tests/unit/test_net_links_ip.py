"""The `ip -batch` lines the start plans for a link's addresses: exactly the wanted ones remain, IPv6 without DAD."""

from netsidecar.links import _address_changes


def test_only_the_difference_is_changed_and_ipv6_skips_duplicate_detection() -> None:
    have = [
        {"family": "inet", "local": "192.168.254.1", "prefixlen": 30},
        {"family": "inet", "local": "10.9.9.9", "prefixlen": 24},
        {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
    ]
    assert _address_changes("podvm0", "inet", have, ["192.168.254.1/30"]) == ["address del 10.9.9.9/24 dev podvm0"]
    assert _address_changes("podvm0", "inet6", have, ["fe80::1/64", "fd00::1/64"]) == [
        "address add fd00::1/64 dev podvm0 nodad"
    ]


def test_a_new_bridge_gets_every_address_and_an_unwanted_family_loses_all() -> None:
    assert _address_changes("podvm0", "inet", [], ["192.168.254.1/30"]) == ["address add 192.168.254.1/30 dev podvm0"]
    have = [{"family": "inet6", "local": "fd00::1", "prefixlen": 64}]
    assert _address_changes("podvm0", "inet6", have, []) == ["address del fd00::1/64 dev podvm0"]
