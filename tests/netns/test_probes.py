"""``netsidecar probe`` against a real pod network: bridge, tap, nftables DNAT, dnsmasq and a VM stand-in.

The pod namespace is built here the way the sidecar builds it (a /30 bridge, a tap, one nftables table, dnsmasq
with one static lease); the stand-in is a namespace whose veth with the VM's MAC sits in the bridge. Each probe
runs healthy and broken, and the verdict and exit status are checked.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.handshake import Handshake

pytestmark = pytest.mark.netns

ID = f"prb{os.getpid() % 100000}"
POD_NS, VM_NS = f"{ID}pod", f"{ID}vm"
POD_IP = "10.77.0.5"
VM_IP, GW = "192.168.254.2", "192.168.254.1"
MAC = "52:54:00:7a:00:02"
RULES = f"""
table ip podvmprobe {{}}
delete table ip podvmprobe
table ip podvmprobe {{
  chain pre {{ type nat hook prerouting priority dstnat; iifname "pod0" ip daddr {POD_IP} counter dnat to {VM_IP}; }}
  chain out {{ type nat hook output priority -100; ip daddr {POD_IP} tcp dport != 5900 counter dnat to {VM_IP}; }}
  chain post {{ type nat hook postrouting priority srcnat; ip saddr {VM_IP} oifname "pod0" counter masquerade; }}
}}
"""


def sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, in a namespace when ``ns`` is given."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(full, capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Bed:
    """The pod namespace, the stand-in and the handshake's directory."""

    run_dir: Path
    dnsmasq: subprocess.Popen[bytes] | None
    servers: list[subprocess.Popen[bytes]]

    def start_dnsmasq(self) -> None:
        """Start dnsmasq as the sidecar would: DHCP only, one static lease for the VM's MAC."""
        self.dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", POD_NS, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
             "--user=root", "--interface=br0", "--bind-interfaces", f"--dhcp-leasefile={self.run_dir}/leases",
             f"--dhcp-range={VM_IP},static,255.255.255.252", f"--dhcp-host={MAC},{VM_IP},vm-0",
             "--dhcp-option=option:router," + GW, "--dhcp-option=option:dns-server,10.96.0.10",
             "--dhcp-option=option:domain-search,a.example,example", "--dhcp-option=option:mtu,1500"],
        )  # fmt: skip
        time.sleep(0.3)

    def stop_dnsmasq(self) -> None:
        """Stop dnsmasq and wait for it."""
        if self.dnsmasq is not None:
            self.dnsmasq.send_signal(signal.SIGTERM)
            self.dnsmasq.wait(10)
            self.dnsmasq = None


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    """Build the pod and the stand-in once for the module; remove everything also when a step fails."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{ID}-"))
    state = Bed(run_dir, None, [])
    try:
        sh("ip", "netns", "add", POD_NS)
        sh("ip", "netns", "add", VM_NS)
        for line in [
            "link add pod0 type veth peer name pod0p",
            "link set pod0p up",
            f"addr add {POD_IP}/24 dev pod0",
            "link set pod0 up",
            "link set lo up",
            "link add br0 type bridge",
            f"addr add {GW}/30 dev br0",
            "link set br0 up",
            "tuntap add dev tap0 mode tap",
            "link set tap0 master br0 up",
            f"link add vmb type veth peer name vm0 netns {VM_NS}",
            "link set vmb master br0 up",
        ]:
            sh("ip", "-n", POD_NS, *line.split())
        for line in ["link set lo up", f"link set vm0 address {MAC} up", f"addr add {VM_IP}/30 dev vm0"]:
            sh("ip", "-n", VM_NS, *line.split())
        sh("ip", "-n", VM_NS, "route", "add", "default", "via", GW)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=POD_NS)
        subprocess.run(["ip", "netns", "exec", POD_NS, "nft", "-f", "-"], input=RULES, text=True, check=True)
        for listen in ["TCP-LISTEN:8080,fork,reuseaddr", "UDP-RECVFROM:7777,fork"]:
            state.servers.append(subprocess.Popen(["ip", "netns", "exec", VM_NS, "socat", listen, "SYSTEM:echo hello"]))
        state.start_dnsmasq()
        Handshake(
            tap="tap0", bridge="br0", mac=MAC, vm_ip=VM_IP, gateway=GW, prefix=30, mtu=1500, pod_ip=POD_IP,
            dns=("10.96.0.10",), search=("a.example", "example"), hostname="vm-0", vnc_in_pod=True, tap_owner=None,
        ).write(run_dir)  # fmt: skip
        time.sleep(0.3)
        yield state
    finally:
        state.stop_dnsmasq()
        for server in state.servers:
            server.kill()
            server.wait(10)
        for ns in (VM_NS, POD_NS):
            subprocess.run(f"ip netns pids {ns} | xargs -r kill -9", shell=True, check=False)  # noqa: S602
            sh("ip", "netns", "del", ns, check=False)
        for path in run_dir.iterdir():
            path.unlink()
        run_dir.rmdir()


def probe(bed: Bed, *args: str) -> tuple[int, dict[str, Any]]:
    """Run ``netsidecar probe ARGS --json`` in the pod namespace; its exit status and its JSON."""
    code = "import sys; from netsidecar.probe import command; sys.exit(command(sys.argv[1:]))"
    done = subprocess.run(
        ["ip", "netns", "exec", POD_NS, sys.executable, "-c", code, *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RUN_DIR": str(bed.run_dir)},
        check=False,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def statuses(report: dict[str, Any]) -> dict[str, str]:
    """Each check's status by its name."""
    return {check["check"]: check["status"] for check in report["checks"]}


def test_dhcp_healthy_matches_the_handshake(bed: Bed) -> None:
    code, report = probe(bed, "dhcp")
    assert (code, statuses(report)) == (0, {"offer": "ok"}), report
    offer = report["checks"][0]["data"]
    assert offer["address"] == VM_IP
    assert offer["search"] == ["a.example", "example"]
    assert offer["mtu"] == 1500
    assert offer["hostname"] == "vm-0"
    assert offer["lease"] is not None


def test_dhcp_without_dnsmasq_fails(bed: Bed) -> None:
    bed.stop_dnsmasq()
    try:
        code, report = probe(bed, "dhcp")
    finally:
        bed.start_dnsmasq()
    assert (code, statuses(report)) == (1, {"offer": "fail"})


def test_arp_healthy_and_stand_in_down(bed: Bed) -> None:
    code, report = probe(bed, "arp")
    assert (code, statuses(report)) == (0, {VM_IP: "ok"})
    assert report["checks"][0]["data"]["macs"] == [MAC]
    sh("ip", "-n", VM_NS, "link", "set", "vm0", "down")
    try:
        code, report = probe(bed, "arp")
    finally:
        sh("ip", "-n", VM_NS, "link", "set", "vm0", "up")
    assert (code, statuses(report)) == (1, {VM_IP: "fail"})


@pytest.mark.parametrize(
    ("port", "code", "state"),
    [("8080", 0, "open"), ("8081", 1, "closed"), ("7777/udp", 0, "open"), ("7778/udp", 1, "closed")],
)
def test_port(bed: Bed, port: str, code: int, state: str) -> None:
    got, report = probe(bed, "port", port)
    assert (got, report["checks"][0]["data"]["state"]) == (code, state), report


def test_path_healthy(bed: Bed) -> None:
    code, report = probe(bed, "path")
    assert code == 0, report
    assert statuses(report) == {
        "ip_forward": "ok", "tap": "ok", "nft dnat": "ok", "nft snat": "ok", "conntrack": "info", "dnat path": "ok",
    }  # fmt: skip


def test_path_with_a_rule_missing_fails(bed: Bed) -> None:
    sh("nft", "flush", "chain", "ip", "podvmprobe", "out", ns=POD_NS)
    sh("nft", "flush", "chain", "ip", "podvmprobe", "pre", ns=POD_NS)
    try:
        code, report = probe(bed, "path")
    finally:
        subprocess.run(["ip", "netns", "exec", POD_NS, "nft", "-f", "-"], input=RULES, text=True, check=True)
    assert code == 1
    assert statuses(report)["nft dnat"] == "fail"
    assert statuses(report)["dnat path"] == "fail"


def test_path_with_forwarding_off_fails(bed: Bed) -> None:
    sh("sysctl", "-qw", "net.ipv4.ip_forward=0", ns=POD_NS)
    try:
        code, report = probe(bed, "path")
    finally:
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=POD_NS)
    assert (code, statuses(report)["ip_forward"]) == (1, "fail")


def test_all_in_one_table(bed: Bed) -> None:
    code, report = probe(bed, "all")
    assert code == 0, report
    assert {check["probe"] for check in report["checks"]} == {"dhcp", "arp", "path"}


def test_unknown_major_version_is_refused(bed: Bed) -> None:
    path = bed.run_dir / "network.json"
    good = path.read_text()
    path.write_text(json.dumps({**json.loads(good), "version": "2.0"}))
    try:
        code, report = probe(bed, "arp")
    finally:
        path.write_text(good)
    assert code == 1
    assert report["checks"][0]["probe"] == "handshake"
    assert "version 2.0 is not supported" in report["checks"][0]["detail"]
