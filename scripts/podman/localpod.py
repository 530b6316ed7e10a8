"""Generates the local variant of deploy/pod.yaml that `podman kube play` runs on a single machine.

The local pod is deploy/pod.yaml with only what a single machine needs changed, so the two never drift apart: claims
and emptyDirs become host directories (podman names emptyDirs globally): the runner's owned by the runner, the
sidecar's state directory by root with mode 0700; the privileges and the init container stay as they are (run at
every start of the pod); /dev/net/tun becomes a device node the runner may open (a host's own node is often
root-only), /dev/kvm is dropped and the accelerator set explicitly, the image comes from a local URL, and the ConfigMap
(podman ignores subPath), with the user data of deploy/configmap.yaml's Secret beside the meta data, is mounted as a
directory named by METADATA and USERDATA. ``plan`` computes it all as data;
``apply`` makes it.

    localpod.py --state DIR --image-source URL [--name NAME] [--tag TAG] [--env K=V ...] [--print]
    # prints: POD_YAML CONFIGMAP_YAML, for podman kube play --configmap CONFIGMAP_YAML POD_YAML
"""

import argparse
import copy
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared import shutdown
from shared.env import Env

REPO = Path(__file__).resolve().parents[2]
RUNNER_UID = 10001
TUN_MAJOR, TUN_MINOR = 10, 200
INIT_TYPE = "io.podman.annotations.init.container.type"


@dataclass(frozen=True)
class LocalSettings:
    """What differs between a cluster and this machine."""

    name: str
    state: Path  # directory holding the cache, the pet disk and the device node
    image_source: str
    tag: str = "latest"
    accel: str = "tcg"
    env: dict[str, str] = field(default_factory=dict)  # more variables for the runner
    net_env: dict[str, str] = field(default_factory=dict)  # more variables for the network sidecar
    config: dict[str, str] = field(default_factory=dict)  # ConfigMap data replacing deploy/configmap.yaml's
    guest_port: int = 80  # what the readiness probe connects to


@dataclass(frozen=True)
class LocalPod:
    """The plan: directories to create for the runner, the tun node, and the manifest to play."""

    directories: tuple[Path, ...]  # the first is the state directory, the others belong to the runner
    shared: Path  # RUN_DIR, both containers': root's, group-writable by the runner's group (emptyDir + fsGroup)
    private: Path  # the network sidecar's NET_STATE_DIR volume: root's, mode 0700
    tun: Path
    manifest: dict[str, Any]
    path: Path
    configmap: dict[str, Any]
    configmap_path: Path


def _set_env(container: dict[str, Any], values: dict[str, str]) -> None:
    env = [item for item in container.get("env", []) if item["name"] not in values]
    container["env"] = env + [{"name": k, "value": v} for k, v in values.items()]


def plan(pod: dict[str, Any], configmap: dict[str, Any], settings: LocalSettings) -> LocalPod:
    """The local pod for ``settings``, computed from the cluster manifests without touching anything."""
    manifest = copy.deepcopy(pod)
    manifest["metadata"]["name"] = settings.name
    # Like Kubernetes for a new pod sandbox, run the init containers at every start of the pod (a restarted podman
    # pod has a new network namespace).
    manifest["metadata"].setdefault("annotations", {})[INIT_TYPE] = "always"
    spec = manifest["spec"]
    # podman 4.3 applies the pod's restart policy to init containers as well: under Always a finished init container
    # is started again and again. Containers that fail are still restarted.
    spec["restartPolicy"] = "OnFailure"
    spec["hostname"] = settings.name
    config = copy.deepcopy(configmap)
    config["metadata"]["name"] = f"{settings.name}-config"
    config["data"] = settings.config or config["data"]
    state = settings.state
    runner_dirs = {name: state / name for name in ("images", "vm", "tmp", "backup")}
    shared = state / "run"
    private = state / "net-state"
    tun = state / "dev" / "tun"
    sources: dict[str, dict[str, Any]] = {
        "net-state": {"hostPath": {"path": str(private), "type": "Directory"}},
        "images": {"hostPath": {"path": str(runner_dirs["images"]), "type": "Directory"}},
        "disk": {"hostPath": {"path": str(runner_dirs["vm"]), "type": "Directory"}},
        "backup": {"hostPath": {"path": str(runner_dirs["backup"]), "type": "Directory"}},
        "run": {"hostPath": {"path": str(shared), "type": "Directory"}},
        "tmp": {"hostPath": {"path": str(runner_dirs["tmp"]), "type": "Directory"}},
        "tun": {"hostPath": {"path": str(tun), "type": "CharDevice"}},
        "config": {"configMap": {"name": config["metadata"]["name"]}},
    }
    spec["volumes"] = [
        {"name": v["name"], **sources[v["name"]]} if v["name"] in sources else v
        for v in spec["volumes"]
        if v["name"] not in ("kvm", "userdata")
    ]
    net_env = dict(settings.net_env)
    if "SHUTDOWN_TIMEOUT" in settings.env:  # both containers read it, or the guest loses its network while it stops
        net_env["SHUTDOWN_TIMEOUT"] = settings.env["SHUTDOWN_TIMEOUT"]
        needed = shutdown.grace_period(shutdown.shutdown_timeout(Env(settings.env)))
        spec["terminationGracePeriodSeconds"] = max(spec["terminationGracePeriodSeconds"], needed)
    for container in spec.get("initContainers", []) + spec["containers"]:
        image = container["image"].rsplit(":", 1)[0]
        container["image"] = f"{image}:{settings.tag}"
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] not in ("kvm", "config", "userdata")]
        if container["name"] == "vm":
            mounts.append({"name": "config", "mountPath": "/config", "readOnly": True})
            variables = {"IMG_SOURCE": settings.image_source, "ACCEL": settings.accel}
            variables |= {"METADATA": "/config/metadata", "USERDATA": "/config/userdata"} | settings.env
            _set_env(container, variables)
            container["readinessProbe"]["tcpSocket"]["port"] = settings.guest_port
        elif net_env and image == "localhost/podvm-net":
            _set_env(container, net_env)
        container["volumeMounts"] = mounts
    return LocalPod(
        directories=(state, *runner_dirs.values(), tun.parent),
        shared=shared,
        private=private,
        tun=tun,
        manifest=manifest,
        path=state / f"{settings.name}.yaml",
        configmap=config,
        configmap_path=state / f"{settings.name}-config.yaml",
    )


def apply(local: LocalPod) -> Path:
    """Create the runner's directories and its tun node (idempotent), write the manifest and return its path."""
    for directory in local.directories:
        directory.mkdir(parents=True, exist_ok=True)
    for directory in local.directories[1:-1]:
        os.chown(directory, RUNNER_UID, RUNNER_UID)
    # The sidecar holds no DAC_OVERRIDE: like Kubernetes' emptyDir with fsGroup, RUN_DIR is root's and the group's.
    local.shared.mkdir(exist_ok=True)
    os.chown(local.shared, 0, RUNNER_UID)
    os.chmod(local.shared, 0o2770)  # noqa: S103 - the runner's group must write it, and no one else
    local.private.mkdir(mode=0o700, exist_ok=True)
    if not local.tun.exists():
        os.mknod(local.tun, stat.S_IFCHR | 0o666, os.makedev(TUN_MAJOR, TUN_MINOR))
    os.chmod(local.tun, 0o666)  # noqa: S103 - a tun node only lets its opener make its own interfaces
    local.configmap_path.write_text(yaml.safe_dump(local.configmap, sort_keys=False))
    local.path.write_text(yaml.safe_dump(local.manifest, sort_keys=False))
    return local.path


def cluster_manifests() -> tuple[dict[str, Any], dict[str, Any]]:
    """deploy/pod.yaml, and deploy/configmap.yaml's meta data ConfigMap holding its Secret's user data too: the
    sources of every local pod."""
    pod = yaml.safe_load((REPO / "deploy" / "pod.yaml").read_text())
    configmap, secret = yaml.safe_load_all((REPO / "deploy" / "configmap.yaml").read_text())
    configmap["data"] |= secret["stringData"]
    return pod, configmap


def main(argv: list[str]) -> int:
    """Write the manifests and print their paths: the pod's, then the ConfigMap's (``--print``: print the pod)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--image-source", required=True)
    parser.add_argument("--name", default="podvm")
    parser.add_argument("--tag", default="latest")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--print", action="store_true", help="print the manifest, change nothing")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    local = plan(
        *cluster_manifests(), LocalSettings(args.name, args.state.resolve(), args.image_source, args.tag, env=env)
    )
    if args.print:
        sys.stdout.write(yaml.safe_dump(local.manifest, sort_keys=False))
    else:
        sys.stdout.write(f"{apply(local)} {local.configmap_path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
