"""Sample data several tiers use, so each test states only what it changes."""

import dataclasses
import json
import re

from shared.handshake import Handshake
from tests.harness.paths import REPO

_HANDSHAKE = Handshake(
    tap="podvm-tap0",
    bridge="podvm0",
    mac="0a:58:c0:a8:fe:02",
    vm_ip="192.168.254.2",
    gateway="192.168.254.1",
    prefix=30,
    mtu=1440,
    pod_ip="10.1.2.3",
    dns=("10.96.0.10", "10.96.0.11"),
    search=("ns.svc.cluster.local", "svc.cluster.local"),
    hostname="vm-0",
    vnc_in_pod=True,
    tap_owner=10001,
)


def handshake(**changes: object) -> Handshake:
    """A valid handshake with ``changes`` applied."""
    return dataclasses.replace(_HANDSHAKE, **changes)  # type: ignore[arg-type]


def dashboard_metrics() -> set[str]:
    """Every podvm metric name the Grafana dashboard in deploy/ queries."""
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for expr in exprs for name in re.findall(r"\bpodvm_[a-z0-9_]+", expr)}
