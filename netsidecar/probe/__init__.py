"""``netsidecar probe``: debug the VM's network from the sidecar, without trusting the VM.

scapy is imported here only, when a probe runs, so ``netsidecar run`` stays fast to start.
"""

import os
import sys
from pathlib import Path

from netsidecar.probe.report import Check, Status, UsageError, exit_status, parse, render, to_json
from shared import handshake
from shared.env import Env
from shared.errors import PodvmError


def _load(run_dir: Path) -> handshake.Handshake | Check:
    """The sidecar's handshake, or a failed check saying why it cannot be used (missing, malformed, unknown major)."""
    try:
        return handshake.read(run_dir / handshake.FILE_NAME)
    except PodvmError as err:
        return Check("handshake", str(run_dir / handshake.FILE_NAME), Status.FAIL, str(err))


def command(args: list[str]) -> int:
    """Run the probe(s) named in ``args``; 0 healthy, 1 a check failed, 2 bad usage."""
    try:
        request = parse(args)
        run_dir = Env(dict(os.environ)).path("RUN_DIR", "/run/podvm")
    except (UsageError, PodvmError) as err:
        print(f"netsidecar probe: {err}", file=sys.stderr)
        return 2
    loaded = _load(run_dir)
    if isinstance(loaded, Check):
        checks = [loaded]
    else:
        from netsidecar.probe import checks as probes  # noqa: PLC0415 - scapy loads only when a probe runs

        if request.probe == "port":
            assert request.port is not None
            checks = probes.port(loaded, request.port, request.protocol)
        elif request.probe == "all":
            names = ("dhcp", "arp", "path") if loaded.ipv6 is None else ("dhcp", "arp", "ra", "nd", "path")
            checks = [check for name in names for check in probes.PROBES[name](loaded)]
        else:
            checks = probes.PROBES[request.probe](loaded)
    print(to_json(checks) if request.as_json else render(checks), end="" if not request.as_json else "\n")
    return exit_status(checks)
