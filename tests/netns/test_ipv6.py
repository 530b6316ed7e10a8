"""IPv6 end to end on the namespace test bed: dual-stack and IPv6-only pods in both CNI styles (Calico-like: a /128
via the link-local fe80::1, proxy NDP on the node; bridge-like: a /64 via a global gateway, with NO_VNC), each with
the real sidecar and a stand-in behind the sidecar's tap that configures IPv6 as a guest does (router
advertisements, then ISC ``dhclient -6`` with its own resolv.conf). What arrives is asserted from the outside
client, from inside the pod and from the guest; the guest's IPv6 attacks are sent with scapy and must not land.

One bed per scenario (module-scoped): the sidecar's start and the DHCPv6 exchange are the slow parts.
"""

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netsidecar import plan
from netsidecar.capabilities import RUN_CAPABILITIES, RUN_CAPABILITIES_IPV6
from shared.handshake import VERSION, Handshake, Ipv6
from tests.harness.netbed import (
    NETSIDECAR,
    Bed,
    BedFactory,
    Conversation,
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
from tests.netns.test_net_privileges import only

pytestmark = pytest.mark.netns

MAC = "52:54:00:7a:00:66"
VM_TCP, VM_UDP, OUT_TCP = 7101, 7102, 7103
NS6 = "fd0d::53"
RESOLV = (
    f"nameserver 10.96.0.10\nnameserver {NS6}\nnameserver fe80::9%eth0\nsearch ns1.svc.cluster.local cluster.local\n"
)

# A server answering "<name> <peer address>" on TCP and UDP, both families; prints ready once listening.
SERVE = """\
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
def reply(peer): return f"{name} {peer[0].removeprefix('::ffff:')}".encode()
def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", port)); s.listen(); ready.release()
    while True:
        c, peer = s.accept(); c.sendall(reply(peer)); c.close()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); ready.release()
    while True:
        data, peer = s.recvfrom(2048); print(data.decode(errors="replace"), flush=True); s.sendto(reply(peer), peer)
ready = threading.Semaphore(0)
for f in (tcp, udp): threading.Thread(target=f, daemon=True).start()
ready.acquire(); ready.acquire(); print("ready", flush=True); threading.Event().wait()
"""

# The guest's NIC with scapy imported once: each stdin line is a JSON list of scapy expressions to send on eth0.


def serve(ns: str, name: str, port: int) -> "subprocess.Popen[str]":
    """Start SERVE in ``ns``; its stdout lists the UDP payloads it received."""
    proc: subprocess.Popen[str] = ns_popen(  # type: ignore[assignment]
        ns, [sys.executable, "-c", SERVE, name, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@dataclass
class World:
    """A bed with the sidecar, a stand-in configured by RA and DHCPv6, and servers on both sides."""

    bed: Bed
    sidecar: Sidecar
    vm: VmStandIn
    handshake: Handshake
    lease: dict[str, str]
    client_server: "subprocess.Popen[str]"
    sender: GuestSender

    @property
    def v6(self) -> Ipv6:
        """The handshake's IPv6 block (present on every bed of this module)."""
        assert self.handshake.ipv6 is not None
        return self.handshake.ipv6

    def send(self, *frames: str) -> None:
        """sendp the scapy expressions ``frames`` from the guest's NIC."""
        self.sender.send(*frames)

    def counters(self) -> dict[str, int]:
        """Packets counted by each guard rule, by its comment."""
        return guard_counters(self.bed.pod.ns)


SCENARIOS = {
    "calico-dual": ("calico", "dual", {}),
    "calico-ipv6only": ("calico", "ipv6", {}),
    "bridge-dual-novnc": ("bridge", "dual", {"NO_VNC": "true"}),
    "bridge-ipv6only-novnc": ("bridge", "ipv6", {"NO_VNC": "true"}),
}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    """The scenario's bed, sidecar and configured stand-in, with a server in the VM and one in the client."""
    style, families, env = SCENARIOS[request.param]
    bed = Bed(fresh_id(), style, families=families)
    sidecar = Sidecar(bed, {"VM_MAC": MAC, **env})
    vm = VmStandIn(bed, MAC)
    procs: list[subprocess.Popen[Any]] = []
    try:
        bed.setup()
        sidecar.write_resolv(RESOLV)
        handshake = sidecar.start(timeout=30)
        vm.setup()
        if bed.v4:
            assert vm.dhcp()["ip"] == handshake.vm_ip, "dual stack: the IPv4 lease as before"
        lease = vm.dhcp6()
        vm.procs.append(serve(vm.ns, "vm", VM_TCP))  # type: ignore[arg-type]
        vm.procs.append(serve(vm.ns, "vm", VM_UDP))  # type: ignore[arg-type]
        vm.procs.append(serve(vm.ns, "vm", 5900))  # type: ignore[arg-type]
        procs.append(serve(bed.pod.ns, "pod", 5900))
        client_server = serve(bed.client.ns, "client", OUT_TCP)
        procs.append(client_server)
        sender = GuestSender(vm)
        yield World(bed, sidecar, vm, handshake, lease, client_server, sender)
    finally:
        if sidecar.log():
            sys.stderr.write(f"--- sidecar log ---\n{sidecar.log()}\n")
        for proc in procs:
            proc.kill()
            proc.wait()
        vm.cleanup()
        sidecar.cleanup()
        bed.cleanup()


def test_handshake_says_which_families_the_vm_has(world: World) -> None:
    hs, bed = world.handshake, world.bed
    assert hs.version == VERSION
    assert hs.families == (("ipv4", "ipv6") if bed.v4 else ("ipv6",))
    assert (hs.pod_ip is not None) == bed.v4 and (hs.vm_ip is not None) == bed.v4
    assert world.v6.pod_ip == bed.pod_ip6 and world.v6.router == "fe80::1" and world.v6.dns == (NS6,)
    plan_out = json.loads(world.sidecar.cli("plan").stdout)
    assert plan_out["handshake"]["families"] == list(hs.families), "`plan` shows the families served"


def test_guest_configures_itself_from_ra_and_dhcpv6(world: World) -> None:
    """DHCPv6 gives the exact address, the nameservers and the search list; the RA gives the default route; an
    EUI-64 SLAAC address formed from the same RA is the very same address."""
    assert world.lease["new_ip6_address"] == world.v6.vm_ip
    assert world.lease["new_dhcp6_name_servers"].split() == [NS6]
    assert world.lease["new_dhcp6_domain_search"].split() == ["ns1.svc.cluster.local.", "cluster.local."]
    routes = ns_run(world.vm.ns, "ip", "-6", "route", "show", "default").stdout
    assert "via fe80::1 dev eth0" in routes and "proto ra" in routes, routes
    mtu = ns_run(world.vm.ns, "cat", "/proc/sys/net/ipv6/conf/eth0/mtu").stdout.strip()
    assert mtu == str(world.bed.mtu), "the RA's MTU option"
    addrs = ns_run(world.vm.ns, "ip", "-6", "-j", "addr", "show", "dev", "eth0").stdout
    mine = [(a["local"], a.get("dynamic", False)) for i in json.loads(addrs) for a in i["addr_info"]]
    assert [a for a, _ in mine].count(world.v6.vm_ip) >= 1, mine
    resolv = world.vm.resolv_conf()
    assert f"nameserver {NS6}" in resolv and "ns1.svc.cluster.local" in resolv, resolv
    assert "fe80::9" not in resolv, "a link-local nameserver of the pod means nothing on the VM's link"


def test_tcp_udp_and_echo_to_the_pod_ipv6_reach_the_vm(world: World) -> None:
    client, pod6 = world.bed.client.ns, world.bed.pod_ip6
    assert tcp_request(client, pod6, VM_TCP) == f"vm {world.bed.client_ip6}"
    assert udp_request(client, pod6, VM_UDP) == f"vm {world.bed.client_ip6}"
    # The VM answers the echo, not the pod: with the VM's answers off, nothing answers.
    ping = ["busybox", "ping", "-6", "-c1", "-W2", pod6]
    assert ns_run(client, *ping, check=False).returncode == 0
    ns_run(world.vm.ns, "sysctl", "-qw", "net.ipv6.icmp.echo_ignore_all=1")
    try:
        assert ns_run(client, *ping, check=False).returncode != 0, "the pod answered an echo meant for the VM"
    finally:
        ns_run(world.vm.ns, "sysctl", "-qw", "net.ipv6.icmp.echo_ignore_all=0")


def test_vnc_port_stays_in_the_pod_unless_no_vnc(world: World) -> None:
    expected = "pod" if world.handshake.vnc_in_pod else "vm"
    assert tcp_request(world.bed.client.ns, world.bed.pod_ip6, 5900).split()[0] == expected


def test_pod_reaches_the_vm_on_its_own_ipv6(world: World) -> None:
    assert tcp_request(world.bed.pod.ns, world.bed.pod_ip6, VM_TCP).startswith("vm ")


def test_vm_outbound_ipv6_leaves_with_the_pod_address(world: World) -> None:
    assert tcp_request(world.vm.ns, world.bed.client_ip6, OUT_TCP) == f"client {world.bed.pod_ip6}"
    if world.bed.v4:
        assert tcp_request(world.vm.ns, world.bed.client_ip, OUT_TCP) == f"client {world.bed.pod_ip}"


def test_mss_is_clamped_to_the_pod_mtu(world: World) -> None:
    """A guest that ignores the MTU (1500 on its NIC, the pod's is 1440) still gets an MSS that fits the pod."""
    code = textwrap.dedent(f"""\
        import socket
        s = socket.create_connection(({world.bed.pod_ip6!r}, {VM_TCP}), timeout=3)
        print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
        """)
    ns_run(world.vm.ns, "ip", "link", "set", "eth0", "mtu", "1500")
    try:
        # The client sees the VM's SYN/ACK: its MSS is the pod route's (1440 - 60), not the guest's 1440.
        mss = int(ns_run(world.bed.client.ns, sys.executable, "-c", code).stdout)
    finally:
        ns_run(world.vm.ns, "ip", "link", "set", "eth0", "mtu", str(world.bed.mtu))
    assert mss <= world.bed.mtu - 60, mss


def received_by_client(world: World, marker: str) -> bool:
    """Whether the client's UDP server printed a datagram carrying ``marker`` (it prints each one)."""
    assert world.client_server.stdout is not None
    import select  # noqa: PLC0415 - only here

    seen = []
    while select.select([world.client_server.stdout], [], [], 1.0)[0]:
        seen.append(world.client_server.stdout.readline())
    return any(marker in line for line in seen)


def test_ipv6_attacks_from_the_guest_fail(world: World) -> None:
    """A spoofed IPv6 source, an RA, a DHCPv6 server reply and an NA for the gateway's addresses are dropped at
    the tap (their counters grow); the same kind of datagram from the guest's own address arrives."""
    hs, bed = world.handshake, world.bed
    eth = f"Ether(src={MAC!r}, dst=getmacbyip6('fe80::1') or '33:33:00:00:00:01')"
    to_client = f"UDP(sport=4000, dport={OUT_TCP}) / Raw(b'%s')"
    before = world.counters()
    routes_before = ns_run(bed.pod.ns, "ip", "-6", "route").stdout
    world.send(
        f"{eth} / IPv6(src={bed.pod_ip6!r}, dst={bed.client_ip6!r}) / " + to_client % "spoof-pod",
        f"{eth} / IPv6(src={world.v6.gateway!r}, dst={bed.client_ip6!r}) / " + to_client % "spoof-gw",
        f"{eth} / IPv6(src='fd0e::9', dst={bed.client_ip6!r}) / " + to_client % "spoof-far",
        f"{eth} / IPv6(src={world.v6.vm_ip!r}, dst={bed.client_ip6!r}) / " + to_client % "control",
    )
    assert received_by_client(world, "control"), "the guest's own datagram arrives"
    after = world.counters()
    assert after[plan.GUARD_IPV6] - before[plan.GUARD_IPV6] >= 3
    for marker in ("spoof-pod", "spoof-gw", "spoof-far"):
        assert not received_by_client(world, marker), marker
    ll = "fe80::5054:ff:fe7a:66"
    world.send(
        f"Ether(src={MAC!r}, dst='33:33:00:00:00:01') / IPv6(src={ll!r}, dst='ff02::1')"
        " / ICMPv6ND_RA(routerlifetime=9000) / ICMPv6NDOptPrefixInfo(prefix='2001:db8:bad::', prefixlen=64)",
        f"Ether(src={MAC!r}, dst='33:33:00:01:00:02') / IPv6(src={ll!r}, dst='ff02::1:2') / UDP(sport=547, dport=546)"
        " / DHCP6_Advertise()",
        f"Ether(src={MAC!r}, dst='33:33:00:00:00:01') / IPv6(src={ll!r}, dst='ff02::1') / ICMPv6ND_NA(tgt='fe80::1',"
        f" R=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr={MAC!r})",
        f"Ether(src={MAC!r}, dst='33:33:00:00:00:01') / IPv6(src={ll!r}, dst='ff02::1') / ICMPv6ND_NA("
        f"tgt={world.v6.gateway!r}, R=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr={MAC!r})",
    )
    time.sleep(0.3)
    final = world.counters()
    assert final[plan.GUARD_RA] - after[plan.GUARD_RA] >= 1
    assert final[plan.GUARD_DHCP6_SERVER] - after[plan.GUARD_DHCP6_SERVER] >= 1
    assert final[plan.GUARD_ND] - after[plan.GUARD_ND] >= 2
    assert ns_run(bed.pod.ns, "ip", "-6", "route").stdout == routes_before, "the pod took no route from the guest"
    neigh = ns_run(bed.pod.ns, "ip", "-6", "neigh", "show", "dev", "podvm0").stdout
    assert MAC not in " ".join(line for line in neigh.splitlines() if line.startswith(("fe80::1 ", world.v6.gateway)))
    # The guest still works after all that.
    assert tcp_request(bed.client.ns, bed.pod_ip6, VM_TCP) == f"vm {bed.client_ip6}"
    assert hs.ipv6 is not None


def test_pod_services_are_closed_to_the_guest_over_ipv6(world: World) -> None:
    """The pod's :: listener (its VNC port here) answers the client but never the guest, whichever pod address the
    guest aims at; the guest still pings its router and gateway."""
    vm = world.vm.ns
    code = textwrap.dedent("""\
        import json, socket, sys
        out = {}
        for host in sys.argv[1:]:
            try:
                s = socket.create_connection((host, 5900), timeout=2)
                out[host] = s.recv(100).decode()
            except OSError:
                out[host] = ""
        print(json.dumps(out))
        """)
    targets = [world.v6.gateway, "fe80::1%eth0"]
    got = json.loads(ns_run(vm, sys.executable, "-c", code, *targets).stdout)
    assert got == dict.fromkeys(targets, ""), got
    assert tcp_request(world.bed.pod.ns, world.v6.gateway, 5900).startswith("pod "), "the listener itself is up"
    for router in (world.v6.gateway, "fe80::1%eth0"):
        assert ns_run(vm, "busybox", "ping", "-6", "-c1", "-W2", router, check=False).returncode == 0, router


def probe(world: World, *args: str) -> tuple[int, dict[tuple[str, str], dict[str, Any]]]:
    """``netsidecar probe ARGS --json`` in the pod: its exit status and its checks by (probe, check)."""
    done = world.sidecar.cli("probe", *args, "--json")
    assert done.stdout, done.stderr
    checks = json.loads(done.stdout)["checks"]
    return done.returncode, {(c["probe"], c["check"]): c for c in checks}


def test_probes_speak_ipv6(world: World) -> None:
    """RA, neighbour discovery, a port and the path, checked over IPv6 against the handshake, while a connection
    of the client's is tracked."""
    talk = Conversation(world.bed.client.ns, world.vm, world.bed.pod_ip6)
    try:
        assert talk.echo("tracked") == "tracked"
        code, checks = probe(world, "all")
        assert code == 0, checks
        for name in ("router", "managed", "prefix", "mtu", "rdnss", "dnssl"):
            assert checks[("ra", name)]["status"] == "ok", checks[("ra", name)]
        nd = checks[("nd", world.v6.vm_ip)]
        assert (nd["status"], nd["data"]["macs"]) == ("ok", [MAC])
        for name in ("ipv6 forwarding", "nft dnat6", "nft snat6", "dnat path6", "isolation"):
            assert checks[("path", name)]["status"] == "ok", checks[("path", name)]
        assert any(world.bed.pod_ip6 in entry for entry in checks[("path", "conntrack")]["data"]["entries"]), checks[
            ("path", "conntrack")
        ]
        assert (("path", "nft dnat") in checks) == world.bed.v4
        code, ports = probe(world, "port", str(VM_TCP))
        assert code == 0 and ports[("port", f"{VM_TCP}/tcp ipv6")]["status"] == "ok", ports
        code, ports = probe(world, "port", "7999")
        assert code == 1 and ports[("port", "7999/tcp ipv6")]["data"]["state"] == "closed", ports
    finally:
        talk.close()


def test_without_the_tap_guards_the_spoofed_ipv6_sources_land(world: World, tmp_path: Path) -> None:
    """The observation of the attack test can fail: with the tap's table removed, the same forged sources reach
    the client. The table is put back as it was listed (the next test restarts the sidecar anyway)."""
    bed = world.bed
    saved = tmp_path / "netdev-podvm.nft"
    saved.write_text(ns_run(bed.pod.ns, "nft", "list", "table", "netdev", "podvm").stdout)
    eth = f"Ether(src={MAC!r}, dst=getmacbyip6('fe80::1') or '33:33:00:00:00:01')"
    ns_run(bed.pod.ns, "nft", "delete", "table", "netdev", "podvm")
    try:
        world.send(
            f"{eth} / IPv6(src='fd0e::9', dst={bed.client_ip6!r}) / UDP(sport=4000, dport={OUT_TCP}) / Raw(b'bare-far')"
        )
        assert received_by_client(world, "bare-far"), "a forged IPv6 source leaves the pod unguarded"
    finally:
        ns_run(bed.pod.ns, "nft", "-f", str(saved))
    assert "guest: foreign IPv6 source" in ns_run(bed.pod.ns, "nft", "list", "table", "netdev", "podvm").stdout


def test_sidecar_kill_keeps_an_ipv6_flow_and_a_restart_takes_over(world: World) -> None:
    """Runs last in each scenario: SIGKILL the sidecar in the middle of an IPv6 connection to the VM; the kernel
    keeps carrying it, a new sidecar replaces the tables whole and the connection still works."""
    bed = world.bed
    talk = Conversation(bed.client.ns, world.vm, bed.pod_ip6)
    try:
        assert talk.echo("before") == "before"
        world.sidecar.kill()
        time.sleep(0.3)
        assert talk.echo("while down") == "while down", "the kernel keeps forwarding without the sidecar"
        again = Sidecar(bed, world.sidecar.env, world.sidecar.run_dir)
        try:
            assert again.start(timeout=30) == world.handshake
            tables = ns_run(bed.pod.ns, "nft", "list", "tables").stdout.split("\n")
            expected = {"table ip6 podvm", "table netdev podvm", "table inet podvm"} | (
                {"table ip podvm"} if bed.v4 else set()
            )
            assert {t for t in tables if "podvm" in t} == expected
            assert ns_run(bed.pod.ns, "nft", "list", "table", "ip6", "podvm").stdout.count("dnat to") == 2
            assert talk.echo("after") == "after"
        finally:
            again.cleanup()
    finally:
        talk.close()


def test_an_ipv6_pod_needs_ipv6_forwarding_and_net_raw(bed_factory: BedFactory) -> None:
    """prepare turns IPv6 forwarding on and keeps the pod's interface taking RAs (accept_ra 2); run refuses, in one
    line, a pod whose IPv6 forwarding is off or a container without NET_RAW (dnsmasq's RAs need a raw ICMPv6
    socket), and runs with exactly RUN_CAPABILITIES_IPV6."""
    bed = bed_factory.bed("bridge", families="ipv6")
    side = bed_factory.sidecar(bed)
    side.prepare()
    sysctl = {
        key: ns_run(bed.pod.ns, "sysctl", "-n", key).stdout.strip()
        for key in ("net.ipv6.conf.all.forwarding", "net.ipv6.conf.eth0.accept_ra", "net.ipv6.conf.default.accept_ra")
    }
    assert sysctl == {
        "net.ipv6.conf.all.forwarding": "1",
        "net.ipv6.conf.eth0.accept_ra": "2",
        "net.ipv6.conf.default.accept_ra": "0",
    }
    run = [*NETSIDECAR, "run"]
    done = ns_run(bed.pod.ns, *only(sorted(RUN_CAPABILITIES)), *run, env=side._env(), check=False)
    assert done.returncode == 2 and "lacks the capabilities NET_RAW" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    ns_run(bed.pod.ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
    done = ns_run(bed.pod.ns, *only(sorted(RUN_CAPABILITIES_IPV6)), *run, env=side._env(), check=False)
    assert done.returncode == 2 and "net.ipv6.conf.all.forwarding is 0 in the pod" in done.stderr, done.stderr
    ns_run(bed.pod.ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    side.prefix = only(sorted(RUN_CAPABILITIES_IPV6))
    assert side.start().families == ("ipv6",)
