"""The start sequence of ``vmrunner run``, and ``vmrunner plan``, which prints what it would do.

``run`` waits for the sidecar's handshake, brings the base into the cache and makes or checks the pet, builds the
config drive, plans qemu's argv and the duties that live beside it (the consoles, the full-volume watch, the backup
schedule), then hands them to the supervisor. ``plan`` computes the same plans with the same functions and prints
them, changing nothing.
"""

import atexit
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from shared import files, handshake
from shared.errors import ConfigError
from vmrunner.config import Config, redact, volume_errors
from vmrunner.metrics.endpoint import serve
from vmrunner.metrics.runs import runs_file
from vmrunner.metrics.sources import Sources
from vmrunner.metrics.tracker import Tracker, base_in_use, fetching, outcome
from vmrunner.run import cdrom, configdrive, suspend
from vmrunner.run.argv import (
    QemuPlan,
    RunPaths,
    choose_accel,
    choose_vhost,
    kvm_problem,
    plan_qemu,
    vhost_problem,
    vnc_enabled,
)
from vmrunner.run.vnc import read_password

if TYPE_CHECKING:
    from vmrunner.console.web import WebPlan
    from vmrunner.run.supervisor import Duty


log = logging.getLogger("vmrunner")


def drive_path(cfg: Config) -> Path:
    """The config drive ISO, rebuilt at each start beside the runner's sockets."""
    return cfg.run_dir / "config-drive.iso"


def run(cfg: Config) -> int:
    """The container's main command: the network, the disks and the drive, then qemu and its duties."""
    from vmrunner.console.web import read_token
    from vmrunner.pet import datadisks
    from vmrunner.pet.binding import prepare
    from vmrunner.run import diskwatch, ownstate

    ownstate.preflight(cfg)
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
    tracker = start_metrics(cfg, hs)
    # The short name, not img_name: that one carries a hash of the URL with its query, which may hold a token.
    with volume_errors(cfg), fetching(tracker, cfg.img_target):
        started = prepare(cfg)
    iso = None  # before anything that asks qemu: a RUN_DIR too small for the drive is refused without it
    if drive is not None:
        iso = drive_path(cfg)
        iso.unlink(missing_ok=True)  # the last start's, of no use now: its room counts for the new one
        configdrive.write(drive, iso, f"RUN_DIR={cfg.run_dir}", configdrive.RUN_DIR_ROOM)
        log.info("config drive %s (%s) with %s", iso, drive.label, ", ".join(sorted(drive.files)))
    else:
        drive_path(cfg).unlink(missing_ok=True)
    with datadisks.held(cfg):  # locked until qemu is gone: no other VM opens them meanwhile
        with volume_errors(cfg):
            cfg = ownstate.ensure(cfg)
            media = cdrom.prepare(cfg)
        base_in_use(tracker, started.digest)
        kvm = kvm_problem()
        accel = choose_accel(cfg.accel, kvm)
        vhost = choose_vhost(cfg.vhost, accel, vhost_problem())
        plan = plan_qemu(cfg, hs, accel, vnc_enabled(cfg, hs), iso, cdroms=media, vhost=vhost)
        log.info("qemu: %s", " ".join(plan.argv))
        fell_back = cfg.accel == "auto" and plan.accel == "tcg"
        path = f"{'vhost-net' if plan.vhost else 'qemu'}, {plan.queues} queue pair{'s' if plan.queues > 1 else ''}"
        tracker.set(
            phase="starting", accel=plan.accel, accel_fallback=(kvm or "") if fell_back else "", network_path=path
        )
        duties = console_duties(plan, served, token)
        volumes = [("VM_DIR", cfg.vm_dir), *((f"DATA_DISKS {d.name}", d.directory) for d in cfg.data_disks)]
        duties.append(diskwatch.watch(plan.paths.monitor, volumes, cfg.vm_dir_min_free))
        if cfg.backup_interval is not None:
            from vmrunner.backups.job import schedule

            log.info("backups every %gs into %s", cfg.backup_interval, cfg.backup_dir)
            duties.append(schedule(cfg, cfg.backup_interval))
        with outcome(tracker):
            return _supervise(cfg, plan, password if plan.secret else None, tracker, duties)


def _supervise(cfg: Config, plan: QemuPlan, secret: bytes | None, tracker: Tracker, duties: list["Duty"]) -> int:
    """Run qemu: on the saved state when one may be resumed (cold when qemu refuses it), and ready to be saved
    on SIGTERM with ON_STOP=suspend."""
    import asyncio

    from vmrunner.run.supervisor import Supervisor

    with volume_errors(cfg):
        saving = suspend.open_saving(cfg) if cfg.on_stop == "suspend" else None
        taken = suspend.claim(cfg, plan.argv)
    try:
        if taken is not None:
            try:
                resumed = suspend.resumed_plan(plan, taken)
                saver = None if saving is None else suspend.Saver(cfg, saving, plan.argv)
                return asyncio.run(
                    Supervisor(resumed, cfg.shutdown_timeout, secret, tracker, duties, saver=saver).run()
                )
            except suspend.ResumeRefused as err:
                log.warning("qemu refused the saved state (%s); booting cold", err)
                tracker.set(suspend=f"cold: qemu refused the saved state: {err}")
            finally:
                os.close(taken.fd)
                suspend.release(cfg)
        saver = None if saving is None else suspend.Saver(cfg, saving, plan.argv)
        return asyncio.run(Supervisor(plan, cfg.shutdown_timeout, secret, tracker, duties, saver=saver).run())
    finally:
        if saving is not None:
            os.close(saving)
            files.remove_below(cfg.vm_dir, suspend.saving_path(cfg))  # unused, or already renamed into place


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


def start_metrics(cfg: Config, hs: handshake.Handshake) -> Tracker:
    """The run's tracker, and the endpoint where the handshake keeps a port in the pod (a mismatch is warned about,
    as for NO_VNC: a port the sidecar sends to the VM would be the guest's, not ours)."""
    if cfg.metrics_port != hs.metrics_port:
        log.warning(
            "METRICS_PORT=%s but the sidecar's handshake says metrics_port=%s; following the handshake",
            cfg.metrics_port or "unset",
            hs.metrics_port or "unset",
        )
    tracker = Tracker(sources(cfg, RunPaths.of(cfg.run_dir).monitor), hs.hostname)
    tracker.set(phase="fetching")
    atexit.register(tracker.forget)
    if hs.metrics_port is not None:
        serve(hs.metrics_port, tracker)
    return tracker


def sources(cfg: Config, monitor: Path) -> Sources:
    runs = runs_file(cfg.vm_dir, cfg.hostname)
    return Sources(cfg.run_dir, cfg.image_dir, runs, monitor, cfg.backup_dir / cfg.hostname)


def show_plan(cfg: Config) -> int:
    """Print the actions of ``run`` as JSON; reads the handshake and the cache if they are there, writes nothing."""
    from vmrunner.console.web import read_token
    from vmrunner.images.layout import Layout
    from vmrunner.images.names import resolve
    from vmrunner.pet import datadisks
    from vmrunner.pet.binding import describe
    from vmrunner.run import machine, ownstate

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
            "base_format": cfg.base_format,  # a vmdk, vhdx, vdi, vpc or ova source is converted once to qcow2
            "checksum": str(cfg.img_checksum) if cfg.img_checksum else None,
        },
        "pet": {**describe(cfg), "grow_to": cfg.vm_disk_size},
        "data_disks": datadisks.describe(cfg),
        "config_drive": None
        if drive is None
        else {"path": str(drive_path(cfg)), "label": drive.label, "files": {k: len(v) for k, v in drive.files.items()}},
    }
    media, document["cdroms"] = cdrom.planned(cfg)
    ownstate.preflight(cfg)
    accel = choose_accel(cfg.accel, kvm_problem())
    document["hardware"] = ownstate.describe(cfg, accel)
    cfg = machine.pinned(cfg)  # the argv as run has it; a VM not started yet is pinned on its first start
    if hs is None:
        document["qemu"] = f"waits for {path}"
    else:
        iso = drive_path(cfg) if drive is not None else None
        vhost = choose_vhost(cfg.vhost, accel, vhost_problem())
        argv = plan_qemu(cfg, hs, accel, vnc_enabled(cfg, hs), iso, cdroms=media, vhost=vhost).argv
        document["network_path"] = {"vhost": vhost, "queues": hs.tap_queues}
        document["qemu"] = list(argv)
        document["resume"] = suspend.describe(cfg, argv)  # the saved state the start would take up (or why not)
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
