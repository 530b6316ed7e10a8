"""Section 6, cold start: sidecar and runner started together to the guest's first HTTP answer on the pod IP."""

import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.pods import first, log_times, rss_mib
from bench.table import Figure, Results
from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.pod import PodNet
from tests.harness.scenario import pod_scenario
from tests.harness.wait import until

STEPS = (
    ("network ready (sidecar)", "sidecar", "network ready"),
    ("fetch + vet image (or hash the cached one)", "runner", ("cached ", "hashing the pet's base")),
    ("overlay (pet disk)", "runner", "created pet disk"),
    ("config drive", "runner", "config drive "),
    ("qemu spawned", "runner", "qemu started"),
    ("qemu + guest boot to its ready line", "runner", "podvm-guest: ready"),
)


def _first_http(pod: PodNet, timeout: float) -> float:
    """The time of the guest's first HTTP answer on the pod IP."""
    argv = ["curl", "-sf", "--max-time", "0.25", f"http://{pod.pod_ip}/"]
    until(f"an HTTP answer on {pod.pod_ip}", lambda: harness.in_ns(pod.client_ns, argv).returncode == 0, timeout, 0.05)
    return time.time()


def children_rss(pid: int) -> dict[str, float]:
    """RSS in MiB of each child program of the runner (qemu, swtpm) by its name."""
    found: dict[str, float] = {}
    for child in harness.children(pid):
        try:
            name = Path(f"/proc/{child}/comm").read_text().strip()
            found[name] = found.get(name, 0.0) + rss_mib(child)
        except OSError:
            continue
    return found


def cold_start(
    cache: Path, image: Path, cached: bool, **extra: str
) -> tuple[float, dict[str, float], float, dict[str, float]]:
    """Pod start (runner and sidecar at once) to the first HTTP answer; steps; the runner's RSS meanwhile, and its
    children's (qemu, swtpm). The image cache ``cache`` outlives the pod (emptied first when not ``cached``); the pet
    disk is new each time; ``extra`` adds runner settings (firmware, TPM)."""
    if not cached:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(exist_ok=True)
    os.chown(cache, harness.RUNNER_UID, harness.RUNNER_UID)
    with pod_scenario("bench-coldstart", hostname="bench", image=image, sidecar_first=False) as scenario:
        (scenario.dirs["config"] / "metadata").write_text("hostname: bench\n")
        (scenario.dirs["config"] / "userdata").write_text("#cloud-config\n")
        pod = scenario.net
        env = scenario.env(IMAGE_DIR=str(cache), SHUTDOWN_TIMEOUT="1s", **extra)
        t0 = time.time()
        runner = scenario.start(f"runner-{'cached' if cached else 'cold'}.log", env)
        scenario.start_sidecar(timeout=30)
        answered = _first_http(pod, 120)
        again = time.time()
        _first_http(pod, 10)  # one more request once up: the price of a request itself (curl in a namespace)
        request_ms = (time.time() - again) * 1000
        runner_rss = rss_mib(runner.popen.pid)
        programs = children_rss(runner.popen.pid)
        logs = {"sidecar": log_times(scenario.sidecar.log()), "runner": log_times(runner.text())}
        steps: dict[str, float] = {}
        prev, missing = t0, []
        for name, source, prefix in STEPS:
            prefixes = prefix if isinstance(prefix, tuple) else (prefix,)
            found = [t for p in prefixes if (t := first(logs[source], p)) is not None]
            if not found:
                missing.append(name.split(" (")[0])  # its time goes to the next step that is logged
                continue
            at = min(found)
            steps[" + ".join([*missing, name])] = (at - prev) * 1000
            prev, missing = at, []
        steps["guest ready line -> first HTTP on pod IP"] = (answered - prev) * 1000
        steps["(a later HTTP request, for scale: curl in the client netns)"] = request_ms
        return (answered - t0) * 1000, steps, runner_rss, programs


def bench_coldstart(res: Results, rounds: int) -> None:
    """Cold start to reachable, image not cached then cached (fresh pet disk each time), with its steps."""
    sec = "6. cold start to reachable (tiny guest, TCG)"
    image = ensure_guest()
    base = Path(tempfile.mkdtemp(prefix="podvm-bench-cold-"))
    base.chmod(0o755)
    rss: list[float] = []
    try:
        for _ in range(rounds):
            for cached in (False, True):
                label = "image cached" if cached else "image not cached"
                short = "cached" if cached else "uncached"
                total, steps, runner_rss, _ = cold_start(base / "image-cache", image, cached)
                rss.append(runner_rss)
                ref = "pod start -> first HTTP answer, image not cached" if cached else None
                res.sample(sec, f"pod start -> first HTTP answer, {label}", total, ref=ref)
                for name, ms in steps.items():
                    res.sample(sec, f"  {short}: {name}", ms, note="from the logs' timestamps")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    res.add(Figure("3. footprint", "runner RSS (python only, qemu running)", "MiB", rss, note="target < 60 MiB"))
