"""qemu really started by the runner as uid 10001 without capabilities, on a tap in a throwaway network namespace.

No guest OS is needed: an empty disk leaves the VM in its BIOS, which answers QMP but not ACPI, exactly what the
hard-stop path needs. The runner reaches /dev/net/tun through a 0666 node bind-mounted in a private mount namespace.
"""

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import samples
from tests.harness.paths import REPO, VMRUNNER
from tests.harness.pod import require, runner_env
from tests.harness.wait import until

UID = 10001
pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A namespace with a tap owned by the runner's uid; removed with everything in it."""
    require("ip")
    require("qemu-system-x86_64")
    name = f"pvm-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap", "user", str(UID)], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "tap0", "up"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
        for pid in pids.split():
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


def publish_handshake(root: Path, vnc_in_pod: bool = False) -> None:
    samples.handshake(
        tap="tap0", bridge="br0", mtu=1500, pod_ip="10.0.0.5", dns=(), search=(), vnc_in_pod=vnc_in_pod, tap_owner=UID
    ).write(root / "run")


@pytest.fixture
def pod(shared_dir: Path, qcow2_bytes: bytes) -> Path:
    """The runner's directories, a base image it can read, a handshake and a 0666 tun node to bind-mount."""
    (shared_dir / "base.qcow2").write_bytes(qcow2_bytes)
    (shared_dir / "base.qcow2").chmod(0o644)
    subprocess.run(["mknod", "-m", "0666", str(shared_dir / "tun"), "c", "10", "200"], check=True)
    publish_handshake(shared_dir)
    return shared_dir


def start(ns: str, root: Path, *extra: str, **env: str) -> subprocess.Popen[str]:
    """``vmrunner run`` as uid 10001 with no capabilities, in ``ns``, with /dev/net/tun usable by it."""
    script = 'mount --bind "$1" /dev/net/tun && shift && exec "$@"'
    argv = [
        *("ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private"),
        *("sh", "-c", script, "sh", str(root / "tun")),
        *("setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all", "--no-new-privs"),
        *VMRUNNER,
        "run",
        *extra,
    ]
    environment = runner_env(root, IMG_SOURCE=str(root / "base.qcow2"), SHUTDOWN_TIMEOUT="1s", **env)
    return subprocess.Popen(argv, env=environment, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    """Wait for ``path`` to appear; fail at once if the runner exited."""

    def there() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"runner exited with {proc.returncode}: {proc.communicate()[1]}")
        return path.exists()

    until(str(path), there, timeout, 0.05)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, err


READS = "podvm_vm_storage_iops_read_total"


def figure_value(report: dict[str, Any], name: str, **labels: str) -> float:
    """The value of one figure in a `vmrunner status` report."""
    found = [f["value"] for f in report["figures"] if f["name"] == name and f["labels"] == labels]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


def qemu_uids(runner_pid: int) -> list[int]:
    children = Path(f"/proc/{runner_pid}/task/{runner_pid}/children").read_text().split()
    return [Path(f"/proc/{pid}").stat().st_uid for pid in children]


def test_unprivileged_runner_runs_qemu_answers_qmp_and_stops_hard(netns: str, pod: Path) -> None:
    proc = start(netns, pod)
    try:
        wait_for(pod / "run" / "qmp.sock", proc)
        assert qemu_uids(proc.pid) == [UID]

        def status_report() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
            done = subprocess.run(
                [*VMRUNNER, "status"], env=runner_env(pod), capture_output=True, text=True, check=False, timeout=20
            )
            return done, json.loads(done.stdout)

        status, shown = status_report()
        assert (status.returncode, shown["state"]) == (0, "running"), status.stderr
        binding = shown["pet"]["binding"]
        assert binding["digest"] == "sha256:" + hashlib.sha256((pod / "base.qcow2").read_bytes()).hexdigest()
        assert binding["next_start"] == "cheap check" and len(shown["pet"]["references"]) == 1
        report = shown
        assert figure_value(report, "podvm_vm_boots_total") == 1
        assert figure_value(report, "podvm_vm_memory_resident_bytes") > 1 << 20, "qemu's RSS from /proc"
        # QMP query-blockstats: the firmware reads the boot disk's first sectors, so the reads count up from zero.
        until("a read of disk0 counted", lambda: figure_value(status_report()[1], READS, drive="disk0") >= 1, 20)
        [base] = [f["labels"] for f in report["figures"] if f["name"] == "podvm_image_base"]
        assert base["digest"] == binding["digest"], "the base in use, by the digest the runner bound the pet to"
        with socket.socket(socket.AF_UNIX) as console:
            console.connect(str(pod / "run" / "console.sock"))
            console.sendall(b"\r\n")
        assert (pod / "vm" / "vm-0.qcow2").exists()
        assert (pod / "run" / "config-drive.iso").exists() is False
    finally:
        code, log = stop(proc)
    assert code == 6, log
    assert "stopping: ACPI power-down requested; waiting up to 1s" in log
    assert "guest did not power off within 1s; stopping qemu hard" in log
    assert log.strip().splitlines()[-1].endswith("the guest ignored the ACPI power-down; stopped hard")
    assert sorted(p.name for p in (pod / "run").iterdir()) == ["network.json"]

    pet = (pod / "vm" / "vm-0.qcow2").stat()
    (pod / "metadata").write_text("name: second\n")
    again = start(netns, pod)
    try:
        wait_for(pod / "run" / "qmp.sock", again)
        assert (pod / "run" / "config-drive.iso").stat().st_uid == UID
        status = subprocess.run([*VMRUNNER, "status"], env=runner_env(pod), capture_output=True, text=True, check=True)
        report = json.loads(status.stdout)
        assert figure_value(report, "podvm_vm_boots_total") == 2, "the pet's record counts both starts"
        assert figure_value(report, "podvm_vm_shutdowns_total", outcome="hard") == 1, "the first run's outcome"
        assert figure_value(report, "podvm_vm_shutdowns_total", outcome="clean") == 0
    finally:
        code, log = stop(again)
    assert code == 6, log
    assert "is on its base sha256:" in log and "fetching" not in log and "hashing" not in log
    assert (pod / "vm" / "vm-0.qcow2").stat().st_ino == pet.st_ino


def test_qemu_failure_exits_with_its_error_output(netns: str, pod: Path) -> None:
    proc = start(netns, pod, "-no-such-option")
    try:
        _, log = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 5, log
    last = log.strip().splitlines()[-1]
    assert "qemu exited with status 1: " in last and "-no-such-option" in last


def test_missing_handshake_names_the_file(pod: Path) -> None:
    (pod / "run" / "network.json").unlink()
    done = subprocess.run(
        [*VMRUNNER, "run"],
        env=runner_env(pod, IMG_SOURCE=str(pod / "base.qcow2"), HANDSHAKE_TIMEOUT="300ms"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 4
    assert f"{pod}/run/network.json: no network handshake after 0.3s" in done.stderr
    assert list((pod / "image").iterdir()) == [] and list((pod / "vm").iterdir()) == []


def test_status_without_qemu_and_a_missing_qemu_are_one_line(pod: Path) -> None:
    status = subprocess.run([*VMRUNNER, "status"], env=runner_env(pod), capture_output=True, text=True, check=False)
    assert status.returncode == 1
    assert status.stderr.strip().splitlines() == [status.stderr.strip()]
    assert f"{pod}/run/qmp.sock: no qemu answers" in status.stderr
    shown = json.loads(status.stdout)
    assert {key: shown[key] for key in ("state", "pet")} == {
        "state": "not running",
        "pet": {"path": f"{pod}/vm/vm-0.qcow2", "exists": False, "mode": "overlay"},
    }
    assert figure_value(shown, "podvm_vm_state", state="stopped") == 1
    done = subprocess.run(
        [*VMRUNNER, "run"],
        env=runner_env(pod, IMG_SOURCE=str(pod / "base.qcow2"), QEMU="/nonexistent/qemu"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("QEMU=/nonexistent/qemu: no such program")


def vnc_login(ns: str, password: bytes) -> str:
    """Log in to VNC on 127.0.0.1:5900 inside ``ns`` as a viewer would (tests/harness/rfb.py); ``OK`` or the refusal."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.harness.rfb", "5900"],
        input=password,
        capture_output=True,
        cwd=REPO,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


def test_vnc_logs_in_with_the_secret_as_written_and_refuses_a_wrong_password(netns: str, pod: Path) -> None:
    """A Secret made from a file that ends in a newline: a viewer typing the password gets in, nobody else does."""
    publish_handshake(pod, vnc_in_pod=True)
    secret = pod / "vnc-password"
    secret.write_bytes(b"s3cret\n")
    os.chown(secret, UID, UID)
    secret.chmod(0o400)
    proc = start(netns, pod, VNC_PASSWORD_FILE=str(secret))
    try:
        wait_for(pod / "run" / "qmp.sock", proc)
        [qemu] = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        cmdline = Path(f"/proc/{qemu}/cmdline").read_bytes()
        args = cmdline.rstrip(b"\0").split(b"\0")
        assert args[args.index(b"-object") + 1] == b"secret,id=vncpass,file=/dev/stdin,format=raw"
        assert b"s3cret" not in cmdline
        assert vnc_login(netns, b"s3cret") == "OK"
        assert vnc_login(netns, b"wrong").startswith("refused: ")
        assert vnc_login(netns, b"s3cret\n").startswith("refused: ")  # the newline is not part of the password
        assert vnc_login(netns, b"s3cret").startswith("OK")  # a refusal does not lock the right password out
        assert not any(b"s3cret" in p.read_bytes() for p in (pod / "run").iterdir() if p.is_file())
    finally:
        code, log = stop(proc)
    assert code == 6, log
    assert "s3cret" not in log and "has no password" not in log


def test_unusable_vnc_password_stops_the_runner_before_anything_is_made(pod: Path) -> None:
    secret = pod / "vnc-password"
    secret.write_bytes(b"ninechars\n")
    done = subprocess.run(
        [*VMRUNNER, "run"],
        env=runner_env(pod, IMG_SOURCE=str(pod / "base.qcow2"), VNC_PASSWORD_FILE=str(secret)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert f"VNC_PASSWORD_FILE={secret}: the VNC password is 9 characters long; VNC uses at most 8" in done.stderr
    assert "ninechars" not in done.stderr
    assert list((pod / "image").iterdir()) == [] and list((pod / "vm").iterdir()) == []


def test_hung_qemu_holds_neither_sigterm_nor_status(netns: str, pod: Path) -> None:
    """qemu stopped with SIGSTOP, as a hung qemu: its monitor socket still accepts (the kernel queues connections)
    but nothing ever greets. ``status`` answers with one line in bounded time, and SIGTERM ends within
    SHUTDOWN_TIMEOUT plus the hard stop (quit 1 s, QUIT_GRACE 5 s) with exit 6, qemu killed.
    """
    publish_handshake(pod, vnc_in_pod=True)
    proc = start(netns, pod)
    qemu = 0
    try:
        wait_for(pod / "run" / "qmp.sock", proc)
        [qemu] = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        status = subprocess.run(
            [*VMRUNNER, "status"], env=runner_env(pod), capture_output=True, text=True, check=False, timeout=20
        )
        assert json.loads(status.stdout)["state"] == "running", status.stderr  # the monitor worked before the hang
        os.kill(qemu, signal.SIGSTOP)
        status = subprocess.run(
            [*VMRUNNER, "status"], env=runner_env(pod), capture_output=True, text=True, check=False, timeout=20
        )
        assert (status.returncode, json.loads(status.stdout)["state"]) == (1, "not running")
        assert status.stderr.strip().splitlines() == [status.stderr.strip()]
        assert "qmp.sock: no qemu answers QMP query-status within 1s: the monitor accepted" in status.stderr
        asked = time.monotonic()
        code, log = stop(proc)
        took = time.monotonic() - asked
    finally:
        if qemu:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu, signal.SIGKILL)
    assert code == 6, log
    # A deadline the runner promises (SHUTDOWN_TIMEOUT 1 s + quit 1 s + QUIT_GRACE 5 s), not a performance figure:
    # before QMP calls had one, this SIGTERM waited for ever.
    assert took < 1 + 1 + 5 + 5, log
    assert "QMP system_powerdown failed" in log and "sending qemu SIGTERM" in log and "killing it" in log
    verdict = "SHUTDOWN_TIMEOUT=1s: qemu did not take the ACPI power-down (its monitor does not answer); stopped hard"
    assert log.strip().splitlines()[-1].endswith(verdict)
    assert not Path(f"/proc/{qemu}").exists()
    assert "VNC on TCP 5900 has no password" in log  # VNC without a Secret is said out loud
