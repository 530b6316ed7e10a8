"""Guest isolation against a hostile guest: the stand-in sits behind the sidecar's real tap (through the relay) and
sends with scapy what a taken-over VM would. Each attack is watched where it would land (the client, the pod's
bridge, the pod's neighbour and route tables, listeners in the pod) next to a control frame that must arrive, so a
broken capture cannot pass for a blocked attack; the guard's drop counter must grow. The last test removes the
guard tables and replays the attacks: they then succeed, which shows the observations can fail.

One bed for the module: the sidecar's start and scapy's imports are the slow parts.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netsidecar import plan
from shared.handshake import Handshake
from tests.harness.netbed import (
    Bed,
    GuestSender,
    Sidecar,
    VmStandIn,
    fresh_id,
    guard_counters,
    ns_popen,
    ns_run,
    tcp_request,
    udp_request,
)

pytestmark = pytest.mark.netns

MAC = "52:54:00:7a:00:42"
ROGUE_MAC = "02:de:ad:be:ef:01"
OPEN_TCP, OPEN_UDP = 7003, 7005
# Pod-namespace services the guest must not reach: a 0.0.0.0 and a dual-stack :: listener, qemu's VNC port
# (the pod runs VNC here), a UDP one; and the ports VM_OPEN_PORTS opens.
LISTENERS = [("tcp", "0.0.0.0", 7001), ("tcp", "::", 7002), ("tcp", "0.0.0.0", 5900), ("udp", "0.0.0.0", 7004)]
OPENED = [("tcp", "0.0.0.0", OPEN_TCP), ("udp", "0.0.0.0", OPEN_UDP)]

LISTEN = """\
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
def serve(proto, host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port))
    if proto == "tcp":
        s.listen()
    yield_ready.release()
    while True:
        if proto == "tcp":
            c, peer = s.accept(); log.write(f"{port} {peer[0]}\\n"); c.sendall(f"pod {port}".encode()); c.close()
        else:
            _, peer = s.recvfrom(100); log.write(f"{port} {peer[0]}\\n"); s.sendto(f"pod {port}".encode(), peer)
specs = [(p, h, int(n)) for p, h, n in (a.split(",") for a in sys.argv[2:])]
yield_ready = threading.Semaphore(0)
for spec in specs:
    threading.Thread(target=serve, args=spec, daemon=True).start()
for _ in specs:
    yield_ready.acquire()
print("ready", flush=True)
threading.Event().wait()
"""

# Every target tried at once from one process, so a dropped SYN costs the timeout once, not per target.
TRY = """\
import json, socket, sys, threading
out = {}
def one(proto, host, port):
    key = f"{proto} {host} {port}"
    try:
        if proto == "tcp":
            s = socket.create_connection((host, port), timeout=2)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(b"x", (host, port))
        out[key] = s.recv(100).decode()
    except OSError:
        out[key] = ""
threads = [threading.Thread(target=one, args=t) for t in json.loads(sys.argv[1])]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps(out))
"""

# The guest's NIC, scapy imported once: each stdin line is a JSON list of scapy expressions to send from eth0.
SNIFF = """\
import json, sys
from scapy.all import ARP, IP, UDP, AsyncSniffer, Ether, ICMPv6ND_RA, IPv6, Raw
def row(p):
    r = {"src": p[Ether].src, "type": p[Ether].type}
    if IP in p: r.update(ip_src=p[IP].src, ip_dst=p[IP].dst)
    if UDP in p: r.update(sport=p[UDP].sport, dport=p[UDP].dport)
    if ARP in p: r.update(arp_op=p[ARP].op, arp_psrc=p[ARP].psrc, arp_hwsrc=p[ARP].hwsrc)
    if IPv6 in p: r.update(ip6_src=p[IPv6].src, ra=ICMPv6ND_RA in p)
    if Raw in p: r.update(raw=bytes(p[Raw].load).decode("latin-1"))
    return r
s = AsyncSniffer(iface=sys.argv[1], store=True, started_callback=lambda: print("ready", flush=True))
s.start()
sys.stdin.readline()
s.stop()
print(json.dumps([row(p) for p in s.results if Ether in p]))
"""


@dataclass
class Isolated:
    """The bed, the real sidecar (VNC in the pod, VM_OPEN_PORTS set), the stand-in and the pod's listeners."""

    bed: Bed
    sidecar: Sidecar
    vm: VmStandIn
    handshake: Handshake
    listener_log: Path
    bridge_mac: str
    sender: GuestSender

    @property
    def vm_ip(self) -> str:
        """The VM's IPv4 address (this bed's pod has IPv4)."""
        assert self.handshake.vm_ip is not None
        return self.handshake.vm_ip

    @property
    def gateway(self) -> str:
        """The bridge's IPv4 address."""
        assert self.handshake.gateway is not None
        return self.handshake.gateway

    def send(self, *frames: str) -> None:
        """sendp the scapy expressions ``frames`` from the guest's NIC."""
        self.sender.send(*frames)

    def counters(self) -> dict[str, int]:
        """Packets counted by each guard rule, by its comment."""
        return guard_counters(self.bed.pod.ns)

    def guest_tries(self, targets: list[tuple[str, str, int]]) -> dict[str, str]:
        """Connect (TCP) or send a datagram (UDP) from the guest to each target; the replies ('' = none)."""
        done = ns_run(self.vm.ns, sys.executable, "-c", TRY, json.dumps(targets), timeout=30)
        result: dict[str, str] = json.loads(done.stdout)
        return result


class Capture:
    """Frames seen on ``iface`` in ``ns`` while the ``with`` block runs (scapy in its own process)."""

    def __init__(self, ns: str, iface: str) -> None:
        self.proc = ns_popen(ns, [sys.executable, "-c", SNIFF, iface], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.frames: list[dict[str, Any]] = []

    def __enter__(self) -> "Capture":
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready", "the capture did not start"
        return self

    def __exit__(self, *_exc: object) -> None:
        time.sleep(0.5)  # frames still in flight through the relay and the bridge
        out, _ = self.proc.communicate(b"stop\n", timeout=30)
        self.frames = json.loads(out)

    def carrying(self, marker: str) -> list[dict[str, Any]]:
        """Captured UDP datagrams whose payload holds ``marker`` (not the ICMP errors quoting them)."""
        return [f for f in self.frames if "sport" in f and marker in f.get("raw", "")]


@pytest.fixture(scope="module")
def bed() -> Iterator[Isolated]:
    """A Calico-like pod with the real sidecar, a stand-in holding its lease, and listeners in the pod."""
    made = Bed(fresh_id())
    env = {"VM_MAC": MAC, "VM_OPEN_PORTS": f"{OPEN_TCP},{OPEN_UDP}/udp"}
    sidecar = Sidecar(made, env)
    vm = VmStandIn(made, MAC)
    log = sidecar.run_dir.parent / f"pv{made.ident}-listeners.log"
    try:
        made.setup()
        handshake = sidecar.start(timeout=20)
        vm.setup()
        lease = vm.dhcp()
        assert lease["ip"] == handshake.vm_ip, "the guest's DHCP passes the guards"
        specs = [f"{p},{h},{n}" for p, h, n in LISTENERS + OPENED]
        listen = ns_popen(made.pod.ns, [sys.executable, "-c", LISTEN, str(log), *specs], stdout=subprocess.PIPE)
        assert listen.stdout is not None and listen.stdout.readline().strip() == b"ready"
        bridge_mac = ns_run(made.pod.ns, "cat", "/sys/class/net/podvm0/address").stdout.strip()
        sender = GuestSender(vm)
        yield Isolated(made, sidecar, vm, handshake, log, bridge_mac, sender)
    finally:
        vm.cleanup()
        sidecar.cleanup()
        made.cleanup()
        log.unlink(missing_ok=True)


def grew(before: dict[str, int], after: dict[str, int], guard: str, at_least: int) -> bool:
    return after.get(guard, 0) - before.get(guard, 0) >= at_least


def to_client(bed: Isolated, src: str, marker: str, mac: str = MAC) -> str:
    """A scapy UDP datagram from the guest's NIC to the outside client, routed through the gateway."""
    return (
        f"Ether(src={mac!r}, dst={bed.bridge_mac!r}) / IP(src={src!r}, dst={bed.bed.client_ip!r})"
        f" / UDP(sport=5555, dport=9999) / Raw({marker!r})"
    )


def spoofed_ipv4(bed: Isolated) -> tuple[list[str], list[str]]:
    """Frames with forged IPv4 sources (and the markers they carry): the gateway, the pod IP, a client neighbour."""
    sources = {"spoof-gw": bed.gateway, "spoof-pod": bed.bed.pod_ip, "spoof-nb": f"10.{bed.bed.ident}.9.77"}
    return [to_client(bed, src, marker) for marker, src in sources.items()], list(sources)


def test_allowed_traffic_still_flows(bed: Isolated) -> None:
    """DHCP (the fixture's lease), ping to the gateway, inbound TCP/UDP/ICMP via the pod IP, outbound as the pod."""
    ping = ("busybox", "ping", "-c1", "-W2")
    assert ns_run(bed.vm.ns, *ping, bed.gateway, check=False).returncode == 0, "guest pings its gateway"
    bed.vm.serve_tcp(8080, "vm")
    bed.vm.serve_udp(5353, "vm")
    assert tcp_request(bed.bed.client.ns, bed.bed.pod_ip, 8080) == f"vm {bed.bed.client_ip}"
    assert udp_request(bed.bed.client.ns, bed.bed.pod_ip, 5353) == f"vm {bed.bed.client_ip}"
    assert ns_run(bed.bed.client.ns, *ping, bed.bed.pod_ip, check=False).returncode == 0
    assert tcp_request(bed.bed.pod.ns, bed.bed.pod_ip, 8080).startswith("vm "), "the pod reaches the VM too"
    with Capture(bed.bed.client.ns, "eth0") as seen:
        bed.send(to_client(bed, bed.vm_ip, "outbound"))
    assert [f["ip_src"] for f in seen.carrying("outbound")] == [bed.bed.pod_ip], "leaves SNATed to the pod IP"


def test_spoofed_ipv4_source_never_leaves(bed: Isolated) -> None:
    before = bed.counters()
    frames, markers = spoofed_ipv4(bed)
    with Capture(bed.bed.client.ns, "eth0") as seen:
        bed.send(*frames, to_client(bed, bed.vm_ip, "control"))
    assert seen.carrying("control"), "the control datagram from the VM's own address arrives"
    assert not [f for marker in markers for f in seen.carrying(marker)], seen.frames
    assert grew(before, bed.counters(), plan.GUARD_IPV4, len(markers))


def test_spoofed_ethernet_source_never_enters_the_bridge(bed: Isolated) -> None:
    before = bed.counters()
    with Capture(bed.bed.client.ns, "eth0") as seen:
        bed.send(to_client(bed, bed.vm_ip, "spoof-mac", ROGUE_MAC), to_client(bed, bed.vm_ip, "ok"))
    assert seen.carrying("ok") and not seen.carrying("spoof-mac")
    fdb = ns_run(bed.bed.pod.ns, "bridge", "fdb", "show", "br", "podvm0").stdout
    assert ROGUE_MAC not in fdb, "the bridge did not learn the forged MAC"
    assert grew(before, bed.counters(), plan.GUARD_MAC, 1)


def neighbours(ns: str) -> set[tuple[str, str, str]]:
    """(address, device, MAC) of every neighbour entry, state left out (it changes with time)."""
    entries = json.loads(ns_run(ns, "ip", "-j", "neigh", "show").stdout)
    return {(e["dst"], e["dev"], e.get("lladdr", "")) for e in entries}


def plant_neighbour(bed: Isolated) -> tuple[str, str]:
    """An ARP request for the gateway from an invented address: answered, it plants a neighbour entry in the pod."""
    invented = f"10.{bed.bed.ident}.0.99"
    frame = f"Ether(src={MAC!r}, dst='ff:ff:ff:ff:ff:ff') / ARP(op=1, hwsrc={MAC!r}, psrc={invented!r}, pdst="
    return invented, frame + f"{bed.gateway!r})"


def test_arp_for_a_foreign_address_changes_nothing(bed: Isolated) -> None:
    """Gratuitous ARP claiming the gateway, an ARP reply claiming the pod's upstream router, and a request that
    would plant a neighbour entry for an invented address; only ARP about the VM's own address passes."""
    hs, pod = bed.handshake, bed.bed.pod.ns
    invented, plant = plant_neighbour(bed)
    table = neighbours(pod)
    routes = ns_run(pod, "ip", "-j", "route", "show").stdout
    bcast = "ff:ff:ff:ff:ff:ff"
    attacks = [
        f"Ether(src={MAC!r}, dst={bcast!r}) / ARP(op=2, hwsrc={MAC!r}, psrc={hs.gateway!r}, pdst={hs.gateway!r})",
        f"Ether(src={MAC!r}, dst={bcast!r}) / ARP(op=1, hwsrc={MAC!r}, psrc={hs.gateway!r}, pdst={hs.gateway!r})",
        f"Ether(src={MAC!r}, dst={bcast!r}) / ARP(op=2, hwsrc={MAC!r}, psrc='169.254.1.1', pdst={hs.gateway!r})",
        plant,
        f"Ether(src={MAC!r}, dst={bcast!r}) / ARP(op=1, hwsrc={ROGUE_MAC!r}, psrc={hs.vm_ip!r}, pdst={hs.gateway!r})",
    ]
    control = f"Ether(src={MAC!r}, dst={bcast!r}) / ARP(op=1, hwsrc={MAC!r}, psrc={hs.vm_ip!r}, pdst={hs.gateway!r})"
    before = bed.counters()
    with Capture(pod, "podvm0") as seen:
        bed.send(*attacks, control)
    arps = {(f["arp_psrc"], f["arp_hwsrc"]) for f in seen.frames if "arp_psrc" in f and f["src"] == MAC}
    assert arps == {(hs.vm_ip, MAC)}, "only the VM's own ARP reaches the bridge (the stand-in may add its own)"
    assert grew(before, bed.counters(), plan.GUARD_ARP, len(attacks))
    after = neighbours(pod)
    assert not [n for n in after - table if n[0] != hs.vm_ip], f"new neighbours: {after - table}"
    assert (hs.gateway, "podvm0", MAC) not in after and (invented, "podvm0", MAC) not in after
    assert ns_run(pod, "ip", "-j", "route", "show").stdout == routes


def dhcp_offer(bed: Isolated) -> str:
    """A DHCP OFFER from the guest, naming itself the router."""
    return (
        f"Ether(src={MAC!r}, dst='ff:ff:ff:ff:ff:ff') / IP(src={bed.vm_ip!r}, dst='255.255.255.255')"
        " / UDP(sport=67, dport=68) / BOOTP(op=2, yiaddr='192.168.254.1', siaddr='192.168.254.2')"
        " / DHCP(options=[('message-type', 'offer'), ('router', '192.168.254.2'), 'end'])"
    )


def test_guest_cannot_act_as_dhcp_server(bed: Isolated) -> None:
    offer = dhcp_offer(bed)
    discover = (
        f"Ether(src={MAC!r}, dst='ff:ff:ff:ff:ff:ff') / IP(src='0.0.0.0', dst='255.255.255.255')"
        f" / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex({MAC.replace(':', '')!r}))"
        " / DHCP(options=[('message-type', 'discover'), 'end'])"
    )
    before = bed.counters()
    with Capture(bed.bed.pod.ns, "podvm0") as seen:
        bed.send(offer, discover)
    from_guest = [f for f in seen.frames if f["src"] == MAC and "sport" in f]
    assert {(f["sport"], f["dport"]) for f in from_guest} == {(68, 67)}, "the DISCOVER arrives, the OFFER does not"
    assert grew(before, bed.counters(), plan.GUARD_DHCP_SERVER, 1)


def reopen_ipv6(pod_ns: str) -> None:
    """IPv6 on the bridge as it stays where /proc/sys is read-only: enabled, accepting router advertisements."""
    for key, value in (("disable_ipv6", "0"), ("accept_ra", "2"), ("autoconf", "1")):
        ns_run(pod_ns, "sysctl", "-qw", f"net.ipv6.conf.podvm0.{key}={value}")


RA = (
    f"Ether(src={MAC!r}, dst='33:33:00:00:00:01') / IPv6(src='fe80::5054:ff:fe7a:42', dst='ff02::1')"
    " / ICMPv6ND_RA(routerlifetime=1800) / ICMPv6NDOptSrcLLAddr(lladdr="
    f"{MAC!r}) / ICMPv6NDOptPrefixInfo(prefix='2001:db8:77::', prefixlen=64, L=1, A=1)"
)


def ipv6_state(pod_ns: str) -> str:
    """The pod's IPv6 routes and addresses."""
    return ns_run(pod_ns, "ip", "-6", "route", "show").stdout + ns_run(pod_ns, "ip", "-6", "addr", "show").stdout


def test_router_advertisement_and_ipv6_are_dropped(bed: Isolated) -> None:
    pod = bed.bed.pod.ns
    sysctl = ns_run(
        pod, "cat", "/proc/sys/net/ipv6/conf/podvm0/disable_ipv6", "/proc/sys/net/ipv6/conf/podvm0/accept_ra"
    )
    assert sysctl.stdout.split() == ["1", "0"], "the sidecar turned IPv6 off on its bridge where it could"
    assert "addrgenmode none" in ns_run(pod, "ip", "-d", "link", "show", "podvm0").stdout
    reopen_ipv6(pod)
    try:
        state = ipv6_state(pod)
        before = bed.counters()
        echo = (
            f"Ether(src={MAC!r}, dst='33:33:00:00:00:01') / IPv6(src='fe80::5054:ff:fe7a:42', dst='ff02::1')"
            " / ICMPv6EchoRequest()"
        )
        with Capture(pod, "podvm0") as seen:
            bed.send(RA, RA, echo)
        assert not [f for f in seen.frames if f["src"] == MAC and "ip6_src" in f], seen.frames
        after = bed.counters()
        assert grew(before, after, plan.GUARD_RA, 2) and grew(before, after, plan.GUARD_IPV6, 1)
        time.sleep(0.5)
        assert ipv6_state(pod) == state, "no route or address from the guest's advertisement"
    finally:
        ns_run(pod, "sysctl", "-qw", "net.ipv6.conf.podvm0.disable_ipv6=1", "net.ipv6.conf.podvm0.accept_ra=0")


def local_targets(bed: Isolated) -> list[tuple[str, str, int]]:
    """Each pod listener through the gateway address and through the pod IP."""
    hosts = (bed.gateway, bed.bed.pod_ip)
    return [(proto, host, port) for proto, _bind, port in LISTENERS for host in hosts]


def test_pod_services_are_closed_to_the_guest(bed: Isolated) -> None:
    """0.0.0.0 and :: listeners and the VNC port, via the gateway or the pod IP; VM_OPEN_PORTS opens its ports."""
    before = bed.counters()
    got = bed.guest_tries(local_targets(bed))
    assert got == {f"{p} {h} {n}": "" for p, h, n in local_targets(bed)}, got
    assert grew(before, bed.counters(), plan.GUARD_POD_SERVICES, len(got))
    assert ns_run(bed.vm.ns, "busybox", "ping", "-c1", "-W1", bed.bed.pod_ip, check=False).returncode != 0
    opened = bed.guest_tries([("tcp", bed.gateway, OPEN_TCP), ("udp", bed.bed.pod_ip, OPEN_UDP)])
    assert sorted(opened.values()) == [f"pod {OPEN_TCP}", f"pod {OPEN_UDP}"], "VM_OPEN_PORTS opens them"
    seen = bed.listener_log.read_text().split("\n")
    guest = {line.split()[0] for line in seen if bed.vm_ip in line}
    assert guest == {str(OPEN_TCP), str(OPEN_UDP)}, f"listeners saw the guest on {guest}"
    pod = bed.bed.pod.ns
    assert tcp_request(pod, "127.0.0.1", 7001) == "pod 7001" and tcp_request(pod, "::1", 7002) == "pod 7002"
    assert tcp_request(pod, bed.bed.pod_ip, 5900) == "pod 5900", "the pod itself still reaches its services"


def test_status_and_probe_show_the_guards_with_counters(bed: Isolated) -> None:
    status = json.loads(bed.sidecar.cli("status").stdout)
    rules = status["rules"]
    counted = {
        r["comment"]: e["counter"]["packets"] for r in rules for e in r["expr"] if "counter" in e and "comment" in r
    }
    assert set(counted) == {*plan.GUARDS, plan.NAT_IN, plan.NAT_OUT}
    assert counted[plan.GUARD_IPV4] > 0 and counted[plan.GUARD_POD_SERVICES] > 0
    dropped = {
        f["labels"]["guard"]: f["value"] for f in status["figures"] if f["name"] == "podvm_guard_dropped_packets_total"
    }
    assert set(dropped) == set(plan.GUARDS), "the metrics name every guard by its comment"
    assert dropped[plan.GUARD_IPV4] >= counted[plan.GUARD_IPV4] > 0, "gathered just after the rules"
    code = "import sys; from netsidecar.probe import command; sys.exit(command(sys.argv[1:]))"
    done = subprocess.run(
        ["ip", "netns", "exec", bed.bed.pod.ns, sys.executable, "-c", code, "path", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RUN_DIR": str(bed.sidecar.run_dir), "NET_STATE_DIR": str(bed.sidecar.state_dir)},
        check=False,
    )
    report = json.loads(done.stdout)
    isolation = next(c for c in report["checks"] if c["check"] == "isolation")
    assert (done.returncode, isolation["status"]) == (0, "ok"), report
    assert isolation["data"]["drops"][plan.GUARD_IPV4] >= counted[plan.GUARD_IPV4] > 0, isolation


def test_without_the_guards_the_same_attacks_succeed(bed: Isolated) -> None:
    """The control: with the isolation tables removed, the observations above do see the attacks."""
    pod = bed.bed.pod.ns
    saved = {f: ns_run(pod, "nft", "list", "table", f, "podvm").stdout for f in ("netdev", "inet")}
    ns_run(pod, "nft", "delete", "table", "netdev", "podvm")
    ns_run(pod, "nft", "delete", "table", "inet", "podvm")
    reopen_ipv6(pod)
    try:
        frames, _markers = spoofed_ipv4(bed)
        with Capture(bed.bed.client.ns, "eth0") as seen:
            bed.send(*frames)
        # The kernel itself drops the forged local sources (gateway, pod IP) as martians; a foreign one leaves.
        assert seen.carrying("spoof-nb"), "a spoofed source leaves unguarded"
        with Capture(pod, "podvm0") as bridge:
            bed.send(to_client(bed, bed.vm_ip, "spoof-mac", ROGUE_MAC), dhcp_offer(bed))
        assert [f["sport"] for f in bridge.frames if f["src"] == MAC and "sport" in f] == [67], "the offer arrives"
        assert ROGUE_MAC in ns_run(pod, "bridge", "fdb", "show", "br", "podvm0").stdout, "the forged MAC is learnt"
        invented, plant = plant_neighbour(bed)
        bed.send(plant)
        assert (invented, "podvm0", MAC) in neighbours(pod), "the invented neighbour is planted"
        got = bed.guest_tries(local_targets(bed))
        assert all(reply.startswith("pod ") for reply in got.values()), got
        bed.send(RA)
        time.sleep(0.5)
        assert "2001:db8:77::/64" in ns_run(pod, "ip", "-6", "route", "show").stdout, "the advertisement is taken"
    finally:
        ns_run(pod, "sysctl", "-qw", "net.ipv6.conf.podvm0.disable_ipv6=1", "net.ipv6.conf.podvm0.accept_ra=0")
        for text in saved.values():
            subprocess.run(["ip", "netns", "exec", pod, "nft", "-f", "-"], input=text, text=True, check=True)
    assert set(bed.counters()) == set(plan.GUARDS), "guards restored"
