"""The save of ``ON_STOP=suspend`` against a real qemu (no guest): the stream is qemu's own migration format, made
durable, and written without qemu's default migration speed limit (128 MiB/s, meant for a live migration over a
shared network), which made a 1 GiB guest's save three times slower than its volume."""

import asyncio
import os
from pathlib import Path

from tests.harness.qemu import monitored
from vmrunner.qemu import qmp
from vmrunner.run import suspend

QEMU_FILE_MAGIC = b"QEVM"  # the first bytes of every migration stream


def test_a_save_writes_qemus_stream_at_the_volumes_speed_not_at_migrations_default_limit(tmp_path: Path) -> None:
    monitor = tmp_path / "monitor.sock"
    stream = tmp_path / "state"
    with monitored("pc", ["-m", "64", "-S"], monitor):
        fd = os.open(stream, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            seconds = asyncio.run(suspend.save(monitor, fd, 60))
        finally:
            os.close(fd)
        limits = asyncio.run(qmp.execute(monitor, "query-migrate-parameters"))
        done = asyncio.run(qmp.execute(monitor, "query-migrate"))
    assert isinstance(limits, dict) and limits["max-bandwidth"] == suspend.SAVE_BANDWIDTH
    assert isinstance(done, dict) and done["status"] == "completed"
    assert seconds > 0 and stream.read_bytes()[:4] == QEMU_FILE_MAGIC


def test_a_resume_runs_the_guest_once_qemu_has_read_the_whole_stream_through_the_shared_offset(tmp_path: Path) -> None:
    """The resume paces its looks by how far qemu has read: that works only because qemu reads through the offset
    it shares with the runner's descriptor, which this checks along with the guest running on."""
    stream = tmp_path / "state"
    with monitored("pc", ["-m", "64", "-S"], tmp_path / "saving.sock"):
        fd = os.open(stream, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            asyncio.run(suspend.save(tmp_path / "saving.sock", fd, 60))
        finally:
            os.close(fd)
    monitor = tmp_path / "resuming.sock"
    fd = os.open(stream, os.O_RDONLY)
    try:
        with monitored("pc", ["-m", "64", "-S", "-incoming", f"fd:{fd}"], monitor, pass_fds=[fd]):

            async def resume() -> tuple[float, object]:
                exited = asyncio.create_task(asyncio.Event().wait())  # qemu is ours to stop: never seen exiting
                seconds = await suspend.resumed(monitor, fd, exited)
                exited.cancel()
                return seconds, await qmp.execute(monitor, "query-status")

            seconds, status = asyncio.run(resume())
            read = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
    assert isinstance(status, dict) and status["status"] == "running"
    assert seconds > 0 and read == stream.stat().st_size
