"""The Kubernetes manifests in deploy/ are valid API objects and keep the promises the README makes about them."""

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from netsidecar.capabilities import RUN_CAPABILITIES
from netsidecar.config import read_settings
from shared import shutdown
from shared.env import Env, parse_size
from shared.figures import CATALOG, sample_name
from shared.handshake import Ipv6
from tests.harness import paths, samples
from vmrunner.config import DRIVE_KINDS, load
from vmrunner.run import configdrive

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# The oldest release the native sidecar needs, and the newest the validator knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kind(kind: str) -> dict[str, Any]:
    found = [doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] == kind]
    assert found, f"no {kind} in deploy/"
    return found[0]


def _pod_specs() -> list[dict[str, Any]]:
    return [_kind("Pod")["spec"], _kind("StatefulSet")["spec"]["template"]["spec"]]


def _container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    every = spec.get("containers", []) + spec.get("initContainers", [])
    return next(c for c in every if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_deploy_has_the_manifests() -> None:
    assert {p.name for p in MANIFESTS} >= {"pod.yaml", "statefulset.yaml", "configmap.yaml"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_api_schema(path: Path, version: str) -> None:
    """Strict: a misspelt field is an error, not silently dropped by the API server."""
    for doc in _documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_validator_catches_a_misspelt_field() -> None:
    broken = _kind("Pod")
    broken["spec"]["containers"][0]["securityContex"] = {"privileged": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_runner_is_unprivileged(spec: dict[str, Any]) -> None:
    ctx = _container(spec, "vm")["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 10001
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["readOnlyRootFilesystem"] is True
    assert "privileged" not in ctx


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_long_running_sidecar_holds_only_the_capabilities_it_needs(spec: dict[str, Any]) -> None:
    """What `netsidecar run` checks for at start, plus NET_RAW for `netsidecar probe`; nothing privileged."""
    ctx = _container(spec, "net")["securityContext"]
    assert "privileged" not in ctx
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert sorted(ctx["capabilities"]["add"]) == sorted([*RUN_CAPABILITIES, "NET_RAW"])
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_only_the_one_shot_prepare_step_is_privileged(spec: dict[str, Any]) -> None:
    """`netsidecar prepare` runs to completion before the sidecar: forwarding on, the state volume made private."""
    inits = spec["initContainers"]
    prepare = _container(spec, "net-prepare")
    assert inits[0] is prepare, "first, before the native sidecar starts"
    assert prepare["args"] == ["prepare"] and prepare["image"] == _container(spec, "net")["image"]
    assert prepare["securityContext"] == {"privileged": True}
    assert "restartPolicy" not in prepare, "runs once and exits"
    privileged = [c["name"] for c in spec["containers"] + inits if c.get("securityContext", {}).get("privileged")]
    assert privileged == ["net-prepare"]


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_sidecar_state_is_out_of_the_runners_reach(spec: dict[str, Any]) -> None:
    state_dir = str(read_settings(Env({"HOSTNAME": "x"})).state_dir)
    volumes = {v["name"]: v for v in spec["volumes"]}
    net = {m["mountPath"]: m["name"] for m in _container(spec, "net")["volumeMounts"]}
    prepare = {m["mountPath"]: m["name"] for m in _container(spec, "net-prepare")["volumeMounts"]}
    assert net[state_dir] == prepare[state_dir] != net["/run/podvm"]
    assert "emptyDir" in volumes[net[state_dir]]
    assert net[state_dir] not in {m["name"] for m in _container(spec, "vm")["volumeMounts"]}
    assert net["/dev/net/tun"] == "tun", "without privileges the tap device must be mounted"


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_tap_is_owned_by_the_runner(spec: dict[str, Any]) -> None:
    net = _container(spec, "net")
    assert _env(net)["TAP_OWNER"] == str(_container(spec, "vm")["securityContext"]["runAsUser"])


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_grace_period_outlasts_the_guest_shutdown(spec: dict[str, Any]) -> None:
    timeout = _env(_container(spec, "vm"))["SHUTDOWN_TIMEOUT"]
    assert timeout.endswith("s")
    assert spec["terminationGracePeriodSeconds"] > float(timeout[:-1])


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_devices_and_shared_volumes(spec: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in spec["volumes"]}
    for device in ("/dev/net/tun", "/dev/kvm"):
        assert any(v.get("hostPath") == {"path": device, "type": "CharDevice"} for v in volumes.values()), device
    vm_mounts = {m["mountPath"]: m["name"] for m in _container(spec, "vm")["volumeMounts"]}
    net_mounts = {m["mountPath"]: m["name"] for m in _container(spec, "net")["volumeMounts"]}
    assert vm_mounts["/run/podvm"] == net_mounts["/run/podvm"]
    assert "emptyDir" in volumes[vm_mounts["/run/podvm"]]
    assert vm_mounts["/image"] != vm_mounts["/vm"], "the pet disk needs a volume of its own"
    assert {"/metadata", "/userdata", "/dev/net/tun", "/dev/kvm"} <= vm_mounts.keys()


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_readiness_means_the_vm_answers(spec: dict[str, Any]) -> None:
    """The probe goes to a guest port on the pod IP, i.e. through the NAT to the VM, not to VNC in the pod."""
    probe = _container(spec, "vm")["readinessProbe"]
    assert probe["tcpSocket"]["port"] != 5900


def test_statefulset_runs_the_network_as_a_native_sidecar() -> None:
    spec = _kind("StatefulSet")["spec"]
    net = _container(spec["template"]["spec"], "net")
    assert net in spec["template"]["spec"]["initContainers"]
    assert net["restartPolicy"] == "Always"
    assert "/run/podvm/network.json" in net["startupProbe"]["exec"]["command"]
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["disk", "backup"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in spec["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"podvm-images"}
    assert _kind("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_configmap_and_secret_feed_the_config_drive() -> None:
    """Meta data in a ConfigMap; user data, which carries passwords and keys, in a Secret."""
    data = _kind("ConfigMap")["data"]
    assert set(data) == {"metadata"}
    yaml.safe_load(data["metadata"])
    userdata = _kind("Secret")["stringData"]
    assert set(userdata) == {"userdata"}
    assert userdata["userdata"].startswith("#cloud-config")
    volumes = {v["name"]: v for v in _kind("Pod")["spec"]["volumes"]}
    assert volumes["userdata"]["secret"]["secretName"] == _kind("Secret")["metadata"]["name"]


def _localpod() -> Any:
    """scripts/podman/localpod.py, which turns deploy/pod.yaml into the pod podman runs here."""
    return paths.script("scripts/podman/localpod.py")


def test_local_pod_is_the_cluster_pod_with_local_storage_and_no_kvm(tmp_path: Path) -> None:
    localpod = _localpod()
    settings = localpod.LocalSettings(
        "podvm-t1", tmp_path, "http://10.88.0.1:8780/guest.qcow2", env={"VM_CPUS": "1"}, net_env={"NO_VNC": "true"}
    )
    local = localpod.plan(*localpod.cluster_manifests(), settings)
    for doc in (local.manifest, local.configmap):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)
    spec = local.manifest["spec"]
    vm = _container(spec, "vm")
    env = _env(vm)
    assert env["IMG_SOURCE"] == settings.image_source
    assert env["ACCEL"] == "tcg"
    assert env["VM_CPUS"] == "1"
    assert _env(_container(spec, "net"))["NO_VNC"] == "true"
    assert env["SHUTDOWN_TIMEOUT"] == _env(_container(_kind("Pod")["spec"], "vm"))["SHUTDOWN_TIMEOUT"]
    assert vm["securityContext"] == _container(_kind("Pod")["spec"], "vm")["securityContext"]
    paths = [v.get("hostPath", {}).get("path", "") for v in spec["volumes"]]
    assert "/dev/kvm" not in paths and "/dev/net/tun" not in paths
    assert all(p.startswith(str(tmp_path)) for p in paths if p)
    assert {"name": "config", "configMap": {"name": "podvm-t1-config"}} in spec["volumes"]
    assert local.configmap["metadata"]["name"] == "podvm-t1-config"
    assert Path(env["METADATA"]).parent.as_posix() in {m["mountPath"] for m in vm["volumeMounts"]}
    cluster = _kind("Pod")["spec"]
    for name in ("net", "net-prepare"):
        assert _container(spec, name)["securityContext"] == _container(cluster, name)["securityContext"]
        assert _container(spec, name)["image"] == "localhost/podvm-net:latest"
    assert [c["name"] for c in spec["initContainers"]] == ["net-prepare"]
    podman_annotation = {"io.podman.annotations.init.container.type": "always"}
    assert local.manifest["metadata"]["annotations"] == {**_kind("Pod")["metadata"]["annotations"], **podman_annotation}
    assert spec["restartPolicy"] == "OnFailure" and "restartPolicy" not in cluster
    assert {"name": "net-state", "hostPath": {"path": str(local.private), "type": "Directory"}} in spec["volumes"]
    assert local.private not in local.directories[1:], "not chowned to the runner"


def test_local_pod_apply_makes_the_sidecars_state_directory_private(tmp_path: Path) -> None:
    localpod = _localpod()
    local = localpod.plan(*localpod.cluster_manifests(), localpod.LocalSettings("p", tmp_path / "s", "http://x/y"))
    localpod.apply(local)
    st = local.private.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
    st = local.shared.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 10001, 0o2770), "like an emptyDir with fsGroup"
    assert (local.directories[1].stat().st_uid, local.tun.stat().st_mode & 0o777) == (10001, 0o666)


def test_local_pod_plan_changes_nothing(tmp_path: Path) -> None:
    localpod = _localpod()
    localpod.plan(*localpod.cluster_manifests(), localpod.LocalSettings("p", tmp_path / "state", "http://x/y"))
    assert not (tmp_path / "state").exists()


def test_the_dashboard_queries_only_names_of_the_catalog() -> None:
    """Offline; tests/e2e checks the same names against a real scrape of the endpoint."""
    served = {sample_name(spec) for spec in CATALOG.values()}
    assert samples.dashboard_metrics() and samples.dashboard_metrics() <= served, samples.dashboard_metrics() - served
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(panel["title"] for panel in dashboard["panels"])
    for area in (
        "podvm_vm_state",
        "podvm_network_receive_bytes_total",
        "podvm_vm_storage_write_traffic_bytes_total",
        "podvm_vm_cpu_usage_seconds_total",
    ):
        assert area in samples.dashboard_metrics(), f"the issue asks for traffic, disk, CPU and state: {area}"


@pytest.mark.parametrize("spec", [_kind("Pod"), _kind("StatefulSet")["spec"]["template"]], ids=["pod", "statefulset"])
def test_the_metrics_port_is_scraped_kept_in_the_pod_and_the_same_in_both_containers(spec: dict[str, Any]) -> None:
    annotations = spec["metadata"]["annotations"]
    port = int(annotations["prometheus.io/port"])
    assert annotations["prometheus.io/scrape"] == "true"
    pod = spec["spec"]
    net, vm = _container(pod, "net"), _container(pod, "vm")
    settings = read_settings(Env({**_env(net), "HOSTNAME": "vm"}))
    assert settings.metrics_port == port, "the sidecar keeps the scraped port in the pod"
    assert load({**_env(vm), "HOSTNAME": "vm"}).metrics_port == port, "and the runner serves it"
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in vm["ports"]
    assert port != vm["readinessProbe"]["tcpSocket"]["port"], "the readiness port must reach the guest"


def _port_ranges(rule: dict[str, Any], protocol: str) -> list[tuple[int, int]]:
    return sorted(
        (p["port"], p.get("endPort", p["port"])) for p in rule.get("ports", []) if p.get("protocol", "TCP") == protocol
    )


def _pod_specs_metadata() -> list[dict[str, str]]:
    """The labels of the pods the manifests make."""
    return [_kind("Pod")["metadata"]["labels"], _kind("StatefulSet")["spec"]["template"]["metadata"]["labels"]]


def test_network_policy_limits_vnc_and_leaves_the_vm_open() -> None:
    """5900 and the metrics port are allowed only from named peers; every other TCP port, all of UDP and SCTP from
    anywhere."""
    spec = _kind("NetworkPolicy")["spec"]
    for pods in _pod_specs_metadata():
        assert spec["podSelector"]["matchLabels"].items() <= pods.items()
    assert spec["policyTypes"] == ["Ingress"]
    open_rules = [rule for rule in spec["ingress"] if "from" not in rule]
    limited_rules = [rule for rule in spec["ingress"] if "from" in rule]
    assert all(rule["from"] for rule in limited_rules), "an empty 'from' would admit everyone"
    assert [_port_ranges(rule, "TCP") for rule in limited_rules] == [[(5900, 5900)], [(9100, 9100)]]
    for port in (5900, 9100):
        assert all(not any(low <= port <= high for low, high in _port_ranges(rule, "TCP")) for rule in open_rules)
    assert all("ports" in rule for rule in open_rules), "a rule without ports would open 5900 too"
    tcp = [r for rule in open_rules for r in _port_ranges(rule, "TCP")]
    assert tcp == [(1, 5899), (5901, 9099), (9101, 65535)]
    for protocol in ("UDP", "SCTP"):
        assert [r for rule in open_rules for r in _port_ranges(rule, protocol)] == [(1, 65535)]


def _timeout_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec in deploy/ that runs both containers, and the podman pod made from deploy/pod.yaml (with the
    runner's SHUTDOWN_TIMEOUT changed, as `--env` does)."""
    specs = []
    for path in MANIFESTS:
        for doc in _documents(path):
            spec = doc.get("spec", {})
            spec = spec.get("template", {}).get("spec", spec)  # a StatefulSet's pod template
            names = {c["name"] for c in spec.get("containers", []) + spec.get("initContainers", [])}
            if {"net", "vm"} <= names:
                specs.append((f"{path.name}:{doc['kind']}", spec))
    localpod = _localpod()
    settings = localpod.LocalSettings(
        "podvm-t2", Path("/tmp/podvm-t2"), "http://x/g.qcow2", env={"SHUTDOWN_TIMEOUT": "5m"}
    )
    specs.append(("localpod", localpod.plan(*localpod.cluster_manifests(), settings).manifest["spec"]))
    return specs


@pytest.mark.parametrize(("where", "spec"), _timeout_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_shutdown_timeouts_and_the_grace_period_agree(where: str, spec: dict[str, Any]) -> None:
    """Both containers read SHUTDOWN_TIMEOUT the same way (shared.shutdown): the sidecar keeps the network for the
    runner's whole shutdown, hard stop included, and the kubelet waits for both."""
    runner = shutdown.stop_budget(Env(_env(_container(spec, "vm"))))
    sidecar_env = _env(_container(spec, "net"))
    assert "NET_DRAIN_TIMEOUT" not in sidecar_env, f"{where}: a second timeout to keep in step"
    assert read_settings(Env(sidecar_env)).drain_timeout == shutdown.network_hold(runner), where
    assert spec["terminationGracePeriodSeconds"] >= shutdown.grace_period(runner), where


def test_the_agreement_check_catches_a_disagreement() -> None:
    spec = _kind("Pod")["spec"]
    for container in spec["containers"]:
        if container["name"] == "vm":
            container["env"] = [*container["env"], {"name": "SHUTDOWN_TIMEOUT", "value": "5m"}]
    with pytest.raises(AssertionError):
        test_the_shutdown_timeouts_and_the_grace_period_agree("changed", spec)


def test_the_demo_stops_its_pod_with_the_pods_grace_period() -> None:
    demo = (DEPLOY.parent / "scripts" / "demo").read_text()
    assert f"GRACE={_kind('Pod')['spec']['terminationGracePeriodSeconds']} " in demo


@pytest.mark.parametrize("spec", _pod_specs(), ids=["pod", "statefulset"])
def test_the_run_volume_holds_the_largest_config_drive(spec: dict[str, Any]) -> None:
    """METADATA and USERDATA at their maxima, both OpenStack versions, IPv6 network data: the ISO and the run's
    other files fit the run volume's sizeLimit (the runner checks the free space too, see configdrive.write)."""
    metadata = {"meta": {"filler": "m" * (configdrive.MAX_SIZES["METADATA"] - 20)}}
    userdata = b"#" * configdrive.MAX_SIZES["USERDATA"]
    ipv6 = Ipv6("fd70:6f64:766d::ff:fe00:aa", "fd70:6f64:766d::1", "fe80::1", 64, "fd00::5", ("fd00::10",))
    hs = samples.handshake(families=("ipv4", "ipv6"), ipv6=ipv6)
    sizes = []
    for kind in DRIVE_KINDS:
        plan = configdrive.plan_drive(kind, "a" * 63, metadata, userdata)
        assert plan is not None
        sizes.append(len(configdrive.render(configdrive.with_network(plan, hs))))
    run = next(v for v in spec["volumes"] if v["name"] == "run")["emptyDir"]
    assert max(sizes) + configdrive.RUN_DIR_ROOM <= parse_size(run["sizeLimit"]), sizes
