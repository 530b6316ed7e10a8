"""``netsidecar probe`` against the real sidecar in the namespace test bed, with a VM stand-in on its bridge.

Each probe runs healthy and broken (dnsmasq stopped, stand-in down, a rule missing, forwarding off, port closed,
an unknown handshake major version), and the verdict and exit status are checked. The bed is built once for the
module: the sidecar's start and scapy's import are the slow parts.
"""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.handshake import Handshake
from tests.harness.netbed import Bed, Sidecar, VmStandIn, ns_run, tcp_request

pytestmark = pytest.mark.netns

MAC = "52:54:00:7a:00:02"


@dataclass
class Probed:
    """The bed, the real sidecar, the stand-in and the handshake the sidecar published."""

    bed: Bed
    sidecar: Sidecar
    vm: VmStandIn
    handshake: Handshake

    def dnsmasq_pid(self) -> int:
        """The sidecar's dnsmasq, found in the pod namespace."""
        pids = ns_run(None, "ip", "netns", "pids", self.bed.pod.ns).stdout.split()
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmdline and cmdline[0].endswith(b"dnsmasq"):
                return int(pid)
        raise AssertionError("no dnsmasq in the pod namespace")


@pytest.fixture(scope="module")
def bed() -> Iterator[Probed]:
    """The real sidecar in a Calico-like pod, and a stand-in that took its lease and runs small servers."""
    made = Bed(1 + (os.getpid() * 11) % 200)
    sidecar = Sidecar(made, {"VM_MAC": MAC})
    vm = VmStandIn(made, MAC)
    try:
        made.setup()
        handshake = sidecar.start(timeout=20)
        vm.setup()
        vm.dhcp()
        vm.serve_tcp(8080, "hello")
        vm.serve_udp(7777, "hello")
        yield Probed(made, sidecar, vm, handshake)
    finally:
        vm.cleanup()
        sidecar.cleanup()
        made.cleanup()


def probe(bed: Probed, *args: str) -> tuple[int, dict[str, Any]]:
    """Run ``netsidecar probe ARGS --json`` in the pod namespace; its exit status and its JSON."""
    code = "import sys; from netsidecar.probe import command; sys.exit(command(sys.argv[1:]))"
    done = subprocess.run(
        ["ip", "netns", "exec", bed.bed.pod.ns, sys.executable, "-c", code, *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RUN_DIR": str(bed.sidecar.run_dir), "NET_STATE_DIR": str(bed.sidecar.state_dir)},
        check=False,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def statuses(report: dict[str, Any]) -> dict[str, str]:
    """Each check's status by its name."""
    return {check["check"]: check["status"] for check in report["checks"]}


def test_dhcp_healthy_matches_the_handshake(bed: Probed) -> None:
    code, report = probe(bed, "dhcp")
    assert (code, statuses(report)) == (0, {"offer": "ok"}), report
    offer, hs = report["checks"][0]["data"], bed.handshake
    assert (offer["address"], offer["router"], offer["dns"]) == (hs.vm_ip, hs.gateway, list(hs.dns))
    assert (offer["search"], offer["mtu"], offer["hostname"]) == (list(hs.search), hs.mtu, hs.hostname)
    assert offer["lease"] is not None


def test_dhcp_with_dnsmasq_stopped_fails(bed: Probed) -> None:
    pid = bed.dnsmasq_pid()
    os.kill(pid, signal.SIGSTOP)  # stopped, not killed: the sidecar would restart a dead one at once
    try:
        code, report = probe(bed, "dhcp")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (code, statuses(report)) == (1, {"offer": "fail"})


def test_arp_healthy_and_stand_in_down(bed: Probed) -> None:
    vm_ip = bed.handshake.vm_ip
    code, report = probe(bed, "arp")
    assert (code, statuses(report)) == (0, {vm_ip: "ok"})
    assert report["checks"][0]["data"]["macs"] == [MAC]
    ns_run(bed.vm.ns, "ip", "link", "set", "eth0", "down")
    try:
        code, report = probe(bed, "arp")
    finally:
        ns_run(bed.vm.ns, "ip", "link", "set", "eth0", "up")
        ns_run(bed.vm.ns, "ip", "route", "replace", "default", "via", str(bed.handshake.gateway))
    assert (code, statuses(report)) == (1, {vm_ip: "fail"})


@pytest.mark.parametrize(
    ("port", "code", "state"),
    [("8080", 0, "open"), ("8081", 1, "closed"), ("7777/udp", 0, "open"), ("7778/udp", 1, "closed")],
)
def test_port(bed: Probed, port: str, code: int, state: str) -> None:
    got, report = probe(bed, "port", port)
    assert (got, report["checks"][0]["data"]["state"]) == (code, state), report


def test_path_healthy(bed: Probed) -> None:
    code, report = probe(bed, "path")
    assert code == 0, report
    assert statuses(report) == {
        "ip_forward": "ok", "tap": "ok", "nft dnat": "ok", "nft snat": "ok", "isolation": "ok", "conntrack": "info",
        "dnat path": "ok",
    }  # fmt: skip


def test_path_with_a_rule_missing_fails(bed: Probed) -> None:
    pod = bed.bed.pod.ns
    saved = ns_run(pod, "nft", "list", "table", "ip", "podvm").stdout
    ns_run(pod, "nft", "flush", "chain", "ip", "podvm", "prerouting")
    ns_run(pod, "nft", "flush", "chain", "ip", "podvm", "output")
    try:
        code, report = probe(bed, "path")
    finally:
        restore = f"delete table ip podvm\n{saved}"
        subprocess.run(["ip", "netns", "exec", pod, "nft", "-f", "-"], input=restore, text=True, check=True)
    assert code == 1
    assert statuses(report)["nft dnat"] == "fail"
    assert statuses(report)["dnat path"] == "fail"


def test_path_with_an_isolation_table_missing_fails(bed: Probed) -> None:
    pod = bed.bed.pod.ns
    saved = ns_run(pod, "nft", "list", "table", "inet", "podvm").stdout
    ns_run(pod, "nft", "delete", "table", "inet", "podvm")
    try:
        code, report = probe(bed, "path")
    finally:
        subprocess.run(["ip", "netns", "exec", pod, "nft", "-f", "-"], input=saved, text=True, check=True)
    isolation = next(check for check in report["checks"] if check["check"] == "isolation")
    assert (code, isolation["status"]) == (1, "fail"), report
    assert "guest to pod: local services" in isolation["data"]["missing"]
    assert statuses(report)["dnat path"] == "ok", "the NAT itself still works"


def test_path_with_forwarding_off_fails(bed: Probed) -> None:
    ns_run(bed.bed.pod.ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    try:
        code, report = probe(bed, "path")
    finally:
        ns_run(bed.bed.pod.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert (code, statuses(report)["ip_forward"]) == (1, "fail")


def test_all_in_one_table(bed: Probed) -> None:
    # a connection through the DNAT just before, so conntrack holds one of the VM's (TCP CLOSE lasts 10 s)
    assert tcp_request(bed.bed.client.ns, bed.bed.pod_ip, 8080).startswith("hello")
    code, report = probe(bed, "all")
    assert code == 0, report
    assert {check["probe"] for check in report["checks"]} == {"dhcp", "arp", "path"}
    conntrack = next(check for check in report["checks"] if check["check"] == "conntrack")
    assert conntrack["data"]["count"] >= 1, conntrack


def test_unknown_major_version_is_refused(bed: Probed) -> None:
    path = bed.sidecar.run_dir / "network.json"
    good = path.read_text()
    path.write_text(json.dumps({**json.loads(good), "version": "2.0"}))
    try:
        code, report = probe(bed, "arp")
    finally:
        path.write_text(good)
    assert code == 1
    assert report["checks"][0]["probe"] == "handshake"
    assert "version 2.0 is not supported" in report["checks"][0]["detail"]


FORGED_TARGET = "192.0.2.77"  # TEST-NET-1: nothing in the bed sends there but a probe obeying a forged handshake
WITNESS = "podvm-witness"


def _witness(bed: Probed) -> dict[str, int]:
    """Frames towards FORGED_TARGET (ARP for it, IPv4 to it) that reached the node from the pod's eth0, counted
    at the node end's ingress: every frame the pod puts on eth0 arrives there."""
    listed = json.loads(ns_run(bed.bed.node.ns, "nft", "-j", "list", "table", "netdev", WITNESS).stdout)
    return {
        item["rule"]["comment"]: next(e["counter"]["packets"] for e in item["rule"]["expr"] if "counter" in e)
        for item in listed["nftables"]
        if "rule" in item
    }


@pytest.fixture
def witness(bed: Probed) -> Iterator[None]:
    """The witness table on the node end of the pod's eth0, removed again."""
    node, device = bed.bed.node.ns, f"pv{bed.bed.ident}pod"
    script = f"""
        table netdev {WITNESS} {{
            chain seen {{
                type filter hook ingress device "{device}" priority 0; policy accept;
                arp operation request arp daddr ip {FORGED_TARGET} counter comment "arp"
                ip daddr {FORGED_TARGET} counter comment "ip"
            }}
        }}
    """
    subprocess.run(["ip", "netns", "exec", node, "nft", "-f", "-"], input=script, text=True, check=True)
    try:
        yield
    finally:
        ns_run(node, "nft", "delete", "table", "netdev", WITNESS, check=False)


def _send_on_eth0(bed: Probed) -> None:
    """The control: one ARP request for FORGED_TARGET and one SYN to it, put on the pod's eth0 as a probe would."""
    code = (
        "from scapy.all import ARP, IP, TCP, Ether, get_if_hwaddr, sendp\n"
        "mac = get_if_hwaddr('eth0')\n"
        f"sendp(Ether(src=mac, dst='ff:ff:ff:ff:ff:ff') / ARP(op=1, hwsrc=mac, pdst='{FORGED_TARGET}'),"
        " iface='eth0', verbose=0)\n"
        f"sendp(Ether(src=mac) / IP(dst='{FORGED_TARGET}') / TCP(dport=22, flags='S'), iface='eth0', verbose=0)\n"
    )
    ns_run(bed.bed.pod.ns, sys.executable, "-c", code)


def test_the_sidecar_keeps_its_own_record_of_what_it_made(bed: Probed) -> None:
    made = bed.sidecar.state_dir / "made.json"
    assert oct(made.stat().st_mode & 0o777) == "0o600" and made.stat().st_uid == 0
    assert json.loads(made.read_text()) == {
        "bridge": "podvm0",
        "tap": "podvm-tap0",
        "tap_owner": bed.handshake.tap_owner,
        "mac": MAC,
        "vm_ip": bed.handshake.vm_ip,
        "gateway": bed.handshake.gateway,
        "pod_ip": bed.bed.pod_ip,
        "vm_ip6": None,
        "gateway6": None,
        "pod_ip6": None,
    }


@pytest.mark.usefixtures("witness")
@pytest.mark.parametrize("args", [("arp",), ("port", "22"), ("all",)])
def test_a_forged_handshake_naming_eth0_fails_and_sends_no_frame(bed: Probed, args: tuple[str, ...]) -> None:
    """The runner can rewrite network.json: pointed at the pod's eth0 and an address of its choice, the probe
    (root, NET_RAW) refuses it as one failed check and puts nothing on eth0. The control shows the witness counts
    exactly such frames."""
    path = bed.sidecar.run_dir / "network.json"
    good = path.read_text()
    before = _witness(bed)
    _send_on_eth0(bed)
    control = _witness(bed)
    assert control == {"arp": before["arp"] + 1, "ip": before["ip"] + 1}, "the witness sees frames put on eth0"
    forged = {**json.loads(good), "bridge": "eth0", "vm_ip": FORGED_TARGET}
    path.write_text(json.dumps(forged))
    try:
        code, report = probe(bed, *args)
    finally:
        path.write_text(good)
    assert _witness(bed) == control, "no frame left through eth0"
    assert code == 1, report
    assert [(c["probe"], c["check"], c["status"]) for c in report["checks"]] == [("handshake", "trusted", "fail")]
    mismatches = report["checks"][0]["data"]["mismatches"]
    assert mismatches == [
        "bridge 'eth0' is not the sidecar's 'podvm0'",
        f"vm_ip '{FORGED_TARGET}' is not the sidecar's '{bed.handshake.vm_ip}'",
    ]
    code, report = probe(bed, "arp")
    assert code == 0, "the handshake restored is trusted again"
