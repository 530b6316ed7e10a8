"""``netsidecar probe``: debug the VM's network from the sidecar, without trusting the VM or the runner.

The probe runs as root with NET_RAW, and the handshake it reads lies in RUN_DIR, which the runner can write: before
any probe sends a frame, the handshake is held against the sidecar's own record in NET_STATE_DIR and against the
kernel (:func:`netsidecar.probe.report.judge_handshake`). scapy is imported here only, when a probe runs, so
``netsidecar run`` stays fast to start.
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

from netsidecar import config, paths, plan
from netsidecar.probe.report import Check, Status, exit_status, judge_handshake, parse, render, to_json
from shared import handshake
from shared.env import Env
from shared.errors import PodvmError
from shared.files import read_small


def _recorded(state_dir: Path) -> dict[str, Any] | None:
    """The sidecar's record of what it made, or None when there is none.

    :raise PodvmError: when NET_STATE_DIR is not the sidecar's own (ConfigError) or the record is unreadable.
    """
    if not paths.state_dir(state_dir, create=False):
        return None
    try:
        data = json.loads(read_small(state_dir / plan.RECORD_FILE, handshake.MAX_SIZE))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise PodvmError(f"{state_dir / plan.RECORD_FILE}: unreadable ({err})") from err
    if not isinstance(data, dict):
        raise PodvmError(f"{state_dir / plan.RECORD_FILE}: not a record of links")
    return data


def _load(run_dir: Path, state_dir: Path) -> handshake.Handshake | Check:
    """The sidecar's handshake, or a failed check saying why it cannot be used (missing, malformed, unknown major,
    or not what the sidecar made)."""
    try:
        loaded = handshake.read(run_dir / handshake.FILE_NAME)
        recorded = _recorded(state_dir)
    except PodvmError as err:
        return Check("handshake", str(run_dir / handshake.FILE_NAME), Status.FAIL, str(err))
    kernel = None
    if recorded is not None:
        from netsidecar import links  # noqa: PLC0415 - pyroute2 only when a probe runs

        kernel = links.link_facts(str(recorded.get("bridge")), str(recorded.get("tap")))
    refused = judge_handshake(plan.record(loaded), recorded, kernel)
    return loaded if refused is None else refused


def command(args: list[str]) -> int:
    """Run the probe(s) named in ``args``; 0 healthy, 1 a check failed, 2 bad usage."""
    try:
        request = parse(args)
    except PodvmError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        env = Env(dict(os.environ))
        run_dir, state_dir = env.path("RUN_DIR", config.RUN_DIR), env.path("NET_STATE_DIR", config.STATE_DIR)
    except PodvmError as err:
        print(f"netsidecar probe: {err}", file=sys.stderr)
        return 2
    loaded = _load(run_dir, state_dir)
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
