"""Serves a directory over HTTP on a podman network's gateway, where a pod reaches the host, for IMG_SOURCE.

The bridge only exists while a container is attached, so the socket is bound with IP_FREEBIND: the server can start
before the pod and never listens on the host's other interfaces.

    python3 scripts/podman/serve.py DIR --network NAME [--port PORT]   # prints the base URL, serves until killed
"""

import argparse
import functools
import json
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_IP_FREEBIND = 15  # from linux/in.h; Python's socket module does not name it


class FreebindServer(ThreadingHTTPServer):
    """A threading HTTP server whose address need not exist yet."""

    daemon_threads = True

    def server_bind(self) -> None:
        """Allow binding to the bridge's address before the bridge is up."""
        self.socket.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        super().server_bind()


class QuietHandler(SimpleHTTPRequestHandler):
    """File handler that keeps the access log out of the demo's output."""

    def log_message(self, format: str, *args: object) -> None:
        """Drop access log lines."""


def podman_gateway(network: str) -> str:
    """The gateway address of a podman network: the host as its containers see it."""
    out = subprocess.run(["podman", "network", "inspect", network], check=True, capture_output=True, text=True)
    gateway: str = json.loads(out.stdout)[0]["subnets"][0]["gateway"]
    return gateway


def bind(directory: Path, address: str, port: int = 0) -> tuple[FreebindServer, str]:
    """A server for ``directory`` bound to ``address`` (port 0: any free port), and its base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = FreebindServer((address, port), handler)
    return server, f"http://{address}:{server.server_address[1]}"


def start(directory: Path, address: str, port: int = 0) -> tuple[FreebindServer, str]:
    """Serve ``directory`` from a background thread; stop it with ``server.shutdown()``."""
    server, url = bind(directory, address, port)
    threading.Thread(target=server.serve_forever, name="podvm-serve", daemon=True).start()
    return server, url


def main(argv: list[str]) -> int:
    """Serve until killed, after printing the base URL on one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=8780)
    parser.add_argument("--network", required=True, help="the podman network the pod runs on")
    args = parser.parse_args(argv)
    server, url = bind(args.directory, podman_gateway(args.network), args.port)
    print(url, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
