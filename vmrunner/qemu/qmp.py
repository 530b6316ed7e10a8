"""The one QMP client of the runner: one short connection per call, everything bounded by a deadline.

Calls are short (connect, greeting, capabilities negotiation, the commands, disconnect) so that no caller holds the
monitor the shutdown needs, and every call ends within its timeout: a qemu whose monitor accepts connections but
never greets (hung, stopped, or something else on the socket) would otherwise hold the caller forever, and a
SIGTERM with it until the kubelet kills the pod. Errors are one :class:`PodvmError` line naming the socket and the
command: qemu's own reason when it refused the command, else what went wrong on the way.
"""

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from shared.errors import PodvmError

TIMEOUT = 5.0  # seconds one QMP call may take, connect and greeting included
RETRY_EVERY = 0.1  # seconds between two connects while qemu is not there yet
Command = tuple[str, dict[str, object] | None]
FIRST_LOOK = 0.02  # seconds before the first look at a job qemu runs: a small one is often done by then


async def execute(
    socket: Path, command: str, timeout: float = TIMEOUT, arguments: dict[str, object] | None = None
) -> object:
    """qemu's answer to ``command`` (with ``arguments``) on the monitor at ``socket``; the connect is retried while
    qemu starts, all of it within ``timeout`` seconds.

    :raise PodvmError: when no qemu answers there in time, or the command fails.
    """
    return (await session(socket, [(command, arguments)], timeout))[0]


async def session(
    socket: Path, commands: Sequence[Command], timeout: float, *, wait: bool = True, fd: int | None = None
) -> list[object]:
    """qemu's answers to ``commands``, sent one after the other on one connection within ``timeout`` seconds.
    With ``wait=False`` a monitor nobody listens on fails at once instead of being retried until the deadline.
    ``fd`` is handed to qemu (SCM_RIGHTS) before the first command, which takes it (``getfd`` or ``add-fd``):
    qemu then writes or opens a file the runner opened, never a path.

    :raise PodvmError: when no qemu answers there in time, or a command fails.
    """
    names = ", ".join(name for name, _ in commands)
    refused: list[str] = []  # why the last connect failed; empty before the first failure and once qemu accepted
    try:
        async with asyncio.timeout(timeout):
            return await _session(socket, commands, refused, wait, fd)
    except TimeoutError:
        why = refused[-1] if refused else "the monitor accepted the connection but never answered"
        raise PodvmError(f"{socket}: no qemu answers QMP {names} within {timeout:g}s: {why}") from None


def next_look(done: int, total: int, elapsed: float, most: float) -> float:
    """Seconds until a job of qemu's (a backup, a save) that did ``done`` of ``total`` in ``elapsed`` seconds is worth
    another look: when it should end at its pace so far, so that its end is seen within FIRST_LOOK rather than up to a
    whole polling period late; at least FIRST_LOOK, at most ``most``. One that shows no progress yet is asked again
    after as long as it has run."""
    if done <= 0 or elapsed <= 0:
        return min(most, max(FIRST_LOOK, elapsed))
    left = max(0, total - done) * elapsed / done
    return min(most, max(FIRST_LOOK, left))


async def _session(
    socket: Path, commands: Sequence[Command], refused: list[str], wait: bool, fd: int | None
) -> list[object]:
    from qemu.qmp import ExecuteError, QMPClient, QMPError

    # The library logs every failed connect at ERROR; retrying is the normal way to wait for a starting qemu.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    client = QMPClient("vmrunner")
    while True:
        try:
            await client.connect(str(socket))
            break
        except (QMPError, OSError) as err:
            if not wait:
                raise PodvmError(f"{socket}: no qemu answers QMP: {err}") from None
            refused[:] = [str(err)]  # kept while the next attempt runs: the deadline may fall inside it
            await asyncio.sleep(RETRY_EVERY)
    refused.clear()
    command = ""
    try:
        if fd is not None:
            client.send_fd_scm(fd)
        answers = []
        for command, arguments in commands:
            answers.append(await client.execute(command, arguments))
        return answers
    except ExecuteError as err:  # qemu refused the command: its own one-line reason
        raise PodvmError(f"{socket}: QMP {command} failed: {err}") from None
    except (QMPError, OSError, EOFError) as err:
        raise PodvmError(f"{socket}: QMP {command} failed: {err!r}") from None
    finally:
        # After ``quit`` qemu closes the socket first; the library reports that as an error on disconnect.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()
