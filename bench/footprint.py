"""Section 3, footprint: the sidecar's and dnsmasq's memory and idle CPU."""

import os
import time

from bench.pods import Pod, cpu_ticks, rss_mib
from bench.table import Figure, Results


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
