"""Sections 1 and 1b, network ready: `netsidecar run` to its handshake against a shell floor, where the time
goes, the imports, and a dual-stack pod against an IPv4-only one."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.pods import READY, first, log_times
from bench.table import Figure, Results
from shared.handshake import FILE_NAME
from tests.harness.ids import fresh_id
from tests.harness.netbed import Bed, Sidecar, ns_run

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
            sec,
            "netsidecar run -> handshake",
            "ms",
            side_ms,
            "shell floor (ip, nft -f, dnsmasq)",
            "target < 100 ms, within 3x",
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
    # The modules `run` imports before its handshake; pyroute2 is not one of them (the links go through `ip`).
    code = "import netsidecar.cli, netsidecar.capabilities, netsidecar.links, netsidecar.nft, netsidecar.dhcp, nftables"
    wanted = ("netsidecar.cli", "netsidecar.links", "netsidecar.nft", "netsidecar.dhcp", "nftables")
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
