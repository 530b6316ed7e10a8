"""The guest's gateway keeps its MAC from pod to pod: a VM resumed in a new pod finds its IPv4 gateway and IPv6
router at the MAC its ARP and neighbour caches hold. Two fresh beds (two pods) run the real sidecar for the same
hostname; the kernel's bridge and what answers the guest's ARP, neighbour and router solicitations are compared."""

import json
import sys

import pytest

from netsidecar.config import LINK_LOCAL, eui64
from shared.handshake import Handshake
from tests.harness.netbed import Bed, BedFactory, VmStandIn, ns_run

pytestmark = pytest.mark.netns

HOSTNAME = "pet-0"
# A port MAC below any the bridge could be given: an unpinned bridge would take it.
LOW_MAC = "02:00:00:00:00:01"

# On the guest's NIC: an ARP who-has for the gateway, a neighbour solicitation for the router and a router
# solicitation; every answer's Ethernet source and the MAC it announces, by kind.
ASK = """\
import json, sys, time
from scapy.all import (ARP, AsyncSniffer, Ether, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6ND_RS,
                       ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6, sendp)
mac, vm_ip, gw, lla, router = sys.argv[1:6]
def row(p):
    if ARP in p and p[ARP].op == 2 and p[ARP].psrc == gw:
        return ["arp", p[Ether].src, p[ARP].hwsrc]
    if ICMPv6ND_NA in p and p[ICMPv6ND_NA].tgt == router and ICMPv6NDOptDstLLAddr in p:
        return ["na", p[Ether].src, p[ICMPv6NDOptDstLLAddr].lladdr]
    if ICMPv6ND_RA in p and ICMPv6NDOptSrcLLAddr in p:
        return ["ra", p[Ether].src, p[ICMPv6NDOptSrcLLAddr].lladdr]
    return None
s = AsyncSniffer(iface="eth0", store=True, lfilter=lambda p: row(p) is not None)
s.start()
time.sleep(0.5)
sendp([
    Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc=vm_ip, pdst=gw),
    Ether(src=mac, dst="33:33:ff:00:00:01") / IPv6(src=lla, dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=router)
    / ICMPv6NDOptSrcLLAddr(lladdr=mac),
    Ether(src=mac, dst="33:33:00:00:00:02") / IPv6(src=lla, dst="ff02::2") / ICMPv6ND_RS()
    / ICMPv6NDOptSrcLLAddr(lladdr=mac),
], iface="eth0", verbose=0)
time.sleep(2)
s.stop()
print(json.dumps(sorted({tuple(row(p)) for p in s.results})))
"""


def bridge_mac(bed: Bed) -> str:
    """The bridge's MAC as the kernel holds it."""
    (link,) = json.loads(ns_run(bed.pod.ns, "ip", "-j", "link", "show", "podvm0").stdout)
    mac: str = link["address"]
    return mac


def answers(vm: VmStandIn, hs: Handshake) -> list[list[str]]:
    """(kind, Ethernet source, announced MAC) of each answer to the guest's ARP, NS and RS."""
    assert hs.vm_ip is not None and hs.gateway is not None and hs.ipv6 is not None
    lla = str(LINK_LOCAL[eui64(hs.mac)])
    argv = (sys.executable, "-c", ASK, hs.mac, hs.vm_ip, hs.gateway, lla, hs.ipv6.router)
    got: list[list[str]] = json.loads(ns_run(vm.ns, *argv).stdout)
    return got


def pod(bed_factory: BedFactory, hostname: str) -> tuple[Bed, str, str, list[list[str]]]:
    """A fresh dual-stack pod running the real sidecar for ``hostname``: the bed, the bridge's MAC in the kernel,
    the one `netsidecar plan` shows, and the answers the guest gets from its gateway."""
    bed = bed_factory.bed("calico", families="dual")
    side = bed_factory.sidecar(bed, {"HOSTNAME": hostname})
    hs = side.start()
    shown = side.cli("plan")
    assert shown.returncode == 0, shown.stderr
    planned: str = json.loads(shown.stdout)["links"]["bridge_mac"]
    vm = bed_factory.vm(bed, hs.mac)
    return bed, bridge_mac(bed), planned, answers(vm, hs)


def test_the_gateway_mac_is_the_same_in_every_pod_of_a_hostname_and_answers_the_guest(
    bed_factory: BedFactory,
) -> None:
    first, mac, planned, heard = pod(bed_factory, HOSTNAME)
    assert mac == planned, "the bridge holds the planned MAC"
    assert heard == [[kind, mac, mac] for kind in ("arp", "na", "ra")], "gateway and router answer with it"
    ns_run(first.pod.ns, "ip", "link", "set", "podvm-tap0", "address", LOW_MAC)
    assert bridge_mac(first) == mac, "pinned: the bridge does not take its port's lower MAC"

    second, mac2, planned2, heard2 = pod(bed_factory, HOSTNAME)
    assert second.ident != first.ident
    assert (mac2, planned2, heard2) == (mac, planned, heard), "the next pod of the same hostname: the same MAC"

    _, other, other_planned, _ = pod(bed_factory, "pet-1")
    assert other == other_planned != mac, "another hostname, another gateway MAC"
