"""vmrunner's two performance goals, measured side by side in one run.

1. Overhead: from starting ``vmrunner run`` (cached, vetted image; existing pet disk) to qemu answering QMP with
   ``running``, against qemu started alone with the same argv. Goal: runner overhead under 500 ms (median).
2. Fetch: ``vmrunner fetch`` with IMG_CHECKSUM (stream, hash, vet, rename) against ``curl -o`` of the same ~1 GiB
   file from the same loopback HTTP server. Goal: at least 0.9 of curl's throughput.

Run as root (it makes a throwaway network namespace with a tap): ``.venv/bin/python bench/runner.py [-n 7]``.
"""

import argparse
import asyncio
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from qemu.qmp import QMPClient

from shared.handshake import Handshake

REPO = Path(__file__).resolve().parents[1]
VMRUNNER = [sys.executable, "-c", "from vmrunner.cli import main; main()"]


async def _until_running(sock: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        client = QMPClient("bench")
        try:
            await client.connect(str(sock))
            status = await client.execute("query-status")
            await client.disconnect()
            if isinstance(status, dict) and status.get("status") == "running":
                return
        except Exception:  # noqa: S110 not up yet: poll again
            pass
        await asyncio.sleep(0.005)
    raise TimeoutError(f"{sock}: qemu not running in time")


def time_to_running(argv: list[str], env: dict[str, str], sock: Path) -> float:
    """Seconds from spawning ``argv`` to QMP reporting ``running``; the process is stopped afterwards."""
    sock.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_until_running(sock, started + 30))
        return time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def bench_overhead(root: Path, runs: int) -> None:
    base = root / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    for name in ("image", "vm", "run"):
        (root / name).mkdir()
    Handshake("tap0", "br0", "0a:58:c0:a8:fe:02", "192.168.254.2", "192.168.254.1", 30, 1500, "10.0.0.5", (), (),
              "vm-0", True, None).write(root / "run")  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMG_SOURCE": str(base),
        "IMAGE_DIR": str(root / "image"),
        "VM_DIR": str(root / "vm"),
        "RUN_DIR": str(root / "run"),
        "HOSTNAME": "vm-0",
        "ACCEL": "tcg",
        "VM_MEMORY": "128M",
        "SHUTDOWN_TIMEOUT": "100ms",
        "METADATA": str(root / "metadata"),
        "USERDATA": str(root / "userdata"),
    }
    (root / "metadata").write_text("name: bench\n")
    sock = root / "run" / "qmp.sock"
    subprocess.run([*VMRUNNER, "fetch"], env=env, check=True)
    plan = json.loads(subprocess.run([*VMRUNNER, "plan"], env=env, capture_output=True, check=True).stdout)
    with netns_with_tap() as ns:
        prefix = ["ip", "netns", "exec", ns]
        time_to_running([*prefix, *VMRUNNER, "run"], env, sock)  # creates the pet disk and warms caches
        subprocess.run([*VMRUNNER, "configdrive", str(root / "run" / "config-drive.iso")], env=env, check=True)
        runner, qemu = [], []
        for _ in range(runs):
            runner.append(time_to_running([*prefix, *VMRUNNER, "run"], env, sock))
            qemu.append(time_to_running([*prefix, *plan["qemu"]], env, sock))
    r, q = statistics.median(runner), statistics.median(qemu)
    print(f"start to qemu running, cached image, median of {runs}:")
    print(f"  vmrunner run      {r * 1000:7.0f} ms")
    print(f"  qemu alone        {q * 1000:7.0f} ms")
    print(f"  runner overhead   {(r - q) * 1000:7.0f} ms   (goal < 500 ms)")


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


def bench_fetch(root: Path, size: int, runs: int) -> None:
    src = root / "srv"
    src.mkdir()
    image = src / "disk.img"
    make_image(image, size)
    with open(image, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    handler = partial(QuietHandler, directory=str(src))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/disk.img"
    curl_times, synced_times, runner_times = [], [], []
    try:
        for i in range(runs):
            out = root / f"curl-{i}"
            started = time.monotonic()
            subprocess.run(["curl", "-sf", "-o", str(out), url], check=True)
            curl_times.append(time.monotonic() - started)
            with open(out, "rb") as written:  # the runner fsyncs before its rename; this is curl's equivalent
                os.fsync(written.fileno())
            synced_times.append(time.monotonic() - started)
            out.unlink()
            cache = root / f"cache-{i}"
            cache.mkdir()
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "IMG_SOURCE": url,
                "IMG_FORMAT": "raw",
                "IMG_CHECKSUM": f"sha256:{digest}",
                "IMAGE_DIR": str(cache),
                "HOSTNAME": "vm-0",
                "LOG_LEVEL": "WARNING",
            }
            started = time.monotonic()
            subprocess.run([*VMRUNNER, "fetch"], env=env, check=True)
            runner_times.append(time.monotonic() - started)
            shutil.rmtree(cache)
    finally:
        httpd.shutdown()
        httpd.server_close()
    c, cs, r = (statistics.median(t) for t in (curl_times, synced_times, runner_times))
    mib = size / (1 << 20)
    print(f"fetch of {mib:.0f} MiB from a loopback HTTP server, median of {runs}:")
    print(f"  curl -o                          {mib / c:7.0f} MiB/s")
    print(f"  curl -o, then fsync              {mib / cs:7.0f} MiB/s")
    print(f"  vmrunner fetch (sha256, fsync, vet) {mib / r:4.0f} MiB/s")
    print(f"  ratio runner/curl                {c / r:7.2f}   (goal >= 0.9)")
    print(f"  ratio runner/(curl + fsync)      {cs / r:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", "--runs", type=int, default=7, help="repetitions of the overhead measurement")
    parser.add_argument("--fetch-runs", type=int, default=3)
    parser.add_argument("--size", default=str(1 << 30), help="bytes of the fetched image")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-"))
    try:
        (root / "overhead").mkdir()
        bench_overhead(root / "overhead", args.runs)
        bench_fetch(root, int(args.size), args.fetch_runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
