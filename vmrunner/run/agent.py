"""The guest agent, asked to freeze the guest's file systems for the instant a backup starts, and to thaw them.

qemu-guest-agent listens inside the guest on the virtio-serial port ``org.qemu.guest_agent.0``; qemu joins that
port to a Unix socket in ``RUN_DIR`` (see :mod:`vmrunner.run.argv`). Whatever answers there is the guest's, so it is
hostile: every wait is bounded, every reply is read at most :data:`MAX_REPLY` bytes, and any surprise (no agent,
silence, garbage, an error) means "not frozen", never a stalled backup. The protocol is the agent's own: a
``guest-sync-delimited`` first, whose answer follows a 0xFF byte that flushes what an earlier client left in the
channel, then one JSON command per line.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import escape_controls

log = logging.getLogger("vmrunner.agent")
MAX_REPLY = 64 * 1024
SYNC_TIMEOUT = 2.0  # an agent that does not answer a sync in this time is taken as absent
FREEZE_TIMEOUT = 10.0  # the agent flushes every file system before it answers a freeze
THAW_TIMEOUT = 10.0
DELIMITER = b"\xff"


class AgentError(Exception):
    """The agent is absent, silent, or answered something unusable; the message says which."""

    def __init__(self, message: str) -> None:
        super().__init__(escape_controls(message))  # it quotes the guest: never a forged line nor an escape sequence


@dataclass(frozen=True)
class Freeze:
    """The outcome of a freeze request: whether the guest's file systems are frozen, and why not."""

    frozen: bool
    why: str  # "frozen N file systems" or the reason it is not


class Agent:
    """One connection to the agent's socket, closed by :meth:`close`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, socket: Path, timeout: float) -> "Agent":
        """Connect and synchronise: the next line read is the answer to our next command.

        :raise AgentError: when nothing listens, or the agent does not echo the sync id in time.
        """
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(socket), limit=MAX_REPLY)
        except (OSError, TimeoutError) as err:
            raise AgentError(f"no guest agent channel at {socket}: {err}") from None
        agent = cls(reader, writer)
        try:
            token = secrets.randbelow(1 << 31)
            agent._send("guest-sync-delimited", {"id": token})
            async with asyncio.timeout(timeout):
                await agent._skip_to_delimiter()
                answer = await agent._reply()
        except TimeoutError:
            agent.close()
            raise AgentError(f"the guest agent did not answer guest-sync-delimited within {timeout:g}s") from None
        except AgentError:
            agent.close()
            raise
        if answer != token:
            agent.close()
            raise AgentError(f"the guest agent answered the sync with {str(answer)[:80]!r}, not {token}")
        return agent

    def _send(self, command: str, arguments: dict[str, object] | None = None) -> None:
        message: dict[str, object] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.writer.write(json.dumps(message).encode() + b"\n")

    async def _skip_to_delimiter(self) -> None:
        """Drop what precedes the 0xFF the agent sends before its sync answer, at most MAX_REPLY bytes."""
        skipped = 0
        while True:
            byte = await self.reader.read(1)
            if not byte:
                raise AgentError("the guest agent channel closed")
            if byte == DELIMITER:
                return
            skipped += 1
            if skipped > MAX_REPLY:
                raise AgentError(f"the guest agent sent over {MAX_REPLY} bytes before its sync answer")

    async def _reply(self) -> object:
        """The ``return`` of the next JSON line, at most MAX_REPLY bytes.

        :raise AgentError: on an error answer, a line too long, or something that is not an answer.
        """
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise AgentError(f"the guest agent sent a line over {MAX_REPLY} bytes") from None
        except asyncio.IncompleteReadError:
            raise AgentError("the guest agent channel closed") from None
        try:
            answer = json.loads(line)
        except (ValueError, RecursionError):
            raise AgentError(f"the guest agent sent something that is not JSON: {line[:80]!r}") from None
        if isinstance(answer, dict) and "return" in answer:
            return answer["return"]
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            raise AgentError(f"the guest agent refused: {str(answer['error'].get('desc'))[:200]}")
        raise AgentError(f"the guest agent sent an unexpected answer: {line[:80]!r}")

    async def execute(self, command: str, timeout: float, arguments: dict[str, object] | None = None) -> object:
        """Send one command and wait at most ``timeout`` seconds for its answer."""
        self._send(command, arguments)
        try:
            async with asyncio.timeout(timeout):
                return await self._reply()
        except TimeoutError:
            raise AgentError(f"the guest agent did not answer {command} within {timeout:g}s") from None

    def close(self) -> None:
        """Close the connection (never waits on the guest)."""
        self.writer.close()


async def freeze(socket: Path) -> tuple[Agent | None, Freeze]:
    """Freeze the guest's file systems; the agent connection is kept open for :func:`thaw` when it answered."""
    try:
        agent = await Agent.connect(socket, SYNC_TIMEOUT)
    except AgentError as err:
        return None, Freeze(False, str(err))
    try:
        count = await agent.execute("guest-fsfreeze-freeze", FREEZE_TIMEOUT)
    except AgentError as err:
        return agent, Freeze(False, str(err))
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return agent, Freeze(False, f"the guest agent answered the freeze with {str(count)[:80]!r}")
    if count == 0:  # e.g. only FAT or other file systems without freeze support
        return agent, Freeze(False, "the guest agent froze no file system (none of the guest's supports it)")
    return agent, Freeze(True, f"froze {count} file systems")


async def thaw(agent: Agent | None) -> None:
    """Thaw the guest's file systems (also after a failed or doubtful freeze); a failure is logged, never raised."""
    if agent is None:
        return
    try:
        await agent.execute("guest-fsfreeze-thaw", THAW_TIMEOUT)
    except AgentError as err:
        log.warning("guest agent: thaw failed: %s", err)
    finally:
        with contextlib.suppress(OSError):
            agent.close()


async def set_time(socket: Path) -> str:
    """Set the guest's clock to the host's (after a resume the guest's clock stands where the save stopped it);
    one line saying what happened, for the log."""
    try:
        agent = await Agent.connect(socket, SYNC_TIMEOUT)
    except AgentError as err:
        return f"the guest's clock was not corrected: {err}"
    try:
        await agent.execute("guest-set-time", SYNC_TIMEOUT, {"time": time.time_ns()})
    except AgentError as err:
        return f"the guest's clock was not corrected: {err}"
    finally:
        agent.close()
    return "the guest's clock was set to the host's through its agent"
