"""End to end on a dual-stack pod: the real sidecar and the real runner (uid 10001, no capabilities, TCG) boot the
tiny guest, whose kernel does plain SLAAC with EUI-64 identifiers (no DHCPv6 client in busybox); its page answers
on the pod's IPv6 address as on its IPv4 one. One boot for the module.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shared.handshake import Handshake
from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.netbed import Sidecar
from tests.harness.pod import PodNet, Proc
from tests.harness.scenario import pod_scenario

pytestmark = pytest.mark.guest


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
    metrics = {"METRICS_PORT": str(harness.METRICS_PORT)}
    with pod_scenario(
        "e2e-ipv6", hostname="pet-e2e6", image=ensure_guest(), families="dual", sidecar_env=metrics
    ) as pod:
        runner = pod.boot("runner.log", pod.env(**metrics))
        via6 = PodNet(pod.bed.pod.ns, pod.bed.client.ns, f"[{pod.bed.pod_ip6}]")
        yield Dual(pod.handshake, runner, pod.sidecar, pod.net, via6)


def test_the_guest_serves_its_page_on_the_pods_ipv6_address(dual: Dual) -> None:
    page4 = harness.guest_page(dual.via4)
    page6 = harness.guest_page(dual.via6)  # SLAAC and the RA's default route take a moment after DHCPv4
    assert page6 == page4 and page4["ip"] == dual.handshake.vm_ip, harness.report(dual.runner)
    assert dual.handshake.families == ("ipv4", "ipv6")


def test_the_metrics_are_scraped_on_the_pods_ipv6_address_as_on_its_ipv4_one(dual: Dual) -> None:
    """The endpoint stays in the pod on both families: Prometheus on an IPv6-only cluster scrapes the pod's IPv6."""
    for via in (dual.via4, dual.via6):
        assert harness.scrape(via).value("podvm_vm_state", state="running") == 1, harness.report(dual.runner)
