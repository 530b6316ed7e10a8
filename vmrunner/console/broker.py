"""The console broker: the one client of qemu's serial port, shared by every viewer.

qemu's serial chardev socket accepts one client at a time. The broker is that client and fans the port out: what
the guest writes goes to every attached viewer (``vmrunner console`` on the broker's own Unix socket in RUN_DIR, the
web page's serial WebSocket), and what any viewer types goes to the guest. The log's copy does not pass through here:
qemu writes it to the chardev's ``logfile`` FIFO itself, so it stays complete whoever is attached.

A viewer that does not keep up (a stalled browser, a terminal on a slow link) is dropped rather than buffered
without bound or allowed to hold up the others: a hostile guest can write as fast as it likes.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger("vmrunner.console")

REPLAY_BYTES = 16 * 1024  # the guest's latest output a new viewer sees first (a prompt, a boot menu)
VIEWER_BACKLOG = 256  # chunks queued for one viewer before it counts as stalled and is dropped
CHUNK = 65536
RECONNECT_DELAY = 0.2  # seconds between attempts to reach qemu's serial socket while qemu starts


class Viewer:
    """One attached viewer: the guest's output queued for it; None in the queue means the broker let it go."""

    def __init__(self, replay: bytes) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(VIEWER_BACKLOG)
        if replay:
            self.queue.put_nowait(replay)

    async def output(self) -> AsyncIterator[bytes]:
        """The guest's output for this viewer until the broker drops it or stops."""
        while (data := await self.queue.get()) is not None:
            yield data


class Broker:
    """Fans qemu's serial port out to many viewers; ``run`` keeps the one connection to qemu."""

    def __init__(self, serial: Path) -> None:
        self.serial = serial
        self.viewers: set[Viewer] = set()
        self.recent: deque[bytes] = deque()
        self.recent_size = 0
        self.writer: asyncio.StreamWriter | None = None

    def attach(self) -> Viewer:
        """A new viewer, given the guest's latest output first."""
        viewer = Viewer(b"".join(self.recent))
        self.viewers.add(viewer)
        return viewer

    def detach(self, viewer: Viewer) -> None:
        """Forget ``viewer`` (it left)."""
        self.viewers.discard(viewer)

    async def send(self, data: bytes) -> None:
        """Type ``data`` into the guest's serial port; dropped while qemu's socket is not connected."""
        if self.writer is not None and data:
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    def _publish(self, data: bytes) -> None:
        self.recent.append(data)
        self.recent_size += len(data)
        while self.recent_size - len(self.recent[0]) >= REPLAY_BYTES:
            self.recent_size -= len(self.recent.popleft())
        for viewer in list(self.viewers):
            try:
                viewer.queue.put_nowait(data)
            except asyncio.QueueFull:
                log.warning("a console viewer fell %d chunks behind the guest's output; dropping it", VIEWER_BACKLOG)
                self._drop(viewer)

    def _drop(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        while not viewer.queue.empty():
            viewer.queue.get_nowait()
        viewer.queue.put_nowait(None)

    async def run(self) -> None:
        """Hold the connection to qemu's serial socket while qemu runs (a duty), reconnecting if it drops."""
        try:
            while True:
                try:
                    reader, self.writer = await asyncio.open_unix_connection(self.serial)
                except OSError:
                    await asyncio.sleep(RECONNECT_DELAY)
                    continue
                log.debug("console broker attached to %s", self.serial)
                while data := await reader.read(CHUNK):
                    self._publish(data)
                self.writer.close()
                self.writer = None
        finally:
            if self.writer is not None:
                self.writer.close()
            for viewer in list(self.viewers):
                self._drop(viewer)


async def pump_output(viewer: Viewer, writer: asyncio.StreamWriter) -> None:
    """Copy the guest's output to one socket viewer until it is dropped or the socket fails."""
    async for data in viewer.output():
        writer.write(data)
        await writer.drain()


async def serve(broker: Broker, path: Path) -> None:
    """The broker's own Unix socket (``vmrunner console`` attaches there) until cancelled; mode 0600: the runner's
    uid only (``kubectl exec`` runs as it)."""

    async def viewer_connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        viewer = broker.attach()
        tasks = {asyncio.create_task(pump_output(viewer, writer)), asyncio.create_task(pump_input(broker, reader))}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            broker.detach(viewer)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()

    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(viewer_connected, path)
    path.chmod(0o600)  # created 0755 under the usual umask: connecting needs write permission, the owner's alone
    async with server:
        await server.serve_forever()


async def pump_input(broker: Broker, reader: asyncio.StreamReader) -> None:
    """Type what one socket viewer sends into the guest until it leaves."""
    while data := await reader.read(CHUNK):
        await broker.send(data)
