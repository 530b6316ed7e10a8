"""A pod's life under podman, checked from outside the pod: the guest assumes the pod IP, VNC stays in the pod,
stopping the pod powers the guest off through ACPI, and a restarted pod boots the same pet disk."""

import re
import socket
import time
import urllib.request

import pytest
import yaml
from helm_python.chart import Chart

from tests.harness import paths
from tests.podman.conftest import Pod, podman, wait_for

pytestmark = pytest.mark.podman
BOOT_TIMEOUT = 180.0  # image fetch, vetting and a TCG boot on a busy 2-core machine
GRACE = 90  # deploy/pod.yaml's terminationGracePeriodSeconds
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the pod IP is local: no proxy


def _page(ip: str) -> str | None:
    """The guest's page on the pod IP, or None while nothing answers."""
    try:
        with DIRECT.open(f"http://{ip}/", timeout=2) as reply:
            return str(reply.read().decode())
    except OSError:
        return None


def _counter(page: str) -> int:
    match = re.search(r"^counter=(\d+)$", page, re.MULTILINE)
    assert match, f"no boot counter in the guest's page:\n{page}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def first_page(pod: Pod) -> str:
    wait_for("the guest answering HTTP on the pod IP", lambda: _page(pod.ip), BOOT_TIMEOUT, pod)
    page = _page(pod.ip)
    assert page is not None
    return page


def test_guest_answers_http_on_the_pod_ip(pod: Pod, first_page: str) -> None:
    """The page comes from the guest: it names the hostname the ConfigMap gave it and the /30 address."""
    assert f"hostname={pod.name}-guest" in first_page
    assert "ip=192.168.254.2" in first_page
    assert "config_drive_label=config-2" in first_page


def test_vnc_answers_on_5900_in_the_pod(pod: Pod, first_page: str) -> None:
    with socket.create_connection((pod.ip, 5900), timeout=5) as conn:
        conn.settimeout(5)
        assert conn.recv(12).startswith(b"RFB 003.")


def _chart_test_command(port: int) -> list[str]:
    """The command of the chart's `helm test` pod for a Service whose first port is ``port``."""
    manifests = paths.script("scripts/manifests.py")
    with Chart.load(manifests.CHART) as chart:
        values = {"workload": {"kind": "Pod", "replicas": 1}, "service": {"ports": [{"name": "http", "port": port}]}}
        hook = yaml.safe_load(manifests.render(chart, values)["tests/vm-answers.yaml"])
    command: list[str] = hook["spec"]["containers"][0]["command"]
    return command


def test_the_charts_test_pod_finds_the_guest(pod: Pod, first_page: str, images: str, network: str) -> None:
    """The chart's test command, run in the runner's image as the test pod runs it, with the pod IP for the Service's
    name (no cluster DNS here): it passes on the guest's HTTP port and fails on a port the guest does not serve."""

    def run(port: int) -> int:
        entrypoint, *args, _host, _port = _chart_test_command(port)  # Kubernetes' command replaces the ENTRYPOINT
        argv = ["run", "--rm", "--network", network, "--user", "10001", "--read-only", "--cap-drop", "ALL"]
        image = f"localhost/podvm-vm:{images}"
        done = podman(*argv, "--entrypoint", entrypoint, image, *args, pod.ip, str(port), check=False, timeout=60)
        return done.returncode

    assert run(80) == 0
    assert run(81) != 0


def test_pod_stop_powers_the_guest_off_through_acpi(pod: Pod, first_page: str) -> None:
    started = time.monotonic()
    podman("pod", "stop", "--time", str(GRACE), pod.name, timeout=GRACE + 30)
    elapsed = time.monotonic() - started
    log = pod.logs("vm")
    assert "podvm-guest: ACPI power button" in log, log[-3000:]
    assert elapsed < GRACE, f"the pod took {elapsed:.0f}s to stop: it was killed, not shut down"
    status = podman("inspect", "--format", "{{.State.ExitCode}}", f"{pod.name}-vm").stdout.strip()
    assert status == "0", f"the runner exited with {status} (6: the guest ignored ACPI and was stopped hard)"


def test_restarted_pod_boots_its_pet_disk(pod: Pod, first_page: str) -> None:
    """Run after the stop above: the guest's counter, kept on its own disk, grows by one."""
    podman("pod", "start", pod.name)
    wait_for("the guest answering again after the restart", lambda: _page(pod.ip), BOOT_TIMEOUT, pod)
    page = _page(pod.ip)
    assert page is not None
    assert _counter(page) == _counter(first_page) + 1
