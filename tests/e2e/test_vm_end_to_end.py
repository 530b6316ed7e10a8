"""End to end: the real sidecar and the real runner (uid 10001, no capabilities, TCG) boot the tiny guest in a pod.

The guest is booted twice in the whole module: the first boot answers the network and VNC checks and is stopped
with SIGTERM (ACPI); the second start must find the same pet disk (the guest's counter grew).
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

HOSTNAME = "pet-e2e"
METADATA_HOSTNAME = "guest-from-metadata"
DNS = ["10.96.0.10", "10.96.0.11"]
SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]
IMAGE_PORT = 8639
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 40.0


@dataclass
class Boot:
    """One start of the runner: the guest's page, the VNC banner, the exit status and the log after SIGTERM."""

    runner: Proc
    identities: list[tuple[int, int]]
    page: dict[str, str]
    vnc: str
    exit_status: int
    log_after_sigterm: str


@dataclass
class World:
    """The pod with the real sidecar, its handshake, and the two boots of the guest."""

    pod: PodNet
    handshake: Handshake
    first: Boot
    second: Boot
    sidecar: Sidecar

    def logs(self) -> str:
        """The runners' logs (with the guest's console) and the sidecar's, for a failure's message."""
        return f"{harness.report(self.first.runner, self.second.runner)}\n----- sidecar -----\n{self.sidecar.log()}"


def _dirs(base: Path) -> dict[str, Path]:
    """The runner's volumes, with the ConfigMap's metadata and user data."""
    dirs = harness.volumes(base)
    (dirs["config"] / "metadata").write_text(f"hostname: {METADATA_HOSTNAME}\nmeta:\n  role: e2e\n")
    (dirs["config"] / "userdata").write_text("#cloud-config\nruncmd: [echo hello]\n")
    return dirs


def _boot(pod: PodNet, env: dict[str, str], tun: Path, log: Path, procs: list[Proc]) -> Boot:
    """Start the runner, wait for the guest, look at it from the client, then stop it with SIGTERM."""
    runner = harness.start_runner(pod, [str(harness.BIN / "vmrunner"), "run"], env, tun, log)
    procs.append(runner)
    runner.wait_for(harness.READY, BOOT_TIMEOUT)
    pids = [runner.popen.pid, *harness.children(runner.popen.pid)]
    identities = [harness.identity(pid) for pid in pids]
    page = harness.guest_page(pod)
    vnc = harness.vnc_banner(pod)
    offset = len(runner.text())
    status = harness.graceful_stop(runner, STOP_TIMEOUT)
    return Boot(runner, identities, page, vnc, status, runner.text()[offset:])


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """Build the pod, start the sidecar, boot the guest twice; everything is removed afterwards, also on failure."""
    image = ensure_guest()
    base = Path(tempfile.mkdtemp(prefix="podvm-e2e-"))
    base.chmod(0o755)
    bed = Bed(1 + (os.getpid() * 7 + 100) % 200)
    procs: list[Proc] = []
    sidecars: list[Sidecar] = []
    with harness.dismantled(base, bed, procs, sidecars):
        dirs = _dirs(base)
        shutil.copyfile(image, dirs["srv"] / "guest.qcow2")
        bed.setup()
        pod = PodNet(bed.pod.ns, bed.client.ns, bed.pod_ip)
        sidecar = Sidecar(bed, {"HOSTNAME": HOSTNAME, "TAP_OWNER": str(harness.RUNNER_UID)}, dirs["run"])
        sidecars.append(sidecar)
        sidecar.write_resolv(f"nameserver {DNS[0]}\nnameserver {DNS[1]}\nsearch {' '.join(SEARCH)}\n")
        handshake = sidecar.start(timeout=20)
        procs.append(harness.serve_directory(pod.pod_ns, dirs["srv"], IMAGE_PORT, base / "http.log"))
        env = harness.volumes_env(IMAGE_PORT, dirs, HOSTNAME, SHUTDOWN_TIMEOUT="30s")
        tun = harness.make_tun_node(base)
        first = _boot(pod, env, tun, base / "runner1.log", procs)
        second = _boot(pod, env, tun, base / "runner2.log", procs)
        yield World(pod, handshake, first, second, sidecar)


def test_the_runner_and_qemu_run_as_uid_10001_without_capabilities(world: World) -> None:
    assert len(world.first.identities) == 2, world.logs()
    assert world.first.identities == [(harness.RUNNER_UID, 0)] * 2


def test_http_to_the_pod_ip_reaches_the_guest_with_its_metadata(world: World) -> None:
    page = world.first.page
    assert page["hostname"] == METADATA_HOSTNAME, world.logs()
    assert page["ip"] == world.handshake.vm_ip
    assert page["user_data"] == "present"
    assert page["uuid"]


def test_the_guest_got_the_pods_dns_settings_and_mtu(world: World) -> None:
    page = world.first.page
    assert page["dns"].split() == DNS
    assert page["search"].split() == SEARCH
    assert int(page["mtu"]) == world.handshake.mtu


def test_the_config_drive_was_found_by_label_by_the_guest_kernel(world: World) -> None:
    assert world.first.page["config_drive_label"] == "config-2"
    assert "podvm-guest: config drive label=config-2 device=/dev/sr0" in world.first.runner.text()


def test_vnc_answers_on_the_pod_ip(world: World) -> None:
    assert harness.is_vnc_banner(world.first.vnc), f"{world.first.vnc!r}\n{world.logs()}"


def test_sigterm_powers_the_guest_off_through_acpi(world: World) -> None:
    assert harness.ACPI_LINE in world.first.log_after_sigterm, world.logs()
    assert world.first.exit_status == harness.GRACEFUL_EXIT


def test_a_second_start_reuses_the_pet_disk(world: World) -> None:
    assert harness.counter(world.second.page) == harness.counter(world.first.page) + 1, world.logs()
    assert world.second.page["uuid"] == world.first.page["uuid"]
    assert world.second.exit_status == harness.GRACEFUL_EXIT
