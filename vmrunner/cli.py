"""Command line of vmrunner: ``run``, ``plan``, ``prepare``, ``fetch``, ``rebase``, ``gc``, ``configdrive OUT``,
``backup``, ``restore``, ``console`` and ``status``.

Arguments after ``run`` are handed to qemu unchanged (the container's ``args:``), so they are not parsed here.
"""

import atexit
import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from shared import handshake
from shared.cli import Arguments, run_main
from shared.env import Env
from shared.errors import ConfigError, PodvmError
from shared.log import configure
from vmrunner.config import Config, load, redact
from vmrunner.metrics.endpoint import serve
from vmrunner.metrics.runs import runs_file
from vmrunner.metrics.sources import Sources, directory_size, gather
from vmrunner.metrics.state import RunState, load_state
from vmrunner.metrics.tracker import Tracker, base_in_use, fetching, outcome
from vmrunner.run import configdrive
from vmrunner.run.argv import QemuPlan, RunPaths, choose_accel, kvm_works, plan_qemu, vnc_enabled
from vmrunner.run.vnc import read_password

if TYPE_CHECKING:
    from vmrunner.console.web import WebPlan
    from vmrunner.run.supervisor import Duty

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
  console             attach to the guest's serial console (Ctrl-] leaves)
  status              print the VM's run state from QMP, its pet disk's base and references, and the figures
                      of the metrics endpoint (JSON)
Configuration comes from environment variables (see the README)."""
ESCAPE = b"\x1d"


def drive_path(cfg: Config) -> Path:
    """The config drive ISO, rebuilt at each start beside the runner's sockets."""
    return cfg.run_dir / "config-drive.iso"


def cmd_run(cfg: Config) -> int:
    """The container's main command."""
    import asyncio

    from vmrunner.console.web import read_token
    from vmrunner.pet.binding import prepare
    from vmrunner.run import diskwatch
    from vmrunner.run.supervisor import Supervisor

    password = read_password(cfg.vnc_password_file)
    token = read_token(cfg.console.password_file) if cfg.console is not None else None
    drive = configdrive.plan_from_config(cfg)
    hs = handshake.wait(cfg.run_dir, cfg.handshake_timeout)
    drive = configdrive.with_network(drive, hs) if drive is not None else None
    if hs.tap_owner is not None and os.getuid() not in (0, hs.tap_owner):
        log.warning(
            "tap %s belongs to uid %d but the runner is uid %d: qemu cannot open it", hs.tap, hs.tap_owner, os.getuid()
        )
    served = web_plan(cfg, hs, RunPaths.of(cfg.run_dir), token is not None)
    tracker = _start_metrics(cfg, hs)
    # The short name, not img_name: that one carries a hash of the URL with its query, which may hold a token.
    with volume_errors(cfg), fetching(tracker, cfg.img_target):
        started = prepare(cfg)
    base_in_use(tracker, started.digest)
    iso = None
    if drive is not None:
        iso = drive_path(cfg)
        iso.unlink(missing_ok=True)  # the last start's, of no use now: its room counts for the new one
        configdrive.write(drive, iso, f"RUN_DIR={cfg.run_dir}", configdrive.RUN_DIR_ROOM)
        log.info("config drive %s (%s) with %s", iso, drive.label, ", ".join(sorted(drive.files)))
    else:
        drive_path(cfg).unlink(missing_ok=True)
    plan = plan_qemu(cfg, hs, choose_accel(cfg.accel, kvm_works()), vnc_enabled(cfg, hs), iso)
    log.info("qemu: %s", " ".join(plan.argv))
    tracker.set(phase="starting", accel=plan.accel)
    duties = console_duties(plan, served, token)
    duties.append(diskwatch.watch(plan.paths.monitor, cfg.vm_dir, cfg.vm_dir_min_free))
    if cfg.backup_interval is not None:
        from vmrunner.backups.job import schedule

        log.info("backups every %gs into %s", cfg.backup_interval, cfg.backup_dir)
        duties.append(schedule(cfg, cfg.backup_interval))
    with outcome(tracker):
        supervisor = Supervisor(plan, cfg.shutdown_timeout, password if plan.secret else None, tracker, duties)
        return asyncio.run(supervisor.run())


def web_plan(cfg: Config, hs: handshake.Handshake, paths: RunPaths, token: bool) -> "WebPlan | None":
    """The browser console's listeners, or None with ``CONSOLE_PORT=off``. The pod IP's port follows the handshake
    (a mismatch is warned about, as for METRICS_PORT): a port the sidecar sends to the VM would be the guest's.

    :raise ConfigError: when the handshake keeps a console port in the pod but no token is configured.
    """
    from vmrunner.console.web import plan_web

    if cfg.console is None:
        if hs.console_port is not None:
            log.warning(
                "CONSOLE_PORT=off but the sidecar's handshake says console_port=%d; no console", hs.console_port
            )
        return None
    if cfg.console.pod_port != hs.console_port:
        log.warning(
            "CONSOLE_POD_PORT=%s but the sidecar's handshake says console_port=%s; following the handshake",
            cfg.console.pod_port or "unset",
            hs.console_port or "unset",
        )
    if hs.console_port is not None and not token:
        raise ConfigError(
            f"the sidecar keeps console_port={hs.console_port} in the pod: a console on the pod IP needs "
            "CONSOLE_PASSWORD_FILE (a Secret holding the token a browser must give)"
        )
    pod_addresses = tuple(a for a in (hs.pod_ip, hs.ipv6.pod_ip if hs.ipv6 else None) if a is not None)
    return plan_web(
        cfg.console.port,
        hs.console_port,
        pod_addresses=pod_addresses,
        token=token,
        assets=cfg.console.assets,
        display=paths.display,
    )


def console_duties(plan: QemuPlan, served: "WebPlan | None", token: bytes | None) -> list["Duty"]:
    """The console broker, its socket for ``vmrunner console`` and, unless ``CONSOLE_PORT=off``, the web server:
    all three live as long as qemu runs. Named closures, not partials: a failing duty is logged by its name, and a
    partial's name would show its arguments, the token among them."""
    from vmrunner.console import web
    from vmrunner.console.broker import Broker, serve

    broker = Broker(plan.paths.serial)

    async def console_broker() -> None:
        await broker.run()

    async def console_socket() -> None:
        await serve(broker, plan.paths.console)

    async def web_console() -> None:
        assert served is not None
        await web.serve(served, broker, token)

    return [console_broker, console_socket, *([web_console] if served is not None else [])]


def _start_metrics(cfg: Config, hs: handshake.Handshake) -> Tracker:
    """The run's tracker, and the endpoint where the handshake keeps a port in the pod (a mismatch is warned about,
    as for NO_VNC: a port the sidecar sends to the VM would be the guest's, not ours)."""
    if cfg.metrics_port != hs.metrics_port:
        log.warning(
            "METRICS_PORT=%s but the sidecar's handshake says metrics_port=%s; following the handshake",
            cfg.metrics_port or "unset",
            hs.metrics_port or "unset",
        )
    tracker = Tracker(_sources(cfg, RunPaths.of(cfg.run_dir).monitor), hs.hostname)
    tracker.set(phase="fetching")
    atexit.register(tracker.forget)
    if hs.metrics_port is not None:
        serve(hs.metrics_port, tracker)
    return tracker


def _sources(cfg: Config, monitor: Path) -> Sources:
    runs = runs_file(cfg.vm_dir, cfg.hostname)
    return Sources(cfg.run_dir, cfg.image_dir, runs, monitor, cfg.backup_dir / cfg.hostname)


def cmd_plan(cfg: Config) -> int:
    """Print the actions of ``run`` as JSON; reads the handshake and the cache if they are there, writes nothing."""
    from vmrunner.console.web import read_token
    from vmrunner.images.layout import Layout
    from vmrunner.images.names import resolve
    from vmrunner.pet.binding import describe

    path = cfg.run_dir / handshake.FILE_NAME
    hs = handshake.read(path) if path.exists() else None
    read_password(cfg.vnc_password_file)  # an unusable Secret is refused here as it would be by run
    token = read_token(cfg.console.password_file) if cfg.console is not None else None
    drive = configdrive.plan_from_config(cfg)
    drive = configdrive.with_network(drive, hs) if drive is not None and hs is not None else drive
    layout = Layout(cfg.image_dir)
    cached = resolve(cfg, layout)  # the digest run would start on without fetching, by run's own rule
    document: dict[str, object] = {
        "image": {
            "source": redact(cfg.img_source),
            "name": cfg.img_name,
            "digest": f"sha256:{cached}" if cached else None,
            "cache": str(layout.base(cached)) if cached else None,
            "cached": cached is not None,
            "format": cfg.img_format,
            "checksum": str(cfg.img_checksum) if cfg.img_checksum else None,
        },
        "pet": {**describe(cfg), "grow_to": cfg.vm_disk_size},
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
        served = web_plan(cfg, hs, RunPaths.of(cfg.run_dir), token is not None)
        document["console"] = None if served is None else {
            "listen": [f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in served.listen],
            "hosts": sorted(served.hosts),
            "token_required": served.token_required,
            "display": str(served.display),
            "assets": str(served.assets),
        }  # fmt: skip
    print(json.dumps(document, indent=2))
    return 0


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

    from vmrunner.pet.binding import describe
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
    items = gather(state, _sources(cfg, monitor), directory_size(cfg.image_dir))
    figures = [item.to_dict() for item in items]
    print(json.dumps({"state": status, "pet": describe(cfg), "figures": figures}, indent=2))
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


@contextlib.contextmanager
def volume_errors(cfg: Config) -> Iterator[None]:
    """A file system error on the image cache or the VM's volume (read-only, full, wrong owner) is one line naming
    the volume's variable, never a traceback."""
    try:
        yield
    except OSError as err:
        where = Path(err.filename) if isinstance(err.filename, str) else None
        volume = next(
            (f"{name}={root}" for name, root in (("IMAGE_DIR", cfg.image_dir), ("VM_DIR", cfg.vm_dir),
                                                 ("BACKUP_DIR", cfg.backup_dir))
             if where is not None and where.is_relative_to(root)),
            "a volume",
        )  # fmt: skip
        error = ConfigError if isinstance(err, PermissionError) or err.errno == errno.EROFS else PodvmError
        raise error(f"{volume}: {err.strerror}: {err.filename}") from None


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
        return cmd_run(load(env, extra))
    if command == "plan":
        return cmd_plan(load(env, extra))
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
