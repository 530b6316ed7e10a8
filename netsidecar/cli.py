"""Command line of netsidecar: prepare | run | plan | status | down | probe.

``prepare`` is the one-shot privileged step (an init container): it turns on forwarding in the pod's namespace and
makes NET_STATE_DIR the sidecar's own. ``run`` then needs only a few network capabilities (deploy/README.md).
``plan`` needs no root and changes nothing: it shows what ``prepare`` (the sysctls it would change, from their
values now), ``run`` and ``down`` do. It reads the pod interface from the kernel when it can; ``POD_IFACE``,
``POD_IP`` and ``POD_MTU`` override those facts (so it also works away from a pod).
"""

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from types import FrameType

from netsidecar import config, figures, paths, plan, sysctl
from netsidecar.config import PodFacts, Settings
from netsidecar.figures import DhcpFigures
from netsidecar.plan import LEASE_FILE, RECORD_FILE, Plan, build, record, rule_count
from shared.cli import run_main
from shared.env import Env
from shared.errors import ConfigError, PodvmError
from shared.files import write_atomic
from shared.handshake import FILE_NAME
from shared.log import configure

log = logging.getLogger("netsidecar")
USAGE = "usage: netsidecar prepare | run | plan | status | down | probe ..."


def _facts(settings: Settings) -> PodFacts:
    """The pod's facts from POD_IFACE, POD_IP, POD_IP6 and POD_MTU when they say enough, else from the kernel."""
    if settings.pod_iface and settings.pod_mtu:
        facts = config.pod_from(settings, settings.pod_iface, settings.pod_mtu, None, None)
        if facts is not None:
            return facts
    from netsidecar.links import pod_facts  # noqa: PLC0415 - pyroute2 only when the kernel is asked

    return pod_facts(settings)


def _plan(settings: Settings, pod: PodFacts) -> Plan:
    config.check_overlap(settings, pod)
    addresses = [f"{ip}/{net.prefixlen}" for ip, net in ((pod.ip, pod.network), (pod.ip6, pod.network6)) if ip and net]
    log.info("pod interface %s %s mtu %d: serving %s", pod.iface, " ".join(addresses), pod.mtu, "+".join(pod.families))
    return build(settings, pod, config.read_resolv(settings.resolv_conf))


def plan_command(settings: Settings) -> int:
    """Print as JSON what `prepare` (from the sysctls' values now), `run` and `down` do."""
    prepare = {"sysctls": [asdict(change) for change in plan.prepare_sysctls(sysctl.prepare_snapshot())]}
    run = _plan(settings, _facts(settings)).to_dict()
    print(json.dumps({"prepare": prepare, **run, "down": plan.teardown().to_dict()}, indent=2))
    return 0


def teardown(settings: Settings) -> None:
    """Remove everything the sidecar makes (the teardown plan): handshake, dnsmasq, its files, tables, tap, bridge."""
    from netsidecar import dhcp, links, nft  # noqa: PLC0415 - keeps `plan` free of pyroute2 and nftables

    steps = plan.teardown()
    # unlink removes a symbolic link the runner may have put there, never what it points to.
    for name in steps.run_files:
        (settings.run_dir / name).unlink(missing_ok=True)
    if paths.state_dir(settings.state_dir, create=False):
        dhcp.stop_stale(settings.state_dir)
        for name in steps.state_files:
            (settings.state_dir / name).unlink(missing_ok=True)
    nft.remove_ruleset(steps.ruleset)
    links.remove_links(steps.links)
    log.info("network removed")


def prepare_command(settings: Settings) -> int:
    """The privileged one-shot step: forwarding on in the pod's namespace, NET_STATE_DIR made the sidecar's own."""
    current = sysctl.prepare_snapshot()
    changes = plan.prepare_sysctls(current)
    for change in changes:
        sysctl.write(change)
    for name in (name for name in plan.FORWARDING.values() if name not in {change.name for change in changes}):
        log.info("%s is %s", name, "already 1" if name in current else "absent: the pod has no IPv6")
    paths.claim_state_dir(settings.state_dir)
    log.info("prepared: forwarding on, %s private", settings.state_dir)
    return 0


def run_command(settings: Settings) -> int:
    """Put the network in place, publish the handshake, supervise dnsmasq until SIGTERM, then tear down."""
    from netsidecar import capabilities, dhcp, links, nft  # noqa: PLC0415 - keeps `plan` free of pyroute2, nftables

    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    capabilities.check_capabilities(())
    links.check_tap_device()
    pod = _facts(settings)
    capabilities.check_capabilities(pod.families)
    sysctl.check_forwarding(pod.families)
    planned = _plan(settings, pod)
    paths.check_run_dir(settings.run_dir)
    paths.state_dir(settings.state_dir, create=True)
    # A handshake left by a killed sidecar is withdrawn until this one has checked everything again.
    (settings.run_dir / FILE_NAME).unlink(missing_ok=True)
    queues = links.ensure_links(planned.links)
    if queues != planned.handshake.tap_queues:
        planned = replace(planned, handshake=replace(planned.handshake, tap_queues=queues))
    nft.apply_ruleset(planned.ruleset)
    log.info("rules: %d in tables %s %s", rule_count(planned.ruleset), "/".join(config.TABLE_FAMILIES), config.TABLE)
    # The sidecar's own record of what it made, where the runner cannot write: what the probe holds the handshake to.
    try:
        write_atomic(settings.state_dir / RECORD_FILE, json.dumps(record(planned.handshake)).encode(), mode=0o600)
    except OSError as err:
        raise PodvmError(f"NET_STATE_DIR={settings.state_dir}: cannot record the links: {err.strerror}") from err
    server = dhcp.Dnsmasq(planned.dnsmasq, settings.state_dir)
    server.start()
    server.wait_listening(planned.handshake.families)
    try:
        path = planned.handshake.write(settings.run_dir)
    except OSError as err:
        raise PodvmError(f"RUN_DIR={settings.run_dir}: cannot publish the handshake: {err.strerror}") from err
    log.info("network ready: handshake %s", path)
    publish_at = 0.0
    while not stop:
        server.poll()
        if settings.metrics_port is not None and time.monotonic() >= publish_at:
            publish_at = time.monotonic() + settings.metrics_interval
            _publish_figures(settings, server.figures)
        time.sleep(0.2)
    log.info(
        "signal %d: keeping the network while the VM holds its tap (up to %gs: the runner's stop and a hard stop)",
        stop[0],
        settings.drain_timeout,
    )
    (settings.run_dir / FILE_NAME).unlink(missing_ok=True)
    deadline = time.monotonic() + settings.drain_timeout
    while links.tap_carrier() and time.monotonic() < deadline:
        server.poll()
        time.sleep(0.2)
    server.stop()
    teardown(settings)
    return 0


def _publish_figures(settings: Settings, dhcp: DhcpFigures) -> None:
    """Hand the network figures to the runner, keeping the DHCP ones in NET_STATE_DIR for `status`."""
    with contextlib.suppress(OSError):
        dhcp.save(settings.state_dir)
    figures.publish(settings.run_dir, figures.gather(dhcp))


def status_command(settings: Settings) -> int:
    """Print what is in place: links, rules with counters, dnsmasq, the lease."""
    from netsidecar import dhcp, links, nft  # noqa: PLC0415 - keeps `plan` free of pyroute2 and nftables

    lease = settings.state_dir / LEASE_FILE
    have_state = paths.state_dir(settings.state_dir, create=False)
    saved = DhcpFigures.load(settings.state_dir) if have_state else DhcpFigures()
    report = {
        "links": links.link_status(),
        "rules": nft.podvm_rules(),
        "dnsmasq_pid": dhcp.is_running(settings.state_dir) if have_state else None,
        "leases": lease.read_text().splitlines() if have_state and lease.exists() else [],
        "handshake": (settings.run_dir / FILE_NAME).exists(),
        # The same figures the runner's metrics endpoint serves for the network (shared.figures).
        "figures": figures.gather(saved)["figures"],
    }
    print(json.dumps(report, indent=2))
    return 0


def down_command(settings: Settings) -> int:
    """Remove everything, e.g. after a sidecar killed without its SIGTERM cleanup."""
    teardown(settings)
    return 0


def command(args: list[str]) -> int:
    """Dispatch a subcommand."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "probe":
        probe = importlib.import_module("netsidecar.probe")
        status: int = probe.command(args[1:])
        return status
    commands = {
        "prepare": prepare_command,
        "run": run_command,
        "plan": plan_command,
        "status": status_command,
        "down": down_command,
    }
    if args[0] not in commands or len(args) > 1:
        raise ConfigError(f"netsidecar {' '.join(args)}: unknown command; {USAGE}")
    return commands[args[0]](config.read_settings(Env(os.environ)))


def main() -> None:
    """Entry point of the `netsidecar` console script."""
    logger: logging.Logger = configure("netsidecar")
    run_main(logger, lambda: command(sys.argv[1:]))
