"""Real parts for vmrunner's tests: an HTTP server of our own on loopback, qcow2 images, the runner as a process."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VMRUNNER = [sys.executable, "-c", "from vmrunner.cli import main; main()"]


@dataclass
class Served:
    """What the test server does; tests change it and read the requests it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None  # close the first full-body response after this many bytes
    ranges: bool = True
    delay: float = 0.0  # seconds before answering, so concurrent fetchers overlap
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        self.files.clear()
        self.redirects.clear()
        self.drop_after, self.ranges, self.delay = None, True, 0.0
        self.requests.clear()


class Server:
    def __init__(self) -> None:
        self.served = Served()
        served = self.served

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with served.lock:
                    served.requests.append((self.path, self.headers.get("Range")))
                if served.delay:
                    threading.Event().wait(served.delay)
                if self.path in served.redirects:
                    self.send_response(302)
                    self.send_header("Location", served.redirects[self.path])
                    self.end_headers()
                    return
                body = served.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted and served.ranges:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                drop = served.drop_after
                if drop is not None and start == 0:
                    served.drop_after = None
                    self.wfile.write(body[:drop])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture(scope="session")
def http_server() -> Iterator[Server]:
    server = Server()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture
def served(http_server: Server) -> Iterator[Server]:
    http_server.served.reset()
    try:
        yield http_server
    finally:
        http_server.served.reset()


def require(tool: str) -> str:
    """The tool's path; a missing tool fails the test with a clear message (never a skip)."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run ./scripts/install-system-deps")
    return path


@pytest.fixture(scope="session")
def qcow2_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small, valid, empty qcow2 image (64 MiB virtual)."""
    require("qemu-img")
    path = tmp_path_factory.mktemp("img") / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path.read_bytes()


@pytest.fixture(scope="session")
def other_qcow2_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Another valid qcow2 (48 MiB virtual): "the image behind the URL changed"."""
    path = tmp_path_factory.mktemp("img") / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "48M"], check=True)
    return path.read_bytes()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A fresh directory every uid can use (the runner runs as 10001 in some tests); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"podvm-vm-{uuid.uuid4().hex[:8]}-", dir="/tmp"))
    path.chmod(0o755)
    try:
        for name in ("image", "vm", "run"):
            (path / name).mkdir()
            os.chown(path / name, 10001, 10001)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def runner_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a runner using ``root``'s image, vm and run directories."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "IMAGE_DIR": str(root / "image"),
        "VM_DIR": str(root / "vm"),
        "RUN_DIR": str(root / "run"),
        "METADATA": str(root / "metadata"),
        "USERDATA": str(root / "userdata"),
        "HOSTNAME": "vm-0",
        "ACCEL": "tcg",
        "VM_MEMORY": "64M",
        "HANDSHAKE_TIMEOUT": "5s",
        "FETCH_RETRIES": "2",
        **extra,
    }
