"""The console in a browser: one page with the VM's screen (noVNC) and its serial console (xterm.js).

The server runs in the runner's event loop beside qemu (a duty of the supervisor). It listens on 127.0.0.1 and ::1,
so people reach it through ``kubectl port-forward`` and Kubernetes decides who may; ``CONSOLE_POD_PORT`` adds the
pod IP, and then a token is required. Two WebSockets carry the consoles: ``/ws/vnc`` is spliced to qemu's VNC
display on a Unix socket (noVNC speaks RFB, and its VNC authentication, itself), ``/ws/serial`` is one viewer of the
console broker.

Every request names an allowed host (localhost, or the pod's own addresses when exposed), so a DNS name rebound to
127.0.0.1 gets nothing; every WebSocket upgrade and login comes from this page's own origin, so a page on another
site that the operator visits while a port-forward is open cannot reach the VM. The token is compared in constant
time and never logged; a correct one buys an HttpOnly, SameSite=Strict session cookie.
"""

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from shared.errors import ConfigError, reason
from shared.secrets import read_secret
from vmrunner.console.broker import CHUNK, Broker

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("vmrunner.console")

UI = Path(__file__).parent / "webui"  # the hand-written page, script and style
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
COOKIE = "podvm_console"
SESSIONS_MAX = 64  # the oldest session is forgotten beyond this many
FAILED_LOGIN_DELAY = 1.0  # seconds every wrong token costs, one guess at a time
TOKEN_MIN, TOKEN_MAX = 12, 256
MESSAGE_MAX = 1 << 20
STOP_GRACE = 1.0  # seconds the server's connections get to close when qemu stops: the VM's shutdown waits for it
# The page's libraries are ES modules from this server; xterm.js writes its own <style> elements.
CSP = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
VENDOR = {  # URL prefix -> directory inside the node_modules npm ci filled
    "/vendor/novnc": "@novnc/novnc",
    "/vendor/xterm": "@xterm/xterm",
    "/vendor/xterm-fit": "@xterm/addon-fit",
}


@dataclass(frozen=True)
class WebPlan:
    """Where and how the console is served (printed by ``vmrunner plan``)."""

    listen: tuple[tuple[str, int], ...]  # (address, port) pairs
    hosts: frozenset[str]  # host names a request may name (its port aside)
    token_required: bool
    assets: Path  # the node_modules directory with the client libraries
    display: Path  # qemu's VNC display socket


def plan_web(
    port: int,
    pod_port: int | None,
    *,
    pod_addresses: tuple[str, ...],
    token: bool,
    assets: Path,
    display: Path,
) -> WebPlan:
    """The listeners and the names they answer to: localhost on ``port``; every address on ``pod_port`` too."""
    listen = [("127.0.0.1", port), ("::1", port)]
    hosts = set(LOCAL_NAMES)
    if pod_port is not None:
        listen = [pair for pair in listen if pair[1] != pod_port] + [("0.0.0.0", pod_port), ("::", pod_port)]  # noqa: S104 the pod IP, with a token
        hosts |= {str(ipaddress.ip_address(address)) for address in pod_addresses}
    return WebPlan(tuple(listen), frozenset(hosts), token, assets, display)


def read_token(path: Path | None) -> bytes | None:
    """The token in ``CONSOLE_PASSWORD_FILE`` without trailing line ends, or None when it is not set.

    :raise ConfigError: naming the file (never the token) when it cannot be read, or is too short, too long or
        holds anything but printable ASCII.
    """
    expected = f"a token of {TOKEN_MIN} to {TOKEN_MAX} printable ASCII characters without spaces"
    read = read_secret("CONSOLE_PASSWORD_FILE", path, TOKEN_MAX + 2, expected)
    if read is None:
        return None
    token, source = read
    if not TOKEN_MIN <= len(token) <= TOKEN_MAX or any(byte < 0x21 or byte > 0x7E for byte in token):
        raise ConfigError(f"{source}: expected {expected}")
    return token


def host_name(header: str | None) -> str | None:
    """The host name of a Host header (``name``, ``name:port``, ``[v6]:port``), lower-case; None when malformed."""
    if not header:
        return None
    try:
        parts = urlsplit(f"http://{header}")
        name, _port = parts.hostname, parts.port
    except ValueError:
        return None
    if name is None or parts.netloc != header or parts.username is not None:
        return None
    return name.lower().rstrip(".")


def host_allowed(header: str | None, hosts: frozenset[str]) -> bool:
    """True when the Host header names one of ``hosts``: anything else may be a DNS name rebound to us."""
    name = host_name(header)
    return name is not None and name in hosts


def same_origin(origin: str | None, host: str | None) -> bool:
    """True when a browser's Origin header is this server's own (``http://`` or ``https://`` and the Host header):
    a WebSocket or a login from a page of any other site is refused."""
    if not origin or not host:
        return False
    return origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())


class Sessions:
    """The session cookies a correct token bought; in memory, so a restart of the runner asks again."""

    def __init__(self, token: bytes | None) -> None:
        self.digest = hashlib.sha256(token).digest() if token is not None else None
        self.known: OrderedDict[str, None] = OrderedDict()
        self.guessing = asyncio.Lock()

    def open(self, cookie: str | None) -> bool:
        """True when no token is needed or ``cookie`` is a live session."""
        return self.digest is None or (cookie is not None and cookie in self.known)

    async def login(self, given: str) -> str | None:
        """A new session for the right token (constant-time compare); a wrong one costs a second, one at a time."""
        assert self.digest is not None
        async with self.guessing:
            if hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.digest):
                session = secrets.token_urlsafe(32)
                self.known[session] = None
                while len(self.known) > SESSIONS_MAX:
                    self.known.popitem(last=False)
                return session
            await asyncio.sleep(FAILED_LOGIN_DELAY)
            return None


class ConsoleServer:
    """The aiohttp application's handlers: the page, its assets, the login and the two consoles' WebSockets."""

    def __init__(self, plan: WebPlan, broker: Broker, token: bytes | None) -> None:
        self.plan = plan
        self.broker = broker
        self.sessions = Sessions(token)
        self.sockets: set[web.WebSocketResponse] = set()  # open WebSockets, closed first when the server stops

    def app(self) -> "web.Application":
        """The application, every route behind :meth:`guard`."""
        from aiohttp import web

        @web.middleware
        async def guard(request: web.Request, handler: "Handler") -> web.StreamResponse:
            return await self.guard(request, handler)

        app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
        app.router.add_get("/", self.page)
        app.router.add_post("/login", self.login)
        app.router.add_get("/ws/serial", self.serial)
        app.router.add_get("/ws/vnc", self.vnc)
        app.router.add_static("/ui", UI)
        for prefix, directory in VENDOR.items():
            app.router.add_static(prefix, self.plan.assets / directory)
        return app

    @staticmethod
    def refusal(request: "web.Request", hosts: frozenset[str]) -> "web.Response | None":
        """Why ``request`` is refused before any handler sees it (a foreign host, a foreign origin), or None."""
        from aiohttp import web

        host = request.headers.get("Host")
        if not host_allowed(host, hosts):
            log.warning("console: refused a request for host %r", (host or "")[:80])
            return web.Response(status=421, text="this console answers to localhost names only\n")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        origin = request.headers.get("Origin")
        if (upgrade or request.method not in ("GET", "HEAD")) and not same_origin(origin, host):
            log.warning("console: refused %s %s from origin %r", request.method, request.path, (origin or "none")[:80])
            return web.Response(status=403, text="cross-origin request refused\n")
        return None

    async def guard(self, request: "web.Request", handler: "Handler") -> "web.StreamResponse":
        """The middleware: Host and Origin checks first, the page's security headers on every answer."""
        from aiohttp import web

        response = self.refusal(request, self.plan.hosts) or await handler(request)
        if not isinstance(response, web.WebSocketResponse):
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "same-origin"  # no-referrer would make a form's Origin "null"
            response.headers["Cache-Control"] = "no-store"
        return response

    async def going_away(self) -> None:
        """Close every WebSocket (1001, going away) so the pages reconnect and the VM's shutdown is not held up."""
        from aiohttp import WSCloseCode

        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY) for ws in list(self.sockets)))

    def authorized(self, request: "web.Request") -> bool:
        """True when no token is needed or the request carries a live session cookie."""
        return self.sessions.open(request.cookies.get(COOKIE))

    async def page(self, request: "web.Request") -> "web.StreamResponse":
        """The consoles, or the login form when a token is needed first."""
        from aiohttp import web

        return web.FileResponse(UI / ("index.html" if self.authorized(request) else "login.html"))

    async def login(self, request: "web.Request") -> "web.StreamResponse":
        """A session cookie for the right token; the form again (403) for a wrong one."""
        from aiohttp import web

        if self.sessions.digest is None:
            raise web.HTTPSeeOther("/")
        form = await request.post()
        given = form.get("token")
        session = await self.sessions.login(given) if isinstance(given, str) else None
        if session is None:
            log.warning("console: a wrong token was given from %s", request.remote)
            return web.FileResponse(UI / "login.html", status=403)
        log.info("console: a browser logged in from %s", request.remote)
        response = web.HTTPSeeOther("/")
        response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", path="/")
        raise response

    async def serial(self, request: "web.Request") -> "web.StreamResponse":
        """One viewer of the console broker: binary frames both ways."""
        from aiohttp import WSMsgType, web

        if not self.authorized(request):
            return web.Response(status=401, text="log in first\n")
        ws = web.WebSocketResponse(max_msg_size=MESSAGE_MAX, heartbeat=30)
        await ws.prepare(request)
        self.sockets.add(ws)
        viewer = self.broker.attach()
        log.info("console: serial viewer attached from %s (%d viewers)", request.remote, len(self.broker.viewers))

        async def output() -> None:
            async for data in viewer.output():
                await ws.send_bytes(data)
            await ws.close()

        sender = asyncio.create_task(output())
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    await self.broker.send(message.data)
                elif message.type == WSMsgType.TEXT:
                    await self.broker.send(message.data.encode())
        finally:
            self.sockets.discard(ws)
            self.broker.detach(viewer)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            log.info("console: serial viewer left (%d viewers)", len(self.broker.viewers))
        return ws

    async def vnc(self, request: "web.Request") -> "web.StreamResponse":
        """qemu's VNC display spliced to the WebSocket; noVNC speaks RFB (and its authentication) through it."""
        from aiohttp import WSMsgType, web

        if not self.authorized(request):
            return web.Response(status=401, text="log in first\n")
        try:
            reader, writer = await asyncio.open_unix_connection(self.plan.display)
        except OSError as err:
            return web.Response(status=503, text=f"the VM's display is not there: {err.strerror}\n")
        ws = web.WebSocketResponse(max_msg_size=MESSAGE_MAX, heartbeat=30)
        await ws.prepare(request)
        self.sockets.add(ws)
        log.info("console: screen viewer attached from %s", request.remote)

        async def screen() -> None:
            while data := await reader.read(CHUNK):
                await ws.send_bytes(data)
            await ws.close()

        sender = asyncio.create_task(screen())
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    writer.write(message.data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.sockets.discard(ws)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()
            log.info("console: screen viewer left")
        return ws


async def serve(plan: WebPlan, broker: Broker, token: bytes | None) -> None:
    """Serve the console until cancelled (a duty); ``::1`` is skipped with a line when the pod has no IPv6."""
    from aiohttp import web

    for directory in VENDOR.values():
        if not (plan.assets / directory).is_dir():
            raise ConfigError(f"CONSOLE_ASSETS={plan.assets}: no {directory} there (npm ci fills it: make deps)")
    server = ConsoleServer(plan, broker, token)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=STOP_GRACE)
    await runner.setup()
    try:
        for address, port in plan.listen:
            site = web.TCPSite(runner, address, port, reuse_address=True)
            try:
                await site.start()
            except OSError as err:
                if address in ("::1", "::"):
                    log.info("console: not listening on [%s]:%d: %s", address, port, reason(err))
                    continue
                raise ConfigError(f"console: cannot listen on {address}:{port}: {reason(err)}") from None
        log.info(
            "console: http://localhost:%d/ (kubectl port-forward pod/NAME %d)%s",
            plan.listen[0][1],
            plan.listen[0][1],
            "; token required" if plan.token_required else "",
        )
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await server.going_away()
            await runner.cleanup()
