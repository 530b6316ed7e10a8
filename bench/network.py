"""netsidecar's two performance goals, measured side by side in one run.

1. Ready time: from starting ``netsidecar run`` in a pod namespace to its handshake on disk (median of ``-n`` runs,
   each followed by a SIGTERM teardown). Goal: under 600 ms.
2. Throughput: iperf3 TCP from an outside client to the VM stand-in through the pod IP (DNAT/SNAT) against the same
   stand-in reached by plain routing to its own address, alternated ``-r`` times. Goal: NAT at least 0.9 of routed.

Run as root from the project root: ``.venv/bin/python bench/network.py [-n 15] [-r 3] [-t 3]``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netbed import Bed, Sidecar, VmStandIn, ns_popen, ns_run


def ready_times(bed: Bed, runs: int) -> list[float]:
    """Seconds from launching `netsidecar run` to its handshake, once per run."""
    times = []
    for _ in range(runs):
        side = Sidecar(bed)
        try:
            begin = time.monotonic()
            side.start()
            times.append(time.monotonic() - begin)
            side.term()
        finally:
            side.cleanup()
    return times


def iperf(client_ns: str, host: str, seconds: int) -> float:
    """Gbit/s received by the iperf3 server at ``host``."""
    out = ns_run(client_ns, "iperf3", "-c", host, "-t", str(seconds), "-J", timeout=seconds + 30).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def main() -> None:
    """Build a bridge-style bed, measure, print figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="sidecar starts to time")
    parser.add_argument("-r", type=int, default=3, help="iperf3 rounds per path")
    parser.add_argument("-t", type=int, default=3, help="seconds per iperf3 round")
    args = parser.parse_args()
    bed = Bed(1 + os.getpid() % 200, style="bridge")
    side: Sidecar | None = None
    vm: VmStandIn | None = None
    try:
        bed.setup()
        times = ready_times(bed, args.n)
        side = Sidecar(bed)
        handshake = side.start()
        vm = VmStandIn(bed, handshake.mac)
        vm.setup()
        vm.dhcp()
        vm.procs.append(ns_popen(vm.ns, ["iperf3", "-s"], stdout=subprocess.DEVNULL))
        time.sleep(0.5)
        # Plain routing to the stand-in's own address: the node routes the VM subnet to the pod.
        ns_run(bed.node.ns, "ip", "route", "add", "192.168.254.0/30", "via", bed.pod_ip)
        nat, routed = [], []
        for _ in range(args.r):
            nat.append(iperf(bed.client.ns, bed.pod_ip, args.t))
            routed.append(iperf(bed.client.ns, handshake.vm_ip, args.t))
    finally:
        if vm is not None:
            vm.cleanup()
        if side is not None:
            side.cleanup()
        bed.cleanup()
    median = statistics.median(times)
    print(
        f"ready: median {median * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
        f"over {len(times)} starts (goal < 600 ms: {'met' if median < 0.6 else 'NOT met'})"
    )
    ratio = statistics.median(nat) / statistics.median(routed)
    print(
        f"throughput: through pod IP (NAT) {statistics.median(nat):.2f} Gbit/s, "
        f"routed {statistics.median(routed):.2f} Gbit/s, ratio {ratio:.2f} "
        f"(goal >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
