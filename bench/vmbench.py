"""Runner figures: image fetch against curl, eight fetchers on one cache, cold start of the tiny guest."""

import hashlib
import http.server
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import BinaryIO, ClassVar

from bench.netbench import first, fresh_id, log_times, rss_mib
from bench.runner import QuietHandler, make_image, overhead_samples
from bench.table import Figure, Results
from tests.e2e import harness
from tests.e2e.harness import PodNet, Proc
from tests.guest.build import ensure_guest
from tests.netbed import Bed, Sidecar
from tests.vm.conftest import runner_env
from vmrunner.config import load
from vmrunner.pet import disk
from vmrunner.pet.binding import check_bound, prepare

REPO = Path(__file__).resolve().parents[1]
VMRUNNER = [sys.executable, "-c", "from vmrunner.cli import main; main()"]


class CountingHandler(QuietHandler):
    """Serves files quietly and counts the body bytes it sends (shared by all requests of one server)."""

    served: ClassVar[list[int]] = [0]
    lock: ClassVar[threading.Lock] = threading.Lock()

    def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:  # type: ignore[override]
        """Copy like the base class, counting."""
        sent = 0
        while chunk := source.read(1 << 20):
            outputfile.write(chunk)
            sent += len(chunk)
        with self.lock:
            self.served[0] += sent


def bench_overhead(res: Results, runs: int) -> None:
    """Start to qemu running with a cached image: ``vmrunner run`` against qemu alone with the same argv."""
    sec = "5a. runner overhead"
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-overhead-"))
    try:
        runner, qemu = overhead_samples(root, runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    alone = "qemu alone: start -> running"
    res.add(Figure(sec, alone, "ms", [t * 1000 for t in qemu]))
    res.add(Figure(sec, "vmrunner run: start -> qemu running (cached image)", "ms", [t * 1000 for t in runner], alone))
    overhead = [(r - q) * 1000 for r, q in zip(runner, qemu, strict=True)]
    res.add(Figure(sec, "runner overhead (paired difference)", "ms", overhead, note="target < 500 ms"))


def bench_fetch(res: Results, size: int, runs: int) -> None:
    """vmrunner fetch (sha256 + vet) against curl -o, alternated; then 8 fetchers at once on one cache."""
    sec = "5. image fetch"
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-fetch-"))
    src = root / "srv"
    src.mkdir()
    image = src / "disk.img"
    make_image(image, size)
    with open(image, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(CountingHandler, directory=str(src)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/disk.img"
    mib = size / (1 << 20)

    def env(cache: Path) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "IMG_SOURCE": url,
            "IMG_FORMAT": "raw",
            "IMG_CHECKSUM": f"sha256:{digest}",
            "IMAGE_DIR": str(cache),
            "HOSTNAME": "vm-0",
            "LOG_LEVEL": "WARNING",
        }

    curl: list[float] = []
    curl_fsync: list[float] = []
    runner: list[float] = []
    try:
        for i in range(runs):
            out = root / f"curl-{i}"
            begin = time.monotonic()
            subprocess.run(["curl", "-sf", "-o", str(out), url], check=True)
            curl.append(mib / (time.monotonic() - begin))
            with open(out, "rb") as written:  # the runner fsyncs before its rename: curl's equivalent
                os.fsync(written.fileno())
            curl_fsync.append(mib / (time.monotonic() - begin))
            out.unlink()
            cache = root / f"cache-{i}"
            cache.mkdir()
            begin = time.monotonic()
            subprocess.run([*VMRUNNER, "fetch"], env=env(cache), check=True, stdout=subprocess.DEVNULL)
            runner.append(mib / (time.monotonic() - begin))
            shutil.rmtree(cache)
        eight, codes, served = _eight_at_once(env(root / "shared-cache"), root / "shared-cache")
    finally:
        httpd.shutdown()
        httpd.server_close()
        shutil.rmtree(root, ignore_errors=True)
    curl_name, sync_name = f"curl -o, {mib:.0f} MiB from loopback HTTP", "curl -o, then fsync"
    res.add(Figure(sec, curl_name, "MiB/s", curl))
    res.add(Figure(sec, sync_name, "MiB/s", curl_fsync))
    res.add(Figure(sec, "vmrunner fetch (sha256, fsync, vet)", "MiB/s", runner, curl_name, "target >= 0.9"))
    res.add(Figure(sec, "  the same, against curl then fsync", "MiB/s", runner, sync_name, "target >= 0.9"))
    one = "one vmrunner fetch (median of above)"
    res.add(Figure(sec, one, "s", [mib / statistics.median(runner)] if runner else []))
    note = f"exit codes {sorted(set(codes))}"
    res.add(Figure(sec, "8 vmrunner fetch at once, one cache", "s", [eight], one, note))
    res.add(Figure(sec, "  bytes served for 8 fetchers / image size", "x", [served / size], note="must be 1.00"))


def bench_check(res: Results, size: int, runs: int) -> None:
    """The check of a pet's base at every start (cheap: identity and re-vet) and a full re-hash, for ``size``."""
    sec = "5b. base check at start"
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-check-"))
    try:
        image = root / "base.raw"
        make_image(image, size)
        for name in ("image", "vm", "run"):
            (root / name).mkdir()
        env = runner_env(root, IMG_SOURCE=str(image), IMG_FORMAT="raw", LOG_LEVEL="WARNING")
        cfg = load(env)
        prepare(cfg)
        info = disk.info(cfg, cfg.pet_path)
        cheap, full, sums = [], [], []
        for _ in range(runs):
            begin = time.perf_counter()
            check_bound(cfg, info, restore=False)
            cheap.append((time.perf_counter() - begin) * 1000)
            begin = time.perf_counter()
            check_bound(load({**env, "VERIFY_BASE": "always"}), info, restore=False)
            full.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            subprocess.run(["sha256sum", str(image)], capture_output=True, check=True)
            sums.append(time.perf_counter() - begin)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gib = size / (1 << 30)
    res.add(Figure(sec, f"every start: identity + re-vet + reference, {gib:.0f} GiB base", "ms", cheap,
                   note="target < 100 ms"))  # fmt: skip
    ref = f"sha256sum of the {gib:.0f} GiB base"
    res.add(Figure(sec, ref, "s", sums))
    res.add(Figure(sec, "full re-hash + vet (changed base or VERIFY_BASE=always)", "s", full, ref))


def _eight_at_once(env: dict[str, str], cache: Path) -> tuple[float, list[int], int]:
    """Eight ``vmrunner fetch`` on one cache at once: seconds until all exit, their exit codes, bytes served."""
    cache.mkdir()
    CountingHandler.served[0] = 0
    begin = time.monotonic()
    procs = [subprocess.Popen([*VMRUNNER, "fetch"], env=env, stdout=subprocess.DEVNULL) for _ in range(8)]
    try:
        codes = [p.wait(600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return time.monotonic() - begin, codes, CountingHandler.served[0]


# ------------------------------------------------------------------------------------------------ 6. cold start

PORT = 8639
STEPS = (
    ("network ready (sidecar)", "sidecar", "network ready"),
    ("fetch + vet image (or hash the cached one)", "runner", ("cached ", "hashing the pet's base")),
    ("overlay (pet disk)", "runner", "created pet disk"),
    ("config drive", "runner", "config drive "),
    ("qemu spawned", "runner", "qemu started"),
    ("qemu + guest boot to its ready line", "runner", "podvm-guest: ready"),
)


def _dirs(base: Path, image: Path) -> dict[str, Path]:
    dirs = harness.volumes(base)
    (dirs["config"] / "metadata").write_text("hostname: bench\n")
    (dirs["config"] / "userdata").write_text("#cloud-config\n")
    if not (dirs["srv"] / "guest.qcow2").exists():
        shutil.copyfile(image, dirs["srv"] / "guest.qcow2")
    return dirs


def _first_http(pod: PodNet, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = harness.in_ns(pod.client_ns, ["curl", "-sf", "--max-time", "0.25", f"http://{pod.pod_ip}/"])
        if done.returncode == 0:
            return time.time()
        time.sleep(0.05)
    raise TimeoutError(f"no HTTP answer on {pod.pod_ip} within {timeout:.0f} s")


def cold_start(base: Path, image: Path, cached: bool) -> tuple[float, dict[str, float], float]:
    """Pod start (runner and sidecar at once) to the first HTTP answer; steps; the runner's RSS meanwhile."""
    dirs = _dirs(base, image)
    if not cached:
        shutil.rmtree(dirs["image"])
    shutil.rmtree(dirs["vm"], ignore_errors=True)
    dirs = _dirs(base, image)
    bed = Bed(fresh_id())
    procs: list[Proc] = []
    sidecar: Sidecar | None = None
    try:
        bed.setup()
        pod = PodNet(bed.pod.ns, bed.client.ns, bed.pod_ip)
        procs.append(harness.serve_directory(pod.pod_ns, dirs["srv"], PORT, base / "http.log"))
        env = harness.volumes_env(PORT, dirs, "bench", SHUTDOWN_TIMEOUT="1s")
        log = base / f"runner-{'cached' if cached else 'cold'}.log"
        log.unlink(missing_ok=True)
        t0 = time.time()
        runner = harness.start_runner(
            pod, [str(harness.BIN / "vmrunner"), "run"], env, harness.make_tun_node(base), log
        )
        procs.append(runner)
        sidecar = Sidecar(bed, {"HOSTNAME": "bench", "TAP_OWNER": str(harness.RUNNER_UID)}, dirs["run"])
        sidecar.start(timeout=30)
        answered = _first_http(pod, 120)
        again = time.time()
        _first_http(pod, 10)  # one more request once up: the price of a request itself (curl in a namespace)
        request_ms = (time.time() - again) * 1000
        runner_rss = rss_mib(runner.popen.pid)
        logs = {"sidecar": log_times(sidecar.log()), "runner": log_times(runner.text())}
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
        return (answered - t0) * 1000, steps, runner_rss
    finally:
        for proc in reversed(procs):
            if proc.popen.poll() is None:
                proc.kill()
        if sidecar is not None:
            sidecar.cleanup()
        bed.cleanup()


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
                total, steps, runner_rss = cold_start(base, image, cached)
                rss.append(runner_rss)
                ref = "pod start -> first HTTP answer, image not cached" if cached else None
                res.sample(sec, f"pod start -> first HTTP answer, {label}", total, ref=ref)
                for name, ms in steps.items():
                    res.sample(sec, f"  {short}: {name}", ms, note="from the logs' timestamps")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    res.add(Figure("3. footprint", "runner RSS (python only, qemu running)", "MiB", rss, note="target < 60 MiB"))
