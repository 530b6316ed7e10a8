"""A VM runner (any program honouring the runner contract) as a process, in a test bed pod, and checks of its guest.

A runner runs as it would in its container: uid 10001 without capabilities, in the pod's network namespace, with
a usable ``/dev/net/tun``. The host's tun node stays untouched: the runner gets a private mount namespace where a
0666 node of its own is bind-mounted over ``/dev/net/tun``. The checks look at the guest from the client
namespace (HTTP and VNC on the pod IP) and at the logs, so a second runner is held to the same standard.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.harness.paths import BIN, REPO
from tests.harness.wait import until

__all__ = ["BIN", "REPO"]

RUNNER_UID = 10001
READY = "podvm-guest: ready"
ACPI_LINE = "podvm-guest: ACPI power button, shutting down"
GRACEFUL_EXIT = 0
AS_RUNNER = ("setpriv", "--reuid", str(RUNNER_UID), "--regid", str(RUNNER_UID), "--clear-groups", "--")  # kubectl exec

_DROP_PRIVILEGES = (
    'mount --bind "$PODVM_TUN" /dev/net/tun && '
    f"exec setpriv --reuid {RUNNER_UID} --regid {RUNNER_UID} --clear-groups "
    '--inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"'
)

METRICS_PORT = 9100  # the manifests' metrics port


@dataclass(frozen=True)
class PodNet:
    """What the harness needs of a test bed pod (``tests.harness.netbed.Bed``): pod and client namespaces, pod IP."""

    pod_ns: str
    client_ns: str
    pod_ip: str


@dataclass
class Proc:
    """A process started by the harness, with its combined output in ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stopped: bool = field(default=False)

    def text(self) -> str:
        """Everything the process wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` appears in the log (past offset ``after``); fail early if the process died."""
        regex = re.compile(pattern)

        def seen() -> re.Match[str] | None:
            match = regex.search(self.text(), after)
            if match is None and self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before {pattern!r}")
            return match

        return until(f"{self.name}: {pattern!r}", seen, timeout)

    def terminate(self, timeout: float) -> int:
        """SIGTERM, wait up to ``timeout``, then kill the whole process group; return the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stopped = True
        return self.popen.wait()

    def kill(self) -> None:
        """Kill the process and everything it started (its own session), ignoring what is already gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


def start(name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> Proc:
    """Start ``argv`` in a session of its own (so a kill reaches its children) with output to ``log``."""
    with log.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def base_env(**extra: str) -> dict[str, str]:
    """A minimal environment: PATH with the project's commands first, plus ``extra``."""
    return {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **extra}


def require(tool: str) -> str:
    """The tool's path; a missing tool fails the test with a clear message (never a skip)."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run ./scripts/install-system-deps")
    return path


def runner_env(
    root: Path, *, config_dir: Path | str | None = None, hostname: str = "vm-0", **extra: str
) -> dict[str, str]:
    """The one environment of a runner under test: ``root``'s ``image``, ``vm`` and ``run`` directories as its
    volumes, ``config_dir``'s (default ``root``'s) metadata and userdata (absent files: no config drive), TCG, a
    small guest, a short wait for the handshake and few fetch retries; ``extra`` adds or overrides."""
    config = Path(config_dir or root)  # str only so that callers may pass **dict[str, str]
    defaults = {
        "PYTHONPATH": str(REPO),
        "IMAGE_DIR": str(root / "image"),
        "VM_DIR": str(root / "vm"),
        "RUN_DIR": str(root / "run"),
        "METADATA": str(config / "metadata"),
        "USERDATA": str(config / "userdata"),
        "HOSTNAME": hostname,
        "ACCEL": "tcg",
        "VM_MEMORY": "64M",
        "HANDSHAKE_TIMEOUT": "5s",
        "FETCH_RETRIES": "2",
        "CONSOLE_ASSETS": str(REPO / "node_modules"),  # where `make deps` put the console's client libraries
    }
    return base_env(**{**defaults, **extra})


def volumes(base: Path) -> dict[str, Path]:
    """A runner's directories under ``base`` (its volumes, the backup volume, RUN_DIR shared with the root sidecar,
    the image server's files, the ConfigMap), owned by the runner's uid."""
    dirs = {name: base / name for name in ("image", "vm", "backup", "run", "srv", "config")}
    for path in dirs.values():
        path.mkdir(exist_ok=True)
        os.chown(path, RUNNER_UID, RUNNER_UID)
    return dirs


def make_tun_node(directory: Path) -> Path:
    """A private 0666 tun node (char 10:200) the runner sees as /dev/net/tun; the host's node is not changed."""
    node = directory / "tun"
    if not node.exists():
        os.mknod(node, 0o666 | 0o020000, os.makedev(10, 200))
    node.chmod(0o666)
    return node


def start_runner(pod: PodNet, argv: Sequence[str], env: Mapping[str, str], tun: Path, log: Path) -> Proc:
    """A runner as uid 10001 without capabilities in the pod namespace, with ``tun`` as its /dev/net/tun."""
    wrapper = [
        "ip", "netns", "exec", pod.pod_ns,
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", _DROP_PRIVILEGES, "podvm-runner", *argv,
    ]  # fmt: skip
    return start("runner", wrapper, {**env, "PODVM_TUN": str(tun)}, log)


def serve_directory(namespace: str, directory: Path, port: int, log: Path) -> Proc:
    """A plain HTTP server on 127.0.0.1:``port`` inside ``namespace`` (IMG_SOURCE for a runner there)."""
    subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
    argv = ["ip", "netns", "exec", namespace, sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]
    server = start("http", [*argv, "--directory", str(directory), str(port)], base_env(), log)
    probe = ["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]
    try:
        until(f"image server on 127.0.0.1:{port} in {namespace}", lambda: in_ns(namespace, probe).returncode == 0, 10)
    except AssertionError as err:
        server.kill()
        raise AssertionError(f"{err}: {server.text()}") from None
    return server


def in_ns(namespace: str, argv: Sequence[str], timeout: float = 15) -> subprocess.CompletedProcess[bytes]:
    """Run a short command inside ``namespace``."""
    return subprocess.run(["ip", "netns", "exec", namespace, *argv], capture_output=True, timeout=timeout, check=False)


def guest_page(pod: PodNet, timeout: float = 30) -> dict[str, str]:
    """The guest's ``key=value`` status page, fetched from the client namespace through the pod IP."""
    argv = ["curl", "-sf", "--max-time", "3", f"http://{pod.pod_ip}/"]
    done = until(
        f"http://{pod.pod_ip}/ from {pod.client_ns}", lambda: _answered(in_ns(pod.client_ns, argv)), timeout, 0.5
    )
    return dict(line.split("=", 1) for line in done.stdout.decode().splitlines() if "=" in line)


@dataclass
class Scrape:
    """One scrape of the endpoint: its text and its samples as Prometheus' own parser reads them."""

    text: str
    samples: list[Sample]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        """The value of exactly one series."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, (name, labels, found)
        return float(found[0])


def scrape(pod: PodNet) -> Scrape:
    """GET the metrics from the client namespace through the pod IP, parsed by prometheus_client's parser."""
    url = f"http://{pod.pod_ip}:{METRICS_PORT}/"
    done = in_ns(pod.client_ns, ["curl", "-sf", "--max-time", "5", url])
    assert done.returncode == 0, f"{url}: curl exit {done.returncode}"
    text = done.stdout.decode()
    families = list(text_string_to_metric_families(text))
    samples = [sample for family in families for sample in family.samples]
    return Scrape(text, samples, {family.name: family.type for family in families})


def _answered(done: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes] | None:
    return done if done.returncode == 0 else None


def vnc_banner(pod: PodNet, port: int = 5900) -> str:
    """The first line a VNC server sends on pod IP:``port``, read from the client namespace."""
    done = in_ns(pod.client_ns, ["socat", "-T", "2", "-u", f"TCP:{pod.pod_ip}:{port},connect-timeout=3", "STDOUT"])
    return done.stdout.decode(errors="replace").split("\n", 1)[0]


def is_vnc_banner(line: str) -> bool:
    """True for an RFB protocol version line of the 3.x family that qemu speaks."""
    return re.fullmatch(r"RFB 003\.00\d", line) is not None


def graceful_stop(runner: Proc, timeout: float) -> int:
    """SIGTERM the runner and return its exit status; the caller checks the ACPI line and the status."""
    return runner.terminate(timeout)


def counter(page: Mapping[str, str]) -> int:
    """The guest's boot counter (kept on its own disk) from its status page."""
    return int(page["counter"])


def identity(pid: int) -> tuple[int, int]:
    """(effective uid, effective capability mask) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[1]), int(fields["CapEff"].strip(), 16)


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (a runner's qemu)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]


def report(*procs: Proc) -> str:
    """Every process's log, for a failing test's output."""
    return "\n".join(f"----- {p.name} ({p.log}) -----\n{p.text()}" for p in procs)


@contextlib.contextmanager
def small_tmpfs(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of ``mib`` MiB at ``path``, the runner's; unmounted (lazily, if qemu still holds it) when done."""
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755,uid={RUNNER_UID},gid={RUNNER_UID}",
         "podvm-small", str(path)],
        check=True,
    )  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
