"""The real pod: both images built from the Dockerfiles, the tiny guest served over HTTP, `podman kube play`.

Images are built once and kept between runs (podman's layer cache makes a rebuild after a code change quick);
everything else (the pod, its ConfigMap volume, the state directory, the HTTP server) is removed also on failure.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.guest.build import ensure_guest

REPO = Path(__file__).resolve().parents[2]
PODMAN_DIR = REPO / "scripts" / "podman"
ENV = os.environ | {"CONTAINERS_CONF": str(PODMAN_DIR / "containers.conf")}
TOOLS = ("podman", "runc", "catatonit", "debootstrap", "qemu-img")


def _script(name: str) -> ModuleType:
    """A module from scripts/podman, which is not a package."""
    if str(PODMAN_DIR) not in sys.path:
        sys.path.insert(0, str(PODMAN_DIR))
    return __import__(name)


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run podman with the project's containers.conf; a failure shows podman's error output."""
    done = subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class Pod:
    """A running local pod and what the tests need to reach it."""

    name: str
    state: Path

    @property
    def ip(self) -> str:
        """The pod's IP now (a restarted pod may get another)."""
        infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", self.name).stdout.strip()
        ip_format = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        return podman("inspect", "--format", ip_format, infra).stdout.strip()

    def logs(self, container: str) -> str:
        """Both streams of one container's log (the runner's includes the guest's console)."""
        done = podman("logs", f"{self.name}-{container}")
        return done.stdout + done.stderr


@pytest.fixture(scope="session")
def images() -> str:
    """Build both images (reused when nothing changed) and return their tag."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"missing tools {missing}: run scripts/install-system-deps"
    tag = "latest"
    done = subprocess.run(
        [str(PODMAN_DIR / "build-images"), tag], env=ENV, capture_output=True, text=True, timeout=1800, check=False
    )
    assert done.returncode == 0, f"scripts/podman/build-images failed: {done.stderr[-3000:]}"
    return tag


@pytest.fixture(scope="session")
def network(images: str) -> Iterator[str]:
    """A podman network of this run's own, so its gateway (where the image is served) is known."""
    name = f"podvm-t{os.getpid()}"
    podman("network", "create", name)
    try:
        yield name
    finally:
        podman("network", "rm", "--force", name, check=False)


@pytest.fixture(scope="session")
def guest_url(network: str) -> Iterator[str]:
    """The tiny guest's qcow2 served over HTTP on the network's gateway, where the pod's runner fetches it."""
    image = ensure_guest()
    serve = _script("serve")
    server, url = serve.start(image.parent, serve.podman_gateway(network))
    try:
        yield f"{url}/{image.name}"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(what: str, check: Callable[[], object], timeout: float, pod: Pod | None = None) -> None:
    """Poll ``check()`` until it is true; on time-out fail with the containers' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    logs = "" if pod is None else f"\n--- net ---\n{pod.logs('net')[-3000:]}\n--- vm ---\n{pod.logs('vm')[-4000:]}"
    pytest.fail(f"{what}: not within {timeout:g}s{logs}")


@pytest.fixture(scope="module")
def pod(images: str, network: str, guest_url: str) -> Iterator[Pod]:
    """The local variant of deploy/pod.yaml, played by podman with names derived from this run's id."""
    localpod = _script("localpod")
    name = f"podvm-t{os.getpid()}"
    state = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/var/tmp"))
    settings = localpod.LocalSettings(
        name,
        state,
        guest_url,
        tag=images,
        env={"VM_MEMORY": "256M", "VM_CPUS": "1", "SHUTDOWN_TIMEOUT": "30s"},
        config={"metadata": f"hostname: {name}-guest\n", "userdata": "#cloud-config\n"},
    )
    local = localpod.plan(*localpod.cluster_manifests(), settings)
    try:
        localpod.apply(local)
        podman("kube", "play", "--network", network, "--configmap", str(local.configmap_path), str(local.path))
        yield Pod(name, state)
    finally:
        podman("pod", "rm", "--force", "--time", "0", name, check=False)
        podman("volume", "rm", "--force", f"{name}-config", check=False)
        shutil.rmtree(state, ignore_errors=True)
