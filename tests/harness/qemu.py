"""A bare qemu for the real-qemu tests: TCG, no display, the given devices, a QMP monitor; killed when done."""

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.harness.wait import until


@contextlib.contextmanager
def monitored(
    machine: str, devices: Sequence[str], monitor: Path, pass_fds: Sequence[int] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """qemu on ``machine`` with ``devices`` (and ``pass_fds`` open in it), once its QMP monitor at ``monitor`` is
    there; a qemu that exits at once (a device it refuses) fails with its own message."""
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-machine", machine, "-accel", "tcg", "-display", "none", *devices,
        "-chardev", f"socket,id=monitor,path={monitor},server=on,wait=off", "-mon", "chardev=monitor,mode=control",
    ]  # fmt: skip
    qemu = subprocess.Popen(argv, stderr=subprocess.PIPE, pass_fds=pass_fds)
    try:
        until("qemu's monitor", lambda: monitor.exists() or qemu.poll() is not None, 10, 0.02)
        assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else ""
        yield qemu
    finally:
        qemu.kill()
        qemu.wait()
