"""End to end: the real sidecar and the real runner (uid 10001, no capabilities, TCG) boot the tiny guest in a pod.

The guest is booted twice in the whole module: the first boot answers the network, VNC and metrics checks (known
traffic and disk writes against the counters, a pause) and is stopped with SIGTERM (ACPI); the second start must
find the same pet disk (the guest's counter grew) and the metrics must count both boots.
"""

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.handshake import Handshake
from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness import samples
from tests.harness.netbed import Sidecar
from tests.harness.pod import PodNet, Proc, Scrape, scrape
from tests.harness.scenario import IMAGE_PORT, Scenario, pod_scenario
from tests.harness.wait import until
from vmrunner.qemu import qmp

pytestmark = pytest.mark.guest

HOSTNAME = "pet-e2e"
METADATA_HOSTNAME = "guest-from-metadata"
DNS = ["10.96.0.10", "10.96.0.11"]
SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]
METRICS_PORT = harness.METRICS_PORT
PINGS = 20
KIB = 1024
SECRET = "s3cret-pass-e2e"  # noqa: S105 - planted to be looked for
TOKEN = "t0ken-e2e-signature"  # noqa: S105 - planted to be looked for


@dataclass
class Exercise:
    """Scrapes around known traffic and disk writes, and one while qemu was paused."""

    before: Scrape
    after: Scrape
    paused: Scrape
    resumed: Scrape
    transfers: list[str]
    status: dict[str, object]  # `vmrunner status` while the guest ran


def _fresh_scrape(pod: PodNet, since: float) -> Scrape:
    """A scrape whose network figures the sidecar gathered after ``since`` (it hands them over every second)."""

    def fresh() -> Scrape | None:
        got = scrape(pod)
        return got if got.value("podvm_network_figures_timestamp_seconds") > since else None

    return until("the sidecar's figures refreshed", fresh, 15, 0.3)


def _client(pod: PodNet, *argv: str) -> str:
    """What a command run in the client namespace printed."""
    return harness.in_ns(pod.client_ns, argv, timeout=60).stdout.decode()


def _exercise(pod: PodNet, base: Path, env: dict[str, str]) -> Exercise:
    """Pings, a TCP upload and download of known size, a disk write in the guest and a backup (``vmrunner backup``
    as ``kubectl exec`` runs it), with scrapes around them; then qemu paused and resumed through its QMP monitor."""
    run_dir = Path(env["RUN_DIR"])
    before = _fresh_scrape(pod, time.time())
    upload = base / "upload.bin"
    upload.write_bytes(os.urandom(KIB * 1024))
    url = f"http://{pod.pod_ip}/cgi-bin"
    pings = _client(pod, "busybox", "ping", "-c", str(PINGS), "-A", "-W", "5", pod.pod_ip)
    transfers = [
        pings.strip().splitlines()[-2],
        _client(pod, "curl", "-sf", "--data-binary", f"@{upload}", f"{url}/sink"),
        _client(pod, "curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", f"{url}/bytes?{KIB}"),
        _client(pod, "curl", "-sf", f"{url}/write?{KIB}"),
    ]
    argv = [*harness.AS_RUNNER, str(harness.BIN / "vmrunner"), "backup"]
    backup = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert backup.returncode == 0, backup.stderr
    argv = [*harness.AS_RUNNER, str(harness.BIN / "vmrunner"), "status"]
    status = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True).stdout)
    after = _fresh_scrape(pod, time.time())
    asyncio.run(qmp.execute(run_dir / "qmp.sock", "stop"))
    paused = _scrape_until(pod, "paused")
    asyncio.run(qmp.execute(run_dir / "qmp.sock", "cont"))
    return Exercise(before, after, paused, _scrape_until(pod, "running"), transfers, status)


def _scrape_until(pod: PodNet, state: str) -> Scrape:
    """The first scrape that shows ``state`` (the endpoint gathers at most once a second)."""

    def showing() -> Scrape | None:
        got = scrape(pod)
        return got if got.value("podvm_vm_state", state=state) == 1 else None

    return until(f"a scrape showing the VM {state}", showing, 10, 0.3)


@dataclass
class Boot:
    """One start of the runner: the guest's page, the VNC banner, the exit status and the log after SIGTERM."""

    runner: Proc
    identities: list[tuple[int, int]]
    page: dict[str, str]
    vnc: str
    exit_status: int
    log_after_sigterm: str
    metrics: Scrape
    exercise: Exercise | None


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


def _boot(scenario: Scenario, env: dict[str, str], log: str, *, exercise: bool = False) -> Boot:
    """Start the runner, wait for the guest, look at it from the client, then stop it with SIGTERM."""
    pod = scenario.net
    runner = scenario.boot(log, env)
    pids = [runner.popen.pid, *harness.children(runner.popen.pid)]
    identities = [harness.identity(pid) for pid in pids]
    page = harness.guest_page(pod)
    vnc = harness.vnc_banner(pod)
    metrics = scrape(pod)
    exercised = _exercise(pod, scenario.base, env) if exercise else None
    offset = len(runner.text())
    status = scenario.stop(runner)
    return Boot(runner, identities, page, vnc, status, runner.text()[offset:], metrics, exercised)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """Build the pod, start the sidecar, boot the guest twice; everything is removed afterwards, also on failure."""
    resolv = f"nameserver {DNS[0]}\nnameserver {DNS[1]}\nsearch {' '.join(SEARCH)}\n"
    # A multiqueue tap: every figure and flow below then also goes through one (the guest has 1 vCPU, 2 queue pairs).
    sidecar_env = {"METRICS_PORT": str(METRICS_PORT), "METRICS_INTERVAL": "1s", "VM_NET_QUEUES": "2"}
    with pod_scenario("e2e", hostname=HOSTNAME, image=ensure_guest(), sidecar_env=sidecar_env, resolv=resolv) as pod:
        (pod.dirs["config"] / "metadata").write_text(f"hostname: {METADATA_HOSTNAME}\nmeta:\n  role: e2e\n")
        (pod.dirs["config"] / "userdata").write_text("#cloud-config\nruncmd: [echo hello]\n")
        # Credentials and a presigned token in the URL: the metrics must show neither.
        source = f"http://podvm:{SECRET}@127.0.0.1:{IMAGE_PORT}/guest.qcow2?X-Amz-Signature={TOKEN}"
        env = pod.env(SHUTDOWN_TIMEOUT="30s", METRICS_PORT=str(METRICS_PORT), IMG_SOURCE=source)
        first = _boot(pod, env, "runner1.log", exercise=True)
        second = _boot(pod, env, "runner2.log")
        yield World(pod.net, pod.handshake, first, second, pod.sidecar)


def test_a_multiqueue_tap_is_said_in_the_handshake_opened_with_its_queues_and_shown_in_status(world: World) -> None:
    assert world.handshake.tap_queues == 2
    shown = json.loads(
        harness.in_ns(world.pod.pod_ns, ["ip", "-details", "-json", "link", "show", world.handshake.tap]).stdout
    )
    assert shown[0]["linkinfo"]["info_data"]["multi_queue"] is True
    qemu = next(line for line in world.first.runner.text().splitlines() if " qemu: " in line)
    assert ",queues=2" in qemu and ",mq=on,vectors=6" in qemu and "vhost=on" not in qemu, qemu  # no /dev/vhost-net
    assert world.first.exercise is not None
    assert world.first.exercise.status["network_path"] == "qemu, 2 queue pairs"


def test_the_runner_and_qemu_run_as_uid_10001_without_capabilities(world: World) -> None:
    assert len(world.first.identities) == 2, world.logs()
    assert world.first.identities == [(harness.RUNNER_UID, 0)] * 2


def test_http_to_the_pod_ip_reaches_the_guest_with_its_metadata(world: World) -> None:
    page = world.first.page
    assert page["hostname"] == METADATA_HOSTNAME, world.logs()
    assert page["ip"] == world.handshake.vm_ip
    assert page["user_data"] == "present"
    # the config drive's instance uuid: stable for the pod's hostname, so cloud-init does not redo its first boot
    assert page["uuid"] == str(uuid.UUID(page["uuid"])) == str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{HOSTNAME}.podvm"))


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


def test_the_endpoint_is_valid_prometheus_text_without_duplicates_or_secrets(world: World) -> None:
    for got in (world.first.metrics, world.second.metrics):
        series = [(s.name, tuple(sorted(s.labels.items()))) for s in got.samples]
        assert len(series) == len(set(series)), "no duplicate series"
        assert all(kind != "unknown" for kind in got.types.values()), got.types
        lines = got.text.splitlines()
        declared = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
        described = {line.split()[2] for line in lines if line.startswith("# HELP ")}
        assert {s.name for s in got.samples} <= declared & described, "every sample's type and help are declared"
        assert SECRET not in got.text and TOKEN not in got.text and "X-Amz" not in got.text
        assert got.value("podvm_build_info", version="0.1.0", accel="tcg", runner="vmrunner", vm=HOSTNAME) == 1
        base = [s.labels for s in got.samples if s.name == "podvm_image_base_info"]
        assert len(base) == 1 and base[0]["name"] == "guest.qcow2" and base[0]["digest"].startswith("sha256:")


def test_the_metrics_port_stays_in_the_pod(world: World) -> None:
    """The scrape went to the pod IP from the client and reached the runner, not the guest (which has no such
    listener); the sidecar's exception rule counted it."""
    got = world.first.exercise.after if world.first.exercise else None
    assert got is not None
    assert got.value("podvm_nat_connections_total", rule=f"in_pod_tcp_{METRICS_PORT}") >= 2
    assert world.handshake.metrics_port == METRICS_PORT


def test_known_traffic_and_disk_writes_show_in_the_counters(world: World) -> None:
    ex = world.first.exercise
    assert ex is not None
    assert f"{PINGS} packets received" in ex.transfers[0], ex.transfers
    assert ex.transfers[1:] == [f"received={KIB * 1024}\n", str(KIB * 1024), f"wrote={KIB * 1024}\n"], ex.transfers

    def grew(name: str, **labels: str) -> float:
        return ex.after.value(name, **labels) - ex.before.value(name, **labels)

    tap = {"interface": "podvm-tap0"}
    assert grew("podvm_network_receive_packets_total", **tap) >= PINGS
    assert grew("podvm_network_transmit_packets_total", **tap) >= PINGS, "echo replies"
    assert grew("podvm_network_receive_bytes_total", **tap) >= KIB * 1024, "the upload reached the guest"
    assert grew("podvm_network_transmit_bytes_total", **tap) >= KIB * 1024, "the download left the guest"
    assert grew("podvm_nat_packets_total", direction="in") >= PINGS
    assert grew("podvm_nat_bytes_total", direction="in") >= KIB * 1024
    assert grew("podvm_nat_bytes_total", direction="out") >= KIB * 1024
    assert grew("podvm_nat_connections_total", rule="dnat") >= 4, "one ping flow and three TCP connections"
    disk = {"drive": "disk0"}
    assert grew("podvm_vm_storage_write_traffic_bytes_total", **disk) >= KIB * 1024
    assert grew("podvm_vm_storage_iops_write_total", **disk) >= 1
    assert grew("podvm_vm_storage_flush_requests_total", **disk) >= 1
    assert grew("podvm_vm_cpu_usage_seconds_total") > 0
    assert ex.after.value("podvm_vm_memory_resident_bytes") > 64 << 20
    assert ex.after.value("podvm_dhcp_leases_total") >= 1
    assert ex.after.value("podvm_dhcp_last_lease_timestamp_seconds") > 0
    assert ex.after.value("podvm_dnsmasq_restarts_total") == 0


def test_the_state_follows_the_vm(world: World) -> None:
    ex = world.first.exercise
    assert ex is not None
    assert ex.before.value("podvm_vm_state", state="running") == 1
    assert ex.paused.value("podvm_vm_state", state="paused") == 1
    assert ex.paused.value("podvm_vm_state", state="running") == 0
    assert ex.resumed.value("podvm_vm_state", state="running") == 1
    assert ex.after.value("podvm_vm_uptime_seconds") > 0


def test_boots_and_shutdowns_of_the_pet_are_counted(world: World) -> None:
    first, second = world.first.metrics, world.second.metrics
    assert first.value("podvm_vm_boots_total") == 1 and second.value("podvm_vm_boots_total") == 2
    assert first.value("podvm_vm_shutdowns_total", outcome="clean") == 0
    assert second.value("podvm_vm_shutdowns_total", outcome="clean") == 1, "the first run's ACPI power-off"
    assert first.value("podvm_image_fetched_bytes_total") > 0, "the first start downloaded the image"
    assert second.value("podvm_image_fetched_bytes_total") == 0, "the second found it in the cache"
    assert second.value("podvm_image_vetting", result="accepted") == 1
    assert second.value("podvm_image_cache_size_bytes") >= first.value("podvm_image_fetched_bytes_total")


def test_a_backup_shows_in_the_scrape(world: World) -> None:
    ex = world.first.exercise
    assert ex is not None
    assert ex.after.value("podvm_backup_last_result", result="ok") == 1
    assert ex.after.value("podvm_backup_last_success_kind", kind="full") == 1, "the pet's first backup is a full one"
    assert ex.after.value("podvm_backup_last_success_size_bytes") > KIB * 1024, "it holds at least the write"
    assert "podvm_backup_last_result" not in {s.name for s in ex.before.samples}, "no figures before any backup"


def test_every_name_the_dashboard_queries_is_in_a_real_scrape(world: World) -> None:
    assert world.first.exercise is not None
    served = {sample.name for sample in world.first.exercise.after.samples}
    assert samples.dashboard_metrics() - served == set()
