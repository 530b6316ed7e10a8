"""A namespace test bed: a simulated node, an outside client, a pod running the real sidecar, and a VM stand-in.

Everything is derived from one short id (``Bed(ident)``): namespace names ``pv<id>-node``, ``pv<id>-pod``,
``pv<id>-cli``, ``pv<id>-vm`` and veth names, so parallel beds never collide. Each object has ``setup()`` and
``cleanup()``, both safe to call twice; ``cleanup`` kills the processes left in the namespace before deleting it.

Topology (addresses from the id ``n``, 1..250, given by ``tests.harness.ids.fresh_id``)::

    client 10.<n>.9.2/24 --- 10.<n>.9.1 node 10.<n>.0.1 --- pod (calico: 10.<n>.0.5/32 via 169.254.1.1;
                                                              bridge: 10.<n>.0.5/24 via 10.<n>.0.1), MTU 1440
    pod: podvm0 (the sidecar's bridge) - podvm-tap0 <- relay -> tap eth0 of the vm stand-in (udhcpc, VM's MAC)

API (all in this module):

- ``ns_run(ns, *argv, check=True, timeout=30)`` runs a command in namespace ``ns`` (``None``: the root one) and
  returns the CompletedProcess; ``ns_popen(ns, argv, **kw)`` starts one.
- ``Bed(ident, style="calico"|"bridge", mtu=1440)``: ``.setup()`` builds node, client and pod; ``.pod_ip``,
  ``.client_ip``, ``.pod.ns``, ``.client.ns``, ``.node.ns``; ``.cleanup()`` removes all (reverse order).
- ``Sidecar(bed, env={}, run_dir=..., prefix=())``: ``.start(timeout=10)`` runs ``netsidecar prepare`` (once,
  as the pod's init container) then ``netsidecar run`` (under ``prefix``, e.g. setpriv) in the pod namespace and
  waits for the handshake (returns it); ``.term()`` (SIGTERM, waits), ``.kill()`` (SIGKILL); ``.log()`` its output;
  ``.cli('status')`` runs another subcommand with the same environment; ``.write_resolv(text)`` before ``start``;
  ``NET_STATE_DIR`` is a private temporary directory (``.state_dir``) unless ``env`` names one.
- ``VmStandIn(bed, mac)``: a namespace behind the sidecar's tap, as qemu's guest is: ``tests/harness/taprelay.py``
  copies frames between ``podvm-tap0`` and the stand-in's own tap ``eth0`` (with ``mac``), so every rule keyed on the
  tap sees the stand-in's frames; ``.relay`` is that process (it holds the tap, so the tap has carrier); ``.dhcp()``
  runs busybox udhcpc (``-O search -O mtu``) and returns what it received (dict of the script's environment);
  ``.serve_tcp(port, reply)`` / ``.serve_udp(port, reply)`` start small servers; ``.ns`` for anything else.
- ``GuestSender(vm)``: ``.send(*frames)`` puts scapy frames on the stand-in's NIC, as a hostile guest would;
  ``guard_counters(pod_ns)``: the packets each named guard rule dropped.
- ``fresh_id()`` (from ``tests.harness.ids``): a bed id no other live bed uses, in this process or another.
- ``BedFactory``: what the fixture ``bed_factory`` of ``tests/conftest.py`` yields (its ``.bed()`` makes a bed).

A real guest can replace the stand-in: start the sidecar with ``Sidecar`` and attach qemu to the tap
``podvm-tap0`` inside ``bed.pod.ns`` (the tap is owned by uid 10001 unless ``TAP_OWNER`` says otherwise).
"""

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from shared.handshake import Handshake, wait
from tests.harness import ids
from tests.harness.ids import fresh_id
from tests.harness.paths import NETSIDECAR, REPO
from tests.harness.wait import until

__all__ = ["NETSIDECAR", "Bed", "BedFactory", "Sidecar", "VmStandIn", "fresh_id", "ns_popen", "ns_run"]


def ns_prefix(ns: str | None) -> list[str]:
    """argv prefix that runs a command inside ``ns``."""
    return [] if ns is None else ["ip", "netns", "exec", ns]


def ns_run(
    ns: str | None, *argv: str, check: bool = True, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in a namespace and capture its output; a failure raises with the output in the message."""
    proc = subprocess.run(
        [*ns_prefix(ns), *argv], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{ns}: {' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def ns_popen(ns: str | None, argv: list[str], **kwargs: object) -> "subprocess.Popen[bytes]":
    """Start a command in a namespace."""
    return subprocess.Popen([*ns_prefix(ns), *argv], **kwargs)  # type: ignore[call-overload,no-any-return]


class Netns:
    """A named network namespace with loopback up."""

    def __init__(self, name: str) -> None:
        self.ns = name

    def setup(self) -> None:
        """Create it (again, if a crashed run left it)."""
        self.cleanup()
        ns_run(None, "ip", "netns", "add", self.ns)
        ns_run(self.ns, "ip", "link", "set", "lo", "up")

    def cleanup(self) -> None:
        """Kill what runs inside, then delete it."""
        pids = ns_run(None, "ip", "netns", "pids", self.ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        if pids:
            time.sleep(0.1)
        ns_run(None, "ip", "netns", "del", self.ns, check=False)


class Veth:
    """A veth pair between two namespaces."""

    def __init__(self, a_ns: str, a: str, b_ns: str, b: str, mtu: int = 1500) -> None:
        self.a_ns, self.a, self.b_ns, self.b, self.mtu = a_ns, a, b_ns, b, mtu

    def setup(self) -> None:
        """Create the pair, move the ends and bring them up."""
        ns_run(
            self.a_ns,
            "ip",
            "link",
            "add",
            self.a,
            "mtu",
            str(self.mtu),
            "type",
            "veth",
            "peer",
            "name",
            self.b,
            "mtu",
            str(self.mtu),
            "netns",
            self.b_ns,
        )
        ns_run(self.a_ns, "ip", "link", "set", self.a, "up")
        ns_run(self.b_ns, "ip", "link", "set", self.b, "up")

    def cleanup(self) -> None:
        """Delete the pair (both ends go)."""
        ns_run(self.a_ns, "ip", "link", "del", self.a, check=False)


class Bed:
    """Node, client and pod namespaces wired like a cluster; see the module docstring."""

    def __init__(self, ident: int, style: str = "calico", mtu: int = 1440, families: str = "ipv4") -> None:
        assert ids.FIRST <= ident <= ids.LAST, ident
        assert style in ("calico", "bridge"), style
        assert families in ("ipv4", "dual", "ipv6"), families
        self.ident, self.style, self.mtu, self.families = ident, style, mtu, families
        self.v4, self.v6 = families != "ipv6", families != "ipv4"
        self.pod_ip6 = f"fd0b:{ident:x}::5"
        self.client_ip6 = f"fd0c:{ident:x}::2"
        self.node = Netns(f"pv{ident}-node")
        self.pod = Netns(f"pv{ident}-pod")
        self.client = Netns(f"pv{ident}-cli")
        self.pod_ip = f"10.{ident}.0.5"
        self.client_ip = f"10.{ident}.9.2"
        self._pod_veth = Veth(self.node.ns, f"pv{ident}pod", self.pod.ns, "eth0", mtu)
        self._cli_veth = Veth(self.node.ns, f"pv{ident}cli", self.client.ns, "eth0")

    def setup(self) -> None:
        """Build the three namespaces and their routes for the families asked for (holding the id meanwhile)."""
        if not (ids.held(self.ident) or ids.claim(self.ident)):
            raise RuntimeError(f"test bed id {self.ident} is in use by another process")
        for ns in (self.node, self.pod, self.client):
            ns.setup()
        self._pod_veth.setup()
        self._cli_veth.setup()
        if self.v4:
            self._setup_ipv4()
        if self.v6:
            self._setup_ipv6()

    def _setup_ipv6(self) -> None:
        """Calico: the pod's /128 via the link-local fe80::1, which the node answers by proxy NDP; bridge: a /64 via
        the node's global address. Addresses skip duplicate detection, so they are usable at once."""
        n, node, pod, cli = self.ident, self.node.ns, self.pod.ns, self.client.ns
        h = f"{n:x}"
        ns_run(node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        ns_run(node, "ip", "-6", "addr", "add", f"fd0c:{h}::1/64", "dev", f"pv{n}cli", "nodad")
        ns_run(cli, "ip", "-6", "addr", "add", f"{self.client_ip6}/64", "dev", "eth0", "nodad")
        ns_run(cli, "ip", "-6", "route", "add", "default", "via", f"fd0c:{h}::1")
        if self.style == "calico":
            ns_run(node, "ip", "-6", "route", "add", f"{self.pod_ip6}/128", "dev", f"pv{n}pod")
            ns_run(node, "sysctl", "-qw", f"net.ipv6.conf.pv{n}pod.proxy_ndp=1")
            ns_run(node, "ip", "-6", "neigh", "add", "proxy", "fe80::1", "dev", f"pv{n}pod")
            ns_run(pod, "ip", "-6", "addr", "add", f"{self.pod_ip6}/128", "dev", "eth0", "nodad")
            ns_run(pod, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        else:
            ns_run(node, "ip", "-6", "addr", "add", f"fd0b:{h}::1/64", "dev", f"pv{n}pod", "nodad")
            ns_run(pod, "ip", "-6", "addr", "add", f"{self.pod_ip6}/64", "dev", "eth0", "nodad")
            ns_run(pod, "ip", "-6", "route", "add", "default", "via", f"fd0b:{h}::1")

    def _setup_ipv4(self) -> None:
        n, node, pod, cli = self.ident, self.node.ns, self.pod.ns, self.client.ns
        ns_run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns_run(node, "ip", "addr", "add", f"10.{n}.9.1/24", "dev", f"pv{n}cli")
        ns_run(cli, "ip", "addr", "add", f"{self.client_ip}/24", "dev", "eth0")
        ns_run(cli, "ip", "route", "add", "default", "via", f"10.{n}.9.1")
        if self.style == "calico":
            ns_run(node, "ip", "route", "add", f"{self.pod_ip}/32", "dev", f"pv{n}pod")
            ns_run(node, "sysctl", "-qw", f"net.ipv4.conf.pv{n}pod.proxy_arp=1")
            # Proxy ARP answers for 169.254.1.1 only if the node routes it elsewhere: a default route does.
            ns_run(node, "ip", "route", "add", "default", "dev", f"pv{n}cli")
            ns_run(pod, "ip", "addr", "add", f"{self.pod_ip}/32", "dev", "eth0")
            ns_run(pod, "ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
            ns_run(pod, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        else:
            ns_run(node, "ip", "addr", "add", f"10.{n}.0.1/24", "dev", f"pv{n}pod")
            ns_run(pod, "ip", "addr", "add", f"{self.pod_ip}/24", "dev", "eth0")
            ns_run(pod, "ip", "route", "add", "default", "via", f"10.{n}.0.1")

    def cleanup(self) -> None:
        """Remove everything, in reverse order, and give the id back."""
        for ns in (self.client, self.pod, self.node):
            ns.cleanup()
        ids.release(self.ident)


def _written_since(path: Path, since_ns: int) -> bool:
    """True once ``path`` exists with a modification time of at least ``since_ns``; a restarted sidecar removes the
    stale handshake while this looks, so the file may vanish between the checks."""
    try:
        return path.stat().st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


class Sidecar:
    """The real `netsidecar run` as a process in the pod namespace."""

    def __init__(
        self, bed: Bed, env: dict[str, str] | None = None, run_dir: Path | None = None, prefix: Sequence[str] = ()
    ) -> None:
        self.bed = bed
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix=f"pv{bed.ident}-run-"))
        self.resolv = self.run_dir.parent / f"pv{bed.ident}-resolv.conf"
        state = (env or {}).get("NET_STATE_DIR") or tempfile.mkdtemp(prefix=f"pv{bed.ident}-state-")
        self.env = {
            "HOSTNAME": f"vm-{bed.ident}",
            "RUN_DIR": str(self.run_dir),
            "NET_STATE_DIR": state,
            "RESOLV_CONF": str(self.resolv),
            "SHUTDOWN_TIMEOUT": "0s",  # holds the network for the runner's hard-stop grace only
            "POD_WAIT_TIMEOUT": "5s",
            **(env or {}),
        }
        self.state_dir = Path(self.env["NET_STATE_DIR"])
        self.prefix = list(prefix)  # e.g. setpriv with a capability set: what `run` runs under
        self.prepared = False
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = self.run_dir.parent / f"pv{bed.ident}-sidecar.log"

    def write_resolv(self, text: str) -> None:
        """The resolv.conf the sidecar reads."""
        self.resolv.write_text(textwrap.dedent(text))

    def prepare(self) -> None:
        """`netsidecar prepare` with full privileges, as the pod's init container runs it before `run`."""
        done = self.cli("prepare")
        if done.returncode != 0:
            raise RuntimeError(f"netsidecar prepare -> {done.returncode}: {done.stderr.strip()}")
        self.prepared = True

    def start(self, timeout: float = 10) -> Handshake:
        """Start `netsidecar run` (after `prepare`, once) and wait for its handshake."""
        if not self.prepared:
            self.prepare()
        if not self.resolv.exists():
            self.write_resolv("nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\n")
        handshake = self.run_dir / "network.json"
        started = time.time_ns()
        with self._out.open("ab") as out:
            argv = [*self.prefix, *NETSIDECAR, "run"]
            self.proc = ns_popen(self.bed.pod.ns, argv, env=self._env(), stdout=out, stderr=out)
        proc = self.proc

        def written() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"netsidecar run exited ({proc.returncode}) before its handshake:\n{self.log()}")
            return _written_since(handshake, started)

        try:
            until("netsidecar run's handshake", written, timeout, interval=0.02)
        except AssertionError as err:
            raise RuntimeError(f"{err}:\n{self.log()}") from None
        return wait(self.run_dir, 1)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run another netsidecar subcommand (status, down, plan) with this sidecar's environment."""
        return ns_run(self.bed.pod.ns, *NETSIDECAR, *args, env=self._env(), check=False)

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), **self.env}

    def log(self) -> str:
        """Everything the sidecar printed so far."""
        return self._out.read_text() if self._out.exists() else ""

    def term(self, timeout: float = 15) -> int:
        """SIGTERM and wait for the clean exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def cleanup(self) -> None:
        """Stop it if it still runs and remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in (self.resolv, self._out):
            path.unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(self.run_dir), str(self.state_dir)], check=False)


class VmStandIn:
    """A namespace standing in for the VM behind the sidecar's tap, with the VM's MAC (tests/harness/taprelay.py)."""

    def __init__(self, bed: Bed, mac: str) -> None:
        self.bed, self.mac = bed, mac
        self.netns = Netns(f"pv{bed.ident}-vm")
        self.ns = self.netns.ns
        self.script = Path(tempfile.gettempdir()) / f"pv{bed.ident}-udhcpc.sh"
        self.record = Path(tempfile.gettempdir()) / f"pv{bed.ident}-udhcpc.json"
        self.resolv = Path("/etc/netns") / self.ns / "resolv.conf"
        self.relay: subprocess.Popen[bytes] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.temp: list[Path] = []

    def setup(self, timeout: float = 10) -> None:
        """Create the namespace and attach the relay to the sidecar's tap (the sidecar must be up)."""
        self.netns.setup()
        # ip netns exec bind-mounts this over /etc/resolv.conf, so no DHCP client here can rewrite the host's.
        self.resolv.parent.mkdir(parents=True, exist_ok=True)
        self.resolv.write_text("")
        relay = [sys.executable, str(REPO / "tests" / "harness" / "taprelay.py"), "podvm-tap0", self.ns, "eth0"]
        self.relay = ns_popen(self.bed.pod.ns, relay, stdout=subprocess.PIPE)
        assert self.relay.stdout is not None
        ready, _, _ = select.select([self.relay.stdout], [], [], timeout)
        if not ready or self.relay.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"tap relay for {self.ns} did not start (rc={self.relay.poll()})")
        ns_run(self.ns, "ip", "link", "set", "eth0", "address", self.mac, "mtu", str(self.bed.mtu), "up")

    def dhcp(self) -> dict[str, str]:
        """Run busybox udhcpc once; apply the lease (address, default route, MTU) and return what it received."""
        self.script.write_text(
            textwrap.dedent(f"""\
            #!/bin/sh
            [ "$1" = bound ] || exit 0
            {sys.executable} -c 'import json,os; print(json.dumps(dict(os.environ)))' > {self.record}
            ip addr add "$ip/$mask" dev "$interface"
            [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
            ip route add default via "$router"
            """)
        )
        self.script.chmod(0o755)
        ns_run(
            self.ns,
            "busybox",
            "udhcpc",
            "-i",
            "eth0",
            "-s",
            str(self.script),
            "-O",
            "search",
            "-O",
            "mtu",
            "-n",
            "-q",
            "-f",
            "-t",
            "10",
            "-T",
            "1",
            timeout=30,
        )
        received: dict[str, str] = json.loads(self.record.read_text())
        return received

    def dhcp6(self) -> dict[str, str]:
        """Configure IPv6 as a real guest does: router advertisements (accept_ra, on while the stand-in does not
        forward) give the default route and SLAAC, then ISC ``dhclient -6`` asks DHCPv6 for an address and the
        nameservers; its stock script writes them to the namespace's own resolv.conf. Returns dhclient's lease
        variables (``new_ip6_address``, ``new_dhcp6_name_servers``, ``new_dhcp6_domain_search``, ...)."""
        for key, value in (("accept_ra", "1"), ("autoconf", "1")):
            ns_run(self.ns, "sysctl", "-qw", f"net.ipv6.conf.eth0.{key}={value}")
        base = Path(tempfile.gettempdir()) / f"pv{self.bed.ident}-dhclient6"
        script = base.with_suffix(".sh")
        record = base.with_suffix(".json")
        self.temp += [script, record, base.with_suffix(".leases"), base.with_suffix(".pid")]
        # The stock dhclient-script does the work (address, resolv.conf); the wrapper records what it was given.
        script.write_text(
            textwrap.dedent(f"""\
            #!/bin/sh
            case "$reason" in BOUND6|RENEW6|REBIND6)
                {sys.executable} -c 'import json,os; print(json.dumps(dict(os.environ)))' > {record};;
            esac
            . /sbin/dhclient-script
            """)
        )
        script.chmod(0o755)
        base.with_suffix(".leases").unlink(missing_ok=True)
        # dhclient gives up at once while the link-local address is still tentative (duplicate detection).
        show = ("ip", "-6", "addr", "show", "dev", "eth0", "scope", "link")
        until(
            "the stand-in's link-local address leaving tentative",
            lambda: "tentative" not in ns_run(self.ns, *show).stdout,
            10,
        )
        ns_run(
            self.ns,
            "dhclient",
            "-6",
            "-1",
            "-sf",
            str(script),
            "-lf",
            str(base.with_suffix(".leases")),
            "-pf",
            str(base.with_suffix(".pid")),
            "eth0",
            timeout=60,
        )
        received: dict[str, str] = json.loads(record.read_text())
        return received

    def resolv_conf(self) -> str:
        """The stand-in's resolv.conf, as its DHCP clients wrote it."""
        return self.resolv.read_text()

    def serve_tcp(self, port: int, reply: str) -> None:
        """A TCP server answering ``reply`` and the peer's address to each connection."""
        self._serve("SOCK_STREAM", port, reply)

    def serve_udp(self, port: int, reply: str) -> None:
        """A UDP server answering ``reply`` and the peer's address to each datagram."""
        self._serve("SOCK_DGRAM", port, reply)

    def _serve(self, kind: str, port: int, reply: str) -> None:
        code = textwrap.dedent(f"""\
            import socket
            s = socket.socket(socket.AF_INET6, socket.{kind})
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", {port}))
            if s.type == socket.SOCK_STREAM:
                s.listen()
                while True:
                    c, peer = s.accept()
                    c.sendall(("{reply} " + peer[0].removeprefix("::ffff:") + "\\n").encode())
                    c.close()
            while True:
                data, peer = s.recvfrom(2048)
                s.sendto(("{reply} " + peer[0].removeprefix("::ffff:") + "\\n").encode(), peer)
            """)
        self.procs.append(ns_popen(self.ns, [sys.executable, "-c", code]))
        time.sleep(0.3)

    def cleanup(self) -> None:
        """Stop servers and the relay (the sidecar's tap loses its carrier), remove the namespace and temp files."""
        for proc in [*self.procs, *([self.relay] if self.relay else [])]:
            proc.kill()
            proc.wait()
        self.procs.clear()
        self.relay = None
        self.netns.cleanup()
        for path in (self.script, self.record, self.resolv, *self.temp):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.resolv.parent.rmdir()


_SEND = """\
import json, sys
from scapy.all import *
print("ready", flush=True)
for line in sys.stdin:
    sendp([eval(frame) for frame in json.loads(line)], iface="eth0", verbose=0)
    print("sent", flush=True)
"""


class GuestSender:
    """A scapy process on the stand-in's NIC: frames sent as the guest sends them, through the sidecar's tap."""

    def __init__(self, vm: VmStandIn) -> None:
        self.proc = ns_popen(vm.ns, [sys.executable, "-c", _SEND], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        vm.procs.append(self.proc)  # stopped with the stand-in
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"

    def send(self, *frames: str) -> None:
        """sendp the scapy expressions ``frames`` (e.g. ``"Ether()/IP()"``) and wait until they are out."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(frames).encode() + b"\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == b"sent", "the guest's sender died"


def guard_counters(pod_ns: str) -> dict[str, int]:
    """Packets each named guard rule of the sidecar's tables dropped, by its comment (summed where a guard has two
    rules); a table that is not loaded counts nothing."""
    out: dict[str, int] = {}
    for family in ("netdev", "inet"):
        listed = ns_run(pod_ns, "nft", "-j", "list", "table", family, "podvm", check=False).stdout
        for item in json.loads(listed or '{"nftables": []}')["nftables"]:
            rule = item.get("rule", {})
            for expr in rule.get("expr", []):
                if "counter" in expr and "comment" in rule:
                    out[rule["comment"]] = out.get(rule["comment"], 0) + expr["counter"]["packets"]
    return out


def tcp_request(ns: str, host: str, port: int, data: str = "") -> str:
    """Connect from ``ns`` to host:port, send ``data``, return the reply ('' if refused or timed out)."""
    code = textwrap.dedent(f"""\
        import socket, sys
        try:
            s = socket.create_connection(({host!r}, {port}), timeout=2)
            s.sendall({data!r}.encode())
            print(s.recv(2048).decode(), end="")
        except OSError as e:
            sys.exit(1)
        """)
    return ns_run(ns, sys.executable, "-c", code, check=False).stdout.strip()


def udp_request(ns: str, host: str, port: int) -> str:
    """Send one datagram from ``ns`` and return the reply ('' if none)."""
    code = textwrap.dedent(f"""\
        import socket, sys
        s = socket.socket(socket.AF_INET6 if ":" in {host!r} else socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"hi", ({host!r}, {port}))
        try:
            print(s.recv(2048).decode(), end="")
        except OSError:
            sys.exit(1)
        """)
    return ns_run(ns, sys.executable, "-c", code, check=False).stdout.strip()


class Conversation:
    """A TCP connection from the client through the pod IP (either family) to an echo server in the stand-in, kept
    open: ``echo(text)`` sends a line and returns the answer."""

    def __init__(self, client_ns: str, vm: VmStandIn, host: str) -> None:
        server = "import socket\ns=socket.create_server(('', 9000), family=socket.AF_INET6, dualstack_ipv6=True)\n"
        server += "c, _ = s.accept()\n"
        server += "while (d := c.recv(100)): c.sendall(d)\n"
        vm.procs.append(ns_popen(vm.ns, [sys.executable, "-c", server]))
        time.sleep(0.3)
        client = f"import socket,sys\ns=socket.create_connection(({host!r}, 9000), timeout=5)\n"
        client += (
            "for line in sys.stdin:\n    s.sendall(line.encode()); print(s.recv(100).decode(), end='', flush=True)\n"
        )
        self.proc = ns_popen(client_ns, [sys.executable, "-c", client], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def echo(self, text: str) -> str:
        """Send ``text`` and return what came back ('' once the connection is gone)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{text}\n".encode())
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    def close(self) -> None:
        """End the client."""
        self.proc.kill()
        self.proc.wait()


class BedFactory:
    """What ``bed_factory`` yields: ``bed()``, ``sidecar(bed, env)``, ``vm(bed, mac)``; ``made`` is torn down."""

    def __init__(self, made: list[Bed | Sidecar | VmStandIn]) -> None:
        self.made = made

    def bed(self, style: str = "calico", mtu: int = 1440, families: str = "ipv4") -> Bed:
        """A Bed, set up now and cleaned up by the fixture."""
        bed = Bed(fresh_id(), style, mtu, families)
        self.made.append(bed)
        bed.setup()
        return bed

    def sidecar(self, bed: Bed, env: dict[str, str] | None = None) -> Sidecar:
        """A Sidecar, cleaned up by the fixture."""
        side = Sidecar(bed, env)
        self.made.append(side)
        return side

    def vm(self, bed: Bed, mac: str) -> VmStandIn:
        """A VmStandIn plugged into the bridge, cleaned up by the fixture."""
        vm = VmStandIn(bed, mac)
        self.made.append(vm)
        vm.setup()
        return vm
