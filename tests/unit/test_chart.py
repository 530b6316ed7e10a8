"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk): every ci/ values file gives valid
Kubernetes objects the two containers accept, bad values are refused with Helm's message, and deploy/*.yaml are
its rendering."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmRenderError, HelmValuesError

from netsidecar.config import read_settings
from shared import shutdown
from shared.env import Env, parse_size
from tests.harness import paths
from tests.unit.test_manifests import VERSIONS, _container, _env
from vmrunner.config import load

manifests = paths.script("scripts/manifests.py")
CHART: Path = manifests.CHART
CI = sorted((CHART / "ci").glob("*-values.yaml"))


@pytest.fixture(scope="module")
def chart() -> Iterator[Chart]:
    with Chart.load(CHART) as loaded:
        yield loaded


def _values(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def _objects(chart: Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = manifests.render(chart, values)
    return [
        doc
        for name, text in rendered.items()
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc is not None
    ]


def _workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec of the Pod or the StatefulSet."""
    (found,) = [o for o in objects if o["kind"] in ("Pod", "StatefulSet") and "helm.sh/hook" not in _annotations(o)]
    spec: dict[str, Any] = found["spec"]
    return spec["template"]["spec"] if found["kind"] == "StatefulSet" else spec


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    annotations: dict[str, str] = obj["metadata"].get("annotations") or {}
    return annotations


@pytest.mark.parametrize("path", [None, *CI], ids=lambda p: p.name if p else "defaults")
def test_lint_passes(path: Path | None) -> None:
    report = lint(CHART, _values(path) if path else None, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", [None, *CI], ids=lambda p: p.name if p else "defaults")
def test_rendering_is_valid_against_the_api_schema(chart: Chart, path: Path | None, version: str) -> None:
    """Strict, like deploy/*.yaml; the PodMonitor is the Prometheus operator's own kind and is checked by shape."""
    objects = _objects(chart, _values(path) if path else {})
    for obj in objects:
        if obj["kind"] == "PodMonitor":
            assert obj["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
        else:
            kubernetes_validate.validate(obj, version, strict=True)
    assert {o["kind"] for o in objects} >= {"Service", "NetworkPolicy", "ConfigMap", "Secret"} - _existing(path)


def _existing(path: Path | None) -> set[str]:
    """The kinds a values file names an existing object for."""
    values = _values(path) if path else {}
    return {kind for kind, key in (("ConfigMap", "metaData"), ("Secret", "userData")) if key in values}


@pytest.mark.parametrize("path", [None, *CI], ids=lambda p: p.name if p else "defaults")
def test_both_containers_accept_the_rendered_settings(chart: Chart, path: Path | None) -> None:
    """The runner's and the sidecar's own validation of their environment, and the pod's resources derived from
    the VM's size with qemu's overhead."""
    spec = _workload(_objects(chart, _values(path) if path else {}))
    vm, net = _container(spec, "vm"), _container(spec, "net")
    config = load({**_env(vm), "HOSTNAME": "vm"})
    settings = read_settings(Env({**_env(net), "HOSTNAME": "vm"}))
    assert settings.metrics_port == config.metrics_port
    assert settings.console_port == (config.console.pod_port if config.console else None)
    budget = shutdown.stop_budget(Env(_env(vm)))
    assert settings.drain_timeout == shutdown.network_hold(budget), "the network stays for a save and a shutdown"
    assert spec["terminationGracePeriodSeconds"] >= shutdown.grace_period(budget)
    requests, limits = vm["resources"]["requests"], vm["resources"]["limits"]
    assert parse_size(requests["memory"]) == config.memory + (256 << 20)
    assert parse_size(limits["memory"]) == config.memory + (512 << 20)
    assert requests["cpu"] == f"{config.cpus * 250}m"
    devices = {k: v for k, v in limits.items() if "/" in k}
    assert devices == {k: v for k, v in requests.items() if "/" in k}, "device resources are requested as limited"
    kvm = [v for v in spec["volumes"] if v.get("hostPath", {}).get("path") == "/dev/kvm"]
    if config.accel == "tcg":
        assert not devices and not kvm
    else:
        assert bool(devices) != bool(kvm), "KVM comes either from a device plugin or from the node's /dev/kvm"


def _render(chart: Chart, values: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a rendering with ``values``."""
    return _workload(_objects(chart, values))


def test_device_plugin_tcg_and_host_path(chart: Chart) -> None:
    plugin = _container(_render(chart, _values(CHART / "ci" / "device-plugin-values.yaml")), "vm")
    assert plugin["resources"]["limits"]["squat.ai/kvm"] == "1"
    assert plugin["resources"]["limits"]["squat.ai/vhost-net"] == "1"
    assert _env(plugin)["ACCEL"] == "kvm"
    default = _container(_render(chart, {}), "vm")
    assert default["resources"]["limits"]["devices.kubevirt.io/kvm"] == "1" and _env(default)["ACCEL"] == "auto"
    tcg = _container(_render(chart, {"devices": {"mode": "tcg"}}), "vm")
    assert _env(tcg)["ACCEL"] == "tcg" and "/dev/kvm" not in {m["mountPath"] for m in tcg["volumeMounts"]}
    host = _container(_render(chart, {"devices": {"mode": "hostPath"}}), "vm")
    assert "/dev/kvm" in {m["mountPath"] for m in host["volumeMounts"]}


def test_an_exposed_console_is_served_behind_its_token_and_its_own_policy_rule(chart: Chart) -> None:
    values = _values(CHART / "ci" / "exposed-console-values.yaml")
    objects = _objects(chart, values)
    spec = _workload(objects)
    for name in ("net", "vm"):
        assert _env(_container(spec, name))["CONSOLE_POD_PORT"] == "6081"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["console-token"]["secret"]["secretName"] == "podvm-console"
    assert volumes["userdata"]["secret"]["secretName"] == "my-userdata"
    assert volumes["config"]["configMap"]["name"] == "my-metadata"
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    limited = {rule["ports"][0]["port"]: rule["from"] for rule in policy["spec"]["ingress"] if "from" in rule}
    assert sorted(limited) == [5900, 6081, 9100]
    (open_rule,) = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    tcp = [(p["port"], p["endPort"]) for p in open_rule["ports"] if p["protocol"] == "TCP"]
    assert tcp == [(1, 5899), (5901, 6080), (6082, 9099), (9101, 65535)]


def test_ipv6_only_with_the_users_own_policy_for_the_vm(chart: Chart) -> None:
    objects = _objects(chart, _values(CHART / "ci" / "ipv6-only-values.yaml"))
    net = _env(_container(_workload(objects), "net"))
    assert (net["IP_FAMILIES"], net["VM_OPEN_PORTS"]) == ("ipv6", "53/udp,8080")
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["ingress"][0] == {"ports": [{"protocol": "TCP", "port": 80}]}
    assert [rule["ports"] for rule in policy["spec"]["ingress"][1:]] == [
        [{"protocol": "TCP", "port": 5900}],
        [{"protocol": "TCP", "port": 9100}],
    ]


def test_pets_by_digest_on_selected_nodes_with_an_existing_cache(chart: Chart) -> None:
    objects = _objects(chart, _values(CHART / "ci" / "pets-values.yaml"))
    (pets,) = [o for o in objects if o["kind"] == "StatefulSet"]
    spec = pets["spec"]["template"]["spec"]
    assert pets["spec"]["replicas"] == 3
    assert _container(spec, "vm")["image"] == "registry.example.com/podvm-vm@sha256:" + "a" * 64
    assert _container(spec, "net")["image"] == "registry.example.com/podvm-net:0.1.0"
    assert spec["nodeSelector"] == {"kubevirt.io/schedulable": "true"}
    images = next(v for v in spec["volumes"] if v["name"] == "images")
    assert images["persistentVolumeClaim"]["claimName"] == "shared-images"
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"], "the cache is someone else's"
    assert [o["kind"] for o in objects if o["kind"] == "PodMonitor"] == ["PodMonitor"]
    assert _env(_container(spec, "vm"))["BACKUP_KEEP"] == "4"
    (db,) = [t for t in pets["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == "data-db"]
    assert db["spec"]["resources"]["requests"]["storage"] == "51Gi"  # 50 GiB for the guest, room for qcow2's metadata
    assert {"name": "data-db", "mountPath": "/data/db"} in _container(spec, "vm")["volumeMounts"]
    assert _env(_container(spec, "vm"))["DATA_DISKS"] == "db:/data/db:50G:virtio:qcow2"


def test_backups_off_leaves_no_backup_claim_or_mount(chart: Chart) -> None:
    off = {"backup": {"enabled": False}}
    for kind in ("Pod", "StatefulSet"):
        objects = _objects(chart, off | {"workload": {"kind": kind, "replicas": 1}})
        spec = _workload(objects)
        assert "/backup" not in {m["mountPath"] for m in _container(spec, "vm")["volumeMounts"]}
        assert "BACKUP_INTERVAL" not in _env(_container(spec, "vm"))
        claims = [o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"]
        templates = [
            t["metadata"]["name"]
            for o in objects
            if o["kind"] == "StatefulSet"
            for t in o["spec"]["volumeClaimTemplates"]
        ]
        assert not any("backup" in name for name in claims + templates)


def test_claims_are_kept_on_uninstall(chart: Chart) -> None:
    objects = _objects(chart, {"workload": {"kind": "Pod", "replicas": 1}})
    claims = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert {o["metadata"]["name"] for o in claims} == {"podvm-images", "podvm-disk", "podvm-backup"}
    assert all(_annotations(o)["helm.sh/resource-policy"] == "keep" for o in claims)


def test_the_chart_test_connects_to_the_vm_through_the_service(chart: Chart) -> None:
    objects = _objects(chart, {})
    (hook,) = [o for o in objects if _annotations(o).get("helm.sh/hook") == "test"]
    (service,) = [o for o in objects if o["kind"] == "Service"]
    command = hook["spec"]["containers"][0]["command"]
    assert command[-2:] == [f"podvm-0.{service['metadata']['name']}", str(service["spec"]["ports"][0]["port"])]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"vm": {"cpu": 2}}, "at '/vm': additional properties 'cpu' not allowed"),
        ({"imageCach": {"size": "1Gi"}}, "additional properties 'imageCach' not allowed"),
        ({"vm": {"cpus": "2"}}, "at '/vm/cpus': got string, want integer"),
        ({"console": {"expose": {"enabled": True}}}, "at '/console/expose/tokenSecret': minLength: got 0, want 1"),
        ({"devices": {"mode": "tcg", "requireKvm": True}}, "at '/devices/requireKvm': value must be false"),
        ({"workload": {"kind": "Pod", "replicas": 2}}, "at '/workload/replicas': value must be 1"),
        ({"image": {"source": "ftp://x/y.qcow2"}}, "at '/image/source'"),
        ({"image": {"ovaDisk": "vmdisk1"}}, "at '/image/ovaDisk': value must be ''"),
        ({"vm": {"profile": "windows-xp"}}, "at '/vm/profile': value must be one of"),
        ({"vm": {"onStop": "hibernate"}}, "at '/vm/onStop': value must be one of"),
        ({"vm": {"cdroms": [{"source": "", "checksum": "sha256:" + "0" * 64}]}}, "at '/vm/cdroms/0/checksum'"),
        ({"vm": {"cdroms": [{"source": "ftp://x/y.iso"}]}}, "at '/vm/cdroms/0/source'"),
        ({"vm": {"cdroms": [{"source": ""}] * 5}}, "at '/vm/cdroms': maxItems"),
        ({"dataDisks": [{"name": "my_db", "size": 5}]}, "at '/dataDisks/0/name'"),
        ({"dataDisks": [{"name": "db", "size": "5Gi"}]}, "at '/dataDisks/0/size': got string, want integer"),
        ({"network": {"queues": 17}}, "at '/network/queues'"),
        ({"network": {"queues": "many"}}, "at '/network/queues'"),
        ({"network": {"vhost": "yes"}}, "at '/network/vhost': value must be one of"),
    ],
)
def test_bad_values_are_refused_by_the_schema(chart: Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmValuesError, match="values don't meet the specifications") as refused:
        chart.render(values=values, name="podvm")
    assert message in str(refused.value)
    assert message in "".join(lint(CHART, values)["errors"]), "helm lint says the same"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"metrics": {"port": 5900}}, "metrics.port=5900: VNC has that port"),
        ({"readiness": {"port": 9100}}, "readiness.port=9100: the metrics hold that port"),
        ({"console": {"enabled": False, "expose": {"enabled": True, "tokenSecret": "t"}}}, "needs console.enabled"),
        ({"dataDisks": [{"name": "db", "size": 5}, {"name": "db", "size": 9}]}, 'two disks are named "db"'),
    ],
)
def test_impossible_combinations_fail_the_rendering(chart: Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmRenderError, match=message):
        chart.render(values=values, name="podvm")


def test_the_plain_manifests_are_the_charts_rendering() -> None:
    """Byte for byte: `make manifests` rewrites them, and this fails until it has."""
    for path, text in manifests.plan().items():
        assert path.read_text() == text, f"{path.name} is stale: run `make manifests`"
    assert manifests.main(["--check"]) == 0


def test_a_windows_ova_that_a_drain_suspends(chart: Chart) -> None:
    """The profile, firmware, import and CD-ROM settings reach the runner; ON_STOP reaches both containers, and the
    grace period leaves the save its time before the fallback shutdown's."""
    spec = _render(chart, _values(CHART / "ci" / "windows-suspend-values.yaml"))
    vm, net = _env(_container(spec, "vm")), _env(_container(spec, "net"))
    assert {k: vm[k] for k in ("IMG_FORMAT", "IMG_OVA_DISK", "VM_PROFILE")} == {
        "IMG_FORMAT": "ova",
        "IMG_OVA_DISK": "vmdisk1",
        "VM_PROFILE": "windows",
    }
    for env in (vm, net):
        assert (env["ON_STOP"], env["SUSPEND_TIMEOUT"], env["SHUTDOWN_TIMEOUT"]) == ("suspend", "120s", "180s")
    assert spec["terminationGracePeriodSeconds"] == 120 + 180 + 30
    loaded = load({**vm, "HOSTNAME": "vm"})
    assert loaded.hardware.tpm, "the windows profile brings its TPM"
    virtio, empty = loaded.cdroms  # the drivers' disc by its digest, and a drive without a disc
    assert virtio is not None and virtio.source.endswith("/virtio-win.iso") and virtio.checksum is not None
    assert empty is None
    (data,) = loaded.data_disks  # on its own claim, on the SATA bus the windows profile's IDE pet implies
    assert (data.name, str(data.directory), data.size, data.bus) == ("data", "/data/data", 200 << 30, "sata")
    as_pod = {**_values(CHART / "ci" / "windows-suspend-values.yaml"), "workload": {"kind": "Pod", "replicas": 1}}
    objects = _objects(chart, as_pod)
    claims = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert claims["podvm-data-data"]["resources"]["requests"]["storage"] == "203Gi"
    assert claims["podvm-data-data"]["storageClassName"] == "fast"
    volume = next(v for v in _workload(objects)["volumes"] if v["name"] == "data-data")
    assert volume["persistentVolumeClaim"]["claimName"] == "podvm-data-data"
    default = _render(chart, {})
    assert "ON_STOP" not in _env(_container(default, "vm")) and default["terminationGracePeriodSeconds"] == 90


def test_the_net_container_sizes_the_taps_queues_from_the_vcpus_and_the_runner_gets_vm_vhost(chart: Chart) -> None:
    objects = _objects(chart, {"vm": {"cpus": 4}, "network": {"queues": 2, "vhost": "on"}})
    (workload,) = [o for o in objects if o["kind"] == "StatefulSet"]
    spec = workload["spec"]["template"]["spec"]
    every = [*spec["containers"], *spec.get("initContainers", [])]
    containers = {c["name"]: {e["name"]: e.get("value") for e in c.get("env", [])} for c in every}
    assert (containers["net"]["VM_CPUS"], containers["net"]["VM_NET_QUEUES"]) == ("4", "2")
    assert containers["vm"]["VM_VHOST"] == "on"
