"""The pet's data survives hard kills and a full VM_DIR: the real sidecar and runner boot the tiny guest in a pod.

Kills: the guest writes a random pattern, flushes it and reports its checksum; then, while it keeps writing, qemu
alone is killed with SIGKILL (the runner sees its child die), and on the next boot the runner and qemu together (a
node losing the pod). After each kill the pet passes ``qemu-img check``, the next boot's guest reports the same
checksum from its disk, and the runner says how the previous run ended. A SIGKILL leaves the host's page cache in
place: these tests prove that qemu keeps nothing the guest flushed in its own memory, not that the host's storage
honours flushes on a power loss (docs/data-safety.md).

Full disk: VM_DIR is a small tmpfs (mounted here, unmounted also on failure), filled up while the guest writes to a
new file: qemu pauses the VM, the runner says so in one line naming VM_DIR, stays up and shows the pause in
``vmrunner status``; once the test frees space the runner resumes the VM, the guest's write completes, and after a
clean shutdown the pet passes ``qemu-img check``.
"""

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.pod import PodNet, Proc
from tests.harness.scenario import STOP_TIMEOUT, Scenario, pod_scenario
from tests.harness.wait import until

pytestmark = pytest.mark.guest

HOSTNAME = "pet-crash"
PATTERN_KIB = 2048
FULL_TMPFS_MIB = 40
ROOM_LEFT_MIB = 4  # what the ballast leaves free on VM_DIR: less than the guest's next write
FILL_KIB = 8192
RESUME_FREE = "16M"
QEMU_DIED = "ended when qemu died"
NODE_LOST = "ended without a shutdown"


@dataclass
class Pod:
    """The test bed pod with its sidecar and image server, shared by the scenarios."""

    scenario: Scenario

    @property
    def net(self) -> PodNet:
        return self.scenario.net

    @property
    def base(self) -> Path:
        return self.scenario.base

    @property
    def dirs(self) -> dict[str, Path]:
        return self.scenario.dirs

    def env(self, **extra: str) -> dict[str, str]:
        return self.scenario.env(SHUTDOWN_TIMEOUT="30s", **extra)

    def boot(self, log: str, **extra: str) -> Proc:
        return self.scenario.boot(log, self.env(**extra))

    def get(self, path: str, timeout: float = 60) -> dict[str, str]:
        """A ``key=value`` answer of the guest's web server, from the client namespace through the pod IP."""
        url = f"http://{self.net.pod_ip}{path}"
        done = harness.in_ns(self.net.client_ns, ["curl", "-sf", "--max-time", str(timeout), url], timeout + 5)
        assert done.returncode == 0, f"{url}: curl exit {done.returncode}"
        return dict(line.split("=", 1) for line in done.stdout.decode().splitlines() if "=" in line)


def qemu_img_check(pet: Path) -> tuple[int, dict[str, object]]:
    """``qemu-img check`` of the pet: its exit status (0: clean, 2: corrupt, 3: leaked clusters) and report."""
    done = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", "--output=json", str(pet)], capture_output=True, text=True, check=False
    )
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr}


def sound(check: tuple[int, dict[str, object]]) -> bool:
    """No corruption and no check error. Leaked clusters (exit 3) are allowed after a kill: qcow2 writes a new
    cluster's refcount before the table that points to it, so a kill in between leaves space counted but unused,
    never data lost (``qemu-img check -r leaks`` reclaims it, docs/data-safety.md)."""
    status, report = check
    return status in (0, 3) and report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0


def status(pod: Pod, vm_dir: Path) -> dict[str, object]:
    """``vmrunner status`` run beside the runner, with its environment."""
    env = {**pod.env(), "VM_DIR": str(vm_dir)}
    done = subprocess.run(
        [str(harness.BIN / "vmrunner"), "status"], env=env, capture_output=True, text=True, check=False, timeout=30
    )
    report: dict[str, object] = json.loads(done.stdout)
    return report


def figure(report: dict[str, object], name: str, **labels: str) -> float:
    found = [f["value"] for f in report["figures"] if f["name"] == name and f["labels"] == labels]  # type: ignore[attr-defined]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


def kill_mid_write(pod: Pod, runner: Proc, whole_pod: bool) -> tuple[str, int]:
    """Write and flush a pattern, start churning, then SIGKILL qemu (or the runner with qemu): the pattern's
    checksum and the runner's exit status (-9 when it was killed itself)."""
    written = pod.get(f"/cgi-bin/pattern?{PATTERN_KIB}")["pattern_sha256"]
    assert pod.get("/cgi-bin/churn") == {"churning": "1"}
    disk = {"drive": "disk0"}
    before = figure(status(pod, pod.dirs["vm"]), "podvm_vm_storage_write_traffic_bytes_total", **disk)
    time.sleep(1.0)  # the churn writes and flushes 2 MiB at a time: the kill lands among them
    after = figure(status(pod, pod.dirs["vm"]), "podvm_vm_storage_write_traffic_bytes_total", **disk)
    assert after > before, "the guest is writing when it is killed"
    (qemu,) = harness.children(runner.popen.pid)
    if whole_pod:
        runner.kill()  # the runner's whole session, qemu with it, as when a node loses the pod
    else:
        os.kill(qemu, signal.SIGKILL)
    code = runner.popen.wait(30)
    until("qemu gone after the kill", lambda: not Path(f"/proc/{qemu}").exists(), 10)
    return written, code


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    """The test bed pod, its sidecar and the image server; removed afterwards, also on failure."""
    with pod_scenario("e2e-crash", hostname=HOSTNAME, image=ensure_guest(), resolv="nameserver 10.96.0.10\n") as base:
        yield Pod(base)


@dataclass
class Kills:
    """What the kill scenario saw."""

    qemu_killed: tuple[str, int]  # pattern checksum, runner's exit status
    checks: list[tuple[int, dict[str, object]]]  # qemu-img check after each kill, then after the clean stop
    pages: list[dict[str, str]]  # the guest's page after each restart
    logs: list[str]  # each restarted runner's log
    pod_killed: tuple[str, int]
    final_stop: int


@pytest.fixture(scope="module")
def kills(pod: Pod) -> Kills:
    """Boot; kill qemu mid-write; boot; kill runner and qemu mid-write; boot; stop cleanly."""
    pet = pod.dirs["vm"] / f"{HOSTNAME}.qcow2"
    first = pod.boot("kill1.log")
    qemu_killed = kill_mid_write(pod, first, whole_pod=False)
    checks = [qemu_img_check(pet)]
    second = pod.boot("kill2.log")
    pages = [harness.guest_page(pod.net)]
    pod_killed = kill_mid_write(pod, second, whole_pod=True)
    checks.append(qemu_img_check(pet))
    third = pod.boot("kill3.log")
    pages.append(harness.guest_page(pod.net))
    final_stop = harness.graceful_stop(third, STOP_TIMEOUT)
    checks.append(qemu_img_check(pet))
    return Kills(qemu_killed, checks, pages, [second.text(), third.text()], pod_killed, final_stop)


def test_after_sigkill_of_qemu_the_flushed_data_is_there_and_the_disk_is_sound(kills: Kills) -> None:
    written, runner_status = kills.qemu_killed
    assert runner_status == 5, "qemu's death is ChildFailed: the runner exits 5 and the kubelet restarts it"
    assert sound(kills.checks[0]), kills.checks[0]
    assert kills.pages[0]["pattern_sha256"] == written


def test_after_sigkill_of_the_runner_and_qemu_the_flushed_data_is_there(kills: Kills) -> None:
    written, runner_status = kills.pod_killed
    assert runner_status == -signal.SIGKILL
    assert sound(kills.checks[1]), kills.checks[1]
    assert kills.pages[1]["pattern_sha256"] == written
    assert kills.pages[1]["pattern_sha256"] != kills.qemu_killed[0], "a new pattern, not the first one again"


def test_the_runner_says_how_the_previous_run_ended(kills: Kills) -> None:
    after_qemu, after_pod = kills.logs
    assert QEMU_DIED in after_qemu and NODE_LOST not in after_qemu
    assert NODE_LOST in after_pod and QEMU_DIED not in after_pod


def test_the_guest_keeps_booting_and_stops_cleanly_after_the_kills(kills: Kills) -> None:
    assert int(kills.pages[1]["counter"]) == int(kills.pages[0]["counter"]) + 1
    assert kills.final_stop == harness.GRACEFUL_EXIT
    assert sound(kills.checks[2]), kills.checks[2]


@dataclass
class Full:
    """What the full-disk scenario saw."""

    paused_log: list[str]  # the runner's lines about the full VM_DIR while it was full
    status: dict[str, object]  # vmrunner status while paused
    alive_while_paused: bool
    boots_while_paused: float
    filled: dict[str, str]  # the guest's answer to the write that hit the full disk
    resumed_log: list[str]
    page_after: dict[str, str]
    stop: int
    check: tuple[int, dict[str, object]]


def _lines(runner: Proc, text: str) -> list[str]:
    return [line for line in runner.text().splitlines() if text in line]


@pytest.fixture(scope="module")
def full(pod: Pod, kills: Kills) -> Iterator[Full]:
    """Boot on a small tmpfs VM_DIR, fill it up under a write of the guest, free it, stop cleanly."""
    del kills  # one VM on the pod's tap at a time: the kill scenario is over
    with harness.small_tmpfs(pod.base / "vm-small", FULL_TMPFS_MIB) as vm_dir:
        runner = pod.boot("full.log", VM_DIR=str(vm_dir), VM_DIR_MIN_FREE=RESUME_FREE)
        ballast = vm_dir / "ballast"
        room = os.statvfs(vm_dir).f_bavail * os.statvfs(vm_dir).f_frsize
        ballast.write_bytes(b"\xff" * (room - ROOM_LEFT_MIB * (1 << 20)))
        url = f"http://{pod.net.pod_ip}/cgi-bin/fill?{FILL_KIB}"
        writer = subprocess.Popen(
            ["ip", "netns", "exec", pod.net.client_ns, "curl", "-sf", "--max-time", "180", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            runner.wait_for("is full", 60)
            report = status(pod, vm_dir)
            time.sleep(8)  # two looks of the watch: no resume while VM_DIR is still full
            paused_log = _lines(runner, "VM_DIR=")
            alive = runner.popen.poll() is None
            boots = figure(status(pod, vm_dir), "podvm_vm_boots_total")
            ballast.unlink()
            runner.wait_for("resuming the VM", 30)
            answer, _ = writer.communicate(timeout=180)
        finally:
            writer.kill()
        filled = dict(line.split("=", 1) for line in answer.splitlines() if "=" in line)
        page = harness.guest_page(pod.net)
        stop = harness.graceful_stop(runner, STOP_TIMEOUT)
        yield Full(
            paused_log,
            report,
            alive,
            boots,
            filled,
            _lines(runner, "resuming the VM"),
            page,
            stop,
            qemu_img_check(vm_dir / f"{HOSTNAME}.qcow2"),
        )


def test_a_full_vm_dir_pauses_the_vm_with_one_line_naming_it(full: Full) -> None:
    assert len(full.paused_log) == 1, full.paused_log
    assert "VM_DIR=" in full.paused_log[0] and "qemu paused the VM" in full.paused_log[0]
    assert "free space there or grow the volume" in full.paused_log[0]


def test_the_pause_shows_in_status_and_the_runner_stays_up(full: Full) -> None:
    assert full.status["state"] == "io-error"
    assert figure(full.status, "podvm_vm_state", state="paused") == 1
    assert figure(full.status, "podvm_vm_io_error_paused") == 1
    assert full.alive_while_paused
    assert full.boots_while_paused == figure(full.status, "podvm_vm_boots_total"), "no restart while paused"


def test_freed_space_resumes_the_vm_and_the_write_completes(full: Full) -> None:
    assert len(full.resumed_log) == 1, full.resumed_log
    assert full.filled == {"filled": str(FILL_KIB * 1024)}
    assert full.page_after["ip"], "the guest still answers"


def test_the_pet_that_filled_its_volume_is_sound_after_a_clean_stop(full: Full) -> None:
    assert full.stop == harness.GRACEFUL_EXIT
    assert sound(full.check), full.check
