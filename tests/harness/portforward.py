"""A stand-in for ``kubectl port-forward``: a port on the host's 127.0.0.1 whose connections are made to a port on
127.0.0.1 *inside* a pod's network namespace, as the kubelet makes them.

socat listens in the root namespace and, for each connection, runs a second socat under ``ip netns exec`` that
connects from inside the pod; so the console server sees a connection from the pod's own loopback, never from the
pod IP, exactly as on a cluster.
"""

import socket
from pathlib import Path

from tests.harness.pod import Proc, base_env, start
from tests.harness.wait import until


def free_port() -> int:
    """A TCP port free on the host's 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PortForward:
    """``127.0.0.1:local`` on the host to ``127.0.0.1:remote`` in ``namespace``; ``setup``/``cleanup`` as usual."""

    def __init__(self, namespace: str, remote: int, log: Path) -> None:
        self.namespace = namespace
        self.remote = remote
        self.local = free_port()
        self.log = log
        self.proc: Proc | None = None

    def setup(self) -> "PortForward":
        """Start forwarding and wait until the local port accepts connections."""
        inner = f"ip netns exec {self.namespace} socat STDIO TCP\\:127.0.0.1\\:{self.remote}"  # socat's escaped colons
        argv = ["socat", f"TCP-LISTEN:{self.local},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{inner}"]
        self.proc = start("port-forward", argv, base_env(), self.log)
        try:
            until(f"port-forward on 127.0.0.1:{self.local}", self._accepts, 10, 0.05)
        except AssertionError as err:
            raise AssertionError(f"{err}: {self.proc.text()}") from None
        return self

    def _accepts(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.local)) == 0

    def cleanup(self) -> None:
        """Stop forwarding (safe to call twice)."""
        if self.proc is not None and self.proc.popen.poll() is None:
            self.proc.kill()
