"""The real sidecar in a pod namespace, checked from an outside client, a VM stand-in and the kernel's own view."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared.shutdown import network_hold
from tests.harness.netbed import BedFactory, Conversation, Sidecar, ns_popen, ns_run, tcp_request, udp_request

pytestmark = pytest.mark.netns

RESOLV = """\
# kubelet
nameserver 10.96.0.10
nameserver fd00::a
nameserver 10.96.0.11
nameserver 10.96.0.12
search ns.svc.cluster.local svc.cluster.local cluster.local corp.example a.example b.example c.example
options ndots:5
"""


def reply_server(ns: str, port: int) -> "subprocess.Popen[bytes]":
    """A TCP server in ``ns`` answering the peer's address (the namespace's cleanup kills it)."""
    code = textwrap.dedent(f"""\
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", {port})); s.listen()
        while True:
            c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()
        """)
    proc = ns_popen(ns, [sys.executable, "-c", code])
    time.sleep(0.3)
    return proc


def kernel_view(pod_ns: str) -> dict[str, object]:
    """What the kernel holds in the pod namespace: our links, our table, dnsmasq processes."""
    links = json.loads(ns_run(pod_ns, "ip", "-j", "link", "show").stdout)
    tables = ns_run(pod_ns, "nft", "list", "tables").stdout.split("\n")
    pids = ns_run(None, "ip", "netns", "pids", pod_ns).stdout.split()
    dnsmasq = [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "dnsmasq"]
    return {
        "links": {link["ifname"]: link["ifindex"] for link in links if link["ifname"].startswith("podvm")},
        "tables": [t for t in tables if "podvm" in t],
        "dnsmasq": dnsmasq,
    }


def test_calico_pod_traffic_and_dhcp(bed_factory: BedFactory) -> None:
    bed = bed_factory.bed("calico")
    side = bed_factory.sidecar(bed)
    side.write_resolv(RESOLV)
    hs = side.start()
    assert (hs.pod_ip, hs.mtu, hs.vnc_in_pod, hs.tap_owner) == (bed.pod_ip, 1440, True, 10001)
    assert ns_run(bed.pod.ns, "cat", "/sys/class/net/podvm-tap0/owner").stdout.strip() == "10001"
    mtus = {link["ifname"]: link["mtu"] for link in json.loads(ns_run(bed.pod.ns, "ip", "-j", "link").stdout)}
    assert mtus["podvm0"] == mtus["podvm-tap0"] == 1440
    assert ns_run(bed.pod.ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    vm = bed_factory.vm(bed, hs.mac)
    got = vm.dhcp()
    assert (got["ip"], got["router"], got["mtu"], got["hostname"]) == (
        "192.168.254.2",
        "192.168.254.1",
        "1440",
        hs.hostname,
    )
    assert got["dns"].split() == ["10.96.0.10", "10.96.0.11", "10.96.0.12"]
    assert got["search"].split() == list(hs.search) and len(hs.search) == 7
    vm.serve_tcp(8080, "vm")
    vm.serve_tcp(5900, "vm-vnc")
    vm.serve_tcp(6080, "vm")
    vm.serve_udp(5353, "vm")
    assert tcp_request(bed.client.ns, bed.pod_ip, 8080) == f"vm {bed.client_ip}"
    assert tcp_request(bed.client.ns, bed.pod_ip, 6080) == f"vm {bed.client_ip}", "no CONSOLE_POD_PORT: the VM's"
    assert udp_request(bed.client.ns, bed.pod_ip, 5353) == f"vm {bed.client_ip}"
    assert tcp_request(bed.client.ns, bed.pod_ip, 5900) == "", "5900 must stay in the pod"
    assert tcp_request(bed.pod.ns, bed.pod_ip, 8080).startswith("vm "), "in-pod connections reach the VM"
    assert tcp_request(bed.pod.ns, bed.pod_ip, 5900) == ""
    ping = ("busybox", "ping", "-c1", "-W2", bed.pod_ip)
    assert ns_run(bed.client.ns, *ping, check=False).returncode == 0
    ns_run(vm.ns, "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1")
    assert ns_run(bed.client.ns, *ping, check=False).returncode != 0, "the echo reply came from the stand-in"
    reply_server(bed.client.ns, 7000)
    assert tcp_request(vm.ns, bed.client_ip, 7000) == bed.pod_ip, "the VM's own connections leave as the pod IP"
    status = json.loads(side.cli("status").stdout)
    assert status["dnsmasq_pid"] and status["handshake"] and len(status["leases"]) == 1
    assert sum(e["counter"]["packets"] for r in status["rules"] for e in r["expr"] if "counter" in e) > 0
    for line in (
        "pod interface eth0",
        "rules: 28 in tables ip/ip6/netdev/inet podvm",
        "dnsmasq started",
        "network ready",
    ):
        assert line in side.log()


def test_bridge_pod_with_no_vnc_and_the_console_on_the_pod_ip(bed_factory: BedFactory) -> None:
    bed = bed_factory.bed("bridge")
    env = {"NO_VNC": "1", "TAP_OWNER": "root", "CONSOLE_POD_PORT": "6080"}
    hs = bed_factory.sidecar(bed, env).start()
    assert not hs.vnc_in_pod and hs.tap_owner is None and hs.console_port == 6080
    vm = bed_factory.vm(bed, hs.mac)
    vm.dhcp()
    vm.serve_tcp(5900, "vnc")
    vm.serve_tcp(6080, "vm")
    assert tcp_request(bed.client.ns, bed.pod_ip, 5900) == f"vnc {bed.client_ip}"
    reply_server(bed.pod.ns, 6080)  # stands in for the runner's console, listening in the pod
    assert tcp_request(bed.client.ns, bed.pod_ip, 6080) == bed.client_ip, "CONSOLE_POD_PORT stays in the pod"


def test_restart_after_kill_keeps_links_and_flows_then_sigterm_cleans(bed_factory: BedFactory) -> None:
    bed = bed_factory.bed("calico")
    side = bed_factory.sidecar(bed)
    hs = side.start()
    vm = bed_factory.vm(bed, hs.mac)
    vm.dhcp()
    talk = Conversation(bed.client.ns, vm, bed.pod_ip)
    try:
        assert talk.echo("before") == "before"
        before = kernel_view(bed.pod.ns)
        assert len(before["dnsmasq"]) == 1 and len(before["tables"]) == 3  # type: ignore[arg-type]
        side.kill()
        time.sleep(0.3)
        assert talk.echo("while down") == "while down", "the kernel keeps forwarding without the sidecar"
        again = Sidecar(bed, side.env, side.run_dir)
        bed_factory.made.append(again)
        hs2 = again.start()
        after = kernel_view(bed.pod.ns)
        assert hs2 == hs and after["links"] == before["links"], "same MAC, same bridge and tap"
        assert len(after["tables"]) == 3 and len(after["dnsmasq"]) == 1  # type: ignore[arg-type]
        assert after["dnsmasq"] != before["dnsmasq"], "the stale dnsmasq was replaced"
        rules = ns_run(bed.pod.ns, "nft", "-a", "list", "table", "ip", "podvm").stdout
        assert rules.count("dnat to") == 2
        assert talk.echo("after") == "after"
    finally:
        talk.close()
    vm.cleanup()  # the tap has no carrier (no VM on it), so SIGTERM tears down at once
    assert again.term() == 0
    gone = kernel_view(bed.pod.ns)
    assert gone == {"links": {}, "tables": [], "dnsmasq": []}
    assert not (side.run_dir / "network.json").exists()


HOLD_TAP = """\
import fcntl, os, struct, time
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"podvm-tap0", 0x0002 | 0x1000))
print("attached", flush=True)
time.sleep(600)
"""


def test_tap_held_by_a_vm_survives_restart_and_delays_teardown(bed_factory: BedFactory) -> None:
    bed = bed_factory.bed("calico")
    side = bed_factory.sidecar(bed, {"SHUTDOWN_TIMEOUT": "1s"})
    side.start()
    holder = ns_popen(bed.pod.ns, [sys.executable, "-c", HOLD_TAP], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"attached"
        before = kernel_view(bed.pod.ns)["links"]
        side.kill()
        side.start()
        assert kernel_view(bed.pod.ns)["links"] == before, "a tap held open is kept, not recreated"
        assert "tap podvm-tap0 kept" in side.log()
        begin = time.monotonic()
        assert side.term() == 0
        waited = time.monotonic() - begin
        hold = network_hold(1.0)  # SHUTDOWN_TIMEOUT and the runner's hard stop: the guest keeps its network
        assert hold - 0.2 <= waited < hold + 4, f"teardown after {waited:.1f}s: must hold {hold}s while the tap is held"
    finally:
        holder.kill()
        holder.wait()
    assert kernel_view(bed.pod.ns)["tables"] == []
