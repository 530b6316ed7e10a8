"""The one QMP client against a real qemu monitor, and against monitors that misbehave."""

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import PodvmError
from tests.harness.wait import until
from vmrunner.qemu import qmp


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Path]:
    """A real qemu with no machine at all: its monitor answers in milliseconds."""
    sock = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ]
    )
    try:
        until("qemu's monitor", sock.exists, 10, 0.02)
        yield sock
    finally:
        qemu.kill()
        qemu.wait()


def test_commands_are_answered_by_qemu(monitor: Path) -> None:
    status = asyncio.run(qmp.execute(monitor, "query-status"))
    assert isinstance(status, dict) and status["status"] in ("prelaunch", "running", "paused")
    version, commands = asyncio.run(qmp.session(monitor, [("query-version", None), ("query-commands", None)], 5.0))
    assert isinstance(version, dict) and version["qemu"]["major"] >= 7
    assert isinstance(commands, list) and {"name": "query-status"} in commands


def test_a_refused_command_is_qemus_own_reason_on_one_line(monitor: Path) -> None:
    with pytest.raises(
        PodvmError, match=rf"^{monitor}: QMP no-such-command failed: The command no-such-command has not been found$"
    ):
        asyncio.run(qmp.execute(monitor, "no-such-command"))
    with pytest.raises(PodvmError, match=r"QMP human-monitor-command failed: .*command-line"):
        asyncio.run(qmp.execute(monitor, "human-monitor-command", arguments={"wrong": 1}))


def test_a_monitor_nobody_listens_on_fails_at_once_or_at_the_deadline(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    begin = time.monotonic()
    with pytest.raises(PodvmError, match=rf"^{missing}: no qemu answers QMP: "):
        asyncio.run(qmp.session(missing, [("query-status", None)], 5.0, wait=False))
    assert time.monotonic() - begin < 1.0
    with pytest.raises(PodvmError, match=r"no qemu answers QMP query-status within 0.5s: .*No such file"):
        asyncio.run(qmp.execute(missing, "query-status", timeout=0.5))
    assert time.monotonic() - begin < 2.5


def test_a_deadline_that_falls_inside_a_refused_connect_still_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retrying without a pause puts most deadlines inside a connect attempt: the reason is the last refusal, never
    "accepted but never answered" for a socket nobody listens on."""
    monkeypatch.setattr(qmp, "RETRY_EVERY", 0)
    missing = tmp_path / "none.sock"
    for _ in range(10):
        with pytest.raises(PodvmError) as raised:
            asyncio.run(qmp.execute(missing, "query-status", timeout=0.05))
        assert str(raised.value).endswith(
            "within 0.05s: Failed to establish connection: [Errno 2] No such file or directory"
        )


def test_a_monitor_that_accepts_but_never_greets_costs_the_timeout_only(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(8)
    try:
        begin = time.monotonic()
        with pytest.raises(PodvmError, match="accepted the connection but never answered"):
            asyncio.run(qmp.execute(path, "query-status", timeout=0.5))
        assert 0.4 < time.monotonic() - begin < 2.0
    finally:
        silent.close()
