"""Section 6c, restart of a VM as a client sees it: with ``ON_STOP=suspend`` against a shutdown and a cold boot,
and the save's speed against a plain write of the same size on the same volume."""

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

SECTION = "6c. VM restart, as a client sees it (tiny guest, TCG)"


def _answers(pod: PodNet) -> bool:
    argv = ["curl", "-sf", "--max-time", "0.25", f"http://{pod.pod_ip}/"]
    return harness.in_ns(pod.client_ns, argv).returncode == 0


def _gap(s: Scenario, env: dict[str, str], name: str, touch_mib: int = 0) -> tuple[float, float]:
    """Milliseconds from the last answer before SIGTERM to the first answer of the next runner, and the seconds
    the stop took (the save, or the shutdown); with ``touch_mib`` the guest first fills that much RAM."""
    runner = s.boot(f"{name}-1.log", env, BOOT_TIMEOUT)
    until("a first answer", lambda: _answers(s.net), 60, 0.05)
    if touch_mib:
        argv = ["curl", "-sf", "--max-time", "600", f"http://{s.net.pod_ip}/cgi-bin/ramfill?{touch_mib}"]
        filled = harness.in_ns(s.net.client_ns, argv, timeout=610)
        assert f"filled={touch_mib << 20}" in filled.stdout.decode(), filled
        until("an answer after the fill", lambda: _answers(s.net), 60, 0.05)
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
    """Per round, in one pod: a restart with shutdown and boot, then one with suspend and resume; then the same with
    a 1280 MiB guest that filled 1 GiB of its RAM (the saved state a busy guest leaves)."""
    for memory, touch, label in (("256M", 0, ""), ("1280M", 1024, ", 1 GiB of RAM touched")):
        reference = f"restart gap, shutdown + cold boot{label}"
        for _ in range(rounds if not touch else max(1, rounds - 1)):
            with pod_scenario("bench-suspend", hostname="bench-sleep", image=ensure_guest()) as s:
                cold, _ = _gap(s, s.env(SHUTDOWN_TIMEOUT="30s", VM_MEMORY=memory), "shutdown", touch)
                res.sample(SECTION, reference, cold, ref=reference)
                for path in s.dirs["vm"].glob("bench-sleep*"):
                    if path.is_file():
                        path.unlink()
                    else:
                        shutil.rmtree(path)
                env = s.env(ON_STOP="suspend", VM_MEMORY=memory, SHUTDOWN_TIMEOUT="120s")
                warm, saved = _gap(s, env, "suspend", touch)
                res.sample(SECTION, f"restart gap, suspend + resume{label}", warm, ref=reference)
                plain = f"  plain write + fsync of the state's size on VM_DIR{label}"
                res.sample(SECTION, f"  the save itself (runner's stop){label}", saved * 1000, ref=plain)
                state = next(s.dirs["vm"].glob("*.suspended"), None)
                size = state.stat().st_size if state is not None else 256 << 20
                res.sample(SECTION, plain, _plain_write(str(s.dirs["vm"]), size) * 1000, note=f"{size >> 20} MiB")
