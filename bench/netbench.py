"""Network figures on the namespace test bed: ready time, packet path, flowtable, footprint, scale."""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.table import Figure, Results
from shared.handshake import FILE_NAME
from tests.netbed import Bed, Sidecar, VmStandIn, ns_popen, ns_prefix, ns_run

READY = "network ready"
VM_NET = "192.168.254.0/30"
_ids = [os.getpid() % 120]


def fresh_id() -> int:
    """A bed id not used before in this run (1..200)."""
    _ids[0] += 1
    return 1 + _ids[0] % 200


def log_times(text: str) -> list[tuple[float, str]]:
    """(epoch seconds, message) of each log line carrying our UTC timestamp."""
    out = []
    for line in text.splitlines():
        match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \S+\s+\S+: (.*)", line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
            out.append((stamp.timestamp(), match.group(2)))
    return out


def first(times: list[tuple[float, str]], prefix: str) -> float | None:
    """Time of the first message starting with ``prefix``."""
    return next((t for t, msg in times if msg.startswith(prefix)), None)


# ----------------------------------------------------------------------------------------------- 1. network ready

FLOOR = """\
set -e
echo 1 > /proc/sys/net/ipv4/ip_forward
ip link add {bridge} mtu {mtu} type bridge
ip addr add {address} dev {bridge}
ip tuntap add dev {tap} mode tap user 10001
ip link set {tap} mtu {mtu} master {bridge} up
ip link set {bridge} up
nft -j -f {rules}
{dnsmasq} >/dev/null 2>&1 &
echo $! > {dir}/dnsmasq.pid
echo '{{}}' > {dir}/{handshake}
"""


def floor_script(side: Sidecar, bed: Bed, work: Path) -> Path:
    """The same bridge, tap, rules and dnsmasq as the sidecar's plan, as a shell script of ip/nft/dnsmasq."""
    side.write_resolv("nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\n")
    plan = json.loads(side.cli("plan").stdout)
    links, argv = plan["links"], plan["dnsmasq"]
    argv = [a if not a.startswith("--dhcp-leasefile=") else f"--dhcp-leasefile={work}/leases" for a in argv]
    rules = work / "rules.json"
    rules.write_text(json.dumps(plan["nftables"]))
    script = work / "floor.sh"
    script.write_text(
        FLOOR.format(
            bridge=links["bridge"],
            tap=links["tap"],
            mtu=links["mtu"],
            address=links["bridge_address"],
            rules=rules,
            dnsmasq=" ".join(f"'{a}'" for a in argv),
            dir=work,
            handshake=FILE_NAME,
        )
    )
    return script


def floor_teardown(bed: Bed, work: Path) -> None:
    """Undo the floor script."""
    pid = work / "dnsmasq.pid"
    if pid.exists():
        ns_run(None, "kill", pid.read_text().strip(), check=False)
        pid.unlink()
    for link in ("podvm-tap0", "podvm0"):
        ns_run(bed.pod.ns, "ip", "link", "del", link, check=False)
    for family in ("ip", "netdev", "inet"):
        ns_run(bed.pod.ns, "nft", "delete", "table", family, "podvm", check=False)
    (work / FILE_NAME).unlink(missing_ok=True)


def _ms_since(start_ns: int, path: Path) -> float:
    return (path.stat().st_mtime_ns - start_ns) / 1e6


SEGMENTS = (
    ("start -> pod interface read (interpreter, imports)", "pod interface"),
    ("pod interface -> bridge and tap up (netlink)", "bridge podvm0 192.168.254.1/30"),
    ("links -> rules applied (nftables)", "rules:"),
    ("rules -> dnsmasq started", "dnsmasq started"),
    ("dnsmasq -> handshake written", READY),
)


def bench_ready(res: Results, runs: int) -> None:
    """Sidecar start to handshake against the shell floor, alternated in one bed; the sidecar's time by log."""
    sec = "1. network ready"
    bed = Bed(fresh_id(), style="calico")
    work = Path(tempfile.mkdtemp(prefix="podvm-floor-"))
    side_ms: list[float] = []
    floor_ms: list[float] = []
    seg: dict[str, list[float]] = {name: [] for name, _ in SEGMENTS}
    try:
        bed.setup()
        probe = Sidecar(bed)
        try:
            script = floor_script(probe, bed, work)
        finally:
            probe.cleanup()
        for _ in range(runs):
            side = Sidecar(bed)
            try:
                side.prepare()  # the init container's step, not part of `run`
                start = time.time_ns()
                side.start()
                side_ms.append(_ms_since(start, side.run_dir / FILE_NAME))
                times = log_times(side.log())
                side.term()
                prev = start / 1e9
                for name, prefix in SEGMENTS:
                    at = first(times, prefix)
                    if at is not None:
                        seg[name].append((at - prev) * 1000)
                        prev = at
            finally:
                side.cleanup()
            start = time.time_ns()
            ns_run(bed.pod.ns, "sh", str(script))
            floor_ms.append(_ms_since(start, work / FILE_NAME))
            floor_teardown(bed, work)
    finally:
        floor_teardown(bed, work)
        bed.cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    res.add(Figure(sec, "shell floor (ip, nft -f, dnsmasq)", "ms", floor_ms))
    res.add(
        Figure(
            sec, "netsidecar run -> handshake", "ms", side_ms, "shell floor (ip, nft -f, dnsmasq)", "target < 600 ms"
        )
    )
    for name, _ in SEGMENTS:
        res.add(Figure(sec, f"  {name}", "ms", seg[name], note="from the sidecar's log (ms resolution)"))
    bench_imports(res, sec)
    bench_ready_dual(res, runs)


def bench_ready_dual(res: Results, runs: int) -> None:
    """Sidecar start to handshake on a dual-stack pod against an IPv4-only one, alternated (two beds)."""
    sec = "1b. network ready, dual-stack"
    beds = {"IPv4-only pod": Bed(fresh_id(), "calico"), "dual-stack pod": Bed(fresh_id(), "calico", families="dual")}
    times: dict[str, list[float]] = {name: [] for name in beds}
    try:
        for bed in beds.values():
            bed.setup()
        for turn in range(runs):
            for name in list(beds)[:: 1 if turn % 2 else -1]:  # A-B then B-A
                side = Sidecar(beds[name])
                try:
                    side.prepare()
                    start = time.time_ns()
                    side.start()
                    times[name].append(_ms_since(start, side.run_dir / FILE_NAME))
                    side.term()
                finally:
                    side.cleanup()
    finally:
        for bed in beds.values():
            bed.cleanup()
    four, dual = (f"netsidecar run -> handshake, {name}" for name in beds)
    res.add(Figure(sec, four, "ms", times["IPv4-only pod"]))
    res.add(Figure(sec, dual, "ms", times["dual-stack pod"], four, "target <= 1.1 (within 10 %)"))


def bench_imports(res: Results, sec: str) -> None:
    """Import costs on the run path, from ``python -X importtime`` (cumulative microseconds of each top module)."""
    code = "import netsidecar.cli, netsidecar.links, netsidecar.nft, netsidecar.dhcp, pyroute2, nftables"
    wanted = ("netsidecar.cli", "netsidecar.links", "netsidecar.nft", "netsidecar.dhcp", "pyroute2", "nftables")
    got: dict[str, list[float]] = {name: [] for name in ("interpreter (python -c pass)", *wanted)}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for _ in range(3):
        begin = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
        got["interpreter (python -c pass)"].append((time.monotonic() - begin) * 1000)
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True, env=env
        ).stderr
        for line in err.splitlines():
            parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
            if len(parts) == 3 and parts[2] in wanted:
                got[parts[2]].append(int(parts[1]) / 1000)
    for name, values in got.items():
        label = name if name.startswith("interpreter") else f"import {name} (cumulative, first import)"
        res.add(Figure(sec, f"  {label}", "ms", values, note="python -X importtime"))


# --------------------------------------------------------------------------------------------- 2. packet path

# Both paths in one process, in blocks of connects taken in turn, so a neighbour's load on this shared machine hits
# both alike; each block is one sample. The number of connects stays bounded: each leaves a TIME_WAIT socket in the
# client, and a crowded port range slows connect() itself down, which would measure the client instead of the path.
CPS_PAIR = """\
import json, socket, time
rates = {{host: [] for host in {hosts!r}}}
for block in range({blocks}):
    for host in {hosts!r}[:: 1 if block % 2 else -1]:  # A-B then B-A: no path always goes first
        begin = time.monotonic()
        for _ in range({count}):
            s = socket.create_connection((host, {port}), timeout=2)
            s.recv(64)
            s.close()
        rates[host].append({count} / (time.monotonic() - begin))
print(json.dumps(list(rates.values())))
"""

# The client closes first (as HTTP clients do), so TIME_WAIT stays on its side, where port choice avoids it.
CPS_SERVER = """\
import socket
s = socket.socket(socket.{family})
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{bind}", {port}))
s.listen(128)
while True:
    c, _ = s.accept()
    c.sendall(b"hi")
    c.recv(64)
    c.close()
"""

UDP_RR = """\
import socket, statistics, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(({host!r}, {port}))
rtts = []
for _ in range({count}):
    t = time.perf_counter_ns()
    s.send(b"x")
    s.recv(2048)
    rtts.append(time.perf_counter_ns() - t)
print(statistics.median(rtts) / 1000)
"""

# Both paths in one process, packet by packet in turn, so scheduling drifts (same core or not) hit both alike.
UDP_RR_PAIR = """\
import socket, statistics, time
socks = []
for host in {hosts!r}:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((host, {port}))
    socks.append(s)
rtts = [[] for _ in socks]
for _ in range({count}):
    for s, out in zip(socks, rtts):
        t = time.perf_counter_ns()
        s.send(b"x")
        s.recv(2048)
        out.append(time.perf_counter_ns() - t)
print(" ".join(str(statistics.median(out) / 1000) for out in rtts))
"""

FLOWTABLE = """\
table ip podvmft {{
  flowtable ft {{ hook ingress priority 0; devices = {{ {devices} }}; }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ip protocol {{ tcp, udp }} flow add @ft
  }}
}}
"""


def iperf(client_ns: str, host: str, seconds: int) -> float:
    """Gbit/s received by the iperf3 server at ``host``."""
    out = ns_run(client_ns, "iperf3", "-c", host, "-t", str(seconds), "-J", timeout=seconds + 30).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def py_in(ns: str, code: str, timeout: float = 60) -> float:
    """Run a Python snippet in ``ns`` and return the number it prints."""
    return float(ns_run(ns, sys.executable, "-c", code, timeout=timeout).stdout.strip())


class Pod:
    """A bed with the real sidecar and a stand-in that holds its lease; ``close`` removes all."""

    def __init__(self, style: str = "calico", env: dict[str, str] | None = None, families: str = "ipv4") -> None:
        self.bed = Bed(fresh_id(), style=style, families=families)
        self.side: Sidecar | None = None
        self.vm: VmStandIn | None = None
        self.env = env
        self.lease: dict[str, str] = {}
        self.lease6: dict[str, str] = {}
        self.vm_ip = ""
        self.vm_ip6 = ""

    def up(self) -> None:
        """Build the bed, start the sidecar, plug the stand-in and take the lease."""
        self.bed.setup()
        self.start()

    def start(self) -> None:
        """Sidecar and stand-in on an already built bed."""
        self.side = Sidecar(self.bed, self.env)
        hs = self.side.start(timeout=60)
        self.vm = VmStandIn(self.bed, hs.mac)
        self.vm.setup()
        if hs.vm_ip is not None:
            self.vm_ip = hs.vm_ip
            self.lease = self.vm.dhcp()
        if hs.ipv6 is not None:
            self.vm_ip6 = hs.ipv6.vm_ip
            self.lease6 = self.vm.dhcp6()

    def close(self) -> None:
        """Remove everything, also after a failure."""
        if self.vm is not None:
            self.vm.cleanup()
        if self.side is not None:
            self.side.cleanup()
        self.bed.cleanup()


def bench_packets(res: Results, rounds: int, seconds: int) -> Pod:
    """Through the pod IP against plain routing to the stand-in, alternated; returns the pod (still up)."""
    sec = "2. packet path"
    pod = Pod()
    try:
        pod.up()
        assert pod.vm is not None
        vm, bed = pod.vm, pod.bed
        vm.procs.append(ns_popen(vm.ns, ["iperf3", "-s"], stdout=subprocess.DEVNULL))
        server = CPS_SERVER.format(family="AF_INET", bind="0.0.0.0", port=8080)
        vm.procs.append(ns_popen(vm.ns, [sys.executable, "-c", server]))
        vm.serve_udp(8081, "hi")
        ns_run(bed.node.ns, "ip", "route", "add", VM_NET, "via", bed.pod_ip, "dev", f"pv{bed.ident}pod", "onlink")
        paths = {"pod IP (DNAT/SNAT)": bed.pod_ip, "routed to stand-in (no NAT)": pod.vm_ip}
        tput: dict[str, list[float]] = {k: [] for k in paths}
        cps: dict[str, list[float]] = {k: [] for k in paths}
        rr: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            # A-B-B-A twice: a load that rises or falls during the round on this shared machine hits both alike.
            for name in [*paths, *reversed(paths)] * 2:
                tput[name].append(iperf(bed.client.ns, paths[name], seconds))
            code = CPS_PAIR.format(hosts=list(paths.values()), port=8080, blocks=20, count=50)
            blocks = json.loads(ns_run(bed.client.ns, sys.executable, "-c", code, timeout=120).stdout)
            for name, values in zip(paths, blocks, strict=True):
                cps[name].extend(values)
            code = UDP_RR_PAIR.format(hosts=list(paths.values()), port=8081, count=2000)
            for name, value in zip(
                paths, ns_run(bed.client.ns, sys.executable, "-c", code).stdout.split(), strict=True
            ):
                rr[name].append(float(value))
        routed = "routed to stand-in (no NAT)"
        for label, data, unit in (
            ("TCP throughput", tput, "Gbit/s"),
            ("TCP connects/s", cps, "conn/s"),
            ("UDP request/response RTT", rr, "us"),
        ):
            res.add(Figure(sec, f"{label}, {routed}", unit, data[routed]))
            nat = "pod IP (DNAT/SNAT)"
            note = "target >= 0.9" if unit != "us" else "target <= 1.11"
            res.add(Figure(sec, f"{label}, {nat}", unit, data[nat], f"{label}, {routed}", note))
        bench_flowtable(res, pod, rounds, seconds)
        bench_guards(res, pod, rounds, seconds)
        bench_packets6(res, rounds, seconds)
    except BaseException:
        pod.close()
        raise
    return pod


def bench_packets6(res: Results, rounds: int, seconds: int) -> None:
    """IPv6 through the pod's IPv6 address against plain routing to the stand-in's IPv6, alternated, on a
    dual-stack Calico-like pod whose stand-in configured itself by RA and DHCPv6."""
    sec = "2c. packet path, IPv6"
    pod = Pod(families="dual")
    try:
        pod.up()
        assert pod.vm is not None
        vm, bed = pod.vm, pod.bed
        vm.procs.append(ns_popen(vm.ns, ["iperf3", "-s"], stdout=subprocess.DEVNULL))
        server = CPS_SERVER.format(family="AF_INET6", bind="::", port=8080)
        vm.procs.append(ns_popen(vm.ns, [sys.executable, "-c", server]))
        via = ["via", bed.pod_ip6, "dev", f"pv{bed.ident}pod", "onlink"]
        ns_run(bed.node.ns, "ip", "-6", "route", "add", f"{pod.vm_ip6}/128", *via)
        paths = {"pod IPv6 (DNAT/SNAT)": bed.pod_ip6, "routed to stand-in's IPv6 (no NAT)": pod.vm_ip6}
        tput: dict[str, list[float]] = {k: [] for k in paths}
        cps: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for name in [*paths, *reversed(paths)] * 2:
                tput[name].append(iperf(bed.client.ns, paths[name], seconds))
            code = CPS_PAIR.format(hosts=list(paths.values()), port=8080, blocks=20, count=50)
            blocks = json.loads(ns_run(bed.client.ns, sys.executable, "-c", code, timeout=120).stdout)
            for name, values in zip(paths, blocks, strict=True):
                cps[name].extend(values)
        nat, routed = paths
        for label, data, unit in (("TCP throughput", tput, "Gbit/s"), ("TCP connects/s", cps, "conn/s")):
            res.add(Figure(sec, f"{label}, {routed}", unit, data[routed]))
            res.add(Figure(sec, f"{label}, {nat}", unit, data[nat], f"{label}, {routed}", "target >= 0.9"))
    finally:
        pod.close()


def bench_flowtable(res: Results, pod: Pod, rounds: int, seconds: int) -> None:
    """Throughput with an nftables flowtable (software fast path) for established flows, against without."""
    sec = "2b. flowtable (software fast path)"
    bed = pod.bed
    rules = Path(tempfile.mkstemp(prefix="podvm-ft-", suffix=".nft")[1])
    devices = "eth0, podvm0, podvm-tap0"
    rules.write_text(FLOWTABLE.format(devices=devices))
    without: list[float] = []
    with_ft: list[float] = []
    routed_ft: list[float] = []
    rr_without: list[float] = []
    rr_with: list[float] = []
    probe = ns_run(bed.pod.ns, "nft", "-c", "-f", str(rules), check=False)
    if probe.returncode != 0:
        rules.unlink(missing_ok=True)
        err = probe.stderr.strip()
        reason = ("Error:" + err.split("Error:", 1)[1].splitlines()[0]) if "Error:" in err else err[:80]
        res.add(
            Figure(
                sec,
                "flowtable",
                "-",
                [],
                note=f"not measured: nft refused the flowtable ({reason}); kernel without nf_flow_table?",
            )
        )
        return
    try:
        for _ in range(rounds):
            without.append(iperf(bed.client.ns, bed.pod_ip, seconds))
            rr_without.append(py_in(bed.client.ns, UDP_RR.format(host=bed.pod_ip, port=8081, count=2000)))
            ns_run(bed.pod.ns, "nft", "-f", str(rules))
            with_ft.append(iperf(bed.client.ns, bed.pod_ip, seconds))
            routed_ft.append(iperf(bed.client.ns, pod.vm_ip, seconds))
            rr_with.append(py_in(bed.client.ns, UDP_RR.format(host=bed.pod_ip, port=8081, count=2000)))
            ns_run(bed.pod.ns, "nft", "delete", "table", "ip", "podvmft")
    finally:
        ns_run(bed.pod.ns, "nft", "delete", "table", "ip", "podvmft", check=False)
        rules.unlink(missing_ok=True)
    base = "TCP throughput via pod IP, no flowtable"
    res.add(Figure(sec, base, "Gbit/s", without))
    res.add(Figure(sec, "TCP throughput via pod IP, flowtable", "Gbit/s", with_ft, base, f"devices {devices}"))
    res.add(Figure(sec, "TCP throughput routed, flowtable", "Gbit/s", routed_ft, base))
    rbase = "UDP RTT via pod IP, no flowtable"
    res.add(Figure(sec, rbase, "us", rr_without))
    res.add(Figure(sec, "UDP RTT via pod IP, flowtable", "us", rr_with, rbase))


GUARD_FAMILIES = ("netdev", "inet")

# One block of connects per line read, so the bench can change the ruleset between blocks of one client process.
CPS_STEP = """\
import socket, sys, time
for _ in sys.stdin:
    begin = time.monotonic()
    for _ in range({count}):
        s = socket.create_connection(({host!r}, {port}), timeout=2)
        s.recv(64)
        s.close()
    print({count} / (time.monotonic() - begin), flush=True)
"""


def bench_guards(res: Results, pod: Pod, rounds: int, seconds: int) -> None:
    """The cost of the guest-isolation tables: the pod IP path with them loaded against the same with them removed,
    switched on-off-off-on between iperf runs and between blocks of connects; the tables are put back after."""
    sec = "2c. guest isolation (what its rules cost)"
    bed, pod_ns = pod.bed, pod.bed.pod.ns
    saved = "".join(ns_run(pod_ns, "nft", "list", "table", f, "podvm").stdout for f in GUARD_FAMILIES)
    loaded = True
    on, off = "via pod IP, isolation rules loaded", "via pod IP, isolation tables removed"
    tput: dict[str, list[float]] = {on: [], off: []}
    cps: dict[str, list[float]] = {on: [], off: []}

    def guards(wanted: bool) -> None:
        nonlocal loaded
        if wanted and not loaded:
            subprocess.run([*ns_prefix(pod_ns), "nft", "-f", "-"], input=saved, text=True, check=True)
        elif loaded and not wanted:
            for family in GUARD_FAMILIES:
                ns_run(pod_ns, "nft", "delete", "table", family, "podvm")
        loaded = wanted

    code = CPS_STEP.format(host=bed.pod_ip, port=8080, count=50)
    client = ns_popen(bed.client.ns, [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    try:
        for _ in range(rounds):
            for state in (on, off, off, on) * 2:
                guards(state == on)
                tput[state].append(iperf(bed.client.ns, bed.pod_ip, seconds))
            for state in (on, off, off, on) * 5:
                guards(state == on)
                client.stdin.write(b"\n")
                client.stdin.flush()
                cps[state].append(float(client.stdout.readline()))
    finally:
        client.kill()
        client.wait()
        guards(True)
    for label, data, unit in (("TCP throughput", tput, "Gbit/s"), ("TCP connects/s", cps, "conn/s")):
        res.add(Figure(sec, f"{label}, {off}", unit, data[off]))
        res.add(Figure(sec, f"{label}, {on}", unit, data[on], f"{label}, {off}", "target >= 0.9"))


# ----------------------------------------------------------------------------------------------- 3. footprint


def rss_mib(pid: int) -> float:
    """VmRSS of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def bench_footprint(res: Results, pod: Pod, idle_seconds: float = 5.0) -> None:
    """RSS of the sidecar plus dnsmasq, and their CPU over an idle stretch."""
    sec = "3. footprint"
    assert pod.side is not None and pod.side.proc is not None
    side_pid = pod.side.proc.pid
    dns_pid = int((pod.side.state_dir / "dnsmasq.pid").read_text())
    side_rss, dns_rss = rss_mib(side_pid), rss_mib(dns_pid)
    tick = os.sysconf("SC_CLK_TCK")
    before = cpu_ticks(side_pid) + cpu_ticks(dns_pid)
    begin = time.monotonic()
    time.sleep(idle_seconds)
    used = (cpu_ticks(side_pid) + cpu_ticks(dns_pid) - before) / tick
    res.add(Figure(sec, "sidecar RSS (python)", "MiB", [side_rss]))
    res.add(Figure(sec, "dnsmasq RSS", "MiB", [dns_rss]))
    res.add(Figure(sec, "sidecar + dnsmasq RSS", "MiB", [side_rss + dns_rss], note="target < 50 MiB"))
    pct = 100 * used / (time.monotonic() - begin)
    res.add(Figure(sec, f"sidecar + dnsmasq idle CPU over {idle_seconds:g} s", "% core", [pct], note="target ~0"))


# --------------------------------------------------------------------------------------------------- 4. scale


def _parallel(items: list[Pod], action: Callable[[Pod], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(pod: Pod) -> None:
        try:
            action(pod)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(p,)) for p in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def bench_scale(res: Results, counts: tuple[int, ...], rounds: int) -> None:
    """N beds built first, then N sidecars plus stand-ins started at once: time until every lease is taken."""
    for _ in range(rounds):
        for count in counts:
            _scale_once(res, count)


def _scale_once(res: Results, count: int) -> None:
    sec = "4. scale (pods set up in parallel)"
    pods = [Pod() for _ in range(count)]
    try:
        errors = _parallel(pods, lambda p: p.bed.setup())
        if errors:
            raise RuntimeError(f"{count} beds: {errors[0]}")
        begin = time.monotonic()
        errors = _parallel(pods, Pod.start)
        elapsed = (time.monotonic() - begin) * 1000
        if errors:
            raise RuntimeError(f"{count} pods: {errors[0]}")
        own = sum(1 for p in pods if p.lease.get("ip") == p.vm_ip and _own_rules(p))
        name = f"{count} pod{'s' if count > 1 else ''}: sidecars + leases ready"
        ref = "1 pod: sidecars + leases ready" if count > 1 else None
        fig = res.find(sec, name) or res.add(Figure(sec, name, "ms", [], ref))
        fig.values.append(elapsed)
        owned = [*_ints(fig.extra.get("own_lease_and_rules")), own]
        fig.extra["own_lease_and_rules"] = owned
        fig.note = f"pods with own lease and rules, per run: {'/'.join(map(str, owned))} of {count}"
    finally:
        _parallel(pods, Pod.close)


def _ints(value: object) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else []


def _own_rules(pod: Pod) -> bool:
    """The pod's table DNATs its own pod IP (not another pod's)."""
    out = ns_run(pod.bed.pod.ns, "nft", "list", "table", "ip", "podvm").stdout
    return f"ip daddr {pod.bed.pod_ip}" in out and "dnat to 192.168.254.2" in out
