"""An image server of our own on loopback: well kept by default, and every way an image server can lie."""

import base64
import contextlib
import hashlib
import threading
from dataclasses import MISSING, dataclass, field, fields
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    """What the test server does; tests change it and read the requests it saw.

    By default it behaves as a well-kept server: a strong ETag derived from the content, ranges honoured, If-Range
    honoured. The other knobs make it lie the ways an image server can.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    then: dict[str, bytes] = field(default_factory=dict)  # after the first answer for a path, serve this body instead
    drops: list[int] = field(default_factory=list)  # successive answers close after this many body bytes
    ranges: bool = True
    range_answers: list[int] = field(default_factory=list)  # successive Range requests: 200 ignores the Range
    validator: str = "etag"  # etag (strong), weak (W/ ETag), fixed (one strong ETag for any content), date, none
    honour_if_range: bool = True
    length_delta: int = 0  # the announced Content-Length minus the real one
    forever: bool = False  # an endless body without a Content-Length
    auth: str | None = None  # "user:password" required as HTTP basic authentication
    query: str | None = None  # the query string required
    delay: float = 0.0  # seconds before answering, so concurrent fetchers overlap
    requests: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # (path, Range, If-Range)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """Back to a well-kept server with no files."""
        for knob in fields(self):
            if knob.name != "lock":
                fresh = knob.default_factory() if knob.default_factory is not MISSING else knob.default
                setattr(self, knob.name, fresh)

    def validators(self, body: bytes) -> dict[str, str]:
        """The validator headers of ``body`` under the current ``validator`` knob."""
        digest = hashlib.sha256(body).hexdigest()
        return {
            "etag": {"ETag": f'"{digest[:16]}"'},
            "weak": {"ETag": f'W/"{digest[:16]}"'},
            "fixed": {"ETag": '"fixed"'},
            "date": {"Last-Modified": formatdate(1_700_000_000 + int(digest[:6], 16), usegmt=True)},
            "none": {},
        }[self.validator]


class Server:
    """The server: ``served`` says how it behaves, ``url(path)`` where a file is."""

    def __init__(self) -> None:
        self.served = Served()
        served = self.served

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                wanted, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                path, _, query = self.path.partition("?")
                with served.lock:
                    served.requests.append((self.path, wanted, if_range))
                    body = served.files.get(path)
                    if path in served.then:
                        served.files[path] = served.then.pop(path)
                    forced = served.range_answers.pop(0) if wanted and served.range_answers else 206
                    drop = served.drops.pop(0) if served.drops and body is not None else None
                if served.delay:
                    threading.Event().wait(served.delay)
                if served.auth is not None and self.headers.get("Authorization") != "Basic " + base64.b64encode(
                    served.auth.encode()
                ).decode("ascii"):
                    self.send_error(401)
                    return
                if served.query is not None and query != served.query:
                    self.send_error(403)
                    return
                if path in served.redirects:
                    self.send_response(302)
                    self.send_header("Location", served.redirects[path])
                    self.end_headers()
                    return
                if body is None:
                    self.send_error(404)
                    return
                headers = served.validators(body)
                current = next(iter(headers.values()), None)
                start = 0
                stale = served.honour_if_range and if_range is not None and if_range != current
                if wanted and served.ranges and forced == 206 and not stale:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                if served.forever:
                    self.end_headers()
                    self._stream_forever()
                    return
                self.send_header("Content-Length", str(len(body) - start + served.length_delta))
                self.end_headers()
                piece = body[start:] if drop is None else body[start : start + drop]
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(piece)
                    self.wfile.flush()

            def _stream_forever(self) -> None:
                block = b"\0" * 65536
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    while True:
                        self.wfile.write(block)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
