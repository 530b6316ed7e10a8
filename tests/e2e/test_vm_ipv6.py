"""End to end on a dual-stack pod: the real sidecar and the real runner (uid 10001, no capabilities, TCG) boot the
tiny guest, whose kernel does plain SLAAC with EUI-64 identifiers (no DHCPv6 client in busybox); its page answers
on the pod's IPv6 address as on its IPv4 one. One boot for the module.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.handshake import Handshake
from tests.e2e import harness
from tests.e2e.harness import PodNet, Proc
from tests.guest.build import ensure_guest
from tests.netbed import Bed, Sidecar

pytestmark = pytest.mark.guest

IMAGE_PORT = 8641
BOOT_TIMEOUT = 120.0


@dataclass
class Dual:
    """The dual-stack pod, its handshake, the running guest's runner, and the pod seen through each family."""

    handshake: Handshake
    runner: Proc
    sidecar: Sidecar
    via4: PodNet
    via6: PodNet


@pytest.fixture(scope="module")
def dual() -> Iterator[Dual]:
    """A dual-stack Calico-like pod with the sidecar and the booted guest; all removed afterwards."""
    image = ensure_guest()
    base = Path(tempfile.mkdtemp(prefix="podvm-e2e6-"))
    base.chmod(0o755)
    bed = Bed(1 + (os.getpid() * 7 + 150) % 200, families="dual")
    procs: list[Proc] = []
    sidecars: list[Sidecar] = []
    with harness.dismantled(base, bed, procs, sidecars):
        dirs = harness.volumes(base)
        shutil.copyfile(image, dirs["srv"] / "guest.qcow2")
        bed.setup()
        sidecar = Sidecar(bed, {"HOSTNAME": "pet-e2e6", "TAP_OWNER": str(harness.RUNNER_UID)}, dirs["run"])
        sidecars.append(sidecar)
        handshake = sidecar.start(timeout=20)
        procs.append(harness.serve_directory(bed.pod.ns, dirs["srv"], IMAGE_PORT, base / "http.log"))
        env = harness.volumes_env(IMAGE_PORT, dirs, "pet-e2e6")
        via4 = PodNet(bed.pod.ns, bed.client.ns, bed.pod_ip)
        runner = harness.start_runner(
            via4, [str(harness.BIN / "vmrunner"), "run"], env, harness.make_tun_node(base), base / "runner.log"
        )
        procs.append(runner)
        runner.wait_for(harness.READY, BOOT_TIMEOUT)
        yield Dual(handshake, runner, sidecar, via4, PodNet(bed.pod.ns, bed.client.ns, f"[{bed.pod_ip6}]"))


def test_the_guest_serves_its_page_on_the_pods_ipv6_address(dual: Dual) -> None:
    page4 = harness.guest_page(dual.via4)
    page6 = harness.guest_page(dual.via6)  # SLAAC and the RA's default route take a moment after DHCPv4
    assert page6 == page4 and page4["ip"] == dual.handshake.vm_ip, harness.report(dual.runner)
    assert dual.handshake.families == ("ipv4", "ipv6")
