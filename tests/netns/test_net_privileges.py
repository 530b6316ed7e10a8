"""The sidecar's privileges and paths, attacked for real: a runner (uid 10001) planting symbolic links in RUN_DIR,
the sidecar run with only its capabilities, forwarding left off, and pod hostnames dnsmasq would misread."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netsidecar.capabilities import RUN_CAPABILITIES
from tests.harness.netbed import NETSIDECAR, Bed, BedFactory, Sidecar, ns_run, tcp_request

pytestmark = pytest.mark.netns

RUNNER = 10001
NOBODY = 65534
AS_RUNNER = ["setpriv", f"--reuid={RUNNER}", f"--regid={RUNNER}", "--clear-groups"]
# Every name the sidecar or dnsmasq wrote in RUN_DIR before NET_STATE_DIR existed, and guesses at temporary names.
PLANTED = (
    "dnsmasq.pid",
    "dnsmasq.leases",
    "network.json",
    ".network.json.tmp",
    "network.json.tmp",
    ".dnsmasq.pid.tmp",
    "network-figures.json",  # the sidecar's figures for the metrics (it replaces this name)
    "dhcp-figures.json",  # its DHCP counters live in NET_STATE_DIR under this name
)
REPLACED = ("network.json", "network-figures.json")


def only(capabilities: list[str]) -> list[str]:
    """setpriv prefix: root with exactly ``capabilities`` (as a container runtime sets them), no privilege gain."""
    caps = ",".join(["-all", *(f"+{name.lower()}" for name in capabilities)])
    return ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set={caps}", "--"]


def cap_names(status: str, field: str) -> set[str]:
    """Names (of those `run` needs, plus NET_RAW) in one capability field of a /proc/PID/status text."""
    value = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith(f"{field}:"))
    known = {**RUN_CAPABILITIES, "NET_RAW": 13}
    assert value & ~sum(1 << bit for bit in known.values()) == 0, f"{field} {value:x} holds more than expected"
    return {name for name, bit in known.items() if value >> bit & 1}


def dnsmasq_pids(pod_ns: str) -> list[int]:
    pids = ns_run(None, "ip", "netns", "pids", pod_ns).stdout.split()
    return [int(p) for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "dnsmasq"]


def wait_for(what: str, check: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.05)


def test_runs_with_only_its_capabilities_and_dnsmasq_keeps_only_net_admin(bed_factory: BedFactory) -> None:
    """No NET_RAW, no DAC_OVERRIDE, no SYS_ADMIN, no privilege gain: the network comes up and the VM gets its lease."""
    bed = bed_factory.bed("calico")
    needed = sorted(RUN_CAPABILITIES)
    side = Sidecar(bed, prefix=only(needed))
    bed_factory.made.append(side)
    hs = side.start()
    assert side.proc is not None
    status = Path(f"/proc/{side.proc.pid}/status").read_text()
    assert cap_names(status, "CapEff") == set(needed) and "NoNewPrivs:\t1" in status
    [server] = dnsmasq_pids(bed.pod.ns)
    server_status = Path(f"/proc/{server}/status").read_text()
    assert f"Uid:\t{NOBODY}" in server_status, "dnsmasq dropped root"
    assert cap_names(server_status, "CapEff") == cap_names(server_status, "CapPrm") == {"NET_ADMIN"}
    vm = bed_factory.vm(bed, hs.mac)
    got = vm.dhcp()
    assert (got["ip"], got["hostname"]) == ("192.168.254.2", hs.hostname)
    vm.serve_tcp(8080, "vm")
    assert tcp_request(bed.client.ns, bed.pod_ip, 8080) == f"vm {bed.client_ip}", "rules in place"
    vm.cleanup()
    assert side.term() == 0, side.log()
    assert dnsmasq_pids(bed.pod.ns) == [], "stopped its dnsmasq (running as nobody) with KILL"
    assert "podvm0" not in ns_run(bed.pod.ns, "ip", "link").stdout


def test_a_missing_capability_is_named_before_anything_changes(bed_factory: BedFactory) -> None:
    bed = bed_factory.bed("calico")
    side = bed_factory.sidecar(bed)
    side.prepare()
    for name in RUN_CAPABILITIES:
        rest = [other for other in RUN_CAPABILITIES if other != name]
        done = ns_run(bed.pod.ns, *only(rest), *NETSIDECAR, "run", env=side._env(), check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert f"the net container lacks the capabilities {name}: add them" in lines[0]
        assert "podvm" not in ns_run(bed.pod.ns, "ip", "link").stdout
        assert not (side.run_dir / "network.json").exists()


def test_forwarding_is_prepared_by_the_init_step_and_only_checked_by_run(bed_factory: BedFactory) -> None:
    bed = bed_factory.bed("calico")
    side = bed_factory.sidecar(bed)
    forwarding = ("cat", "/proc/sys/net/ipv4/ip_forward")
    ns_run(bed.pod.ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")  # a new namespace copies the host's value
    done = ns_run(bed.pod.ns, *only(sorted(RUN_CAPABILITIES)), *NETSIDECAR, "run", env=side._env(), check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "net.ipv4.ip_forward is 0 in the pod: run `netsidecar prepare`" in done.stderr
    assert ns_run(bed.pod.ns, *forwarding).stdout.strip() == "0", "run does not write /proc/sys"
    assert "podvm" not in ns_run(bed.pod.ns, "ip", "link").stdout
    # A container without privileges sees /proc/sys read-only: prepare says so in one line.
    read_only = 'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"'
    done = ns_run(
        bed.pod.ns,
        "unshare",
        "--mount",
        "sh",
        "-c",
        read_only,
        "-",
        *NETSIDECAR,
        "prepare",
        env=side._env(),
        check=False,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot turn on forwarding (Read-only file system): `netsidecar prepare` needs a privileged" in done.stderr
    side.prepare()
    assert ns_run(bed.pod.ns, *forwarding).stdout.strip() == "1"
    assert (side.state_dir.stat().st_mode & 0o777) == 0o700
    # Forwarding on (e.g. by the pod's sysctls), prepare needs no capability to claim a fresh emptyDir-like volume.
    fresh = Path(tempfile.mkdtemp(prefix=f"pv{bed.ident}-fresh-"))
    try:
        fresh.chmod(0o2777)
        env = {**side._env(), "NET_STATE_DIR": str(fresh)}
        done = ns_run(bed.pod.ns, *only([]), *NETSIDECAR, "prepare", env=env, check=False)
        assert done.returncode == 0, done.stderr
        assert (fresh.stat().st_mode & 0o7777) == 0o700
    finally:
        fresh.rmdir()


RACER = """\
import os, sys, time
run, state, targets = sys.argv[1], sys.argv[2], sys.argv[3]
print("ready", flush=True)
while True:
    for name in sys.argv[4:]:
        try:
            os.symlink(os.path.join(targets, name), os.path.join(run, name))
        except FileExistsError:
            pass
        try:
            os.symlink(os.path.join(targets, name), os.path.join(state, name))
            print("planted in the state directory", flush=True)
        except PermissionError:
            pass
    time.sleep(0.005)
"""


class Targets:
    """Root-owned files outside RUN_DIR, one per planted name, and what they looked like before."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        for name in PLANTED:
            target = self.dir / name
            target.write_text(f"root's {name}\n")
            target.chmod(0o600)
            os.utime(target, ns=(10**18, 10**18))
        self.before = self.now()

    def now(self) -> dict[str, tuple[str, int, int, int, int]]:
        """Content, mode, owner, modification time and inode of each target."""
        out = {}
        for name in PLANTED:
            st = os.stat(self.dir / name)
            out[name] = ((self.dir / name).read_text(), st.st_mode, st.st_uid, st.st_mtime_ns, st.st_ino)
        return out

    def changed(self) -> list[str]:
        now = self.now()
        return [name for name in PLANTED if now[name] != self.before[name]]


def test_a_runner_planting_symlinks_in_run_dir_redirects_no_write(bed_factory: BedFactory) -> None:
    """uid 10001 keeps planting links named like every file the sidecar and dnsmasq wrote in RUN_DIR, each aimed
    at a root-owned file; through start, kill -9 and restart, dnsmasq killed and restarted, and SIGTERM, no target
    changes and the VM keeps getting its lease."""
    bed: Bed = bed_factory.bed("calico")
    run_dir = Path(tempfile.mkdtemp(prefix=f"pv{bed.ident}-shared-"))
    os.chown(run_dir, 0, RUNNER)
    run_dir.chmod(0o2777)  # what an emptyDir with fsGroup 10001 looks like
    targets = Targets(f"pv{bed.ident}-targets-")
    side = Sidecar(bed, {"METRICS_PORT": "9100", "METRICS_INTERVAL": "500ms"}, run_dir=run_dir)
    bed_factory.made.append(side)
    racer = subprocess.Popen(
        [*AS_RUNNER, sys.executable, "-c", RACER, str(run_dir), str(side.state_dir), str(targets.dir), *PLANTED],
        stdout=subprocess.PIPE,
    )
    try:
        assert racer.stdout is not None and racer.stdout.readline().strip() == b"ready"
        wait_for("links planted", lambda: all((run_dir / n).is_symlink() for n in PLANTED))

        hs = side.start()
        vm = bed_factory.vm(bed, hs.mac)
        assert vm.dhcp()["ip"] == "192.168.254.2"
        assert targets.changed() == [], "after the first start and lease"

        side.kill()
        again = Sidecar(bed, side.env, run_dir)
        bed_factory.made.append(again)
        again.start()
        assert targets.changed() == [], "after kill -9 and a restart"
        [first] = dnsmasq_pids(bed.pod.ns)
        os.kill(first, signal.SIGKILL)
        wait_for("dnsmasq restarted by the supervisor", lambda: dnsmasq_pids(bed.pod.ns) not in ([], [first]))
        assert vm.dhcp()["ip"] == "192.168.254.2"
        assert targets.changed() == [], "after dnsmasq's restart and a new lease"
        assert len(json.loads(again.cli("status").stdout)["leases"]) == 1, "status reads the lease where it is"
        wait_for("figures published", (run_dir / "network-figures.json").is_file)

        def dhcp_figures() -> dict[str, float]:
            report = json.loads(again.cli("status").stdout)
            return {
                f["name"]: f["value"] for f in report["figures"] if f["name"].startswith(("podvm_dhcp", "podvm_dns"))
            }

        wait_for("restart and lease counted", lambda: dhcp_figures()["podvm_dnsmasq_restarts_total"] == 1)
        assert dhcp_figures()["podvm_dhcp_leases_total"] >= 1, "the lease after dnsmasq's restart"
        assert sorted(p.name for p in side.state_dir.iterdir()) == [
            "dhcp-figures.json",
            "dnsmasq.leases",
            "dnsmasq.pid",
            "made.json",
        ], "dnsmasq's files and the sidecar's record of its links"
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(PLANTED), "nothing else in RUN_DIR"
        assert not any((run_dir / n).is_symlink() for n in REPLACED), "the handshake and figures replaced the links"
        vm.cleanup()
        assert again.term() == 0
        assert targets.changed() == [], "after SIGTERM's teardown"
        assert all((run_dir / n).is_symlink() for n in PLANTED if n not in REPLACED), "left alone"
        assert list(side.state_dir.iterdir()) == [], "teardown removed dnsmasq's files; nothing was planted there"
    finally:
        racer.kill()
        racer.wait()
        subprocess.run(["rm", "-rf", str(targets.dir)], check=False)
    assert racer.stdout is not None and b"planted in the state directory" not in racer.stdout.read()


@pytest.mark.parametrize("hostname", ["ignore", "12345"])
def test_hostnames_dnsmasq_would_misread_still_get_lease_and_name(bed_factory: BedFactory, hostname: str) -> None:
    """In --dhcp-host, `ignore` would mean "never answer this MAC" and `12345` a lease time of 12345 s."""
    bed = bed_factory.bed("calico")
    hs = bed_factory.sidecar(bed, {"HOSTNAME": hostname}).start()
    got = bed_factory.vm(bed, hs.mac).dhcp()
    assert (got["ip"], got["hostname"], got["lease"]) == ("192.168.254.2", hostname, str(2**32 - 1))
