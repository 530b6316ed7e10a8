"""The guest agent client against agents written to misbehave: whatever the guest sends (nothing, a flood, garbage,
an error, a wrong sync), a freeze request ends within its bounds with "not frozen" and a reason; a well-behaved
agent is frozen and then thawed. Real Unix sockets; the agents are asyncio servers in the test."""

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from vmrunner.run import agent


class Peer:
    """The agent's end of one connection: what it reads, writes, and the commands it was sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[str]) -> None:
        self.reader, self.writer, self.seen = reader, writer, seen

    async def command(self) -> dict[str, object]:
        """The next command, recorded by name."""
        message = json.loads(await self.reader.readline())
        self.seen.append(str(message["execute"]))
        return dict(message)

    async def sync(self) -> None:
        """Answer the sync as a real agent does: 0xFF, then the id."""
        sync = await self.command()
        arguments = sync["arguments"]
        assert isinstance(arguments, dict)
        await self.send(b"\xff" + json.dumps({"return": arguments["id"]}).encode() + b"\n")

    async def send(self, data: bytes) -> None:
        """Write and drain."""
        self.writer.write(data)
        await self.writer.drain()


Handler = Callable[[Peer], Awaitable[None]]


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "SYNC_TIMEOUT", 0.3)
    monkeypatch.setattr(agent, "FREEZE_TIMEOUT", 0.3)
    monkeypatch.setattr(agent, "THAW_TIMEOUT", 0.3)


async def _freeze_with(tmp_path: Path, handler: Handler) -> tuple[agent.Freeze, list[str]]:
    """Run a freeze and a thaw against ``handler``; the commands it received are returned beside the outcome.
    The whole exchange must end within a few seconds: a hang is a failure, not a slow pass."""
    socket = tmp_path / "agent.sock"
    seen: list[str] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ValueError):
            await handler(Peer(reader, writer, seen))

    server = await asyncio.start_unix_server(recording, str(socket))
    try:
        async with asyncio.timeout(5):
            conn, freeze = await agent.freeze(socket)
            await agent.thaw(conn)
    finally:
        server.close()
    return freeze, seen


async def _good(peer: Peer) -> None:
    await peer.sync()
    await peer.command()
    await peer.send(b'{"return": 2}\n')
    await peer.command()
    await peer.send(b'{"return": 2}\n')


def test_a_well_behaved_agent_freezes_and_is_thawed(tmp_path: Path) -> None:
    freeze, seen = asyncio.run(_freeze_with(tmp_path, _good))
    assert freeze == agent.Freeze(True, "froze 2 file systems")
    assert seen == ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


def test_no_agent_channel_is_not_frozen(tmp_path: Path) -> None:
    conn, freeze = asyncio.run(agent.freeze(tmp_path / "absent.sock"))
    assert conn is None and not freeze.frozen
    assert "no guest agent channel" in freeze.why


async def _silent(peer: Peer) -> None:
    await peer.reader.read(-1)


async def _flood(peer: Peer) -> None:
    for _ in range(200):
        await peer.send(b"A" * 4096)


async def _long_line(peer: Peer) -> None:
    await peer.command()
    await peer.send(b"\xff" + b"7" * (agent.MAX_REPLY * 2))


async def _wrong_sync(peer: Peer) -> None:
    await peer.command()
    await peer.send(b'\xff{"return": 12345678901}\n')


async def _garbage(peer: Peer) -> None:
    await peer.command()
    await peer.send(b"\xff\x1b[2J not json\n")


async def _refuses_freeze(peer: Peer) -> None:
    await peer.sync()
    await peer.command()
    await peer.send(b'{"error": {"class": "GenericError", "desc": "fsfreeze is disabled"}}\n')
    await peer.reader.read(-1)


async def _silent_after_sync(peer: Peer) -> None:
    await peer.sync()
    await peer.reader.read(-1)


async def _froze_nothing(peer: Peer) -> None:
    await peer.sync()
    await peer.command()
    await peer.send(b'{"return": 0}\n')
    await peer.reader.read(-1)


async def _odd_count(peer: Peer) -> None:
    await peer.sync()
    await peer.command()
    await peer.send(b'{"return": true}\n')
    await peer.reader.read(-1)


@pytest.mark.parametrize(
    ("handler", "why"),
    [
        (_silent, "did not answer guest-sync-delimited"),
        (_flood, "bytes before its sync answer"),
        (_long_line, "a line over"),
        (_wrong_sync, "answered the sync with"),
        (_garbage, "not JSON"),
        (_refuses_freeze, "refused: fsfreeze is disabled"),
        (_silent_after_sync, "did not answer guest-fsfreeze-freeze"),
        (_odd_count, "answered the freeze with 'True'"),
        (_froze_nothing, "froze no file system"),
    ],
)
def test_a_hostile_agent_means_not_frozen_within_bounds(tmp_path: Path, handler: Handler, why: str) -> None:
    freeze, _seen = asyncio.run(_freeze_with(tmp_path, handler))
    assert not freeze.frozen
    assert why in freeze.why
