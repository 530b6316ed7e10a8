"""Command line of vmrunner: ``run``, ``plan``, ``prepare``, ``fetch``, ``rebase``, ``gc``, ``configdrive OUT``,
``backup``, ``restore``, ``cdrom``, ``console`` and ``status``.

Arguments after ``run`` are handed to qemu unchanged (the container's ``args:``), so they are not parsed here.
"""

import json
import logging
import os
import select
import signal
import socket
import sys
import termios
import tty
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from shared import handshake
from shared.arguments import Arguments
from shared.cli import run_main
from shared.env import Env
from shared.errors import ConfigError, PodvmError
from shared.log import configure
from vmrunner.config import Config, load, volume_errors
from vmrunner.metrics.sources import directory_size, gather
from vmrunner.metrics.state import RunState, load_state
from vmrunner.run import configdrive
from vmrunner.run.argv import RunPaths

if TYPE_CHECKING:
    pass

from vmrunner import start

log = logging.getLogger("vmrunner")
USAGE = """usage: vmrunner COMMAND
  run [QEMU_ARG...]   wait for the network, fetch and vet the image, make the pet disk and config drive, run qemu
  plan [QEMU_ARG...]  print what run would do (JSON), changing nothing
  prepare             fetch and vet the image, make the pet disk or check its base; no network, no qemu
  fetch               fetch and vet the base image into IMAGE_DIR only
  rebase DIGEST|NAME  move the stopped pet to another cached base, keeping every byte the guest sees
  gc [--dry-run] [--grace DURATION]
                      remove cached bases no pet has referenced for DURATION (default 24h)
  configdrive OUT     write the config drive ISO to OUT only
  backup [--full] [--plan]
                      back the running VM's disk up into BACKUP_DIR now (incremental when its chain allows);
                      --plan prints what it would do (JSON), changing nothing
  restore [POINT] [--name NAME] [--overwrite]
                      make a standalone pet disk in VM_DIR from a backup point (CHAIN.SEQ, chain id or UTC
                      time; default the newest), as <hostname>.qcow2 or NAME.qcow2; never over a disk unless told
  cdrom insert SLOT URL|PATH [--checksum sha256:HEX]
                      fetch and vet an ISO, then put it into CD-ROM slot SLOT of the running VM
  cdrom eject SLOT    take the disc out of CD-ROM slot SLOT of the running VM
  console             attach to the guest's serial console (Ctrl-] leaves)
  status              print the VM's run state from QMP, its pet disk's base and references, what each CD-ROM
                      slot holds, and the figures of the metrics endpoint (JSON)
Configuration comes from environment variables (see the README)."""
ESCAPE = b"\x1d"


def cmd_prepare(cfg: Config) -> int:
    """Everything ``run`` does to the disks, without the network or qemu (e.g. an init container)."""
    from vmrunner.pet.binding import prepare

    started = prepare(cfg)
    print(json.dumps({"pet": str(started.path), "digest": f"sha256:{started.digest}" if started.digest else None}))
    return 0


def cmd_fetch(cfg: Config) -> int:
    """Fetch and vet only (e.g. an init container warming the cache); prints the digest."""
    from vmrunner.images.store import ensure_image

    print(f"sha256:{ensure_image(cfg).hex}")
    return 0


def cmd_rebase(cfg: Config, wanted: str) -> int:
    """Move the stopped pet onto another cached base."""
    from vmrunner.pet.binding import rebase

    print(f"sha256:{rebase(cfg, wanted)}")
    return 0


def cmd_gc(cfg: Config, args: list[str]) -> int:
    """Remove unreferenced bases after the grace period; ``--dry-run`` only says what it would remove."""
    from vmrunner.images.gc import collect

    parser = Arguments("gc", "[--dry-run] [--grace DURATION]")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--grace", default="24h")
    parsed = parser.parse(args)
    dry_run, grace = parsed.dry_run, Env({"--grace": parsed.grace}).duration("--grace", 0.0)
    print(json.dumps(asdict(collect(cfg.image_dir, grace, dry_run)), indent=2))
    return 0


def cmd_configdrive(cfg: Config, out: str) -> int:
    """Write the config drive ISO to ``out`` only."""
    drive = configdrive.plan_from_config(cfg)
    if drive is None:
        raise ConfigError(f"METADATA={cfg.metadata} and USERDATA={cfg.userdata}: neither exists, no drive to write")
    path = cfg.run_dir / handshake.FILE_NAME
    drive = configdrive.with_network(drive, handshake.read(path)) if path.exists() else drive
    target = Path(out).absolute()
    configdrive.write(drive, target, str(target.parent))
    return 0


def cmd_status(cfg: Config) -> int:
    """Print qemu's run state (``running``, ``paused``, ...) from QMP, the pet's binding and every figure of the
    metrics endpoint, as JSON."""
    import asyncio

    from vmrunner.pet import datadisks
    from vmrunner.pet.binding import describe
    from vmrunner.pet.state import own_state
    from vmrunner.qemu import qmp

    try:
        result = asyncio.run(qmp.execute(RunPaths.of(cfg.run_dir).qmp, "query-status", timeout=1.0))
        status = result.get("status") if isinstance(result, dict) else None
    except PodvmError as err:
        log.info("%s", err)
        status = "not running"
    # The figures the metrics endpoint serves: the run's own state when a vmrunner runs here, else qemu's monitor.
    state = load_state(cfg.run_dir)
    paths = RunPaths.of(cfg.run_dir)
    monitor = paths.qmp if state is None else paths.monitor
    if state is None:
        state = RunState(phase="running" if status == "running" else "stopped", vm=cfg.hostname)
    items = gather(state, start.sources(cfg, monitor), directory_size(cfg.image_dir))
    figures = [item.to_dict() for item in items]
    cdroms = None
    if cfg.cdroms:
        from vmrunner.run import cdrom

        try:
            block = asyncio.run(qmp.execute(monitor, "query-block", timeout=1.0)) if status != "not running" else None
        except PodvmError as err:
            log.info("%s", err)
            block = None
        cdroms = cdrom.describe(cfg, block)
    accel = {"in_use": state.accel or None, "fallback": state.accel_fallback or None}  # why ACCEL=auto is on TCG
    document = {
        "state": status,
        "accel": accel,
        "network_path": state.network_path or None,  # vhost-net or qemu's threads, and the NIC's queue pairs
        "boot_refused": state.boot_refused or None,  # the firmware refused the boot option (Secure Boot)
        "suspend": state.suspend or None,  # this run resumed a saved state, booted cold instead (why), or was saved
        "pet": describe(cfg),
        "own_state": own_state(cfg),
        "data_disks": datadisks.describe(cfg),
        "cdroms": cdroms,  # what is in each CD-ROM slot now, as qemu says
        "figures": figures,
    }
    print(json.dumps(document, indent=2))
    return 0 if status == "running" else 1


def cmd_backup(cfg: Config, args: list[str]) -> int:
    """One backup of the running VM now (``kubectl exec POD -c vm -- vmrunner backup``); exit 0 when it completed."""
    import asyncio

    from vmrunner.backups.job import on_demand, show_plan

    parser = Arguments("backup", "[--full] [--plan]")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--plan", action="store_true")
    parsed = parser.parse(args)
    if parsed.plan:
        print(json.dumps(asyncio.run(show_plan(cfg, want_full=parsed.full)), indent=2))
        return 0
    return 0 if asyncio.run(on_demand(cfg, want_full=parsed.full)) is not None else 1


def cmd_restore(cfg: Config, args: list[str]) -> int:
    """Restore a backup point into VM_DIR; prints the restored disk's path."""
    from vmrunner.backups.restore import restore

    parser = Arguments("restore", "[POINT] [--name NAME] [--overwrite]")
    parser.add_argument("point", nargs="?")
    parser.add_argument("--name")
    parser.add_argument("--overwrite", action="store_true")
    parsed = parser.parse(args)
    wanted, name, overwrite = parsed.point, parsed.name, parsed.overwrite
    print(restore(cfg, wanted, name, overwrite))
    return 0


def cmd_cdrom(cfg: Config, args: list[str]) -> int:
    """``cdrom insert SLOT SOURCE`` or ``cdrom eject SLOT`` on the running VM; prints what the slot holds now."""
    import asyncio

    from vmrunner.config import parse_cdrom
    from vmrunner.run import cdrom

    parser = Arguments("cdrom", "insert SLOT URL|PATH [--checksum sha256:HEX] | eject SLOT")
    parser.add_argument("action", choices=("insert", "eject"))
    parser.add_argument("slot")
    parser.add_argument("source", nargs="?")
    parser.add_argument("--checksum")
    parsed = parser.parse(args)
    monitor = RunPaths.of(cfg.run_dir).monitor
    if parsed.action == "eject":
        if parsed.source is not None or parsed.checksum is not None:
            raise ConfigError("cdrom eject: takes only the slot")
        print(json.dumps(asyncio.run(cdrom.eject(cfg, monitor, parsed.slot))))
        return 0
    if parsed.source is None:
        raise ConfigError("cdrom insert: give the slot and the ISO's http(s) URL or absolute path")
    wanted = parse_cdrom("cdrom insert", parsed.source, parsed.checksum)
    print(json.dumps(asyncio.run(cdrom.insert(cfg, monitor, parsed.slot, wanted))))
    return 0


def cmd_console(run_dir: Path) -> int:
    """Bridge this terminal to the guest's serial console until Ctrl-] or the socket closes."""
    path = RunPaths.of(run_dir).console
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError as err:
        raise PodvmError(f"{path}: cannot attach to the console: {err.strerror}") from None
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)
        print("attached to the guest's console; Ctrl-] leaves\r", file=sys.stderr)
    try:
        while True:
            ready, _, _ = select.select([conn, stdin], [], [])
            if conn in ready:
                data = conn.recv(65536)
                if not data:
                    return 0
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or (saved is not None and ESCAPE in data):
                    return 0
                conn.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        conn.close()


def dispatch(args: list[str]) -> int:
    """Run the subcommand named by ``args[0]``; each reads only the settings it uses."""
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    env = dict(os.environ)
    if command == "console" and not rest:
        return cmd_console(Env(env).path("RUN_DIR", "/run/podvm"))
    if command == "status" and not rest:
        return cmd_status(load(env, image=False))
    extra = tuple(rest[1:] if rest[:1] == ["--"] else rest)
    if command == "run":
        return start.run(load(env, extra))
    if command == "plan":
        return start.show_plan(load(env, extra))
    if command == "prepare" and not rest:
        cfg = load(env)
        with volume_errors(cfg):
            return cmd_prepare(cfg)
    if command == "fetch" and not rest:
        cfg = load(env)
        with volume_errors(cfg):
            return cmd_fetch(cfg)
    if command == "rebase" and len(rest) == 1:
        cfg = load(env, image=False)
        with volume_errors(cfg):
            return cmd_rebase(cfg, rest[0])
    if command == "gc":
        cfg = load(env, image=False)
        with volume_errors(cfg):
            return cmd_gc(cfg, rest)
    if command == "backup":
        return cmd_backup(load(env, image=False), rest)
    if command == "restore":
        cfg = load(env, image=False)
        with volume_errors(cfg):
            return cmd_restore(cfg, rest)
    if command == "cdrom":
        cfg = load(env, image=False)
        with volume_errors(cfg):
            return cmd_cdrom(cfg, rest)
    if command == "configdrive" and len(rest) == 1:
        return cmd_configdrive(load(env, image=False), rest[0])
    print(USAGE, file=sys.stderr)
    return 2


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM before qemu runs (e.g. mid-download): unwind so temporary files are removed."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point of the `vmrunner` console script."""
    signal.signal(signal.SIGTERM, _terminated)
    logger = configure("vmrunner")
    run_main(logger, lambda: dispatch(sys.argv[1:]))
