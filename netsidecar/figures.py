"""The sidecar's figures: traffic on the tap, the NAT's and the guards' counters, DHCP and dnsmasq.

Gathered by one function for both readers: the ``run`` loop hands them to the runner every ``METRICS_INTERVAL``
(``RUN_DIR/network-figures.json``, written atomically; the runner serves them), and ``netsidecar status`` prints
them. DHCP and dnsmasq figures exist only in the ``run`` process, which keeps them in ``NET_STATE_DIR`` (the
sidecar's own directory) so that ``status`` reads them there and never from a directory the runner can write.
"""

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from netsidecar import nft
from netsidecar.config import TAP
from netsidecar.plan import DHCP_FILE, NAT_IN, NAT_OUT, Json
from shared import figures
from shared.figures import Figure, figure
from shared.files import write_atomic

log = logging.getLogger("netsidecar")
# A DHCPACK line as dnsmasq logs it with --log-dhcp ("dnsmasq-dhcp[PID]: XID DHCPACK(podvm0) ADDR MAC [NAME]"):
# anchored at the start, so a name the guest chose (at the end of the line) cannot fake one.
_ACK = re.compile(rb"^dnsmasq-dhcp\[\d+\]: (?:\d+ )?DHCPACK\(")

# The tap's counters are the host's view; the guest receives what the tap transmits and the other way round.
_TAP = {
    "rx_bytes": "podvm_network_transmit_bytes_total",
    "tx_bytes": "podvm_network_receive_bytes_total",
    "rx_packets": "podvm_network_transmit_packets_total",
    "tx_packets": "podvm_network_receive_packets_total",
    "rx_errors": "podvm_network_transmit_errors_total",
    "tx_errors": "podvm_network_receive_errors_total",
    "rx_dropped": "podvm_network_transmit_packets_dropped_total",
    "tx_dropped": "podvm_network_receive_packets_dropped_total",
}


@dataclass
class DhcpFigures:
    """What only the supervisor sees: acknowledgements dnsmasq logged and its restarts."""

    leases: int = 0
    last_lease: float = 0.0
    restarts: int = 0

    def line(self, raw: bytes) -> None:
        """Count a dnsmasq log line if it is a DHCPACK."""
        if _ACK.match(raw):
            self.leases += 1
            self.last_lease = time.time()

    def save(self, state_dir: Path) -> None:
        """Keep them in the sidecar's own directory, for ``status``."""
        write_atomic(state_dir / DHCP_FILE, json.dumps(asdict(self)).encode(), mode=0o600)

    @classmethod
    def load(cls, state_dir: Path) -> "DhcpFigures":
        """The figures the ``run`` process saved, or zeros when there are none (no sidecar runs)."""
        try:
            data = json.loads((state_dir / DHCP_FILE).read_bytes()[: figures.MAX_SIZE])
            return cls(int(data["leases"]), float(data["last_lease"]), int(data["restarts"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()


def tap_figures(stats: dict[str, int] | None) -> list[Figure]:
    """The tap's counters under KubeVirt's names, seen from the guest."""
    if stats is None:
        return []
    return [figure(name, stats.get(key, 0), interface=TAP) for key, name in _TAP.items()]


def rule_figures(rules: list[Json]) -> list[Figure]:
    """Figures from the podvm tables' rules as nftables lists them: the accounting rules by their comment, the NAT
    rules by what they do, and every counted drop (the isolation guards) by its comment. IPv4's and IPv6's NAT
    tables count into the same series."""
    out: list[Figure] = []
    for rule in rules:
        counter = nft.counter(rule)
        if counter is None:
            continue
        comment, chain, verdicts = rule.get("comment"), rule.get("chain", ""), nft.verdicts(rule)
        if comment in (NAT_IN, NAT_OUT):
            direction = "in" if comment == NAT_IN else "out"
            out.append(figure("podvm_nat_packets_total", counter["packets"], direction=direction))
            out.append(figure("podvm_nat_bytes_total", counter["bytes"], direction=direction))
        elif "drop" in verdicts:
            guard = str(comment or f"{rule.get('family')} {chain} #{rule.get('handle', '?')}")
            out.append(figure("podvm_guard_dropped_packets_total", counter["packets"], guard=guard))
            out.append(figure("podvm_guard_dropped_bytes_total", counter["bytes"], guard=guard))
        elif verdicts & {"dnat", "snat", "return"} and rule.get("family") in ("ip", "ip6"):
            local = "_local" if chain == "output" else ""
            if "dnat" in verdicts:
                name = f"dnat{local}"
            elif "snat" in verdicts:
                name = "snat"
            else:
                name = f"in_pod{local}_tcp_{nft.kept_port(rule)}"
            out.append(figure("podvm_nat_connections_total", counter["packets"], rule=name))
    return _merge(out)


def _merge(items: list[Figure]) -> list[Figure]:
    """Sum figures of the same series (two guards with one comment are one series)."""
    merged: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for item in items:
        key = (item.name, item.labels)
        merged[key] = merged.get(key, 0.0) + item.value
    return [Figure(name, labels, value) for (name, labels), value in merged.items()]


def dhcp_figures(dhcp: DhcpFigures) -> list[Figure]:
    """DHCP and dnsmasq figures."""
    return [
        figure("podvm_dhcp_leases_total", dhcp.leases),
        figure("podvm_dhcp_last_lease_timestamp_seconds", dhcp.last_lease),
        figure("podvm_dnsmasq_restarts_total", dhcp.restarts),
    ]


def gather(dhcp: DhcpFigures) -> dict[str, Any]:
    """All network figures as a document, read from the kernel now."""
    from netsidecar import links  # noqa: PLC0415 - keeps `plan` free of pyroute2

    now = time.time()
    items = tap_figures(links.tap_stats()) + rule_figures(nft.podvm_rules()) + dhcp_figures(dhcp)
    items.append(figure("podvm_network_figures_timestamp_seconds", now))
    return figures.document(items, now)


def publish(run_dir: Path, document: dict[str, Any]) -> None:
    """Hand the figures to the runner; a failure is logged, the network goes on."""
    try:
        write_atomic(run_dir / figures.NETWORK_FILE, json.dumps(document).encode(), mode=0o644)
    except OSError as err:
        log.warning("RUN_DIR=%s: cannot write %s: %s", run_dir, figures.NETWORK_FILE, err.strerror)
