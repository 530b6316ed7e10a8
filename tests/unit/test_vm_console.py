"""The console's plans and guards, the broker's fan-out over real Unix sockets, and the web server's refusals through
real HTTP (aiohttp's test server); the browser and the booted guest are in tests/e2e/test_console.py."""

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp import web as aioweb
from aiohttp.test_utils import TestClient, TestServer

from shared.errors import ConfigError
from tests.harness import samples
from tests.harness.portforward import free_port
from vmrunner.cli import dispatch
from vmrunner.config import ConsoleConfig, load
from vmrunner.console import web
from vmrunner.console.broker import REPLAY_BYTES, VIEWER_BACKLOG, Broker, serve
from vmrunner.run.argv import RunPaths, plan_qemu
from vmrunner.run.supervisor import Supervisor
from vmrunner.start import console_duties, web_plan

BASE = {"IMG_SOURCE": "https://example.org/images/debian-12.qcow2", "HOSTNAME": "vm-0"}
TOKEN = "a-token-of-24-characters"  # noqa: S105 a test token
Client = TestClient[aioweb.Request, aioweb.Application]


def test_console_defaults_and_off() -> None:
    cfg = load(BASE)
    assert cfg.console == ConsoleConfig(6080, None, None, Path("/usr/share/podvm/console/node_modules"))
    assert load({**BASE, "CONSOLE_PORT": "off"}).console is None
    assert load({**BASE, "CONSOLE_PORT": "OFF"}).console is None


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"CONSOLE_PORT": "5900"}, r"^CONSOLE_PORT=5900: VNC has that port"),
        ({"CONSOLE_PORT": "9100", "METRICS_PORT": "9100"}, r"^CONSOLE_PORT=9100: METRICS_PORT has that port"),
        ({"CONSOLE_PORT": "0"}, r"^CONSOLE_PORT="),
        ({"CONSOLE_PORT": "http"}, r"^CONSOLE_PORT="),
        ({"CONSOLE_POD_PORT": "6080"}, r"^CONSOLE_POD_PORT=6080: a console on the pod IP needs CONSOLE_PASSWORD_FILE"),
        ({"CONSOLE_POD_PORT": "5900", "CONSOLE_PASSWORD_FILE": "/s/t"}, r"^CONSOLE_POD_PORT=5900: VNC has that port"),
    ],
)
def test_bad_console_settings_are_one_line_naming_the_variable(values: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load({**BASE, **values})


def test_console_on_5900_is_fine_without_vnc() -> None:
    cfg = load({**BASE, "NO_VNC": "true", "CONSOLE_PORT": "5900"})
    assert cfg.console is not None and cfg.console.port == 5900


def test_local_plan_listens_on_loopback_only_and_answers_to_localhost_names() -> None:
    plan = web.plan_web(6080, None, pod_addresses=("10.1.2.3",), token=False, assets=Path("/a"), display=Path("/d"))
    assert plan.listen == (("127.0.0.1", 6080), ("::1", 6080))
    assert plan.hosts == {"localhost", "127.0.0.1", "::1"}


def test_exposed_plan_adds_every_address_and_the_pods_own_names() -> None:
    plan = web.plan_web(
        6080, 7080, pod_addresses=("10.1.2.3", "FD00::5"), token=True, assets=Path("/a"), display=Path("/d")
    )
    assert plan.listen == (("127.0.0.1", 6080), ("::1", 6080), ("0.0.0.0", 7080), ("::", 7080))
    assert plan.hosts == {"localhost", "127.0.0.1", "::1", "10.1.2.3", "fd00::5"}
    same = web.plan_web(6080, 6080, pod_addresses=(), token=True, assets=Path("/a"), display=Path("/d"))
    assert same.listen == (("0.0.0.0", 6080), ("::", 6080))


def test_the_runner_follows_the_handshakes_console_port(caplog: pytest.LogCaptureFixture) -> None:
    paths = RunPaths.of(Path("/r"))
    exposed = samples.handshake(console_port=6080)
    plan = web_plan(load({**BASE}), exposed, paths, token=True)
    assert plan is not None and ("0.0.0.0", 6080) in plan.listen
    assert "CONSOLE_POD_PORT=unset but the sidecar's handshake says console_port=6080" in caplog.text
    with pytest.raises(ConfigError, match="console_port=6080 in the pod: a console on the pod IP needs CONSOLE_PASS"):
        web_plan(load({**BASE}), exposed, paths, token=False)
    caplog.clear()
    cfg = load({**BASE, "CONSOLE_POD_PORT": "6080", "CONSOLE_PASSWORD_FILE": "/s/t"})
    plan = web_plan(cfg, samples.handshake(), paths, token=True)
    assert plan is not None and plan.listen == (("127.0.0.1", 6080), ("::1", 6080))  # the sidecar sends it to the VM
    assert "following the handshake" in caplog.text
    assert web_plan(load({**BASE, "CONSOLE_PORT": "off"}), samples.handshake(), paths, token=False) is None


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("localhost", True),
        ("localhost:6080", True),
        ("LOCALHOST:8080", True),
        ("localhost.:6080", True),
        ("127.0.0.1:6080", True),
        ("[::1]:6080", True),
        ("attacker.example", False),  # DNS rebinding: the attacker's name resolved to 127.0.0.1
        ("localhost.attacker.example", False),
        ("attacker.example:6080", False),
        ("user@localhost", False),
        ("localhost:6080/path", False),
        ("localhost:http", False),
        ("[::1", False),
        ("", False),
        (None, False),
        ("10.1.2.3:6080", False),  # the pod's address only when exposed
    ],
)
def test_host_header(header: str | None, allowed: bool) -> None:
    assert web.host_allowed(header, frozenset(web.LOCAL_NAMES)) is allowed


@pytest.mark.parametrize(
    ("origin", "same"),
    [
        ("http://localhost:6080", True),
        ("HTTP://LOCALHOST:6080", True),
        ("https://localhost:6080", True),
        ("http://localhost:6081", False),
        ("http://localhost", False),
        ("http://attacker.example", False),
        ("null", False),
        ("", False),
        (None, False),
    ],
)
def test_origin(origin: str | None, same: bool) -> None:
    assert web.same_origin(origin, "localhost:6080") is same


@pytest.mark.parametrize(
    ("written", "error"),
    [
        (b"short\n", "expected a token of 12 to 256"),
        (b"has a space in it\n", "expected a token of 12"),
        (b"x" * 300, "expected a token of 12"),
        ("pässwörtchen-1234".encode(), "expected a token of 12 to 256 printable ASCII"),
    ],
)
def test_unusable_token_is_one_line_that_never_shows_it(tmp_path: Path, written: bytes, error: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(written)
    with pytest.raises(ConfigError, match=f"^CONSOLE_PASSWORD_FILE={path}: {error}") as raised:
        web.read_token(path)
    assert written.decode(errors="replace").strip() not in str(raised.value)


def test_token_is_read_without_its_line_end(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\r\n")
    assert web.read_token(path) == TOKEN.encode()
    assert web.read_token(None) is None
    with pytest.raises(ConfigError, match=r"^CONSOLE_PASSWORD_FILE=.*/missing: cannot read"):
        web.read_token(tmp_path / "missing")


# --- the broker, over real Unix sockets ---------------------------------------------------------------------------


class FakeSerial:
    """qemu's serial chardev socket: one client at a time; records what was typed, sends what the guest says."""

    def __init__(self) -> None:
        self.typed = bytearray()
        self.clients: list[asyncio.StreamWriter] = []

    async def connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.append(writer)
        while data := await reader.read(4096):
            self.typed.extend(data)

    def say(self, data: bytes) -> None:
        for writer in self.clients:
            writer.write(data)


async def eventually(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_broker(tmp_path: Path) -> AsyncIterator[tuple[FakeSerial, Broker, Path]]:
    serial = FakeSerial()
    server = await asyncio.start_unix_server(serial.connected, tmp_path / "serial.sock")
    broker = Broker(tmp_path / "serial.sock")
    sock = tmp_path / "console.sock"
    tasks = [asyncio.create_task(broker.run()), asyncio.create_task(serve(broker, sock))]
    try:
        await eventually(lambda: bool(serial.clients) and sock.exists())
        yield serial, broker, sock
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()


def test_broker_fans_out_to_every_viewer_and_takes_input_from_any(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(tmp_path) as (serial, _broker, sock):
            assert sock.stat().st_mode & 0o777 == 0o600
            serial.say(b"login: ")
            await eventually(lambda: b"login: " in b"".join(_broker.recent))
            viewers = [await asyncio.open_unix_connection(sock) for _ in range(3)]
            for reader, _ in viewers:
                assert await reader.readexactly(7) == b"login: "  # the latest output, replayed
            serial.say(b"hello\r\n")
            for reader, _ in viewers:
                assert await reader.readexactly(7) == b"hello\r\n"
            viewers[1][1].write(b"ls\r")
            viewers[2][1].write(b"pwd\r")
            await eventually(lambda: b"ls\r" in serial.typed and b"pwd\r" in serial.typed)
            for _, writer in viewers:
                writer.close()
            assert len(serial.clients) == 1  # qemu's port had one client throughout: the broker

    asyncio.run(scenario())


def test_a_stalled_viewer_is_dropped_and_the_others_keep_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(tmp_path) as (serial, broker, _sock):
            stalled = broker.attach()  # never reads
            active = broker.attach()
            got = bytearray()

            async def read() -> None:
                async for data in active.output():
                    got.extend(data)

            reader = asyncio.create_task(read())
            for sent in range(1, VIEWER_BACKLOG + 10):
                serial.say(b"x" * 100)  # one chunk at a time, each read by the active viewer before the next
                await eventually(lambda: len(got) >= sent * 100)  # noqa: B023 awaited within the iteration
            assert stalled not in broker.viewers and active in broker.viewers
            assert broker.recent_size < REPLAY_BYTES + 100  # the replay stays small whatever the guest says
            reader.cancel()

    asyncio.run(scenario())


# --- the web server's refusals, through real HTTP -----------------------------------------------------------------


def serve_app(tmp_path: Path, token: bytes | None, check: Callable[[Client], Awaitable[None]]) -> None:
    """Run ``check`` against the console application (a broker without qemu, node_modules stand-ins)."""
    for directory in web.VENDOR.values():
        (tmp_path / "assets" / directory).mkdir(parents=True, exist_ok=True)
    plan = web.plan_web(6080, None, pod_addresses=(), token=token is not None, assets=tmp_path / "assets",
                        display=tmp_path / "display.sock")  # fmt: skip

    async def scenario() -> None:
        app = web.ConsoleServer(plan, Broker(tmp_path / "none.sock"), token).app()
        async with TestClient(TestServer(app)) as client:
            await check(client)

    asyncio.run(scenario())


LOCAL = {"Host": "localhost:6080"}
SAME_ORIGIN = {**LOCAL, "Origin": "http://localhost:6080"}


def test_server_refuses_foreign_hosts_and_origins(tmp_path: Path) -> None:
    async def check(client: Client) -> None:
        page = await client.get("/", headers=LOCAL)
        assert page.status == 200 and "console.js" in await page.text()
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert (await client.get("/", headers={"Host": "attacker.example:6080"})).status == 421
        for origin in ("http://attacker.example", "null", None):
            headers = {**LOCAL, **({"Origin": origin} if origin else {})}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect("/ws/serial", headers=headers)
            assert refused.value.status == 403
        ws = await client.ws_connect("/ws/serial", headers=SAME_ORIGIN)
        await ws.close()
        # the screen's socket is not there: a clear 503, not a hang
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws/vnc", headers=SAME_ORIGIN)
        assert refused.value.status == 503

    serve_app(tmp_path, None, check)


def test_server_needs_the_token_for_the_page_and_the_websockets(tmp_path: Path) -> None:
    async def check(client: Client) -> None:
        page = await client.get("/", headers=LOCAL)
        assert 'name="token"' in await page.text() and "console.js" not in await page.text()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws/serial", headers=SAME_ORIGIN)
        assert refused.value.status == 401
        wrong = await client.post("/login", data={"token": TOKEN + "x"}, headers=SAME_ORIGIN, allow_redirects=False)
        assert wrong.status == 403 and "Set-Cookie" not in wrong.headers
        foreign = {**LOCAL, "Origin": "http://attacker.example"}
        assert (await client.post("/login", data={"token": TOKEN}, headers=foreign)).status == 403
        right = await client.post("/login", data={"token": TOKEN}, headers=SAME_ORIGIN, allow_redirects=False)
        assert right.status == 303
        cookie = right.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        ws = await client.ws_connect("/ws/serial", headers=SAME_ORIGIN)  # the client keeps the cookie
        await ws.send_bytes(b"typed")
        await ws.close()
        assert (await client.get("/", headers=LOCAL)).status == 200

    serve_app(tmp_path, TOKEN.encode(), check)


def test_the_serial_websocket_is_a_broker_viewer(tmp_path: Path) -> None:
    """Through the WebSocket: the guest's output arrives, typed bytes reach qemu's port."""

    async def scenario() -> None:
        async with running_broker(tmp_path) as (serial, broker, _sock):
            for directory in web.VENDOR.values():
                (tmp_path / "assets" / directory).mkdir(parents=True, exist_ok=True)
            plan = web.plan_web(6080, None, pod_addresses=(), token=False, assets=tmp_path / "assets",
                                display=tmp_path / "display.sock")  # fmt: skip
            async with TestClient(TestServer(web.ConsoleServer(plan, broker, None).app())) as client:
                ws = await client.ws_connect("/ws/serial", headers=SAME_ORIGIN)
                serial.say(b"guest says hi")
                message = await ws.receive(timeout=5)
                assert message.type == WSMsgType.BINARY and b"guest says hi" in message.data
                await ws.send_str("echo typed\r")
                await eventually(lambda: b"echo typed\r" in serial.typed)
                await ws.close()
                await eventually(lambda: not broker.viewers)

    asyncio.run(scenario())


def test_missing_client_libraries_are_named(tmp_path: Path) -> None:
    plan = web.plan_web(6080, None, pod_addresses=(), token=False, assets=tmp_path, display=tmp_path / "d.sock")
    with pytest.raises(ConfigError, match=rf"^CONSOLE_ASSETS={tmp_path}: no @novnc/novnc there"):
        asyncio.run(web.serve(plan, Broker(tmp_path / "s.sock"), None))
    assert not os.listdir(tmp_path)


def test_plan_prints_the_consoles_listeners(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    samples.handshake(console_port=7080).write(tmp_path)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    env = {**BASE, "RUN_DIR": str(tmp_path), "IMAGE_DIR": str(tmp_path), "VM_DIR": str(tmp_path),
           "CONSOLE_POD_PORT": "7080", "CONSOLE_PASSWORD_FILE": str(token)}  # fmt: skip
    monkeypatch.setattr(os, "environ", env)
    assert dispatch(["plan"]) == 0
    shown = json.loads(capsys.readouterr().out)["console"]
    assert shown["listen"] == ["127.0.0.1:6080", "[::1]:6080", "0.0.0.0:7080", "[::]:7080"]
    assert shown["token_required"] is True and shown["display"] == str(tmp_path / "display.sock")
    assert shown["hosts"] == ["10.1.2.3", "127.0.0.1", "::1", "localhost"]  # the pod's own address, when exposed


def test_a_failing_web_console_is_one_line_without_the_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The web server cannot start (no client libraries): the supervisor logs the duty's failure by its name; the VM
    would carry on, and the token is not in the line."""
    plan = web.plan_web(6080, None, pod_addresses=(), token=True, assets=tmp_path, display=tmp_path / "d.sock")
    qemu_plan = plan_qemu(load({**BASE, "RUN_DIR": str(tmp_path)}), samples.handshake(), "tcg", True, None)
    duties = console_duties(qemu_plan, plan, TOKEN.encode())
    assert [duty.__name__ for duty in duties] == ["console_broker", "console_socket", "web_console"]
    asyncio.run(Supervisor._duty(duties[2]))
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "web_console stopped: CONSOLE_ASSETS=" in record.getMessage()
    assert TOKEN not in caplog.text


def test_stopping_the_server_closes_its_websockets_at_once(tmp_path: Path) -> None:
    """qemu stops while a page is open: the duty ends within its grace, the page hears 1001 (going away) on both
    consoles; a server waiting for its viewers would hold up the VM's shutdown."""

    async def scenario() -> None:
        display = await asyncio.start_unix_server(lambda r, w: None, tmp_path / "display.sock")  # a silent screen
        async with running_broker(tmp_path) as (_serial, broker, _sock):
            for directory in web.VENDOR.values():
                (tmp_path / "assets" / directory).mkdir(parents=True, exist_ok=True)
            port = free_port()
            plan = web.plan_web(port, None, pod_addresses=(), token=False, assets=tmp_path / "assets",
                                display=tmp_path / "display.sock")  # fmt: skip
            served = asyncio.create_task(web.serve(plan, broker, None))
            headers = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
            async with aiohttp.ClientSession() as session:
                for _ in range(50):
                    with contextlib.suppress(aiohttp.ClientConnectorError):
                        screen = await session.ws_connect(f"http://127.0.0.1:{port}/ws/vnc", headers=headers)
                        break
                    await asyncio.sleep(0.05)
                serial = await session.ws_connect(f"http://127.0.0.1:{port}/ws/serial", headers=headers)
                served.cancel()
                async with asyncio.timeout(web.STOP_GRACE + 2):
                    await asyncio.gather(served, return_exceptions=True)
                    for ws in (screen, serial):
                        while (message := await ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
                            pass
                        assert (message.type, message.data) == (WSMsgType.CLOSE, 1001)  # the page reconnects
        display.close()

    asyncio.run(scenario())


def test_a_console_port_taken_on_localhost_is_one_line_naming_it(tmp_path: Path) -> None:
    for directory in web.VENDOR.values():
        (tmp_path / "assets" / directory).mkdir(parents=True, exist_ok=True)
    port = free_port()
    plan = web.plan_web(port, None, pod_addresses=(), token=False, assets=tmp_path / "assets",
                        display=tmp_path / "display.sock")  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        refused = rf"^console: cannot listen on 127\.0\.0\.1:{port}: Address already in use$"
        with pytest.raises(ConfigError, match=refused):
            asyncio.run(web.serve(plan, Broker(tmp_path / "none.sock"), None))
