"""Command line of vmrunner: ``run``, ``plan``, ``fetch``, ``configdrive OUT``, ``console`` and ``status``.

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
from pathlib import Path

from shared import handshake
from shared.cli import run_main
from shared.env import Env
from shared.errors import ConfigError, PodvmError
from shared.log import configure
from vmrunner import configdrive
from vmrunner.config import Config, load
from vmrunner.qemu import RunPaths, choose_accel, kvm_works, plan_qemu, vnc_enabled

log = logging.getLogger("vmrunner")
USAGE = """usage: vmrunner COMMAND
  run [QEMU_ARG...]   wait for the network, fetch and vet the image, make the pet disk and config drive, run qemu
  plan [QEMU_ARG...]  print what run would do (JSON), changing nothing
  fetch               fetch and vet the base image into IMAGE_DIR only
  configdrive OUT     write the config drive ISO to OUT only
  console             attach to the guest's serial console (Ctrl-] leaves)
  status              print the VM's run state from QMP
Configuration comes from environment variables (see the README)."""
ESCAPE = b"\x1d"


def drive_path(cfg: Config) -> Path:
    """The config drive ISO, rebuilt at each start beside the runner's sockets."""
    return cfg.run_dir / "config-drive.iso"


def _check_vnc_password(cfg: Config) -> None:
    if cfg.vnc_password_file is None:
        return
    try:
        if not cfg.vnc_password_file.read_bytes().strip():
            raise ConfigError(f"VNC_PASSWORD_FILE={cfg.vnc_password_file}: the file is empty")
    except OSError as err:
        raise ConfigError(f"VNC_PASSWORD_FILE={cfg.vnc_password_file}: cannot read: {err.strerror}") from None


def cmd_run(cfg: Config) -> int:
    """The container's main command."""
    import asyncio

    from vmrunner.image import ensure_base
    from vmrunner.pet import ensure_pet
    from vmrunner.supervise import Supervisor

    _check_vnc_password(cfg)
    drive = configdrive.plan_from_config(cfg)
    hs = handshake.wait(cfg.run_dir, cfg.handshake_timeout)
    drive = configdrive.with_network(drive, hs) if drive is not None else None
    if hs.tap_owner is not None and os.getuid() not in (0, hs.tap_owner):
        log.warning(
            "tap %s belongs to uid %d but the runner is uid %d: qemu cannot open it", hs.tap, hs.tap_owner, os.getuid()
        )
    verdict = ensure_base(cfg)
    ensure_pet(cfg, verdict.virtual_size)
    iso = None
    if drive is not None:
        iso = drive_path(cfg)
        configdrive.write(drive, iso)
        log.info("config drive %s (%s) with %s", iso, drive.label, ", ".join(sorted(drive.files)))
    else:
        drive_path(cfg).unlink(missing_ok=True)
    plan = plan_qemu(cfg, hs, choose_accel(cfg.accel, kvm_works()), vnc_enabled(cfg, hs), iso)
    log.info("qemu: %s", " ".join(plan.argv))
    return asyncio.run(Supervisor(plan, cfg.shutdown_timeout).run())


def cmd_plan(cfg: Config) -> int:
    """Print the actions of ``run`` as JSON; reads the handshake if it is there, writes nothing."""
    path = cfg.run_dir / handshake.FILE_NAME
    hs = handshake.read(path) if path.exists() else None
    drive = configdrive.plan_from_config(cfg)
    drive = configdrive.with_network(drive, hs) if drive is not None and hs is not None else drive
    document: dict[str, object] = {
        "image": {
            "source": cfg.img_source,
            "cache": str(cfg.base_path),
            "cached": cfg.base_path.exists(),
            "format": cfg.img_format,
            "checksum": str(cfg.img_checksum) if cfg.img_checksum else None,
        },
        "pet": {"path": str(cfg.pet_path), "exists": cfg.pet_path.exists(), "grow_to": cfg.vm_disk_size},
        "config_drive": None
        if drive is None
        else {"path": str(drive_path(cfg)), "label": drive.label, "files": {k: len(v) for k, v in drive.files.items()}},
    }
    if hs is None:
        document["qemu"] = f"waits for {path}"
    else:
        accel = choose_accel(cfg.accel, kvm_works())
        iso = drive_path(cfg) if drive is not None else None
        document["qemu"] = list(plan_qemu(cfg, hs, accel, vnc_enabled(cfg, hs), iso).argv)
    print(json.dumps(document, indent=2))
    return 0


def cmd_fetch(cfg: Config) -> int:
    """Fetch and vet only (e.g. an init container warming the cache)."""
    from vmrunner.image import ensure_base

    ensure_base(cfg)
    return 0


def cmd_configdrive(cfg: Config, out: str) -> int:
    """Write the config drive ISO to ``out`` only."""
    drive = configdrive.plan_from_config(cfg)
    if drive is None:
        raise ConfigError(f"METADATA={cfg.metadata} and USERDATA={cfg.userdata}: neither exists, no drive to write")
    path = cfg.run_dir / handshake.FILE_NAME
    drive = configdrive.with_network(drive, handshake.read(path)) if path.exists() else drive
    configdrive.write(drive, Path(out).absolute())
    return 0


def cmd_status(run_dir: Path) -> int:
    """Print qemu's run state (``running``, ``paused``, ...) from QMP."""
    import asyncio

    from vmrunner.supervise import qmp_execute

    qmp = RunPaths.of(run_dir).qmp
    result = asyncio.run(qmp_execute(qmp, "query-status", timeout=1.0))
    status = result.get("status") if isinstance(result, dict) else None
    print(status)
    return 0 if status == "running" else 1


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
    """Run the subcommand named by ``args[0]``."""
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if command == "console":
        return cmd_console(run_dir_from_env())
    if command == "status":
        return cmd_status(run_dir_from_env())
    extra = tuple(rest[1:] if rest[:1] == ["--"] else rest)
    if command == "run":
        return cmd_run(load(dict(os.environ), extra))
    if command == "plan":
        return cmd_plan(load(dict(os.environ), extra))
    if command == "fetch" and not rest:
        return cmd_fetch(load(dict(os.environ)))
    if command == "configdrive" and len(rest) == 1:
        return cmd_configdrive(load(dict(os.environ)), rest[0])
    print(USAGE, file=sys.stderr)
    return 2


def run_dir_from_env() -> Path:
    """RUN_DIR alone: ``console`` and ``status`` need no image settings."""
    return Env(dict(os.environ)).path("RUN_DIR", "/run/podvm")


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM before qemu runs (e.g. mid-download): unwind so temporary files are removed."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point of the `vmrunner` console script."""
    signal.signal(signal.SIGTERM, _terminated)
    logger = configure("vmrunner")
    run_main(logger, lambda: dispatch(sys.argv[1:]))
