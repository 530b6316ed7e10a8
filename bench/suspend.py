"""Section 6c, restart of a VM as a client sees it: with ``ON_STOP=suspend`` against a shutdown and a cold boot,
and the save's speed against a plain write of the same size on the same volume; for the tiny guest and for one
holding 1 GiB of touched RAM (what a save must write grows with it, a cold boot does not)."""

import os
import shutil
import subprocess
import time

from bench.table import Results
from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.pod import PodNet
from tests.harness.scenario import BOOT_TIMEOUT, Scenario, pod_scenario
from tests.harness.wait import until

SECTION = "6c. VM restart, as a client sees it (TCG)"
# (label, settings, MiB of RAM the guest fills before each stop)
GUESTS: tuple[tuple[str, dict[str, str], int], ...] = (
    ("tiny guest", {}, 0),
    ("1 GiB touched", {"VM_MEMORY": "1536M"}, 1024),
)
FILL_TIMEOUT = 300  # seconds for the guest to write its RAM under TCG


def _answers(pod: PodNet) -> bool:
    argv = ["curl", "-sf", "--max-time", "0.25", f"http://{pod.pod_ip}/"]
    return harness.in_ns(pod.client_ns, argv).returncode == 0


def _fill(pod: PodNet, mib: int) -> None:
    """The guest's RAM holds ``mib`` MiB more of non-zero bytes."""
    argv = ["curl", "-sf", "--max-time", str(FILL_TIMEOUT), f"http://{pod.pod_ip}/cgi-bin/fill?{mib}"]
    out = harness.in_ns(pod.client_ns, argv, timeout=FILL_TIMEOUT + 5)
    if f"filled={mib}".encode() not in out.stdout:
        raise RuntimeError(f"the guest did not fill {mib} MiB of RAM: {out.stdout!r} {out.stderr!r}")


def _gap(s: Scenario, env: dict[str, str], name: str, fill: int) -> tuple[float, float]:
    """Milliseconds from the last answer before SIGTERM to the first answer of the next runner, and the seconds
    the stop took (the save, or the shutdown)."""
    runner = s.boot(f"{name}-1.log", env, BOOT_TIMEOUT)
    until("a first answer", lambda: _answers(s.net), 60, 0.05)
    if fill:
        _fill(s.net, fill)
    last = time.monotonic()
    stopping = time.monotonic()
    s.stop(runner)
    stopped = time.monotonic() - stopping
    runner = s.start(f"{name}-2.log", env)
    until("the first answer after the restart", lambda: _answers(s.net), BOOT_TIMEOUT, 0.05)
    gap = (time.monotonic() - last) * 1000
    s.stop(runner)
    return gap, stopped


def _plain_write(directory: str, size: int) -> float:
    """Seconds to write and fsync ``size`` bytes to a new file in ``directory`` (what the save competes with)."""
    path = os.path.join(directory, "bench-write.tmp")
    started = time.monotonic()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size >> 20}", "conv=fsync", "status=none"], check=True
    )
    seconds = time.monotonic() - started
    os.unlink(path)
    return seconds


def bench_suspend(res: Results, rounds: int) -> None:
    """Per guest and round, in one pod: a restart with shutdown and boot, then one with suspend and resume (the
    guest with 1 GiB of touched RAM once: each of its rounds writes gigabytes)."""
    for label, settings, fill in GUESTS:
        reference = f"{label}: restart gap, shutdown + cold boot"
        for _ in range(rounds if not fill else 1):
            with pod_scenario("bench-suspend", hostname="bench-sleep", image=ensure_guest()) as s:
                cold, _ = _gap(s, s.env(SHUTDOWN_TIMEOUT="30s", **settings), "shutdown", fill)
                res.sample(SECTION, reference, cold, ref=reference)
                for path in s.dirs["vm"].glob("bench-sleep*"):
                    if path.is_file():
                        path.unlink()
                    else:
                        shutil.rmtree(path)
                warm, saved = _gap(s, s.env(ON_STOP="suspend", SUSPEND_TIMEOUT="300s", **settings), "suspend", fill)
                res.sample(SECTION, f"{label}: restart gap, suspend + resume", warm, ref=reference)
                state = next(s.dirs["vm"].glob("*.suspended"), None)
                if state is None:
                    raise RuntimeError(f"{label}: the suspend left no saved state in {s.dirs['vm']}")
                size = state.stat().st_size
                write = f"  {label}: plain write + fsync of the state's size on VM_DIR"
                plain = _plain_write(str(s.dirs["vm"]), size) * 1000
                res.sample(SECTION, write, plain, ref=write, note=f"{size >> 20} MiB")
                res.sample(SECTION, f"  {label}: the save itself (runner's stop)", saved * 1000, ref=write)
