"""qemu really started by the runner as uid 10001 without capabilities, on a tap in a throwaway network namespace.

No guest OS is needed: an empty disk leaves the VM in its BIOS, which answers QMP but not ACPI, exactly what the
hard-stop path needs. The runner reaches /dev/net/tun through a 0666 node bind-mounted in a private mount namespace.
"""

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

import pytest

from tests import samples
from tests.vm.conftest import VMRUNNER, require, runner_env

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
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"runner exited with {proc.returncode}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, err


def qemu_uids(runner_pid: int) -> list[int]:
    children = Path(f"/proc/{runner_pid}/task/{runner_pid}/children").read_text().split()
    return [Path(f"/proc/{pid}").stat().st_uid for pid in children]


def test_unprivileged_runner_runs_qemu_answers_qmp_and_stops_hard(netns: str, pod: Path) -> None:
    proc = start(netns, pod)
    try:
        wait_for(pod / "run" / "qmp.sock", proc)
        assert qemu_uids(proc.pid) == [UID]
        status = subprocess.run(
            [*VMRUNNER, "status"], env=runner_env(pod), capture_output=True, text=True, check=False, timeout=20
        )
        shown = json.loads(status.stdout)
        assert (status.returncode, shown["state"]) == (0, "running"), status.stderr
        binding = shown["pet"]["binding"]
        assert binding["digest"] == "sha256:" + hashlib.sha256((pod / "base.qcow2").read_bytes()).hexdigest()
        assert binding["next_start"] == "cheap check" and len(shown["pet"]["references"]) == 1
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
    assert json.loads(status.stdout) == {
        "state": "not running",
        "pet": {"path": f"{pod}/vm/vm-0.qcow2", "exists": False, "mode": "overlay"},
    }
    done = subprocess.run(
        [*VMRUNNER, "run"],
        env=runner_env(pod, IMG_SOURCE=str(pod / "base.qcow2"), QEMU="/nonexistent/qemu"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("QEMU=/nonexistent/qemu: no such program")


RFB_SECURITY_TYPES = """
import socket, time
deadline = time.monotonic() + 15
while True:  # qemu opens its QMP socket before its VNC server
    try:
        s = socket.create_connection(("127.0.0.1", 5900), timeout=10)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
version = s.recv(12)
s.sendall(b"RFB 003.008\\n")
count = s.recv(1)[0]
print(version.decode().strip(), list(s.recv(count)))
"""


def test_vnc_asks_for_the_password_from_the_secret_file(netns: str, pod: Path) -> None:
    publish_handshake(pod, vnc_in_pod=True)
    secret = pod / "vnc-password"
    secret.write_text("s3cret")
    os.chown(secret, UID, UID)
    secret.chmod(0o400)
    proc = start(netns, pod, VNC_PASSWORD_FILE=str(secret))
    try:
        wait_for(pod / "run" / "qmp.sock", proc)
        seen = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", RFB_SECURITY_TYPES],
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
    finally:
        stop(proc)
    assert seen.stdout.strip() == "RFB 003.008 [2]", seen.stderr  # 2: VNC authentication, nothing weaker offered
