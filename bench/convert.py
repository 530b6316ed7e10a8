"""Section 5d, foreign disk import: `vmrunner fetch` of a vmdk (download, sha256, vetting, conversion to a qcow2
base, its sha256, fsync) against plain `qemu-img convert` of the same file, alternated in one run."""

import hashlib
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from bench.runner import QuietHandler, make_image
from bench.table import Figure, Results
from tests.harness.paths import VMRUNNER
from tests.harness.pod import runner_env


def bench_convert(res: Results, size: int, runs: int) -> None:
    """A ``size``-byte disk with data as a monolithicSparse vmdk: fetched and converted by the runner, against
    ``qemu-img convert -f vmdk -O qcow2`` of the local file plus an fsync, A-B then B-A."""
    sec = "5d. foreign disk import"
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-convert-"))
    src = root / "srv"
    src.mkdir()
    raw = root / "disk.raw"
    make_image(raw, size)
    vmdk = src / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(vmdk)], check=True)
    raw.unlink()
    with open(vmdk, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(src)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/disk.vmdk"
    plain: list[float] = []
    runner: list[float] = []

    def convert(i: int) -> None:
        out = root / f"plain-{i}.qcow2"
        begin = time.monotonic()
        subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "qcow2", str(vmdk), str(out)], check=True)
        with open(out, "rb") as written:  # the runner's base is on disk before its rename
            os.fsync(written.fileno())
        plain.append(time.monotonic() - begin)
        out.unlink()

    def fetch(i: int) -> None:
        cache = root / f"cache-{i}"
        cache.mkdir()
        env = runner_env(root, IMG_SOURCE=url, IMG_FORMAT="vmdk", IMG_CHECKSUM=f"sha256:{digest}",
                         IMAGE_DIR=str(cache), LOG_LEVEL="WARNING")  # fmt: skip
        begin = time.monotonic()
        subprocess.run([*VMRUNNER, "fetch"], env=env, check=True, stdout=subprocess.DEVNULL)
        runner.append(time.monotonic() - begin)
        shutil.rmtree(cache)

    try:
        for i in range(runs):
            for step in (convert, fetch) if i % 2 == 0 else (fetch, convert):
                step(i)
    finally:
        httpd.shutdown()
        httpd.server_close()
        shutil.rmtree(root, ignore_errors=True)
    gib = size / (1 << 30)
    plain_name = f"qemu-img convert -f vmdk -O qcow2 + fsync, {gib:g} GiB vmdk"
    res.add(Figure(sec, plain_name, "s", plain))
    note = "download, sha256, vet, convert, sha256, fsync"
    res.add(Figure(sec, "vmrunner fetch of the vmdk from loopback HTTP", "s", runner, plain_name, note))
