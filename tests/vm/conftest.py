"""Real parts for vmrunner's tests as fixtures: the image server (tests.harness.httpserver), qcow2 images, a
directory every uid can use."""

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.httpserver import Server
from tests.harness.pod import require


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
