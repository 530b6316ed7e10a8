"""vmrunner's start-up overhead: from ``vmrunner run`` (cached, vetted image; existing pet disk) to qemu answering
QMP with ``running``, against qemu started alone with the same argv, in one run. ``make bench`` reports it as its
"runner overhead" section; the helpers here (a throwaway namespace with a tap, a sparse test image) serve it.
"""

import asyncio
import contextlib
import http.server
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from shared.errors import PodvmError
from tests.harness import samples
from tests.harness.paths import VMRUNNER
from tests.harness.pod import runner_env
from vmrunner.qemu import qmp


async def _until_running(sock: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(PodvmError):  # not up yet: poll again
            (status,) = await qmp.session(sock, [("query-status", None)], 1.0, wait=False)
            if isinstance(status, dict) and status.get("status") == "running":
                return
        await asyncio.sleep(0.005)
    raise TimeoutError(f"{sock}: qemu not running in time")


def stop(proc: "subprocess.Popen[bytes]", grace: float) -> None:
    """SIGTERM ``proc`` and wait; kill it when it is still there after ``grace`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def time_to_running(argv: list[str], env: dict[str, str], sock: Path) -> float:
    """Seconds from spawning ``argv`` to QMP reporting ``running``; the process is stopped afterwards."""
    sock.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_until_running(sock, started + 30))
        return time.monotonic() - started
    finally:
        stop(proc, 10)


@contextlib.contextmanager
def netns_with_tap() -> Iterator[str]:
    name = f"pvm-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True)
        yield name
    finally:
        for pid in subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        ).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)


def overhead_samples(root: Path, runs: int) -> tuple[list[float], list[float]]:
    """Seconds to ``running`` for ``vmrunner run`` and for qemu alone, ``runs`` of each, alternated. The runner is
    configured as the manifests run it: the metrics endpoint on 9100, the browser console on localhost."""
    base = root / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    for name in ("image", "vm", "run"):
        (root / name).mkdir()
    samples.handshake(
        tap="tap0", bridge="br0", mtu=1500, pod_ip="10.0.0.5", dns=(), search=(), tap_owner=None, metrics_port=9100
    ).write(root / "run")
    env = {
        **os.environ,
        **runner_env(root, IMG_SOURCE=str(base), VM_MEMORY="128M", SHUTDOWN_TIMEOUT="100ms", METRICS_PORT="9100"),
    }
    (root / "metadata").write_text("name: bench\n")
    sock = root / "run" / "qmp.sock"
    subprocess.run([*VMRUNNER, "fetch"], env=env, check=True, stdout=subprocess.DEVNULL)
    plan = json.loads(subprocess.run([*VMRUNNER, "plan"], env=env, capture_output=True, check=True).stdout)
    with netns_with_tap() as ns:
        prefix = ["ip", "netns", "exec", ns]
        time_to_running([*prefix, *VMRUNNER, "run"], env, sock)  # creates the pet disk and warms caches
        subprocess.run([*VMRUNNER, "configdrive", str(root / "run" / "config-drive.iso")], env=env, check=True)
        runner, qemu = [], []
        for _ in range(runs):
            runner.append(time_to_running([*prefix, *VMRUNNER, "run"], env, sock))
            qemu.append(time_to_running([*prefix, *plan["qemu"]], env, sock))
    return runner, qemu


def make_image(path: Path, size: int) -> None:
    """A raw image, sparse-ish: a random MiB every 8 MiB, holes between (what downloads of real images look like)."""
    with open(path, "wb") as out:
        out.truncate(size)
        for offset in range(0, size, 8 << 20):
            out.seek(offset)
            out.write(os.urandom(1 << 20))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:
        """Say nothing."""
