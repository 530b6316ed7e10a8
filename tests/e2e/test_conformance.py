"""The runner contract, checked the same way for every runner: ``vmrunner`` and ``runners/qemu-runner.sh``.

A pod namespace holds what the sidecar publishes (a /30 bridge, a persistent tap, one nftables table mapping the
pod IP to the VM except TCP 5900, dnsmasq with one static lease, and the handshake); a client namespace reaches it
through the pod IP. Each runner boots the tiny guest under TCG on the tap and must: give the guest the lease
(so the MAC is right), answer HTTP on the pod IP, serve VNC on 5900, put the serial console in its log, power the
guest off through ACPI on SIGTERM, reuse the pet disk on the next start, and refuse a handshake of major version 2.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.handshake import Handshake
from tests.guest.build import ensure_guest

pytestmark = [pytest.mark.netns, pytest.mark.guest]

ROOT = Path(__file__).resolve().parents[2]
ID = f"cf{os.getpid() % 100000}"
POD_NS, CLIENT_NS = f"{ID}pod", f"{ID}cli"
POD_IP, CLIENT_IP = "10.78.0.5", "10.78.0.9"
VM_IP, GW = "192.168.254.2", "192.168.254.1"
MAC = "52:54:00:7a:00:03"
RUNNERS = {
    "vmrunner": [str(ROOT / ".venv" / "bin" / "vmrunner"), "run"],
    "qemu-runner.sh": ["sh", str(ROOT / "runners" / "qemu-runner.sh")],
}
RULES = f"""
table ip podvmconf {{}}
delete table ip podvmconf
table ip podvmconf {{
  chain pre {{ type nat hook prerouting priority dstnat; iifname "pod0" ip daddr {POD_IP} tcp dport 5900 return;
    iifname "pod0" ip daddr {POD_IP} counter dnat to {VM_IP}; }}
  chain post {{ type nat hook postrouting priority srcnat; ip saddr {VM_IP} oifname "pod0" counter masquerade; }}
}}
"""


def ip(*args: str) -> None:
    """``ip ARGS``, failing loudly."""
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Pod:
    """The pod's network as the sidecar leaves it, and the directories a runner uses."""

    root: Path
    image: Path

    @property
    def run_dir(self) -> Path:
        """RUN_DIR, shared with the sidecar."""
        return self.root / "run"


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    """Build the pod and the client namespaces once; remove them and every process in them afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"{ID}-"))
    dnsmasq: subprocess.Popen[bytes] | None = None
    try:
        image = ensure_guest()
        for name in ("run", "image", "vm"):
            (root / name).mkdir()
        ip("netns", "add", POD_NS)
        ip("netns", "add", CLIENT_NS)
        for line in [
            f"link add pod0 type veth peer name client0 netns {CLIENT_NS}",
            f"addr add {POD_IP}/24 dev pod0",
            "link set pod0 up",
            "link set lo up",
            "link add br0 type bridge",
            f"addr add {GW}/30 dev br0",
            "link set br0 up",
            "tuntap add dev tap0 mode tap",
            "link set tap0 master br0 up",
        ]:
            ip("-n", POD_NS, *line.split())
        for line in ["link set lo up", f"addr add {CLIENT_IP}/24 dev client0", "link set client0 up"]:
            ip("-n", CLIENT_NS, *line.split())
        subprocess.run(["ip", "netns", "exec", POD_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        subprocess.run(["ip", "netns", "exec", POD_NS, "nft", "-f", "-"], input=RULES, text=True, check=True)
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", POD_NS, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
             "--user=root", "--interface=br0", "--bind-interfaces", f"--dhcp-leasefile={root}/leases",
             f"--dhcp-range={VM_IP},static,255.255.255.252", f"--dhcp-host={MAC},{VM_IP},vm-0",
             "--dhcp-option=option:router," + GW, "--dhcp-option=option:dns-server,10.96.0.10",
             "--dhcp-option=option:mtu,1500"],
        )  # fmt: skip
        Handshake(
            tap="tap0", bridge="br0", mac=MAC, vm_ip=VM_IP, gateway=GW, prefix=30, mtu=1500, pod_ip=POD_IP,
            dns=("10.96.0.10",), search=(), hostname="vm-0", vnc_in_pod=True, tap_owner=None,
        ).write(root / "run")  # fmt: skip
        yield Pod(root, image)
    finally:
        if dnsmasq is not None:
            dnsmasq.terminate()
            dnsmasq.wait(10)
        for ns in (CLIENT_NS, POD_NS):
            subprocess.run(f"ip netns pids {ns} 2>/dev/null | xargs -r kill -9", shell=True, check=False)  # noqa: S602
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


class Runner:
    """One runner process in the pod namespace, its output in a log file."""

    def __init__(self, pod: Pod, name: str, log: Path) -> None:
        env = {
            **os.environ,
            "RUN_DIR": str(pod.run_dir),
            "IMAGE_DIR": str(pod.root / "image"),
            "VM_DIR": str(pod.root / "vm" / name),
            "IMG_SOURCE": str(pod.image),
            "ACCEL": "tcg",
            "HOSTNAME": "vm-0",
            "VM_MEMORY": "256M",
            "SHUTDOWN_TIMEOUT": "30",
            "HANDSHAKE_TIMEOUT": "5",
            "METADATA": str(pod.root / "absent-metadata"),
            "USERDATA": str(pod.root / "absent-userdata"),
        }
        (pod.root / "vm" / name).mkdir(exist_ok=True)
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", POD_NS, *RUNNERS[name]], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def text(self) -> str:
        """Everything the runner (and the guest's serial console) wrote so far."""
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as Kubernetes sends it, and the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def kill(self) -> None:
        """Hard cleanup after a failed test: the runner and its qemu."""
        if self.process.poll() is None:
            subprocess.run(f"ip netns pids {POD_NS} | xargs -r kill -9", shell=True, check=False)  # noqa: S602
            self.process.wait(10)


def guest_page(runner: Runner, timeout: float = 90.0) -> str:
    """The guest's HTTP page, fetched from the client namespace through the pod IP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert runner.process.poll() is None, f"runner exited {runner.process.returncode}:\n{runner.text()[-3000:]}"
        done = subprocess.run(
            ["ip", "netns", "exec", CLIENT_NS, "curl", "-sf", "--max-time", "2", f"http://{POD_IP}/"],
            capture_output=True,
            text=True,
            check=False,
        )
        if "counter=" in done.stdout:
            return done.stdout
        time.sleep(1)
    raise AssertionError(f"no HTTP answer from the guest on {POD_IP}:\n{runner.text()[-3000:]}")


def vnc_banner() -> bytes:
    """The first bytes a VNC server sends, read from the client namespace at pod IP:5900."""
    code = f"import socket,sys; s=socket.create_connection(('{POD_IP}',5900),5); sys.stdout.buffer.write(s.recv(12))"
    done = subprocess.run(
        ["ip", "netns", "exec", CLIENT_NS, "python3", "-c", code], capture_output=True, timeout=30, check=False
    )
    return done.stdout


def field(page: str, name: str) -> str:
    """One ``name=value`` line of the guest's page."""
    return next(line.split("=", 1)[1] for line in page.splitlines() if line.startswith(f"{name}="))


@pytest.mark.parametrize("name", list(RUNNERS))
def test_runner_honours_the_contract(pod: Pod, name: str, tmp_path: Path) -> None:
    first = Runner(pod, name, tmp_path / "first.log")
    try:
        page = guest_page(first)
        assert field(page, "ip") == VM_IP, page
        assert field(page, "gateway") == GW
        assert field(page, "mtu") == "1500"
        counter = int(field(page, "counter"))
        assert vnc_banner().startswith(b"RFB "), "no VNC server on pod IP:5900"
        assert "podvm-guest: booted" in first.text(), "the serial console is not in the runner's log"
        assert first.stop() == 0, first.text()[-3000:]
        assert "podvm-guest: ACPI power button" in first.text(), "the guest was not powered off through ACPI"
    finally:
        first.kill()
    second = Runner(pod, name, tmp_path / "second.log")
    try:
        assert int(field(guest_page(second), "counter")) == counter + 1, "the pet disk was not reused"
        assert second.stop() == 0
    finally:
        second.kill()


@pytest.mark.parametrize("name", list(RUNNERS))
def test_runner_refuses_an_unknown_major_version(pod: Pod, name: str, tmp_path: Path) -> None:
    handshake = pod.run_dir / "network.json"
    good = handshake.read_text()
    handshake.write_text(json.dumps({**json.loads(good), "version": "2.0"}))
    try:
        runner = Runner(pod, name, tmp_path / "runner.log")
        try:
            assert runner.process.wait(60) == 4
        finally:
            runner.kill()
    finally:
        handshake.write_text(good)
    assert "version 2.0 is not supported" in runner.text()
    assert not socket_in_use()


def socket_in_use() -> bool:
    """Whether anything listens on the pod's VNC port (a refused runner must not have started qemu)."""
    done = subprocess.run(
        ["ip", "netns", "exec", POD_NS, "ss", "-Hltn", "sport = :5900"], check=False, capture_output=True, text=True
    )
    return bool(done.stdout.strip())
