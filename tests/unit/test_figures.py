"""The metrics: the catalog's names, the checked hand-over from the sidecar, and what each figure is made from."""

import ast
import ipaddress
import json
import math
import os
import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from netsidecar import plan
from netsidecar.config import PodFacts, read_settings
from netsidecar.figures import DhcpFigures, dhcp_figures, rule_figures, tap_figures
from shared import figures
from shared.env import Env
from shared.errors import ChildFailed, ImageRejected, PodvmError, StoppedHard
from shared.figures import CATALOG, FiguresError, figure, parse_document, read_document
from tests.harness import samples
from tests.harness.paths import REPO
from vmrunner import start
from vmrunner.backups.job import Result, write_last
from vmrunner.config import load
from vmrunner.metrics import endpoint, runs, sources, state
from vmrunner.metrics import tracker as tracking
from vmrunner.metrics.tracker import Tracker

NETWORK = figures.NETWORK_NAMES


def doc(*items: dict[str, Any], **top: Any) -> bytes:
    return json.dumps({"version": 1, "time": 1.5, "figures": list(items), **top}).encode()


def tap(value: object = 1, **labels: object) -> dict[str, Any]:
    return {
        "name": "podvm_network_receive_bytes_total",
        "labels": labels or {"interface": "podvm-tap0"},
        "value": value,
    }


def test_names_follow_prometheus_conventions() -> None:
    for spec in CATALOG.values():
        assert re.fullmatch(r"podvm_[a-z0-9_]+", spec.name), spec.name
        assert spec.help and spec.kind in ("counter", "gauge", "info")
        assert (spec.kind == "counter") == spec.name.endswith("_total"), spec.name
        assert not spec.name.endswith("_info"), "the client library appends _info"
        if any(word in spec.name for word in ("time", "duration", "uptime")):
            assert "_seconds" in spec.name, f"{spec.name}: a time is in seconds, named so"
        if any(word in spec.name for word in ("size", "memory", "traffic")):
            assert "_bytes" in spec.name, f"{spec.name}: a size is in bytes, named so"
        assert all(re.fullmatch(r"[a-z_]+", label) for label in spec.labels)


def test_a_valid_document_round_trips() -> None:
    items = [figure("podvm_dhcp_leases_total", 3), figure("podvm_guard_dropped_packets_total", 2, guard="g: x")]
    when, back = parse_document(json.dumps(figures.document(items, 7.0)).encode(), NETWORK)
    assert when == 7.0 and back == items


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff not json", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (json.dumps({"version": 2, "time": 1, "figures": []}).encode(), "version 1"),
        (doc(time=-1), "unix time"),
        (doc(time=True), "unix time"),
        (doc(tap(), tap()), "twice"),
        (doc({"name": "podvm_vm_state", "labels": {"state": "running"}, "value": 1}), "unknown figure"),
        (doc({"name": "node_cpu_seconds_total", "labels": {}, "value": 1}), "unknown figure"),
        (doc(tap(interface="podvm-tap0", extra="x")), "expected the labels"),
        (doc(tap(interface="x" * 129)), "printable text"),
        (doc(tap(interface='tap"} 1\n# TYPE evil counter\nevil')), "printable text"),
        (doc(tap(interface=5)), "printable text"),
        (doc(tap(-1)), "finite number"),
        (doc(tap(True)), "finite number"),
        (doc(tap("1")), "finite number"),
        (doc({"name": "podvm_dhcp_leases_total", "labels": {}, "value": 1, "help": "x"}), "name, labels and value"),
        (json.dumps({"version": 1, "time": 1, "figures": [tap()] * 501}).encode(), "at most 500"),
    ],
)
def test_a_forged_or_broken_document_is_refused_whole(data: bytes, message: str) -> None:
    """The runner reads what a compromised runner (or guest escaped into it) may have written in RUN_DIR: a runner
    figure passed off as the sidecar's, label text that would inject lines, NaN, duplicates, a flood."""
    with pytest.raises(FiguresError, match=message):
        parse_document(data, NETWORK)


def test_nan_and_infinity_are_refused() -> None:
    for value in (math.nan, math.inf):
        with pytest.raises(FiguresError, match="finite"):
            parse_document(json.dumps({"version": 1, "time": 1, "figures": [tap(value)]}).encode(), NETWORK)


def test_the_file_is_read_without_following_links_blocking_or_reading_without_end(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_bytes(doc(tap(4)))
    assert read_document(good, NETWORK)[1][0].value == 4
    (tmp_path / "link.json").symlink_to(good)
    with pytest.raises(FiguresError, match="Too many levels of symbolic links"):
        read_document(tmp_path / "link.json", NETWORK)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(FiguresError, match="not a regular file"):
        read_document(tmp_path / "fifo.json", NETWORK)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (figures.MAX_SIZE + 1))
    with pytest.raises(FiguresError, match="larger than"):
        read_document(big, NETWORK)
    with pytest.raises(FiguresError, match="No such file"):
        read_document(tmp_path / "missing.json", NETWORK)


def _rule(family: str, chain: str, *expr: dict[str, Any], comment: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"family": family, "table": "podvm", "chain": chain, "handle": 4, "expr": list(expr)}
    if comment:
        rule["comment"] = comment
    return rule


def _count(packets: int, octets: int = 0) -> dict[str, Any]:
    return {"counter": {"packets": packets, "bytes": octets}}


def _port(port: int) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": port}}


def test_rules_become_nat_accounting_connection_and_guard_figures() -> None:
    """Rules as `nft -j list table` prints them: the NAT's by what they do, accounting and guards by comment."""
    rules = [
        _rule("ip", "prerouting", _port(5900), _count(2), {"return": None}),
        _rule("ip", "prerouting", _port(9100), _count(3), {"return": None}),
        _rule("ip", "prerouting", _count(5), {"dnat": {"addr": "192.168.254.2"}}),
        _rule("ip", "output", _count(1), {"dnat": {"addr": "192.168.254.2"}}),
        _rule("ip", "postrouting", _count(7), {"snat": {"addr": "10.1.2.3"}}),
        _rule("ip", "accounting", _count(40, 4000), comment=plan.NAT_IN),
        _rule("ip", "accounting", _count(30, 3000), comment=plan.NAT_OUT),
        _rule("netdev", "from-tap", _count(6, 600), {"drop": None}, comment=plan.GUARD_IPV4),
        _rule("netdev", "from-tap", {"accept": None}),
        _rule("inet", "guest-to-pod", _count(1, 60), {"drop": None}, comment=plan.GUARD_POD_SERVICES),
        _rule("inet", "guest-to-pod", _count(1, 40), {"drop": None}, comment=plan.GUARD_POD_SERVICES),
    ]
    got = {(f.name, f.labels): f.value for f in rule_figures(rules)}
    assert got == {
        ("podvm_nat_connections_total", (("rule", "in_pod_tcp_5900"),)): 2,
        ("podvm_nat_connections_total", (("rule", "in_pod_tcp_9100"),)): 3,
        ("podvm_nat_connections_total", (("rule", "dnat"),)): 5,
        ("podvm_nat_connections_total", (("rule", "dnat_local"),)): 1,
        ("podvm_nat_connections_total", (("rule", "snat"),)): 7,
        ("podvm_nat_packets_total", (("direction", "in"),)): 40,
        ("podvm_nat_bytes_total", (("direction", "in"),)): 4000,
        ("podvm_nat_packets_total", (("direction", "out"),)): 30,
        ("podvm_nat_bytes_total", (("direction", "out"),)): 3000,
        ("podvm_guard_dropped_packets_total", (("guard", plan.GUARD_IPV4),)): 6,
        ("podvm_guard_dropped_bytes_total", (("guard", plan.GUARD_IPV4),)): 600,
        ("podvm_guard_dropped_packets_total", (("guard", plan.GUARD_POD_SERVICES),)): 2,
        ("podvm_guard_dropped_bytes_total", (("guard", plan.GUARD_POD_SERVICES),)): 100,
    }


def test_every_planned_guard_and_accounting_rule_yields_figures() -> None:
    """Counters as the kernel would fill them into the planned rules: each guard and both directions appear."""
    pod = PodFacts("eth0", ipaddress.IPv4Address("10.1.2.3"), ipaddress.IPv4Network("10.1.2.3/32"), 1440)
    document = plan.ruleset(read_settings(Env({"HOSTNAME": "vm", "METRICS_PORT": "9100"})), pod)
    listed = []
    for command in document["nftables"]:
        rule = command.get("add", {}).get("rule")
        if rule:
            expr = [_count(1, 1) if e == {"counter": None} else e for e in rule["expr"]]
            listed.append({**rule, "expr": expr})
    got = rule_figures(listed)
    guards = {dict(f.labels)["guard"] for f in got if f.name == "podvm_guard_dropped_packets_total"}
    assert guards == set(plan.GUARDS)
    rules = {dict(f.labels)["rule"] for f in got if f.name == "podvm_nat_connections_total"}
    assert rules == {
        "dnat",
        "dnat_local",
        "snat",
        "in_pod_tcp_5900",
        "in_pod_local_tcp_5900",
        "in_pod_tcp_9100",
        "in_pod_local_tcp_9100",
    }
    assert {dict(f.labels)["direction"] for f in got if f.name == "podvm_nat_packets_total"} == {"in", "out"}


def test_tap_counters_are_seen_from_the_guest() -> None:
    got = {f.name: f.value for f in tap_figures({"rx_bytes": 10, "tx_bytes": 20, "rx_packets": 1, "tx_packets": 2})}
    assert got["podvm_network_transmit_bytes_total"] == 10, "what the tap received, the guest sent"
    assert got["podvm_network_receive_bytes_total"] == 20
    assert got["podvm_network_receive_errors_total"] == 0
    assert tap_figures(None) == []


def test_dhcp_acks_are_counted_from_dnsmasq_lines_only_at_their_start() -> None:
    dhcp = DhcpFigures()
    dhcp.line(b"dnsmasq-dhcp[42]: 3305410926 DHCPACK(podvm0) 192.168.254.2 02:aa:bb:cc:dd:ee vm-0\n")
    dhcp.line(b"dnsmasq-dhcp[42]: DHCPACK(podvm0) 192.168.254.2 02:aa:bb:cc:dd:ee\n")
    dhcp.line(b"dnsmasq-dhcp[42]: 3305410926 DHCPREQUEST(podvm0) 192.168.254.2 02:aa:bb:cc:dd:ee\n")
    dhcp.line(b"dnsmasq-dhcp[42]: 1 client provides name: DHCPACK(podvm0)\n")
    assert dhcp.leases == 2 and dhcp.last_lease > 0


def test_dhcp_figures_survive_in_the_state_directory(tmp_path: Path) -> None:
    DhcpFigures(3, 5.0, 1).save(tmp_path)
    assert DhcpFigures.load(tmp_path) == DhcpFigures(3, 5.0, 1)
    (tmp_path / "dhcp-figures.json").write_text("{broken")
    assert DhcpFigures.load(tmp_path) == DhcpFigures()


BLOCKSTATS = [
    {
        "device": "disk0",
        "stats": {
            "rd_bytes": 512,
            "wr_bytes": 2048,
            "rd_operations": 1,
            "wr_operations": 2,
            "rd_total_time_ns": 1_500_000_000,
            "wr_total_time_ns": 0,
            "flush_operations": 3,
            "flush_total_time_ns": 10,
        },
    },
    {"device": "", "node-name": "#block123", "stats": {"rd_bytes": 1}},
    {"device": "cd0", "stats": {"rd_bytes": -5}},
    "garbage",
]


def test_block_figures_per_drive() -> None:
    got = {(f.name, dict(f.labels)["drive"]): f.value for f in sources.block_figures(BLOCKSTATS)}
    assert got[("podvm_vm_storage_write_traffic_bytes_total", "disk0")] == 2048
    assert got[("podvm_vm_storage_read_times_seconds_total", "disk0")] == 1.5
    assert got[("podvm_vm_storage_flush_requests_total", "disk0")] == 3
    assert got[("podvm_vm_storage_read_traffic_bytes_total", "#block123")] == 1
    assert ("podvm_vm_storage_read_traffic_bytes_total", "cd0") not in got
    assert sources.block_figures(None) == []


@pytest.mark.parametrize(
    ("phase", "qmp", "state"),
    [
        ("fetching", None, "fetching"),
        ("running", {"status": "running"}, "running"),
        ("running", {"status": "paused"}, "paused"),
        ("running", {"status": "shutdown"}, "shutting_down"),
        ("running", {"status": "guest-panicked"}, "error"),
        ("running", None, "running"),
        ("shutting_down", {"status": "running"}, "shutting_down"),
    ],
)
def test_vm_state(phase: str, qmp: object, state: str) -> None:
    assert sources.vm_state(phase, qmp) == state


def _tracker(tmp_path: Path) -> Tracker:
    for name in ("run", "image", "vm"):
        (tmp_path / name).mkdir()
    found = sources.Sources(
        tmp_path / "run", tmp_path / "image", runs.runs_file(tmp_path / "vm", "vm-0"), tmp_path / "run" / "no.sock"
    )
    return Tracker(found, "vm-0")


def scrape(tracker: Tracker) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(endpoint.Collector(tracker))
    return generate_latest(registry).decode()


def test_the_endpoint_text_parses_names_only_catalog_figures_and_keeps_bad_network_figures_out(
    tmp_path: Path,
) -> None:
    tracker = _tracker(tmp_path)
    tracker.set(phase="fetching")
    (tmp_path / "image" / "base.qcow2").write_bytes(b"x" * 1000)
    (tmp_path / "image" / "loop").symlink_to(tmp_path)
    good = [figure("podvm_guard_dropped_packets_total", 5, guard='guest: "quoted" \\ back')]
    (tmp_path / "run" / figures.NETWORK_FILE).write_text(json.dumps(figures.document(good, 1.0)))
    text = scrape(tracker)
    families = list(text_string_to_metric_families(text))
    samples = {s.name: s for f in families for s in f.samples}
    assert samples["podvm_guard_dropped_packets_total"].labels["guard"] == 'guest: "quoted" \\ back'
    assert samples["podvm_image_cache_size_bytes"].value == 1000, "the symlinked loop is not followed"
    assert all(s.name.removesuffix("_info") in CATALOG for f in families for s in f.samples)

    (tmp_path / "run" / figures.NETWORK_FILE).write_text(json.dumps({"version": 1, "time": 1, "figures": [tap(-1)]}))
    assert "podvm_guard" not in scrape(tracker), "a bad document contributes nothing"
    assert "podvm_vm_state" in scrape(tracker), "and the runner's own figures stay"


def test_boots_and_shutdowns_are_recorded_beside_the_pet(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path)
    tracker.qemu_started(os.getpid())
    tracker.finished("hard")
    tracker.qemu_started(os.getpid())
    record = runs.read_runs(tracker.sources.runs_file)
    assert record == {"boots": 2, "clean": 0, "hard": 1, "crashed": 0, "suspended": 0}
    tracker.sources.runs_file.write_text('{"boots": -3, "clean": "x", "hard": true}')
    assert runs.read_runs(tracker.sources.runs_file) == {
        "boots": 0,
        "clean": 0,
        "hard": 0,
        "crashed": 0,
        "suspended": 0,
    }


def test_the_run_state_is_saved_for_status_and_removed_at_the_end(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path)
    tracker.state.image.name = "base.qcow2"
    tracker.set(phase="running", qemu_pid=os.getpid(), started=1.0, accel="tcg")
    saved = state.load_state(tmp_path / "run")
    assert saved is not None and saved.phase == "running" and saved.image.name == "base.qcow2"
    own = {f.name for f in sources.process_figures(os.getpid())}
    assert {"podvm_vm_cpu_usage_seconds_total", "podvm_vm_memory_resident_bytes"} <= own
    tracker.forget()
    assert state.load_state(tmp_path / "run") is None
    (tmp_path / "run" / state.STATE_FILE).write_text('{"phase": 1, "image": []}')
    assert state.load_state(tmp_path / "run") is None


def test_the_runner_follows_the_handshake_on_the_metrics_port(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As for NO_VNC: a port the sidecar does not keep in the pod would belong to the guest, so the runner serves
    only where the handshake says, and warns when its own METRICS_PORT disagrees."""
    env = {"IMG_SOURCE": "/base.qcow2", "RUN_DIR": str(tmp_path), "VM_DIR": str(tmp_path), "HOSTNAME": "vm-0"}
    cfg = load({**env, "METRICS_PORT": "9100"})
    tracker = start.start_metrics(cfg, samples.handshake(metrics_port=None))
    assert "METRICS_PORT=9100 but the sidecar's handshake says metrics_port=unset; following the handshake" in (
        caplog.text
    )
    assert tracker.state.phase == "fetching" and state.load_state(tmp_path) is not None
    tracker.forget()
    caplog.clear()
    start.start_metrics(load(env), samples.handshake(metrics_port=None))
    assert "METRICS_PORT" not in caplog.text


def test_a_flood_of_scrapes_gathers_once_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone who reaches the pod IP can scrape: the figures (a QMP query among them) are gathered at most once per
    GATHER_EVERY however many requests arrive."""
    calls: list[float] = []
    real = sources.gather

    def counting(*args: Any) -> list[figures.Figure]:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(endpoint, "gather", counting)
    tracker = _tracker(tmp_path)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(endpoint.Collector(tracker))
    for _ in range(20):
        generate_latest(registry)
    assert len(calls) == 1
    monkeypatch.setattr(endpoint, "GATHER_EVERY", 0.0)
    generate_latest(registry)
    assert len(calls) == 2


def test_vetting_and_outcome_are_recorded_on_the_way_out(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path)
    with pytest.raises(ImageRejected), tracking.fetching(tracker, "base.qcow2"):
        raise ImageRejected("refused")
    assert tracker.state.image.vetting == "refused"
    with tracking.fetching(tracker, "base.qcow2"):
        pass
    assert tracker.state.image.vetting == "accepted"
    for raised, outcome in ((StoppedHard("x"), "hard"), (ChildFailed("x"), "crashed")):
        with pytest.raises(type(raised)), tracking.outcome(tracker):
            raise raised
        assert runs.read_runs(tracker.sources.runs_file)[outcome] == 1
    with tracking.outcome(tracker):
        pass
    assert runs.read_runs(tracker.sources.runs_file) == {
        "boots": 0,
        "clean": 1,
        "hard": 1,
        "crashed": 1,
        "suspended": 0,
    }
    assert tracker.state.phase == "stopped"


def test_backup_figures_come_from_the_last_record_and_a_bad_record_gives_none(tmp_path: Path) -> None:
    root = tmp_path / "backup" / "vm-0"
    assert sources.backup_figures(root) == [], "no backup yet: no figures"
    root.mkdir(parents=True)
    write_last(root, Result("incremental", "c.3", 3 << 20, 4 << 20, 2.5, True, "froze 1 file systems"), ok=True)
    write_last(root, None, ok=False, error="QMP: qemu stopped answering")
    got = {(f.name, f.labels): f.value for f in sources.backup_figures(root)}
    assert got[("podvm_backup_last_result", (("result", "failed"),))] == 1
    assert got[("podvm_backup_last_result", (("result", "ok"),))] == 0
    assert got[("podvm_backup_last_success_kind", (("kind", "incremental"),))] == 1
    assert got[("podvm_backup_last_success_copied_bytes", ())] == 3 << 20
    assert got[("podvm_backup_last_success_size_bytes", ())] == 4 << 20
    assert got[("podvm_backup_last_success_duration_seconds", ())] == 2.5
    assert got[("podvm_backup_last_success_frozen", ())] == 1
    assert got[("podvm_backup_last_success_timestamp_seconds", ())] > 0
    assert all(name in CATALOG for name, _ in got)
    (root / "last.json").write_text('{"last": {"time": -5, "result": "ok"}, "last_success": "x"}')
    bad = {(f.name, f.labels): f.value for f in sources.backup_figures(root)}
    assert bad == {
        ("podvm_backup_last_attempt_timestamp_seconds", ()): 0.0,  # a negative time is not reported as such
        ("podvm_backup_last_result", (("result", "ok"),)): 1.0,
        ("podvm_backup_last_result", (("result", "failed"),)): 0.0,
    }, "a malformed last success is left out"


def _producers() -> dict[Path, set[str]]:
    """Every module of the product that makes figures (it calls ``figure`` or ``Figure`` of shared.figures; a module
    that only names the type is not one), with every metric name written in it."""
    found: dict[Path, set[str]] = {}
    for package in ("netsidecar", "vmrunner"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            imports = {
                alias.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "shared.figures"
                for alias in node.names
            }
            calls = {
                node.func.id
                for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            }
            if imports & calls & {"figure", "Figure"}:
                found[path.relative_to(REPO)] = {
                    node.value
                    for node in ast.walk(tree)
                    if isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and re.fullmatch(r"podvm_[a-z0-9_]+", node.value)
                }
    return found


def test_every_figure_a_producer_makes_has_its_catalog_entry() -> None:
    """A figure missing from the catalog would be dropped by the runner (a sidecar figure outside NETWORK even
    takes the whole network document with it): that is this test's failure, not a silent gap in the scrape."""
    producers = _producers()
    assert {path.parts[0] for path in producers} == {"netsidecar", "vmrunner"}, producers
    for path, names in producers.items():
        assert names, f"{path} makes figures under no name this test can see"
        allowed = figures.NETWORK_NAMES if path.parts[0] == "netsidecar" else set(CATALOG)
        assert names <= allowed, f"{path}: no catalog entry for {sorted(names - allowed)}"


def test_every_catalog_entry_has_a_producer() -> None:
    made = set().union(*_producers().values())
    assert set(CATALOG) - made == set(), "catalog entries nothing makes"


def test_the_sidecars_whole_document_passes_the_runners_check() -> None:
    """Everything the sidecar's producers make for a planned ruleset, as one document: the runner keeps it all."""
    pod = PodFacts("eth0", ipaddress.IPv4Address("10.1.2.3"), ipaddress.IPv4Network("10.1.2.3/32"), 1440)
    ruleset = plan.ruleset(read_settings(Env({"HOSTNAME": "vm", "METRICS_PORT": "9100"})), pod)
    rules = [
        {**rule, "expr": [_count(1, 1) if e == {"counter": None} else e for e in rule["expr"]]}
        for command in ruleset["nftables"]
        if (rule := command.get("add", {}).get("rule"))
    ]
    made = tap_figures({"rx_bytes": 1}) + rule_figures(rules) + dhcp_figures(DhcpFigures(1, 2.0, 0))
    made.append(figure("podvm_network_figures_timestamp_seconds", 3.0))
    when, kept = parse_document(json.dumps(figures.document(made, 3.0)).encode(), figures.NETWORK_NAMES)
    assert (when, kept) == (3.0, made)


def test_the_endpoint_serves_the_scrape_on_both_families_and_a_taken_port_is_one_line(tmp_path: Path) -> None:
    """The real listener (aiohttp in its own thread): ``/`` and ``/metrics`` give the exposition text on IPv4 and
    IPv6 (an IPv6-only pod is scraped too), also while the VM runs (the scrape then asks qemu's monitor, here absent);
    a scrape that comes before qemu has started waits for the server rather than being refused; a second endpoint on
    the same port is refused naming METRICS_PORT."""
    tracker = _tracker(tmp_path)
    tracker.set(phase="running")
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    endpoint.serve(port, tracker)
    assert not tracker.spawned.is_set()  # no qemu here: the server loads SERVE_AFTER in, the first scrape waits
    for url in (f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/metrics", f"http://[::1]:{port}/"):
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            names = {f.name for f in text_string_to_metric_families(answer.read().decode())}
        assert names == {f.name for f in text_string_to_metric_families(scrape(tracker))} and names, names
    asked = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(asked, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
        assert answer.read().decode().endswith("# EOF\n")
    with pytest.raises(PodvmError, match=rf"^METRICS_PORT={port}: cannot listen: Address already in use$"):
        endpoint.serve(port, tracker)
