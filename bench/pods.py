"""What several sections share: the test bed pod with the real sidecar and a VM stand-in holding its lease,
the logs' timestamps, and how a process's memory, CPU and the packet path's rates are read."""

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

from tests.harness.ids import fresh_id
from tests.harness.netbed import Bed, Sidecar, VmStandIn, ns_run

READY = "network ready"
VM_NET = "192.168.254.0/30"


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
