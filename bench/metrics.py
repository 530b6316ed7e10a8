"""What metrics cost: scrape latency, and the runner's and the sidecar's memory and idle CPU with ``METRICS_PORT``
set against the same process without it, measured side by side in one run.

The runner runs qemu on an empty disk in a throwaway namespace (as the "runner overhead" section does); the sidecar
runs on the namespace test bed with a stand-in holding its lease, publishing its figures every ``METRICS_INTERVAL``
(the default, 10 s).
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.pods import Pod, cpu_ticks, rss_mib
from bench.runner import _until_running, netns_with_tap, stop
from bench.table import Figure, Results
from tests.harness import samples
from tests.harness.paths import VMRUNNER
from tests.harness.pod import runner_env

PORT = 9100
SCRAPES = 8
# Pairs of scrapes: the first gathers afresh (the pause before it outlasts GATHER_EVERY), the second right after it
# is served from the gathered figures.
SCRAPER = """
import sys, time, urllib.request
def get():
    begin = time.perf_counter()
    with urllib.request.urlopen(sys.argv[1], timeout=5) as resp:
        resp.read()
    return (time.perf_counter() - begin) * 1000
fresh, again = [], []
for _ in range(int(sys.argv[2])):
    time.sleep(1.1)
    fresh.append(get())
    again.append(get())
print(" ".join(f"{t:.3f}" for t in fresh))
print(" ".join(f"{t:.3f}" for t in again))
"""


def _idle_cpu(pids: list[int], seconds: float) -> float:
    """Percent of one core the processes used over ``seconds`` of idling."""
    before = sum(cpu_ticks(pid) for pid in pids)
    begin = time.monotonic()
    time.sleep(seconds)
    used = (sum(cpu_ticks(pid) for pid in pids) - before) / os.sysconf("SC_CLK_TCK")
    return 100 * used / (time.monotonic() - begin)


def _runner_once(root: Path, ns: str, metrics: bool, idle: float) -> tuple[float, float, list[list[float]]]:
    """RSS (MiB) and idle CPU (%) of a running ``vmrunner run``, and scrape times (ms, fresh and repeated) when
    metrics are on."""
    port = PORT if metrics else None
    samples.handshake(
        tap="tap0", bridge="br0", mtu=1500, pod_ip="10.0.0.5", dns=(), search=(), tap_owner=None, metrics_port=port
    ).write(root / "run")
    extra = {"METRICS_PORT": str(PORT)} if metrics else {}
    env = {**os.environ, **runner_env(root, IMG_SOURCE=str(root / "base.qcow2"), VM_MEMORY="128M", **extra)}
    env["SHUTDOWN_TIMEOUT"] = "100ms"
    sock = root / "run" / "qmp.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *VMRUNNER, "run"], env=env, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_until_running(sock, time.monotonic() + 30))
        time.sleep(1.0)
        rss = rss_mib(proc.pid)
        cpu = _idle_cpu([proc.pid], idle)
        scrapes: list[list[float]] = [[], []]
        if metrics:
            url = f"http://127.0.0.1:{PORT}/metrics"
            done = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", SCRAPER, url, str(SCRAPES)],
                capture_output=True,
                text=True,
                check=True,
            )
            scrapes = [[float(t) for t in line.split()] for line in done.stdout.splitlines()]
        return rss, cpu, scrapes
    finally:
        stop(proc, 15)


def bench_runner(res: Results, rounds: int, idle: float = 5.0) -> None:
    """The runner with and without its endpoint, alternated."""
    sec = "3b. metrics"
    with tempfile.TemporaryDirectory(prefix="podvm-bench-metrics-") as tmp:
        root = Path(tmp)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root / "base.qcow2"), "1G"], check=True)
        for name in ("image", "vm", "run"):
            (root / name).mkdir()
        (root / "metadata").write_text("name: bench\n")
        fetch_env = {**os.environ, **runner_env(root, IMG_SOURCE=str(root / "base.qcow2"))}
        subprocess.run([*VMRUNNER, "fetch"], env=fetch_env, check=True)
        rss: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        fresh: list[float] = []
        again: list[float] = []
        with netns_with_tap() as ns:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            for _ in range(rounds):
                for metrics in (False, True):
                    one_rss, one_cpu, one_scrapes = _runner_once(root, ns, metrics, idle)
                    rss[metrics].append(one_rss)
                    cpu[metrics].append(one_cpu)
                    fresh += one_scrapes[0]
                    again += one_scrapes[1]
    res.add(Figure(sec, "scrape, figures gathered (QMP, /proc, sidecar file)", "ms", fresh, note="pod-local"))
    res.add(Figure(sec, "scrape within a second of the last (served again)", "ms", again, note="pod-local"))
    res.add(Figure(sec, "runner RSS without metrics", "MiB", rss[False]))
    res.add(Figure(sec, "runner RSS with metrics", "MiB", rss[True], ref="runner RSS without metrics",
                   note="target < 60 MiB"))  # fmt: skip
    res.add(Figure(sec, f"runner idle CPU over {idle:g} s without metrics", "% core", cpu[False]))
    res.add(Figure(sec, f"runner idle CPU over {idle:g} s with metrics", "% core", cpu[True], note="target ~0"))


def bench_sidecar(res: Results, idle: float = 20.0) -> None:
    """The sidecar (and dnsmasq) with and without figures handed over every METRICS_INTERVAL (10 s)."""
    sec = "3b. metrics"
    for metrics in (False, True):
        pod = Pod(env={"METRICS_PORT": str(PORT)} if metrics else None)
        try:
            pod.up()
            assert pod.side is not None and pod.side.proc is not None
            pid = pod.side.proc.pid
            time.sleep(1.0)
            label = "with" if metrics else "without"
            res.add(Figure(sec, f"sidecar RSS {label} metrics", "MiB", [rss_mib(pid)]))
            res.add(Figure(sec, f"sidecar idle CPU over {idle:g} s {label} metrics", "% core", [_idle_cpu([pid], idle)],
                           note="target ~0" if metrics else ""))  # fmt: skip
        finally:
            pod.close()


def bench(res: Results, rounds: int, sidecar_idle: float) -> None:
    """Both containers' cost of metrics, and the scrape."""
    bench_runner(res, rounds)
    bench_sidecar(res, sidecar_idle)
