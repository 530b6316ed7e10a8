"""The pod scenario every end-to-end module and the benchmarks build: a fresh test bed (its own id), the real
sidecar, an image server in the pod, the runner's volumes, runners started as uid 10001, and a teardown that removes
all of it, also on failure.

A scenario that fails keeps its logs (sidecar, image server, each runner's log with the guest's serial console)
under ``build/test-logs/<name>/`` and names that place, as Firecracker's ``microvm_factory`` keeps a failed
microVM's files: ``pod_scenario`` does so when the scenario itself fails, and the hook in ``tests/conftest.py``
when a test using a live scenario fails.
"""

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.handshake import Handshake
from tests.harness import pod
from tests.harness.ids import fresh_id
from tests.harness.netbed import Bed, Sidecar
from tests.harness.paths import BIN, REPO
from tests.harness.pod import PodNet, Proc

LOGS = REPO / "build" / "test-logs"
IMAGE_PORT = 8641
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 40.0
RUN = (str(BIN / "vmrunner"), "run")
# What the guest runner is given beyond runner_env's small defaults: a guest that boots its init, and the product's
# own waits (a real pod's).
GUEST = {"VM_MEMORY": "256M", "HANDSHAKE_TIMEOUT": "120s", "FETCH_RETRIES": "5"}

_live: list["Scenario"] = []


@dataclass
class Scenario:
    """One pod: its bed and namespaces (``net``), the sidecar and its handshake, the volumes (``dirs``: image, vm,
    backup, run, srv, config under ``base``) and every process started in it (``procs``)."""

    name: str
    hostname: str
    base: Path
    bed: Bed
    dirs: dict[str, Path]
    sidecar: Sidecar
    started: Handshake | None = None
    procs: list[Proc] = field(default_factory=list)

    @property
    def handshake(self) -> Handshake:
        """The sidecar's handshake (the scenario started it)."""
        assert self.started is not None, "the sidecar has not started"
        return self.started

    @property
    def net(self) -> PodNet:
        """The pod seen from the client namespace through its IPv4 address."""
        return PodNet(self.bed.pod.ns, self.bed.client.ns, self.bed.pod_ip)

    @property
    def tun(self) -> Path:
        """The runner's private /dev/net/tun."""
        return pod.make_tun_node(self.base)

    def start_sidecar(self, timeout: float = 20) -> Handshake:
        """`netsidecar prepare` and `run`, waiting for the handshake."""
        self.started = self.sidecar.start(timeout=timeout)
        return self.started

    def env(self, volumes: Path | str | None = None, **extra: str) -> dict[str, str]:
        """The runner's environment on this pod's volumes (or a runner's own image and vm directories and metadata
        under ``volumes``, with no backup volume), image server and hostname; ``extra`` adds or overrides."""
        own = {} if volumes else {"BACKUP_DIR": str(self.dirs["backup"])}
        return pod.runner_env(
            Path(volumes or self.base),
            config_dir=volumes or self.dirs["config"],
            hostname=self.hostname,
            **{"IMG_SOURCE": f"http://127.0.0.1:{IMAGE_PORT}/guest.qcow2", **own, **GUEST, **extra},
        )

    def start(self, log: str, env: Mapping[str, str], argv: tuple[str, ...] | list[str] = RUN) -> Proc:
        """A runner (``argv``, vmrunner by default) as uid 10001 in the pod, logging to ``base/log``."""
        runner = pod.start_runner(self.net, argv, env, self.tun, self.base / log)
        self.procs.append(runner)
        return runner

    def boot(self, log: str, env: Mapping[str, str] | None = None, timeout: float = BOOT_TIMEOUT) -> Proc:
        """``start`` the runner and wait for the guest's ready line."""
        runner = self.start(log, self.env() if env is None else env)
        runner.wait_for(pod.READY, timeout)
        return runner

    def vmrunner(self, env: Mapping[str, str], *args: str, timeout: float = 300) -> "subprocess.CompletedProcess[str]":
        """``vmrunner ARGS`` as uid 10001 in the pod's network namespace (where the image server is), waited for:
        what ``kubectl exec`` of a command does."""
        drop = [*pod.AS_RUNNER[:-1], "--inh-caps=-all", "--no-new-privs", "--"]
        argv = ["ip", "netns", "exec", self.net.pod_ns, *drop, str(BIN / "vmrunner"), *args]
        return subprocess.run(argv, env=dict(env), capture_output=True, text=True, check=False, timeout=timeout)

    def stop(self, runner: Proc) -> int:
        """SIGTERM the runner (the guest powers off through ACPI) and return its exit status."""
        return pod.graceful_stop(runner, STOP_TIMEOUT)

    def report(self) -> str:
        """Every process's log and the sidecar's, for a failure's message."""
        return f"{pod.report(*self.procs)}\n----- sidecar -----\n{self.sidecar.log()}"

    def keep_logs(self, test: str) -> Path:
        """Copy every log of the scenario (the sidecar's, the image server's, each runner's with the guest's serial
        console) to build/test-logs/<test>/<scenario>/ and return that directory."""
        kept = LOGS / _safe(test) / _safe(self.name)
        kept.mkdir(parents=True, exist_ok=True)
        for log in self.base.rglob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copyfile(log, kept / "-".join(log.relative_to(self.base).parts))
        return kept

    def cleanup(self) -> None:
        """Stop every process (last started first), the sidecar, the bed; remove the volumes."""
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.kill()
        self.sidecar.cleanup()
        self.bed.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]


def keep_live_logs(test: str) -> list[Path]:
    """``keep_logs`` of every scenario alive now (called when a test fails)."""
    return [live.keep_logs(test) for live in _live]


@contextlib.contextmanager
def pod_scenario(
    name: str,
    *,
    hostname: str,
    image: Path | None,
    sidecar_env: Mapping[str, str] | None = None,
    resolv: str | None = None,
    families: str = "ipv4",
    sidecar_first: bool = True,
) -> Iterator[Scenario]:
    """A pod named ``name`` (the logs' directory) with an image server in the pod serving ``image`` (when given) as
    ``guest.qcow2`` (more files can be put in ``dirs["srv"]``) and its sidecar started (unless ``sidecar_first`` is
    false: the caller calls ``start_sidecar``, e.g. with the runner already started); removed when the block ends.
    A failure inside the block keeps the logs and prints where."""
    base = Path(tempfile.mkdtemp(prefix=f"podvm-{_safe(name)}-"))
    base.chmod(0o755)
    bed = Bed(fresh_id(), families=families)
    dirs = pod.volumes(base)
    env = {"HOSTNAME": hostname, "TAP_OWNER": str(pod.RUNNER_UID), **(sidecar_env or {})}
    scenario = Scenario(name, hostname, base, bed, dirs, Sidecar(bed, env, dirs["run"]))
    _live.append(scenario)
    try:
        if image is not None:
            shutil.copyfile(image, dirs["srv"] / "guest.qcow2")
        bed.setup()
        if resolv is not None:
            scenario.sidecar.write_resolv(resolv)
        scenario.procs.append(pod.serve_directory(bed.pod.ns, dirs["srv"], IMAGE_PORT, base / "http.log"))
        if sidecar_first:
            scenario.start_sidecar()
        yield scenario
    except BaseException:
        print(f"{scenario.report()}\nlogs kept in {scenario.keep_logs(name)}")
        raise
    finally:
        _live.remove(scenario)
        scenario.cleanup()
