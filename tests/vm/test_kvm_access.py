"""KVM that exists but may not be opened: the runner says exactly why, refuses ACCEL=kvm, and shows the fallback.

On containerd and CRI-O a hostPath ``/dev/kvm`` is visible in the container but its device cgroup does not allow
opening it. Here the same case is made with a real KVM device node (char 10:232) that the runner's uid may not open.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import samples
from tests.harness.paths import VMRUNNER
from tests.harness.pod import AS_RUNNER, runner_env

REFUSED = "the container may not open /dev/kvm: request the device through a device plugin (see deploy/README.md)"
PROBLEM = "import sys; from vmrunner.run.argv import kvm_problem; print(kvm_problem(sys.argv[1]))"


@pytest.fixture
def closed_kvm(shared_dir: Path) -> Path:
    """A real KVM device node, root's alone (0600), in a folder every uid can reach: only its mode stops the runner."""
    node = shared_dir / "kvm"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(10, 232))
    return node


def test_a_kvm_node_the_runner_may_not_open_is_named_with_what_to_do(closed_kvm: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": os.environ["PATH"]}
    done = subprocess.run([*AS_RUNNER, sys.executable, "-c", PROBLEM, str(closed_kvm)], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert done.stdout.strip() == REFUSED.replace("/dev/kvm", str(closed_kvm))
    missing = subprocess.run([sys.executable, "-c", PROBLEM, str(tmp_path / "none")], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
    assert missing.stdout.strip().startswith(f"{tmp_path / 'none'} is missing")


def _plan_as_runner(closed_kvm: Path, shared_dir: Path, accel: str) -> subprocess.CompletedProcess[str]:
    """``vmrunner plan`` as the runner's uid, with the closed node mounted over /dev/kvm in a mount namespace of its
    own (the host's /dev/kvm is untouched)."""
    assert Path("/dev/kvm").exists(), "this test mounts over /dev/kvm: the machine must have one"
    samples.handshake().write(shared_dir / "run")
    env = runner_env(shared_dir, IMG_SOURCE="/nonexistent/base.qcow2", ACCEL=accel, CONSOLE_PORT="off")
    script = 'mount --bind "$0" /dev/kvm && exec "$@"'
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(closed_kvm), *AS_RUNNER, *VMRUNNER]
    return subprocess.run([*argv, "plan"], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_accel_kvm_is_refused_in_one_line_and_auto_falls_back_saying_why(closed_kvm: Path, shared_dir: Path) -> None:
    refused = _plan_as_runner(closed_kvm, shared_dir, "kvm")
    assert refused.returncode == 2, refused.stderr
    assert [line for line in refused.stderr.splitlines() if "ERROR" in line] == [
        line for line in refused.stderr.splitlines() if line.endswith(f"ACCEL=kvm: {REFUSED}")
    ]
    assert f"ACCEL=kvm: {REFUSED}" in refused.stderr
    auto = _plan_as_runner(closed_kvm, shared_dir, "auto")
    assert auto.returncode == 0, auto.stderr
    assert f"ACCEL=auto: {REFUSED}; running under TCG emulation" in auto.stderr
    argv = json.loads(auto.stdout)["qemu"]
    assert argv[argv.index("-accel") + 1] == "tcg"
