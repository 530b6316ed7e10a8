"""The browser console's cost: ``vmrunner run`` start to qemu running, and the runner's RSS once its duties are up,
with the console on (broker, web server on localhost, qemu's second VNC display) and off (``CONSOLE_PORT=off``: the
broker for ``vmrunner console`` only), alternated in one run on the same cached image and pet disk."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.pods import rss_mib
from bench.runner import netns_with_tap, stop, time_to_running
from bench.table import Figure, Results
from tests.harness import samples
from tests.harness.paths import REPO, VMRUNNER
from tests.harness.pod import runner_env

SETTLE = 2.0  # seconds after qemu runs before the RSS is read: the duties (aiohttp imported, sockets bound) are up


def _rss_when_up(argv: list[str], env: dict[str, str], sock: Path) -> float:
    """VmRSS (MiB) of the runner's python a moment after qemu runs; the runner is stopped afterwards."""
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)  # ip netns exec execs: the same pid
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(SETTLE)
        return rss_mib(proc.pid)
    finally:
        stop(proc, 10)


def bench_console(res: Results, runs: int) -> None:
    """Start time and RSS with the console on and off, ``runs`` of each, alternated."""
    sec = "5c. browser console"
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-console-"))
    try:
        base = root / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
        for name in ("image", "vm", "run"):
            (root / name).mkdir()
        hs = samples.handshake(tap="tap0", bridge="br0", mtu=1500, pod_ip="10.0.0.5", dns=(), search=(), tap_owner=None)
        hs.write(root / "run")
        common = {**os.environ, **runner_env(root, IMG_SOURCE=str(base), VM_MEMORY="128M", SHUTDOWN_TIMEOUT="100ms")}
        envs = {
            "on": {**common, "CONSOLE_ASSETS": str(REPO / "node_modules")},
            "off": {**common, "CONSOLE_PORT": "off"},
        }
        sock = root / "run" / "qmp.sock"
        start: dict[str, list[float]] = {"on": [], "off": []}
        rss: dict[str, list[float]] = {"on": [], "off": []}
        with netns_with_tap() as ns:
            argv = ["ip", "netns", "exec", ns, *VMRUNNER, "run"]
            time_to_running(argv, envs["on"], sock)  # fetches, creates the pet disk, warms caches
            for i in range(runs):
                for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    start[mode].append(time_to_running(argv, envs[mode], sock) * 1000)
                    rss[mode].append(_rss_when_up(argv, envs[mode], root / "run" / "console.sock"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    off_start, off_rss = "start -> qemu running, CONSOLE_PORT=off", "runner RSS (python only), CONSOLE_PORT=off"
    res.add(Figure(sec, off_start, "ms", start["off"]))
    res.add(Figure(sec, "start -> qemu running, console on", "ms", start["on"], off_start, note="target <= 1.1"))
    res.add(Figure(sec, off_rss, "MiB", rss["off"]))
    res.add(Figure(sec, "runner RSS (python only), console on", "MiB", rss["on"], off_rss, note="target < 60 MiB"))
