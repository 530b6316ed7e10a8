"""The probes themselves: packets crafted with scapy on the sidecar's bridge, and what the kernel holds.

Everything here reads or sends; nothing changes the sidecar's state, except the DHCP probe's temporary veth,
which it removes again. Verdicts come from the pure functions in :mod:`netsidecar.probe.report`.
"""

import contextlib
import dataclasses
import ipaddress
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyroute2 import Conntrack, IPRoute
from scapy.arch import get_if_hwaddr
from scapy.config import conf
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import ARP, Ether
from scapy.packet import NoPayload
from scapy.sendrecv import AsyncSniffer, sendp, srp
from scapy.utils6 import in6_getnsma, in6_getnsmac

from netsidecar import nft, sysctl
from netsidecar.plan import FORWARDING, GUARDS
from netsidecar.probe.report import (
    Advert,
    Check,
    Expected,
    Offer,
    PortState,
    Status,
    decode_domain_search,
    judge_arp,
    judge_isolation,
    judge_offer,
    judge_port,
    judge_ra,
    judge_rules,
    rules_from_ruleset,
)
from shared.errors import PodvmError
from shared.handshake import Handshake

TIMEOUT = 1.5
# The synthetic connection of the path probe goes to this port of the pod IP (discard; never the VNC port).
PATH_PORT = 9
_REQUESTED = [1, 3, 6, 12, 15, 26, 28, 51, 54, 119]

conf.verb = 0
conf.checkIPaddr = False  # a DHCP offer comes from the server's address, not the broadcast we sent to


def _option(options: list[Any], name: str | int) -> tuple[Any, ...]:
    for option in options:
        if isinstance(option, tuple) and option[0] == name:
            return tuple(option[1:])
    return ()


def _text(values: tuple[Any, ...]) -> str | None:
    if not values:
        return None
    value = values[0]
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _offer_from(packet: Any) -> Offer:
    options: list[Any] = packet[DHCP].options
    search_raw = _option(options, 119)
    mtu = _option(options, "interface-mtu")
    lease = _option(options, "lease_time")
    return Offer(
        server=str(_option(options, "server_id")[0] if _option(options, "server_id") else packet[IP].src),
        address=str(packet[BOOTP].yiaddr),
        netmask=_text(_option(options, "subnet_mask")),
        router=_text(_option(options, "router")),
        dns=tuple(str(ip) for ip in _option(options, "name_server")),
        search=tuple(decode_domain_search(search_raw[0])) if search_raw else (),
        mtu=int(mtu[0]) if mtu else None,
        hostname=_text(_option(options, "hostname")),
        lease=int(lease[0]) if lease else None,
    )


def _no_ipv4(kind: str) -> list[Check]:
    """What an IPv4 probe reports on a pod without IPv4."""
    return [Check(kind, "ipv4", Status.INFO, "the pod has no IPv4: this probe checks the IPv4 side only")]


@contextlib.contextmanager
def _bridge_port(hs: Handshake) -> Iterator[str | None]:
    """A temporary veth whose inner end is a port of the bridge, as a second guest would be; yields the outer end's
    name (None when the bridge does not exist) and removes the pair again."""
    suffix = f"{os.getpid() % 100000}"
    outer, inner = f"pdo{suffix}", f"pdi{suffix}"
    ipr = IPRoute()
    try:
        bridge = ipr.link_lookup(ifname=hs.bridge)
        if not bridge:
            yield None
            return
        ipr.link("add", ifname=outer, kind="veth", peer=inner)
        inner_index = ipr.link_lookup(ifname=inner)[0]
        ipr.link("set", index=inner_index, master=bridge[0], state="up")
        ipr.link("set", index=ipr.link_lookup(ifname=outer)[0], state="up")
        conf.ifaces.reload()  # scapy caches interfaces by name: an earlier probe's veth of that name is gone
        yield outer
    finally:
        if ipr.link_lookup(ifname=outer):
            ipr.link("del", ifname=outer)
        ipr.close()


def dhcp(hs: Handshake) -> list[Check]:
    """A DISCOVER for the VM's MAC from a temporary veth in the bridge; the OFFER is compared with the handshake.

    Only DISCOVER/OFFER: nothing is requested, so the VM's lease is untouched. The frame's source MAC is the
    veth's own (only the DHCP chaddr carries the VM's MAC) and the broadcast flag is set, so the bridge keeps
    sending the VM's traffic to the VM and the offer comes back to the veth.
    """
    if hs.vm_ip is None or hs.gateway is None or hs.pod_ip is None:
        return _no_ipv4("dhcp")
    with _bridge_port(hs) as outer:
        if outer is None:
            return [Check("dhcp", "bridge", Status.FAIL, f"bridge {hs.bridge} does not exist")]
        xid = secrets.randbits(32)
        chaddr = bytes.fromhex(hs.mac.replace(":", "")) + bytes(10)
        discover = (
            Ether(src=get_if_hwaddr(outer), dst="ff:ff:ff:ff:ff:ff")
            / IP(src="0.0.0.0", dst="255.255.255.255")  # noqa: S104 - DHCP clients send from 0.0.0.0
            / UDP(sport=68, dport=67)
            / BOOTP(chaddr=chaddr, xid=xid, flags=0x8000)
            / DHCP(options=[("message-type", "discover"), ("param_req_list", _REQUESTED), "end"])
        )
        offer: Offer | None = None
        for _ in range(3):  # the new bridge port may drop the first frame while it comes up
            answered, _unanswered = srp(discover, iface=outer, timeout=TIMEOUT)
            if answered:
                offer = _offer_from(answered[0][1])
                break
        return judge_offer(offer, Expected(hs.vm_ip, hs.gateway, hs.prefix, hs.dns, hs.search, hs.mtu, hs.hostname))


def _no_ipv6(probe: str) -> list[Check]:
    """What an IPv6 probe reports on a pod without IPv6."""
    return [Check(probe, "ipv6", Status.INFO, "the pod has no IPv6: this probe checks the IPv6 side only")]


def _advert_from(packet: Any) -> Advert:
    ra = packet[ICMPv6ND_RA]
    prefixes, mtu, rdnss, dnssl = [], None, [], []
    option = ra.payload
    while option and not isinstance(option, NoPayload):
        if isinstance(option, ICMPv6NDOptPrefixInfo):
            prefixes.append((str(option.prefix), int(option.prefixlen), bool(option.A)))
        elif isinstance(option, ICMPv6NDOptMTU):
            mtu = int(option.mtu)
        elif isinstance(option, ICMPv6NDOptRDNSS):
            rdnss += [str(address) for address in option.dns]
        elif isinstance(option, ICMPv6NDOptDNSSL):
            dnssl += [
                name.decode().rstrip(".") if isinstance(name, bytes) else str(name).rstrip(".")
                for name in option.searchlist
            ]
        option = option.payload
    return Advert(int(ra.routerlifetime), bool(ra.M), tuple(prefixes), mtu, tuple(rdnss), tuple(dnssl))


def ra(hs: Handshake) -> list[Check]:
    """A router solicitation from a temporary bridge port (from ::, so nobody learns a neighbour from it); the
    advertisement a guest would receive is compared with the handshake."""
    if hs.ipv6 is None:
        return _no_ipv6("ra")
    with _bridge_port(hs) as outer:
        if outer is None:
            return [Check("ra", "bridge", Status.FAIL, f"bridge {hs.bridge} does not exist")]
        solicit = (
            Ether(src=get_if_hwaddr(outer), dst="33:33:00:00:00:02") / IPv6(src="::", dst="ff02::2") / ICMPv6ND_RS()
        )
        advert: Advert | None = None
        for _ in range(3):  # the new bridge port may drop the first frame while it comes up
            sniffer = AsyncSniffer(iface=outer, lfilter=lambda p: p.haslayer(ICMPv6ND_RA), count=1, store=True)
            sniffer.start()
            time.sleep(0.1)
            sendp(solicit, iface=outer)
            sniffer.join(timeout=TIMEOUT)
            if sniffer.running:
                sniffer.stop()
            if sniffer.results:
                advert = _advert_from(sniffer.results[0])
                break
        prefix = f"{ipaddress.IPv6Network(f'{hs.ipv6.vm_ip}/{hs.ipv6.prefix}', strict=False)}"
        return judge_ra(advert, prefix, hs.mtu, hs.ipv6.dns, hs.search)


def nd(hs: Handshake) -> list[Check]:
    """A neighbour solicitation for the VM's IPv6 address from the bridge; every advertisement's MAC is collected
    (more than the VM's is a duplicate)."""
    if hs.ipv6 is None:
        return _no_ipv6("nd")
    bridge_mac = get_if_hwaddr(hs.bridge)
    target = hs.ipv6.vm_ip
    group = in6_getnsma(socket.inet_pton(socket.AF_INET6, target))
    solicit = (
        Ether(src=bridge_mac, dst=in6_getnsmac(group))
        / IPv6(src=hs.ipv6.gateway, dst=socket.inet_ntop(socket.AF_INET6, group))
        / ICMPv6ND_NS(tgt=target)
        / ICMPv6NDOptSrcLLAddr(lladdr=bridge_mac)
    )
    sniffer = AsyncSniffer(
        iface=hs.bridge,
        lfilter=lambda p: p.haslayer(ICMPv6ND_NA) and p[ICMPv6ND_NA].tgt == target,
        store=True,
    )
    sniffer.start()
    time.sleep(0.1)
    sendp(solicit, iface=hs.bridge)
    time.sleep(TIMEOUT)  # every answer, not only the first: a second one is a duplicate
    sniffer.stop()
    return [judge_arp([str(p[Ether].src) for p in sniffer.results or []], target, hs.mac, "nd")]


def arp(hs: Handshake) -> list[Check]:
    """An ARP who-has for the VM's address from the bridge; every answer's MAC is collected."""
    if hs.vm_ip is None or hs.gateway is None or hs.pod_ip is None:
        return _no_ipv4("arp")
    bridge_mac = get_if_hwaddr(hs.bridge)
    request = Ether(src=bridge_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=bridge_mac, psrc=hs.gateway, pdst=hs.vm_ip
    )
    answered, _unanswered = srp(request, iface=hs.bridge, timeout=TIMEOUT, multi=True)
    return [judge_arp([str(reply[ARP].hwsrc) for _sent, reply in answered], hs.vm_ip, hs.mac)]


def _families(hs: Handshake) -> list[tuple[str, str, str, str]]:
    """(family, VM address, bridge address, pod address) for each family the VM has, IPv4 first."""
    out = []
    if hs.vm_ip is not None and hs.gateway is not None and hs.pod_ip is not None:
        out.append(("ipv4", hs.vm_ip, hs.gateway, hs.pod_ip))
    if hs.ipv6 is not None:
        out.append(("ipv6", hs.ipv6.vm_ip, hs.ipv6.gateway, hs.ipv6.pod_ip))
    return out


def _suffix(family: str) -> str:
    """How check names tell IPv6 from IPv4 (IPv4's names are as they always were)."""
    return "6" if family == "ipv6" else ""


def port(hs: Handshake, number: int, protocol: str) -> list[Check]:
    """A SYN (or a UDP datagram) from the gateway to the guest, straight across the bridge, for each family."""
    bridge_mac = get_if_hwaddr(hs.bridge)
    checks = []
    for family, vm_ip, gateway, _pod_ip in _families(hs):
        sport = 40000 + secrets.randbelow(20000)
        l3 = IP(src=gateway, dst=vm_ip) if family == "ipv4" else IPv6(src=gateway, dst=vm_ip)
        l4 = TCP(sport=sport, dport=number, flags="S") if protocol == "tcp" else UDP(sport=sport, dport=number)
        answered, _unanswered = srp(
            Ether(src=bridge_mac, dst=hs.mac) / l3 / l4, iface=hs.bridge, timeout=TIMEOUT, retry=1
        )
        state = PortState.NO_ANSWER
        for _sent, reply in answered:
            if (reply.haslayer(ICMP) and reply[ICMP].type == 3) or reply.haslayer(ICMPv6DestUnreach):
                state = PortState.CLOSED
            elif reply.haslayer(TCP):
                state = PortState.CLOSED if reply[TCP].flags & 0x04 else PortState.OPEN
            elif reply.haslayer(UDP):
                state = PortState.OPEN
        check = judge_port(state, number, protocol)
        checks.append(dataclasses.replace(check, name=f"{check.name}{' ipv6' if family == 'ipv6' else ''}"))
    return checks


def _forwarding(family: str) -> Check:
    name = "ip_forward" if family == "ipv4" else "ipv6 forwarding"
    label = "IPv4" if family == "ipv4" else "IPv6"
    if sysctl.enabled(FORWARDING[family]):
        return Check("path", name, Status.OK, f"{label} forwarding is on")
    return Check("path", name, Status.FAIL, f"{label} forwarding is off: the VM cannot be reached from outside")


def _tap(hs: Handshake) -> Check:
    sys_dir = Path("/sys/class/net") / hs.tap
    if not sys_dir.exists():
        return Check("path", "tap", Status.FAIL, f"tap {hs.tap} does not exist")
    master = sys_dir / "master"
    in_bridge = master.exists() and master.resolve().name == hs.bridge
    admin_up = int((sys_dir / "flags").read_text(), 16) & 1
    carrier = (sys_dir / "operstate").read_text().strip() == "up"
    data = {"in_bridge": in_bridge, "up": bool(admin_up), "carrier": carrier}
    if not in_bridge:
        return Check("path", "tap", Status.FAIL, f"tap {hs.tap} is not in bridge {hs.bridge}", data)
    if not admin_up:
        return Check("path", "tap", Status.FAIL, f"tap {hs.tap} is down", data)
    attached = "carrier: a VM is attached" if carrier else "no carrier: no VM attached"
    return Check("path", "tap", Status.OK, f"tap {hs.tap} is up in {hs.bridge}, {attached}", data)


def _nft_rules(hs: Handshake) -> list[Check]:
    try:
        rules = rules_from_ruleset(nft.ruleset())
    except PodvmError as err:
        return [Check("path", "nft dnat", Status.FAIL, str(err))]
    nat = [check for family, vm_ip, _gw, _pod in _families(hs) for check in judge_rules(rules, vm_ip, _suffix(family))]
    return [*nat, judge_isolation(rules, GUARDS)]


def _conntrack(vm_ips: list[str]) -> Check:
    """Connections the kernel tracks to or from the VM, read over netlink (no conntrack tool needed); a dump holds
    one address family, so each family the VM has is asked for."""
    entries: list[str] = []
    for vm_ip in vm_ips:
        with Conntrack(nfgen_family=socket.AF_INET6 if ":" in vm_ip else socket.AF_INET) as ct:
            for entry in ct.dump_entries():
                orig, reply = entry.tuple_orig, entry.tuple_reply
                if vm_ip in (orig.saddr, orig.daddr, reply.saddr, reply.daddr):
                    entries.append(f"{orig.proto} {orig.saddr}:{orig.sport} -> {orig.daddr}:{orig.dport}")
    detail = f"{len(entries)} tracked connection(s) of the VM"
    return Check("path", "conntrack", Status.INFO, detail, {"count": len(entries), "entries": entries[:20]})


def _synthetic(hs: Handshake, vm_ip: str, pod_ip: str, suffix: str) -> Check:
    """Connect from the pod to pod-ip:PATH_PORT and watch the bridge for the SYN rewritten to the VM's address."""
    started = threading.Event()
    l3 = IPv6 if suffix else IP

    def seen(packet: Any) -> bool:
        return bool(
            packet.haslayer(TCP) and packet.haslayer(l3) and packet[l3].dst == vm_ip and packet[TCP].dport == PATH_PORT
        )

    sniffer = AsyncSniffer(iface=hs.bridge, lfilter=seen, count=1, store=True, started_callback=started.set)
    sniffer.start()
    started.wait(TIMEOUT)
    outcome = "no answer from the VM"
    try:
        with socket.create_connection((pod_ip, PATH_PORT), timeout=TIMEOUT):
            outcome = "the VM accepted the connection"
    except ConnectionRefusedError:
        outcome = "the VM refused the port (the path works)"
    except OSError:
        pass
    sniffer.join(timeout=0.5)  # it stops by itself after the first match; the capture may lag the socket
    if sniffer.running:
        sniffer.stop()
    reached = bool(sniffer.results)
    data = {"port": PATH_PORT, "reached_bridge": reached, "outcome": outcome}
    if not reached:
        detail = f"a connection to {pod_ip}:{PATH_PORT} never reached {vm_ip} on {hs.bridge} (DNAT broken?)"
        return Check("path", f"dnat path{suffix}", Status.FAIL, detail, data)
    return Check("path", f"dnat path{suffix}", Status.OK, f"{pod_ip}:{PATH_PORT} reached {vm_ip}: {outcome}", data)


def path(hs: Handshake) -> list[Check]:
    """Forwarding, the tap, the NAT and guest-isolation rules with their counters, conntrack, and a connection
    through the DNAT, for each family the VM has."""
    families = _families(hs)
    return [
        *[_forwarding(family) for family, *_rest in families],
        _tap(hs),
        *_nft_rules(hs),
        _conntrack([vm_ip for _family, vm_ip, *_rest in families]),
        *[_synthetic(hs, vm_ip, pod_ip, _suffix(family)) for family, vm_ip, _gw, pod_ip in families],
    ]


PROBES: dict[str, Callable[[Handshake], list[Check]]] = {"dhcp": dhcp, "arp": arp, "ra": ra, "nd": nd, "path": path}
