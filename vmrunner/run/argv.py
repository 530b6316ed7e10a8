"""qemu's command line, planned as data from the config, the handshake and a few observed facts."""

import fcntl
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from shared.handshake import Handshake
from vmrunner.config import Config, DataDisk
from vmrunner.run import cdrom, devices, firmware
from vmrunner.run import vnc as vnc_password
from vmrunner.run.tpm import SwtpmPlan, plan_swtpm, tpm_args

log = logging.getLogger("vmrunner.qemu")

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12
PET_NODE = "pet0"  # the pet's qcow2 node: its dirty bitmaps live there and backups read from it
AGENT_PORT = "org.qemu.guest_agent.0"  # the virtio-serial port name qemu-guest-agent looks for


@dataclass(frozen=True)
class RunPaths:
    """The runner's sockets and FIFO in ``RUN_DIR``."""

    qmp: Path
    console: Path  # the console broker's socket: ``vmrunner console`` attaches there
    console_log: Path
    monitor: Path  # a second QMP monitor for status queries and metrics, so they never hold up the shutdown
    serial: Path  # qemu's serial port: one client at a time, the console broker
    display: Path  # qemu's screen as VNC on a Unix socket, for the browser console
    agent: Path  # the guest agent's virtio-serial channel (see vmrunner.run.agent)

    @classmethod
    def of(cls, run_dir: Path) -> "RunPaths":
        """The fixed names inside ``run_dir``; ``vmrunner console`` and ``status`` find them there."""
        return cls(
            run_dir / "qmp.sock",
            run_dir / "console.sock",
            run_dir / "console.fifo",
            run_dir / "status.sock",
            run_dir / "serial.sock",
            run_dir / "display.sock",
            run_dir / "agent.sock",
        )

    def made(self) -> tuple[Path, ...]:
        """Everything qemu and the runner create here, removed before a start and after qemu exits."""
        return (self.qmp, self.console, self.console_log, self.monitor, self.serial, self.display, self.agent)


@dataclass(frozen=True)
class QemuPlan:
    """qemu's argv and the facts it was derived from (printed by ``vmrunner plan``)."""

    argv: tuple[str, ...]
    accel: str
    vnc: bool  # VNC on TCP 5900 of the pod
    paths: RunPaths
    display: bool = False  # VNC on the Unix socket ``paths.display`` for the browser console
    secret: bool = False  # qemu reads the VNC password on its standard input (a display needs it)
    environment: tuple[tuple[str, str], ...] = ()  # variables qemu gets beyond the runner's (TZ for a local RTC)
    swtpm: SwtpmPlan | None = None  # the TPM's emulator, started before qemu (VM_TPM=on)
    incoming: int | None = None  # the saved state's descriptor qemu takes up (``-incoming``) instead of booting
    pass_fds: tuple[int, ...] = ()  # descriptors qemu inherits (the saved state it reads)
    vhost: bool = False  # the NIC's packets go through the kernel's vhost-net, not qemu's own threads
    queues: int = 1  # the NIC's queue pairs: the handshake's multiqueue tap


def vhost_problem(device: str = "/dev/vhost-net") -> str | None:
    """Why qemu cannot use ``device`` for the NIC (missing, not openable by this container), or None."""
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return f"{device} is missing: the node has no vhost-net, or the container was not given the device"
    except PermissionError:
        return f"the container may not open {device}: request the device through a device plugin (see deploy/README.md)"
    except OSError as err:
        return f"{device} cannot be opened: {err.strerror}"
    return None


def choose_vhost(wanted: str, accel: str, problem: str | None) -> bool:
    """vhost-net for VM_VHOST=auto|on|off, given :func:`vhost_problem`'s answer: auto uses it under KVM when the
    device opens (qemu's own threads otherwise, said at INFO: nothing is wrong, the path is only slower).

    :raise ConfigError: for VM_VHOST=on when it cannot be used.
    """
    if wanted == "off":
        return False
    why = problem or ("ACCEL is tcg: vhost-net serves KVM guests" if accel != "kvm" else None)
    if why is None:
        return True
    if wanted == "on":
        raise ConfigError(f"VM_VHOST=on: {why}")
    log.info("VM_VHOST=auto: %s; the NIC's packets go through qemu", why)
    return False


def nic_args(cfg: Config, hs: Handshake, vhost: bool) -> list[str]:
    """The NIC on the handshake's tap: one queue pair per queue of a multiqueue tap (the kernel refuses a
    single-queue open of one, so every NIC model gets them on its netdev; virtio-net also spreads them, with one
    interrupt vector per queue, its config and control), and vhost-net when chosen."""
    netdev = f"tap,id=net0,ifname={hs.tap},script=no,downscript=no"
    device = f"{cfg.nic_model},netdev=net0,mac={hs.mac}"
    if hs.tap_queues > 1:
        netdev += f",queues={hs.tap_queues}"
        if cfg.nic_model.startswith("virtio-net"):
            device += f",mq=on,vectors={2 * hs.tap_queues + 2}"
    if vhost:
        netdev += ",vhost=on"
    return ["-netdev", netdev, "-device", device]


def kvm_problem(device: str = "/dev/kvm") -> str | None:
    """Why ``device`` cannot run a VM (missing, not openable by this container, another API, refusing to create
    a VM), or None when it opens read-write, speaks KVM API 12 and lets this process create a VM."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{device} is missing: the node has no KVM, or the container was not given the device"
    except PermissionError:
        # Visible but not openable: a hostPath device the container runtime's device cgroup does not allow.
        return f"the container may not open {device}: request the device through a device plugin (see deploy/README.md)"
    except OSError as err:
        return f"{device} cannot be opened: {err.strerror}"
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION:
            return f"{device} does not speak KVM API {KVM_API_VERSION}"
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        return None
    except OSError as err:
        return f"{device} refused to create a VM: {err.strerror}"
    finally:
        os.close(fd)


def choose_accel(wanted: str, kvm: str | None) -> str:
    """``kvm`` or ``tcg`` for ACCEL=auto|kvm|tcg, given :func:`kvm_problem`'s answer ``kvm``; auto falls back to
    TCG with a warning.

    :raise ConfigError: for ACCEL=kvm when KVM cannot be used, before anything is started.
    """
    if wanted == "tcg":
        return "tcg"
    if kvm is None:
        return "kvm"
    if wanted == "kvm":
        raise ConfigError(f"ACCEL=kvm: {kvm}")
    log.warning("ACCEL=auto: %s; running under TCG emulation, which is much slower", kvm)
    return "tcg"


def vnc_enabled(cfg: Config, hs: Handshake) -> bool:
    """VNC follows the handshake: no server when the sidecar sends TCP 5900 to the VM; a warning when it is open."""
    if cfg.no_vnc == hs.vnc_in_pod:
        log.warning(
            "NO_VNC=%s but the sidecar's handshake says vnc_in_pod=%s; following the handshake",
            str(cfg.no_vnc).lower(),
            str(hs.vnc_in_pod).lower(),
        )
    vnc_password.warn_if_open(hs.vnc_in_pod, cfg.vnc_password_file)
    return hs.vnc_in_pod


# What the pet's drive does with the guest's data, spelt out rather than left to qemu's defaults (docs/data-safety.md):
# cache=writeback acknowledges a write once it is in the host's page cache and turns the guest's flush into an
# fdatasync of the pet file, so what the guest flushed survives a crash of qemu, of the runner and of the node;
# werror=enospc pauses the VM when VM_DIR is full (the runner's storage watch resumes it once there is room) and
# hands any other write error to the guest, as rerror=report does for reads.
DISK_DATA = "cache=writeback,werror=enospc,rerror=report"
DEVICE_ERRORS = "werror=enospc,rerror=report,write-cache=on"  # the same, set on a device of a -blockdev node


def _disk_args(bus: str, pet: Path) -> list[str]:
    drive = ["-drive", f"file={pet},if=none,id=disk0,node-name={PET_NODE},format=qcow2,discard=unmap,{DISK_DATA}"]
    if bus == "virtio":
        return [*drive, "-device", "virtio-blk-pci,drive=disk0,bootindex=1"]
    if bus == "ide":
        return [*drive, "-device", "ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=1"]
    return [*drive, "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1"]


DATA_SCSI = "datascsi"  # the data disks' own controllers: the pet's bus and the IDE units stay as they are
DATA_SATA = "datasata"


def data_node(name: str) -> str:
    """The block node of the data disk ``name``: backups and the metrics name it."""
    return f"data-{name}"


def data_device(name: str) -> str:
    """The guest device of the data disk ``name``."""
    return f"datadisk-{name}"


def _data_blockdev(disk: DataDisk) -> str:
    """The disk's node, with the pet's data handling (writeback cache, discard) and no backing file, whatever its
    header says (it was checked to name none: this holds even if it were swapped since)."""
    node: dict[str, object] = {
        "driver": disk.format,
        "node-name": data_node(disk.name),
        "discard": "unmap",
        "cache": {"direct": False, "no-flush": False},
        "file": {"driver": "file", "filename": str(disk.path), "discard": "unmap"},
    }
    if disk.format == "qcow2":
        node["backing"] = None
    return json.dumps(node, separators=(",", ":"))


def data_disk_args(disks: Sequence[DataDisk]) -> list[str]:
    """Each data disk as its own node and device, its name as the serial the guest sees (/dev/disk/by-id); the
    errors handled as the pet's (``werror=enospc``: a full volume pauses the VM); scsi and sata disks on a
    controller of their own, so no IDE unit of the pet, the config drive or a CD-ROM is ever taken."""
    args: list[str] = []
    if any(d.bus == "scsi" for d in disks):
        args += ["-device", f"virtio-scsi-pci,id={DATA_SCSI}"]
    if any(d.bus == "sata" for d in disks):
        args += ["-device", f"ich9-ahci,id={DATA_SATA}"]
    port = 0
    for disk in disks:
        common = f"drive={data_node(disk.name)},id={data_device(disk.name)},serial={disk.name},{DEVICE_ERRORS}"
        args += ["-blockdev", _data_blockdev(disk)]
        if disk.bus == "virtio":
            args += ["-device", f"virtio-blk-pci,{common}"]
        elif disk.bus == "scsi":
            args += ["-device", f"scsi-hd,{common},bus={DATA_SCSI}.0"]
        else:
            args += ["-device", f"ide-hd,{common},bus={DATA_SATA}.{port}"]
            port += 1
    return args


def plan_qemu(
    cfg: Config,
    hs: Handshake,
    accel: str,
    vnc: bool,
    drive: Path | None,
    *,
    cdroms: Sequence[Path | None] = (),
    vhost: bool = False,
) -> QemuPlan:
    """The complete argv: explicit formats everywhere, no defaults, the handshake's tap and MAC, extra args last;
    ``cdroms`` are the ISOs of the CD-ROM slots (:mod:`vmrunner.run.cdrom`).

    A VNC password is read by qemu from its standard input, where the runner puts it (see :mod:`vmrunner.run.vnc`).
    """
    paths = RunPaths.of(cfg.run_dir)
    argv = [
        cfg.qemu,
        "-name",
        f"{cfg.hostname},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-machine",
        firmware.machine_arg(cfg),
        "-accel",
        accel,
        *devices.cpu_args(cfg, accel),
        "-smp",
        str(cfg.cpus),
        "-m",
        f"{cfg.memory >> 20}M",
        "-display",
        "none",
        "-device",
        "VGA",
        *_disk_args(cfg.disk_bus, cfg.pet_path),
        *data_disk_args(cfg.data_disks),
        *firmware.firmware_args(cfg),
        *devices.pointer_args(cfg),
        *devices.rtc_args(cfg),
    ]
    swtpm = plan_swtpm(cfg) if cfg.hardware.tpm else None
    argv += tpm_args(swtpm) if swtpm is not None else []
    if drive is not None:
        argv += [
            "-drive",
            f"file={drive},if=none,id=cd0,format=raw,readonly=on,media=cdrom",
            "-device",
            "ide-cd,drive=cd0,bus=ide.1,unit=0",
        ]
    argv += cdrom.cdrom_args(cfg, cdroms)
    argv += nic_args(cfg, hs, vhost)
    display = cfg.console is not None
    password = ""
    if cfg.vnc_password_file is not None and (vnc or display):
        argv += ["-object", f"secret,id={vnc_password.SECRET_ID},file={vnc_password.SECRET_SOURCE},format=raw"]
        password = f",password-secret={vnc_password.SECRET_ID}"
    if vnc:
        argv += ["-vnc", f":0{password}"]
    if display:
        # A second display of the same screen on a Unix socket: only the runner's web server reaches it.
        argv += ["-vnc", f"unix:{paths.display},id=web{password}"]
    argv += [
        "-chardev",
        f"socket,id=qmp,path={paths.qmp},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=monitor,path={paths.monitor},server=on,wait=off",
        "-mon",
        "chardev=monitor,mode=control",
        "-chardev",
        f"socket,id=agent,path={paths.agent},server=on,wait=off",
        "-device",
        "virtio-serial-pci,id=serial0",
        "-device",
        f"virtserialport,bus=serial0.0,chardev=agent,name={AGENT_PORT}",
        "-chardev",
        f"socket,id=console,path={paths.serial},server=on,wait=off,logfile={paths.console_log}",
        "-serial",
        "chardev:console",
        *cfg.extra_args,
    ]
    return QemuPlan(
        tuple(argv), accel, vnc, paths, display, bool(password), devices.environment(cfg), swtpm,
        vhost=vhost, queues=hs.tap_queues,
    )  # fmt: skip
