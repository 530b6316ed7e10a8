"""The runner contract, checked the same way for every runner: ``vmrunner`` and ``runners/qemu-runner.sh``.

The real sidecar runs in a test bed pod; each runner runs as uid 10001 without capabilities (tests.harness.pod)
and boots the tiny guest under TCG on the sidecar's tap. It must: use the handshake's MAC (the guest gets its
lease, ``netsidecar probe all`` is healthy), make the guest answer HTTP on the pod IP, serve VNC on 5900, put the
serial console in its log, power the guest off through ACPI on SIGTERM and exit 0, reuse the pet disk on the next
start, and refuse a handshake of major version 2 with exit status 4.

Each runner gets the settings of the ``vm`` container in deploy/pod.yaml, written as users write them (``60s``),
except what this machine cannot honour: the image (the tiny guest, served in the pod), the accelerator (TCG: KVM
hangs here) and the CPU count (the tiny guest boots on one vCPU of a shared two-core machine).
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from shared.handshake import Handshake
from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.netbed import Sidecar
from tests.harness.pod import PodNet, Proc
from tests.harness.scenario import BOOT_TIMEOUT, STOP_TIMEOUT, Scenario, pod_scenario

pytestmark = pytest.mark.guest

HOSTNAME = "pet-conformance"
RUNNERS = {
    "vmrunner": [str(harness.BIN / "vmrunner"), "run"],
    "qemu-runner.sh": ["sh", str(harness.REPO / "runners" / "qemu-runner.sh")],
}


def _manifest_settings() -> dict[str, str]:
    """The ``vm`` container's environment in deploy/pod.yaml, minus what the test bed must set itself."""
    pod = yaml.safe_load((harness.REPO / "deploy" / "pod.yaml").read_text())
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "vm")
    settings = {item["name"]: str(item["value"]) for item in container["env"]}
    return {k: v for k, v in settings.items() if k not in {"IMG_SOURCE", "ACCEL", "VM_CPUS"}}


MANIFEST = _manifest_settings()


@dataclass
class Pod:
    """The bed pod with the real sidecar, its handshake, and where runners keep their volumes."""

    scenario: Scenario
    net: PodNet
    handshake: Handshake
    sidecar: Sidecar
    base: Path
    run_dir: Path
    tun: Path


def _owned_dir(path: Path) -> Path:
    path.mkdir()
    os.chown(path, harness.RUNNER_UID, harness.RUNNER_UID)
    return path


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    """One bed, the real sidecar and an image server for the module; removed afterwards, also on failure. The tap is
    multiqueue: every runner must open it with the handshake's queues (the kernel refuses a single-queue open)."""
    with pod_scenario(
        "conformance", hostname=HOSTNAME, image=ensure_guest(), sidecar_env={"VM_NET_QUEUES": "2"}
    ) as pod:
        yield Pod(pod, pod.net, pod.handshake, pod.sidecar, pod.base, pod.dirs["run"], pod.tun)


def _env(pod: Pod, name: str, run_dir: Path, **extra: str) -> dict[str, str]:
    """The same settings for every runner (the manifest's, see above); each gets volumes of its own."""
    volumes = pod.base / name
    if not volumes.exists():
        volumes.mkdir()
        _owned_dir(volumes / "image")
        _owned_dir(volumes / "vm")
    return pod.scenario.env(volumes, RUN_DIR=str(run_dir), **{**MANIFEST, **extra})


def _vnc_login(pod: Pod, password: bytes) -> str:
    """A viewer's RFB login on pod IP:5900 from the client namespace (tests/harness/rfb.py): ``OK`` or the refusal."""
    done = subprocess.run(
        ["ip", "netns", "exec", pod.net.client_ns, sys.executable, "-m", "tests.harness.rfb", "5900", pod.net.pod_ip],
        input=password,
        capture_output=True,
        cwd=harness.REPO,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


def _probe_all(pod: Pod) -> dict[str, object]:
    """``netsidecar probe all --json`` in the pod, as ``kubectl exec`` into the net container would run it."""
    done = subprocess.run(
        ["ip", "netns", "exec", pod.net.pod_ns, str(harness.BIN / "netsidecar"), "probe", "all", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RUN_DIR": str(pod.run_dir), "NET_STATE_DIR": str(pod.sidecar.state_dir)},
        check=False,
    )
    report: dict[str, object] = json.loads(done.stdout)
    report["exit"] = done.returncode
    return report


@pytest.mark.parametrize("name", list(RUNNERS))
def test_runner_honours_the_contract(pod: Pod, name: str) -> None:
    secret = pod.base / f"{name}-vnc-password"
    secret.write_text("s3cret\n")  # as `echo` or an editor leaves it
    os.chown(secret, harness.RUNNER_UID, harness.RUNNER_UID)
    env = _env(pod, name, pod.run_dir, VNC_PASSWORD_FILE=str(secret))
    procs: list[Proc] = []
    try:
        first = pod.scenario.start(f"{name}-1.log", env, RUNNERS[name])
        procs.append(first)
        first.wait_for(harness.READY, BOOT_TIMEOUT)
        page = harness.guest_page(pod.net)
        assert page["ip"] == pod.handshake.vm_ip, "the guest did not get its lease: wrong MAC?"
        assert (page["gateway"], page["mtu"]) == (pod.handshake.gateway, str(pod.handshake.mtu))
        assert page["dns"].split() == list(pod.handshake.dns)
        assert harness.is_vnc_banner(harness.vnc_banner(pod.net)), "no VNC server on pod IP:5900"
        assert _vnc_login(pod, b"s3cret") == "OK", "the password of VNC_PASSWORD_FILE, without its newline"
        assert _vnc_login(pod, b"wrong").startswith("refused"), "VNC let a wrong password in"
        assert "podvm-guest: booted" in first.text(), "the serial console is not in the runner's log"
        probes = _probe_all(pod)
        assert probes["exit"] == 0, probes
        offset = len(first.text())
        assert harness.graceful_stop(first, STOP_TIMEOUT) == harness.GRACEFUL_EXIT
        assert harness.ACPI_LINE in first.text()[offset:], "the guest was not powered off through ACPI"

        second = pod.scenario.start(f"{name}-2.log", env, RUNNERS[name])
        procs.append(second)
        second.wait_for(harness.READY, BOOT_TIMEOUT)
        assert harness.counter(harness.guest_page(pod.net)) == harness.counter(page) + 1, "pet disk not reused"
        assert harness.graceful_stop(second, STOP_TIMEOUT) == harness.GRACEFUL_EXIT
    except BaseException:
        print(f"{harness.report(*procs)}\n----- sidecar -----\n{pod.sidecar.log()}")
        raise
    finally:
        for proc in procs:
            proc.kill()


def test_the_manifest_writes_durations_with_units() -> None:
    """What makes the checks above meaningful for duration parsing: the manifest's values carry units."""
    assert MANIFEST["SHUTDOWN_TIMEOUT"].rstrip("0123456789. ") != "", MANIFEST


@pytest.mark.parametrize("name", list(RUNNERS))
def test_runner_refuses_an_unknown_major_version(pod: Pod, name: str) -> None:
    """The handshake appears while the runner waits for it (HANDSHAKE_TIMEOUT's default, 120s): it is read, refused."""
    run_dir = pod.base / f"{name}-v2"
    if not run_dir.exists():
        _owned_dir(run_dir)
    (run_dir / "network.json").unlink(missing_ok=True)
    runner = pod.scenario.start(f"{run_dir.name}/out.log", _env(pod, name, run_dir), RUNNERS[name])
    try:
        time.sleep(1.0)
        future = {**pod.handshake.to_dict(), "version": "2.0"}
        (run_dir / ".network.json.tmp").write_text(json.dumps(future))
        (run_dir / ".network.json.tmp").rename(run_dir / "network.json")
        assert runner.popen.wait(60) == 4, runner.text()
    finally:
        runner.kill()
    assert "handshake version 2.0 is not supported" in runner.text()
    assert not list(run_dir.glob("*.qmp")) and not list(run_dir.glob("*.sock")), "a refused runner started qemu"


@pytest.mark.parametrize("name", list(RUNNERS))
def test_runner_gives_up_waiting_for_the_handshake(pod: Pod, name: str) -> None:
    run_dir = pod.base / f"{name}-none"
    if not run_dir.exists():
        _owned_dir(run_dir)
    env = _env(pod, name, run_dir, HANDSHAKE_TIMEOUT="1500ms")
    runner = pod.scenario.start(f"{run_dir.name}/out.log", env, RUNNERS[name])
    try:
        assert runner.popen.wait(60) == 4, runner.text()
    finally:
        runner.kill()
    assert "network.json" in runner.text()
