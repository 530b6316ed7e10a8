"""The one way the runner runs ``qemu-img``: always under a timeout, one mapping of its failures to one line.

Every caller says what a run is for (a :class:`Job`): the file it works on, what it is doing, the volume to name
when it fills up. A failure is then one line naming them: qemu-img not installed, the volume full, the image in use
by a running qemu (qemu-img's own lock), a run past its timeout, or qemu-img's own last error line. Vetting an
untrusted image adds CPU and address-space limits, so a crafted header cannot make qemu-img spin or balloon.
"""

import asyncio
import os
import re
import resource
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.errors import PodvmError

QUICK = 60.0  # seconds for a command that reads or writes headers only (info, check, create, resize)
COPY = 6 * 3600.0  # seconds for one that copies a disk (convert, rebase): hours for a large one on a slow volume
NOT_INSTALLED = "qemu-img is not installed (it is part of qemu-utils)"
# The image ``run`` hands over as standard input, by a name inside procfs: qemu-img unlinks a file it failed to
# create, and as root it would remove the /dev/stdin link itself (a later create then wrote a regular file there).
STDIN = "/dev/fd/0"
_IN_USE = ('Failed to get "write" lock', 'Failed to get shared "write" lock')
PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")  # what ``convert -p`` prints


class InUse(PodvmError):
    """qemu-img could not take the image's lock: a running qemu holds it."""


@dataclass(frozen=True)
class Job:
    """What one qemu-img run is for, as its errors say it."""

    subject: str  # the file it works on (or the image's name), first in every error
    doing: str  # what for, e.g. "creating the pet disk"
    volume: str = ""  # e.g. "VM_DIR=/vm": the volume a "no space left" names; empty: the subject's
    timeout: float = QUICK
    error: type[PodvmError] = PodvmError  # ImageRejected when vetting: a failure refuses the image
    ok: tuple[int, ...] = (0,)  # exit statuses that are not failures (qemu-img check: 3 is leaked clusters only)
    limits: tuple[int, int] | None = None  # (CPU seconds, address-space bytes) for an untrusted image


def _describe(argv: Sequence[str]) -> str:
    """``qemu-img VERB`` with its ``-f FORMAT``: how an error names the command."""
    fmt = f" -f {argv[argv.index('-f') + 1]}" if "-f" in argv[:-1] else ""
    return f"qemu-img {argv[1]}{fmt}"


def last_line(text: str) -> str:
    """The last non-empty line of qemu-img's output, the one that says why."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def failure(argv: Sequence[str], job: Job, returncode: int, stderr: str) -> PodvmError | None:
    """The error a finished run means, or None when its exit status is one of ``job.ok``; pure, for unit tests."""
    if returncode in job.ok:
        return None
    if "No space left on device" in stderr:
        return job.error(f"{job.volume or job.subject}: no space left on device while {job.doing}")
    if any(marker in stderr for marker in _IN_USE):
        return InUse(f"{job.subject}: in use by a running qemu; stop the VM before {job.doing}")
    return job.error(f"{job.subject}: {_describe(argv)} failed ({job.doing}): {last_line(stderr)}")


def _timed_out(argv: Sequence[str], job: Job) -> PodvmError:
    return job.error(f"{job.subject}: qemu-img {argv[1]} took longer than {job.timeout:g}s; refused")


def _preexec(job: Job) -> Callable[[], None] | None:
    if job.limits is None:
        return None
    cpu, address_space = job.limits

    def limit() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return limit


def percent_lines(say: Callable[[str], None], every: float = 5.0) -> Callable[[bytes], None]:
    """A ``progress`` for :func:`run` of ``convert -p``: ``say(percent)`` at most every ``every`` seconds."""
    last = time.monotonic()

    def progress(chunk: bytes) -> None:
        nonlocal last
        found = PROGRESS.findall(chunk)
        if found and time.monotonic() - last >= every:
            last = time.monotonic()
            say(found[-1].decode())

    return progress


def run(
    argv: Sequence[str],
    job: Job,
    progress: Callable[[bytes], None] | None = None,
    *,
    stdin: int | None = None,
    pass_fds: Sequence[int] = (),
) -> str:
    """qemu-img's standard output; ``progress`` gets each chunk of it as it comes (``convert -p``). ``stdin``: a
    descriptor of the image, named :data:`STDIN` in ``argv``, for a file on a volume another pod can write (qemu-img
    then reopens the inode the runner opened, never a path); ``pass_fds``: more of them, named ``/dev/fd/N``.

    :raise PodvmError: (``job.error``) as :func:`failure` says, or when it is not installed or runs past its time.
    """
    deadline = time.monotonic() + job.timeout
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            pass_fds=pass_fds,
            preexec_fn=_preexec(job),  # noqa: PLW1509 setrlimit only, no threads are started before exec
        )
    except FileNotFoundError:
        raise PodvmError(NOT_INSTALLED) from None
    with proc:
        assert proc.stdout is not None
        out = b""
        if progress is not None:
            while True:  # never waiting past the deadline: a qemu-img hung before its next line prints nothing
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    proc.kill()
                    raise _timed_out(argv, job)
                if not (chunk := os.read(proc.stdout.fileno(), 4096)):
                    break
                progress(chunk)
        try:
            rest, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise _timed_out(argv, job) from None
        out += rest
    error = failure(argv, job, proc.returncode, err.decode(errors="replace"))
    if error is not None:
        raise error
    return out.decode(errors="replace")


async def run_async(argv: Sequence[str], job: Job, *, stdin: int | None = None) -> str:
    """:func:`run` for the event loop (backups run beside qemu): the same errors, the loop never blocked."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
        )
    except FileNotFoundError:
        raise PodvmError(NOT_INSTALLED) from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), job.timeout)
    except TimeoutError:
        raise _timed_out(argv, job) from None
    finally:  # timed out or cancelled (a backup stopped by SIGTERM): qemu-img does not outlive its caller
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    error = failure(argv, job, proc.returncode if proc.returncode is not None else -1, err.decode(errors="replace"))
    if error is not None:
        raise error
    return out.decode(errors="replace")
