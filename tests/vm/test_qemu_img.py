"""The one qemu-img runner against the real qemu-img: its failures, each one line, and its deadline."""

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import ImageRejected, PodvmError
from vmrunner.qemu import img


def _image(tmp_path: Path, size: str = "16M") -> Path:
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def test_a_run_gives_qemu_imgs_output_and_its_progress(tmp_path: Path) -> None:
    source = _image(tmp_path)
    out = img.run(["qemu-img", "info", "-f", "qcow2", "--output=json", str(source)], img.Job(str(source), "reading"))
    assert '"virtual-size": 16777216' in out
    chunks: list[bytes] = []
    argv = ["qemu-img", "convert", "-p", "-f", "qcow2", "-O", "raw", str(source), str(tmp_path / "copy.raw")]
    img.run(argv, img.Job("copy", "copying", timeout=img.COPY), chunks.append)
    assert b"100.00/100%" in b"".join(chunks)
    assert (tmp_path / "copy.raw").stat().st_size == 16 << 20


def test_a_failure_is_qemu_imgs_last_line_naming_the_file_and_the_purpose(tmp_path: Path) -> None:
    missing = tmp_path / "none.qcow2"
    with pytest.raises(ImageRejected, match=rf"^{missing}: qemu-img info -f qcow2 failed \(vetting\): .*No such file"):
        img.run(
            ["qemu-img", "info", "-f", "qcow2", str(missing)], img.Job(str(missing), "vetting", error=ImageRejected)
        )
    with pytest.raises(PodvmError, match=r"^qemu-img is not installed \(it is part of qemu-utils\)$"):
        img.run(["no-such-qemu-img", "info", str(missing)], img.Job(str(missing), "reading"))
    with pytest.raises(PodvmError, match=r"^qemu-img is not installed"):
        asyncio.run(img.run_async(["no-such-qemu-img", "info", str(missing)], img.Job(str(missing), "reading")))


def test_an_image_a_running_qemu_holds_is_in_use(tmp_path: Path) -> None:
    held = _image(tmp_path)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(held)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # qemu-io takes the image's lock as it opens it
        job = img.Job(str(held), "growing it", "VM_DIR=/vm")
        with pytest.raises(img.InUse, match=rf"^{held}: in use by a running qemu; stop the VM before growing it$"):
            img.run(["qemu-img", "resize", "-q", "-f", "qcow2", str(held), "32M"], job)
        with pytest.raises(img.InUse):
            asyncio.run(img.run_async(["qemu-img", "resize", "-q", "-f", "qcow2", str(held), "32M"], job))
    finally:
        holder.kill()
        holder.wait()


def test_a_run_past_its_timeout_is_stopped(tmp_path: Path) -> None:
    """qemu-img opening a FIFO blocks until a writer comes: no writer comes, the timeout ends it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    job = img.Job(str(fifo), "vetting", timeout=0.5, error=ImageRejected)
    begin = time.monotonic()
    with pytest.raises(ImageRejected, match=rf"^{fifo}: qemu-img info took longer than 0.5s; refused$"):
        img.run(["qemu-img", "info", "-f", "raw", str(fifo)], job)
    with pytest.raises(ImageRejected, match=r"took longer than 0\.5s"):
        asyncio.run(img.run_async(["qemu-img", "info", "-f", "raw", str(fifo)], job))
    assert time.monotonic() - begin < 5


def _qemu_imgs_on(path: Path) -> list[int]:
    """The qemu-img processes whose command line names ``path``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and cmdline[0].endswith(b"qemu-img") and str(path).encode() in cmdline:
            found.append(int(proc.name))
    return found


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO nobody writes: qemu-img opening it waits for ever. A qemu-img a failed test left on it is killed."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path
    for pid in _qemu_imgs_on(path):
        os.kill(pid, signal.SIGKILL)


def test_a_run_with_progress_that_stops_printing_is_stopped_at_its_timeout(fifo: Path, tmp_path: Path) -> None:
    """``convert -p`` from the FIFO: qemu-img prints 0% and hangs, never printing another line."""
    argv = ["qemu-img", "convert", "-p", "-f", "raw", "-O", "raw", str(fifo), str(tmp_path / "copy.raw")]
    chunks: list[bytes] = []
    begin = time.monotonic()
    with pytest.raises(PodvmError, match=rf"^{fifo}: qemu-img convert took longer than 0.5s"):
        img.run(argv, img.Job(str(fifo), "restoring", timeout=0.5), chunks.append)
    assert time.monotonic() - begin < 5 and b"".join(chunks).strip() == b"(0.00/100%)"
    assert _qemu_imgs_on(fifo) == [], "the hung qemu-img was left running"


def test_a_cancelled_run_stops_its_qemu_img(fifo: Path) -> None:
    """A backup cancelled by SIGTERM must not leave its qemu-img behind on the volume."""

    async def cancel_it() -> None:
        job = img.Job(str(fifo), "creating the backup target", timeout=60)
        task = asyncio.create_task(img.run_async(["qemu-img", "info", "-f", "raw", str(fifo)], job))
        await asyncio.sleep(0.3)
        assert _qemu_imgs_on(fifo), "qemu-img did not start"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_it())
    assert _qemu_imgs_on(fifo) == [], "the cancelled qemu-img was left running"


def test_failures_map_to_one_line_each() -> None:
    argv = ("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "/image/base", "/vm/pet.qcow2")
    job = img.Job("/vm/pet.qcow2", "creating the pet disk", "VM_DIR=/vm")
    full = img.failure(argv, job, 1, "qemu-img: error while writing at byte 0: No space left on device\n")
    assert str(full) == "VM_DIR=/vm: no space left on device while creating the pet disk"
    other = img.failure(argv, job, 1, "first\nqemu-img: Could not open '/image/base': Permission denied\n\n")
    assert type(other) is PodvmError
    assert str(other) == (
        "/vm/pet.qcow2: qemu-img convert -f raw failed (creating the pet disk): "
        "qemu-img: Could not open '/image/base': Permission denied"
    )
    assert str(img.failure(argv, job, 1, "")).endswith("(no output)")
    assert img.failure(argv, job, 0, "warnings") is None
    checked = img.Job("/image/x", "vetting", ok=(0, 3), error=ImageRejected)
    assert img.failure(("qemu-img", "check", "-f", "qcow2", "/image/x"), checked, 3, "leaked clusters") is None
    assert type(img.failure(("qemu-img", "check", "/image/x"), checked, 2, "corrupt")) is ImageRejected
