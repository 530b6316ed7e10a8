"""dnsmasq under supervision: exactly one instance, restarted with back-off, its lines relayed into our log.

dnsmasq drops to an unprivileged user, which clears any parent-death signal, so a dnsmasq outlives a sidecar
killed with SIGKILL (and keeps answering DHCP meanwhile); the pid file in NET_STATE_DIR (which only the sidecar
can write), checked against /proc/PID/cmdline, lets the next sidecar replace it so exactly one runs.
"""

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from netsidecar.config import BRIDGE, IPV4, IPV6
from netsidecar.figures import DhcpFigures
from netsidecar.plan import pid_file
from shared.errors import ChildFailed
from shared.files import write_atomic

log = logging.getLogger("netsidecar")
_BACKOFF_MAX = 10.0


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def stop_stale(state_dir: Path) -> None:
    """Kill the dnsmasq a previous sidecar left behind, if the pid file still names one serving our bridge."""
    path = pid_file(state_dir)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    argv = _cmdline(pid)
    if argv and Path(argv[0]).name == "dnsmasq" and f"--interface={BRIDGE}" in argv:
        log.info("stopping stale dnsmasq (pid %d)", pid)
        os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not _cmdline(pid):
                break
            time.sleep(0.02)
    path.unlink(missing_ok=True)


# The DHCP server port of each family and the /proc table of its UDP sockets.
_SERVER_PORTS = {IPV4: ("udp", 67), IPV6: ("udp6", 547)}


def _dhcp_port_bound(family: str) -> bool:
    """Whether a UDP socket of this network namespace is bound to ``family``'s DHCP server port."""
    table, port = _SERVER_PORTS[family]
    try:
        lines = Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1].endswith(f":{port:04X}") for line in lines if line.strip())


def _relay(proc: subprocess.Popen[bytes], figures: DhcpFigures) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        figures.line(raw)
        log.info("dnsmasq: %s", raw.decode(errors="replace").rstrip())


class Dnsmasq:
    """One supervised dnsmasq; `poll` restarts it with back-off when it has died."""

    def __init__(self, argv: list[str], state_dir: Path) -> None:
        self.argv = argv
        self.state_dir = state_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.backoff = 0.5
        self.next_start = 0.0
        self.figures = DhcpFigures()

    def start(self) -> None:
        """Start dnsmasq and record its pid."""
        stop_stale(self.state_dir)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        write_atomic(pid_file(self.state_dir), f"{self.proc.pid}\n".encode())
        threading.Thread(target=_relay, args=(self.proc, self.figures), daemon=True).start()
        log.info("dnsmasq started (pid %d)", self.proc.pid)

    def wait_listening(self, families: tuple[str, ...], timeout: float = 5.0) -> None:
        """Wait until dnsmasq holds the DHCP port of each family served, so the handshake never promises a server
        that drops requests.

        :raise ChildFailed: when dnsmasq exits or does not listen within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while not all(_dhcp_port_bound(family) for family in families):
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ChildFailed(f"dnsmasq exited with status {code} before serving DHCP (see its lines above)")
            if time.monotonic() >= deadline:
                ports = ", ".join(str(_SERVER_PORTS[family][1]) for family in families)
                raise ChildFailed(f"dnsmasq does not listen on UDP port {ports} after {timeout:g}s")
            time.sleep(0.005)

    def poll(self) -> None:
        """Restart dnsmasq if it died, waiting longer after each quick death."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if self.next_start == 0.0:
            log.warning("dnsmasq exited with status %s; restarting in %.1fs", self.proc.returncode, self.backoff)
            self.next_start = now + self.backoff
            self.backoff = min(self.backoff * 2, _BACKOFF_MAX)
        if now >= self.next_start:
            self.next_start = 0.0
            self.figures.restarts += 1
            self.start()

    def stop(self) -> None:
        """Stop dnsmasq and forget its pid."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        pid_file(self.state_dir).unlink(missing_ok=True)


def is_running(state_dir: Path) -> int | None:
    """The pid of the dnsmasq the pid file names, if it runs."""
    try:
        pid = int(pid_file(state_dir).read_text().strip())
    except (OSError, ValueError):
        return None
    argv = _cmdline(pid)
    return pid if argv and Path(argv[0]).name == "dnsmasq" else None
