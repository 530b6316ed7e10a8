"""Section 2, the packet path (and 2b flowtable, 2c guest isolation, 2c IPv6): the pod IP's NAT against plain
routing to the stand-in, with the rates measured side by side."""

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.pods import VM_NET, Pod, iperf, py_in
from bench.table import Figure, Results
from tests.harness.netbed import ns_popen, ns_prefix, ns_run

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


@dataclass(frozen=True)
class Family:
    """One address family of section 2: its pod, the stand-in's listening socket, the route that bypasses the NAT,
    the two paths compared (NAT first) and whether UDP request/response is measured too."""

    section: str
    families: str
    af: str
    bind: str
    nat: str
    routed: str
    udp: bool


FAMILIES = (
    Family("2. packet path", "ipv4", "AF_INET", "0.0.0.0", "pod IP (DNAT/SNAT)", "routed to stand-in (no NAT)", True),
    Family(
        "2c. packet path, IPv6",
        "dual",
        "AF_INET6",
        "::",
        "pod IPv6 (DNAT/SNAT)",
        "routed to stand-in's IPv6 (no NAT)",
        False,
    ),
)


def bench_packets(res: Results, rounds: int, seconds: int) -> Pod:
    """Through the pod IP against plain routing to the stand-in, alternated, for IPv4 (then the flowtable and the
    guards on that pod) and IPv6 (a dual-stack Calico-like pod whose stand-in configured itself by RA and DHCPv6);
    returns the IPv4 pod (still up)."""
    kept: Pod | None = None
    try:
        for family in FAMILIES:
            pod = Pod(families=family.families)
            try:
                pod.up()
                _nat_against_routing(res, pod, family, rounds, seconds)
                if kept is None:
                    kept = pod
                    bench_flowtable(res, pod, rounds, seconds)
                    bench_guards(res, pod, rounds, seconds)
            finally:
                if pod is not kept:
                    pod.close()
    except BaseException:
        if kept is not None:
            kept.close()
        raise
    assert kept is not None
    return kept


def _nat_against_routing(res: Results, pod: Pod, family: Family, rounds: int, seconds: int) -> None:
    """Serve on the stand-in, route its address around the NAT, then measure both paths side by side."""
    assert pod.vm is not None
    vm, bed = pod.vm, pod.bed
    vm.procs.append(ns_popen(vm.ns, ["iperf3", "-s"], stdout=subprocess.DEVNULL))
    server = CPS_SERVER.format(family=family.af, bind=family.bind, port=8080)
    vm.procs.append(ns_popen(vm.ns, [sys.executable, "-c", server]))
    via = ["dev", f"pv{bed.ident}pod", "onlink"]
    if family.af == "AF_INET":
        ns_run(bed.node.ns, "ip", "route", "add", VM_NET, "via", bed.pod_ip, *via)
        paths = {family.nat: bed.pod_ip, family.routed: pod.vm_ip}
    else:
        ns_run(bed.node.ns, "ip", "-6", "route", "add", f"{pod.vm_ip6}/128", "via", bed.pod_ip6, *via)
        paths = {family.nat: bed.pod_ip6, family.routed: pod.vm_ip6}
    if family.udp:
        vm.serve_udp(8081, "hi")
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
        if family.udp:
            code = UDP_RR_PAIR.format(hosts=list(paths.values()), port=8081, count=2000)
            for name, value in zip(
                paths, ns_run(bed.client.ns, sys.executable, "-c", code).stdout.split(), strict=True
            ):
                rr[name].append(float(value))
    figures = [("TCP throughput", tput, "Gbit/s"), ("TCP connects/s", cps, "conn/s")]
    if family.udp:
        figures.append(("UDP request/response RTT", rr, "us"))
    for label, data, unit in figures:
        res.add(Figure(family.section, f"{label}, {family.routed}", unit, data[family.routed]))
        note = "target >= 0.9" if unit != "us" else "target <= 1.11"
        ref = f"{label}, {family.routed}"
        res.add(Figure(family.section, f"{label}, {family.nat}", unit, data[family.nat], ref, note))


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
