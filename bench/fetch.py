"""Section 5, image fetch: `vmrunner fetch` against curl, and eight fetchers at once on one cache."""

import hashlib
import http.server
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import BinaryIO, ClassVar

from bench.runner import QuietHandler, make_image
from bench.table import Figure, Results
from tests.harness.paths import VMRUNNER
from tests.harness.pod import runner_env


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
        checksum = f"sha256:{digest}"
        return runner_env(
            root, IMG_SOURCE=url, IMG_FORMAT="raw", IMG_CHECKSUM=checksum, IMAGE_DIR=str(cache), LOG_LEVEL="WARNING"
        )

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
