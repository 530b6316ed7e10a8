"""The runner's configuration, read and validated from the environment before anything is touched."""

import contextlib
import errno
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared import shutdown
from shared.env import Env, console_pod_port, metrics_port, parse_size, pod_hostname
from shared.errors import ConfigError, PodvmError
from vmrunner.profiles import Hardware, cdrom_units, resolve

_HEX = re.compile(r"^[0-9a-f]+$")
_DIGEST_LENGTH = {"sha256": 64, "sha512": 128}
_TARGET = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,199}$")  # room for "name." and ".lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
ACCELS = ("auto", "kvm", "tcg")
VHOSTS = ("auto", "on", "off")
DISK_BUSES = ("virtio", "ide", "scsi")
NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
FORMATS = ("qcow2", "raw", "vmdk", "vhdx", "vdi", "vpc", "ova")
CONVERTED = ("vmdk", "vhdx", "vdi", "vpc", "ova")  # imported once into a qcow2 base; qcow2 and raw are stored as is
_OVA_DISK = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,63}$")
DRIVE_KINDS = ("config-2", "nocloud")
DISK_MODES = ("overlay", "standalone")
VERIFY_MODES = ("changed", "always")
RUN_DIR_MAX = 107 - len("/console.sock")  # qemu's sockets live there, and a Unix socket's path holds 107 bytes

# Greedy up to the last "@" of a URL: a password with an unescaped "@", "/" or "?" is still masked whole.
_USERINFO = re.compile(r"://[^\s'\"<>]*@")
_QUERY = re.compile(r"[?#][^\s'\"<>]+")


@dataclass(frozen=True)
class Checksum:
    """An expected digest: ``algorithm`` is a hashlib name, ``hexdigest`` lower-case hex."""

    algorithm: str
    hexdigest: str

    def hasher(self) -> "hashlib._Hash":
        """A fresh hash object of this checksum's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def parse_checksum(name: str, raw: str) -> Checksum:
    """``sha256:<hex>`` or ``sha512:<hex>``; ConfigError naming ``name`` otherwise."""
    algorithm, _, digest = raw.partition(":")
    algorithm, digest = algorithm.lower(), digest.lower()
    length = _DIGEST_LENGTH.get(algorithm)
    if length is None or len(digest) != length or not _HEX.match(digest):
        raise ConfigError(f"{name}={raw!r}: expected sha256:<64 hex digits> or sha512:<128 hex digits>")
    return Checksum(algorithm, digest)


@dataclass(frozen=True)
class Cdrom:
    """An ISO for a CD-ROM slot: an http(s) URL or an absolute path, and the digest it must have (optional)."""

    source: str
    checksum: Checksum | None = None


DATA_BUSES = ("virtio", "scsi", "sata")  # sata: a port of an AHCI controller of their own, never an IDE unit
DATA_FORMATS = ("qcow2", "raw")
DATA_DISKS_MAX = 6  # the ports of the data disks' AHCI controller; the same bound for every bus keeps one rule
# The guest sees the name as the disk's serial (/dev/disk/by-id/virtio-<name>): 20 bytes is what virtio-blk and
# ATA hand the guest.
_DATA_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,19}$")


@dataclass(frozen=True)
class DataDisk:
    """One DATA_DISKS entry: a disk of the VM's own on a volume of its own (a PVC mounted at ``directory``)."""

    name: str  # the disk's serial in the guest, and its file's name on the volume
    directory: Path  # the volume's mount point in the runner
    size: int  # bytes: the size it is created with, and grown to (never shrunk)
    bus: str  # virtio, scsi or sata
    format: str  # qcow2 or raw

    @property
    def path(self) -> Path:
        """The disk: ``<directory>/<name>.<format>``."""
        return self.directory / f"{self.name}.{self.format}"

    @property
    def owner_path(self) -> Path:
        """The record beside it naming the VM (hostname) the disk belongs to."""
        return self.directory / f".{self.name}.owner"

    @property
    def lock_path(self) -> Path:
        """The lock the runner holds while its VM may open the disk."""
        return self.directory / f".{self.name}.lock"

    @property
    def setting(self) -> str:
        """How errors name it: ``DATA_DISKS entry 'db'``."""
        return f"DATA_DISKS entry {self.name!r}"


def parse_data_disks(raw: str, default_bus: str) -> tuple[DataDisk, ...]:
    """DATA_DISKS: entries separated by ``,`` (or white space), each ``name:/volume/dir:size[:bus[:format]]``;
    the bus defaults to the pet's (``sata`` for a pet on ``ide``), the format to qcow2.

    :raise ConfigError: naming DATA_DISKS and the entry at fault.
    """
    disks: list[DataDisk] = []
    for entry in raw.replace(",", " ").split():
        parts = entry.split(":")
        if not 3 <= len(parts) <= 5:
            raise ConfigError(f"DATA_DISKS: {entry!r}: expected name:/volume/dir:size[:bus[:format]]")
        name, directory, size_text = parts[:3]
        bus = parts[3] if len(parts) > 3 and parts[3] else ("sata" if default_bus == "ide" else default_bus)
        fmt = parts[4] if len(parts) > 4 else "qcow2"
        if not _DATA_NAME.match(name):
            raise ConfigError(
                f"DATA_DISKS: {entry!r}: the name must be 1 to 20 lower-case letters, digits, '-' or '_' (it is the "
                "disk's serial in the guest)"
            )
        if not directory.startswith("/") or any(p in ("", ".", "..") for p in directory.strip("/").split("/")):
            raise ConfigError(f"DATA_DISKS: {entry!r}: expected the absolute path of the disk's volume, without '..'")
        try:
            size = parse_size(size_text)
        except ValueError:
            raise ConfigError(f"DATA_DISKS: {entry!r}: expected a size such as 512M or 20G") from None
        if size < 1 << 20:
            raise ConfigError(f"DATA_DISKS: {entry!r}: a data disk has at least 1M")
        if bus not in DATA_BUSES:
            raise ConfigError(f"DATA_DISKS: {entry!r}: bus {bus!r}: expected one of {', '.join(DATA_BUSES)}")
        if fmt not in DATA_FORMATS:
            raise ConfigError(f"DATA_DISKS: {entry!r}: format {fmt!r}: expected one of {', '.join(DATA_FORMATS)}")
        disk = DataDisk(name, Path(directory), size, bus, fmt)
        if any(d.name == name for d in disks):
            raise ConfigError(f"DATA_DISKS: {entry!r}: the name {name!r} is given twice")
        if any(d.path == disk.path or d.directory == disk.directory for d in disks):
            raise ConfigError(f"DATA_DISKS: {entry!r}: each data disk needs a volume of its own")
        disks.append(disk)
    if len(disks) > DATA_DISKS_MAX:
        raise ConfigError(f"DATA_DISKS: {len(disks)} disks, at most {DATA_DISKS_MAX}")
    return tuple(disks)


ISO_FORMAT = "iso"  # the format of a CD-ROM's ISO in the cache (vmrunner.images.iso), never an IMG_FORMAT
EMPTY = "empty"  # a VM_CDROMS entry: a drive with no disc, for ``vmrunner cdrom insert`` later


def parse_cdrom(name: str, source: str, checksum: str | None = None) -> Cdrom:
    """One ISO source (and its checksum); ConfigError naming ``name`` for anything but an http(s) URL with a host
    or an absolute path."""
    if source.startswith(("http://", "https://")):
        try:
            host = urlsplit(source).hostname
        except ValueError as err:
            raise ConfigError(f"{name}={redact(source)!r}: not a valid URL: {err}") from None
        if not host:
            raise ConfigError(f"{name}={redact(source)!r}: the URL has no host")
    elif not source.startswith("/"):
        raise ConfigError(f"{name}={redact(source)!r}: expected an http(s) URL or an absolute path of an ISO")
    return Cdrom(source, parse_checksum(name, checksum) if checksum is not None else None)


def parse_cdroms(raw: str, machine: str) -> tuple[Cdrom | None, ...]:
    """VM_CDROMS: one entry per slot, separated by white space: an http(s) URL or an absolute path of an ISO, each
    optionally followed by its ``sha256:<hex>`` (or ``sha512:``), or ``empty`` for a drive without a disc.

    :raise ConfigError: naming VM_CDROMS and the entry at fault, or more entries than the machine has slots.
    """
    slots: list[Cdrom | None] = []
    for token in raw.split():
        if token.lower().startswith(tuple(f"{a}:" for a in _DIGEST_LENGTH)):
            last = slots[-1] if slots else None
            if last is None or last.checksum is not None:
                raise ConfigError(f"VM_CDROMS: {token[:20]!r}...: a checksum must follow the URL or path it checks")
            slots[-1] = Cdrom(last.source, parse_checksum("VM_CDROMS", token))
        elif token == EMPTY:
            slots.append(None)
        else:
            slots.append(parse_cdrom("VM_CDROMS", token))
    units = cdrom_units(machine)
    if len(slots) > len(units):
        raise ConfigError(f"VM_CDROMS: {len(slots)} entries, but VM_MACHINE={machine} has {len(units)} CD-ROM slots")
    return tuple(slots)


@dataclass(frozen=True)
class ConsoleConfig:
    """The browser console's settings (README, "The console in a browser")."""

    port: int  # CONSOLE_PORT: served on 127.0.0.1 and ::1 only, reached with kubectl port-forward
    pod_port: int | None  # CONSOLE_POD_PORT: also served on the pod IP there (the handshake decides)
    password_file: Path | None  # CONSOLE_PASSWORD_FILE: the token a browser must give (required with pod_port)
    assets: Path  # CONSOLE_ASSETS: the node_modules directory npm ci filled with the client libraries


def _console(env: Env, no_vnc: bool, metrics: int | None) -> ConsoleConfig | None:
    """CONSOLE_*; a local port the VNC server or the metrics endpoint holds, or an exposed console without a token,
    is refused."""
    if env.text("CONSOLE_PORT", "6080").lower() == "off":
        return None
    port = env.integer("CONSOLE_PORT", 6080, 1, 65535)
    taken = {**({5900: "VNC"} if not no_vnc else {}), **({metrics: "METRICS_PORT"} if metrics else {})}
    if port in taken:
        raise ConfigError(f"CONSOLE_PORT={port}: {taken[port]} has that port; choose another (e.g. 6080)")
    pod_port = console_pod_port(env, no_vnc)
    password_file = env.path("CONSOLE_PASSWORD_FILE", "/") if env.optional("CONSOLE_PASSWORD_FILE") else None
    if pod_port is not None and password_file is None:
        raise ConfigError(
            f"CONSOLE_POD_PORT={pod_port}: a console on the pod IP needs CONSOLE_PASSWORD_FILE (a Secret holding "
            "the token a browser must give)"
        )
    assets = env.path("CONSOLE_ASSETS", "/usr/share/podvm/console/node_modules")
    return ConsoleConfig(port, pod_port, password_file, assets)


@dataclass(frozen=True)
class Config:
    """Everything ``vmrunner`` needs, validated; each field is one environment variable (see the README)."""

    img_source: str  # IMG_SOURCE: http(s) URL or absolute path of the base image ("" for commands without one)
    img_target: str  # the image's short name in log lines: IMG_TARGET, else the source's file name
    img_name: str  # the image's name in IMAGE_DIR/names: IMG_TARGET, else <file name>@<hash of the source>
    img_checksum: Checksum | None  # IMG_CHECKSUM: expected digest of the base image
    img_format: str  # IMG_FORMAT: the source's format (qcow2, raw, or one converted: CONVERTED), never probed
    img_max_size: int  # IMG_MAX_SIZE: largest virtual size accepted, bytes
    fetch_retries: int  # FETCH_RETRIES: attempts after a transient download failure
    image_dir: Path  # IMAGE_DIR: the shared cache of base images
    vm_dir: Path  # VM_DIR: the VM's own volume, holding the pet disk
    vm_disk_size: int | None  # VM_DISK_SIZE: grow the pet disk to this size (never shrinks)
    vm_disk_mode: str  # VM_DISK_MODE: overlay (on a cached base) or standalone (no backing file)
    verify_base: str  # VERIFY_BASE: changed (re-hash the base when its identity changed) or always
    cpus: int  # VM_CPUS
    memory: int  # VM_MEMORY, bytes
    accel: str  # ACCEL: auto, kvm or tcg
    machine: str  # VM_MACHINE: qemu machine type
    disk_bus: str  # VM_DISK_BUS: virtio, ide or scsi
    nic_model: str  # VM_NIC_MODEL
    vhost: str  # VM_VHOST: auto, on or off (the kernel's vhost-net for the NIC's packets)
    no_vnc: bool  # NO_VNC
    vnc_password_file: Path | None  # VNC_PASSWORD_FILE
    shutdown_timeout: float  # SHUTDOWN_TIMEOUT, seconds
    handshake_timeout: float  # HANDSHAKE_TIMEOUT, seconds
    metadata: Path  # METADATA: YAML merged into the config drive's meta data
    userdata: Path  # USERDATA: user data handed to the guest verbatim
    config_drive: str  # CONFIG_DRIVE: config-2 or nocloud
    run_dir: Path  # RUN_DIR: handshake, QMP and console sockets
    hostname: str  # HOSTNAME: names the pet disk, handed to the guest
    qemu: str  # QEMU: the qemu system emulator binary
    extra_args: tuple[str, ...]  # container arguments after ``run``: appended to qemu's argv
    metrics_port: int | None = None  # METRICS_PORT: the metrics endpoint's TCP port (the handshake decides)
    vm_dir_min_free: int = 128 << 20  # VM_DIR_MIN_FREE: free bytes at which a VM paused on a full VM_DIR resumes
    console: ConsoleConfig | None = None  # CONSOLE_*: the browser console (None: CONSOLE_PORT=off)
    backup_dir: Path = Path("/backup")  # BACKUP_DIR: the backup volume; chains under <hostname>/
    backup_interval: float | None = None  # BACKUP_INTERVAL: seconds between scheduled backups (None: no schedule)
    backup_keep: int = 2  # BACKUP_KEEP: complete chains kept
    backup_chain_length: int = 6  # BACKUP_CHAIN_LENGTH: incrementals in a chain before the next full backup
    backup_speed: int = 0  # BACKUP_SPEED: bytes per second a backup job may read (0: no limit)
    hardware: Hardware = field(default_factory=Hardware)  # VM_PROFILE, VM_FIRMWARE, VM_TPM, ... (vmrunner.profiles)
    on_stop: str = "shutdown"  # ON_STOP: shutdown (ACPI) or suspend (saved to VM_DIR, resumed by the next start)
    suspend_timeout: float = shutdown.SUSPEND_TIMEOUT  # SUSPEND_TIMEOUT: seconds a save may take, then the shutdown
    img_ova_disk: str | None = None  # IMG_OVA_DISK: the OVF disk (id or file name) of an ova; None: the first
    cdroms: tuple[Cdrom | None, ...] = ()  # VM_CDROMS: the ISO in each CD-ROM slot at start (None: no disc)
    data_disks: tuple[DataDisk, ...] = ()  # DATA_DISKS: the VM's data disks, each on a volume of its own
    source_setting: str = "IMG_SOURCE"  # the setting the fetch's errors name (VM_CDROMS for an ISO)
    checksum_setting: str = "IMG_CHECKSUM"

    @property
    def base_format(self) -> str:
        """The format of the base in the cache: a converted source becomes a qcow2 base."""
        return "qcow2" if self.img_format in CONVERTED else self.img_format

    @property
    def conversion(self) -> str | None:
        """What turns the source into its base (``vmdk``, ``ova-<disk>``...), None when it is stored as it is; two
        configurations with the same conversion of the same source bytes share one base."""
        if self.img_format not in CONVERTED:
            return None
        if self.img_format == "ova" and self.img_ova_disk is not None:
            return f"ova-{self.img_ova_disk}"
        return self.img_format

    @property
    def is_url(self) -> bool:
        """True when the base image is downloaded rather than copied from a local file."""
        return self.img_source.startswith(("http://", "https://"))

    @property
    def pet_path(self) -> Path:
        """The VM's own overlay disk, named after the pod."""
        return self.vm_dir / f"{self.hostname}.qcow2"


def _url_parts(source: str) -> tuple[str, str, str, str]:
    """``(scheme, host[:port], path, query)`` of an http(s) URL, without any ``user:password@``.

    Plain string splitting, so even a URL that ``urlsplit`` refuses (a broken ``[IPv6]`` host) is redacted.
    """
    scheme, _, rest = source.partition("://")
    rest, _, query = rest.split("#", 1)[0].partition("?")
    netloc, slash, path = rest.partition("/")
    return scheme, netloc.rpartition("@")[2].lower(), slash + path, query


def redact(text: str) -> str:
    """``text`` fit for a log line, an error or the shared cache: no URL credentials, no query (presigned tokens).

    A whole http(s) URL becomes ``scheme://host[:port]/path``; any other text, such as a library's error message
    that quotes a URL, has ``user:password@`` and every query or fragment masked (``***``). The one way
    ``IMG_SOURCE`` is shown anywhere.
    """
    masked = _USERINFO.sub("://***@", text)
    if not masked.startswith(("http://", "https://")) or any(c.isspace() for c in masked):
        return _QUERY.sub("?***", masked)
    scheme, host, path, _query = _url_parts(masked)
    return f"{scheme}://{host}{path}"


def name_key(source: str, target: str | None) -> str:
    """The image's name in ``IMAGE_DIR/names`` (see docs/runner-contract.md, "The image cache")."""
    if target is not None:
        return target
    if source.startswith(("http://", "https://")):
        scheme, host, path, query = _url_parts(source)
        keyed = f"{scheme}://{host}{path}" + (f"?{query}" if query else "")
        file_name = path.rstrip("/").rsplit("/", 1)[-1]
    else:
        keyed = source
        file_name = source.rstrip("/").rsplit("/", 1)[-1]
    stem = _UNSAFE.sub("_", file_name)[:100] or "image"
    return f"{stem}@{hashlib.sha256(keyed.encode()).hexdigest()[:16]}"


def _source_and_target(env: Env) -> tuple[str, str, str]:
    source = env.required("IMG_SOURCE", "an http(s) URL or an absolute path of a qcow2 image")
    if source.startswith(("http://", "https://")):
        try:
            parts = urlsplit(source)
            host, _ = parts.hostname, parts.port
        except ValueError as err:  # a broken [IPv6] host or port
            raise ConfigError(f"IMG_SOURCE={redact(source)!r}: not a valid URL: {err}") from None
        if not host:
            raise ConfigError(f"IMG_SOURCE={redact(source)!r}: the URL has no host")
        file_name = parts.path.rstrip("/").rsplit("/", 1)[-1]
    elif source.startswith("/"):
        file_name = source.rsplit("/", 1)[-1]
    else:
        raise ConfigError(f"IMG_SOURCE={source!r}: expected an http(s) URL or an absolute path")
    target = env.optional("IMG_TARGET")
    if target is not None and not _TARGET.match(target):
        raise ConfigError(
            f"IMG_TARGET={target!r}: expected a plain name: up to 200 letters, digits, '.', '_', '+' or '-', "
            "not starting with '.'"
        )
    return source, target or file_name or "image", name_key(source, target)


def load(values: dict[str, str], extra_args: tuple[str, ...] = (), *, image: bool = True) -> Config:
    """Validate the environment ``values`` into a Config; ``image=False`` reads neither ``IMG_SOURCE``,
    ``IMG_TARGET`` nor ``IMG_CHECKSUM``, for the commands that never fetch the configured image (``configdrive``,
    ``status``, ``gc``, ``rebase``).

    :raise ConfigError: naming the first variable whose value is wrong.
    """
    env = Env(values)
    source, target, name = _source_and_target(env) if image else ("", "", "")
    checksum_raw = env.optional("IMG_CHECKSUM") if image else None
    disk_size = env.size("VM_DISK_SIZE", 0, minimum=1 << 20) if env.optional("VM_DISK_SIZE") else None
    password_file = env.path("VNC_PASSWORD_FILE", "/") if env.optional("VNC_PASSWORD_FILE") else None
    accel = env.choice("ACCEL", "auto", ACCELS)
    machine, disk_bus, nic_model, hardware = resolve(env, DISK_BUSES, NIC_MODELS, accel)
    return Config(
        img_source=source,
        img_target=target,
        img_name=name,
        img_checksum=parse_checksum("IMG_CHECKSUM", checksum_raw) if checksum_raw else None,
        img_format=env.choice("IMG_FORMAT", "qcow2", FORMATS),  # also rebase: the format of a base for a standalone pet
        img_ova_disk=_ova_disk(env),
        img_max_size=env.size("IMG_MAX_SIZE", 256 << 30, minimum=1 << 20),
        fetch_retries=env.integer("FETCH_RETRIES", 5, 0, 100),
        image_dir=env.path("IMAGE_DIR", "/image"),
        vm_dir=env.path("VM_DIR", "/vm"),
        vm_disk_size=disk_size,
        vm_disk_mode=env.choice("VM_DISK_MODE", "overlay", DISK_MODES),
        verify_base=env.choice("VERIFY_BASE", "changed", VERIFY_MODES),
        cpus=env.integer("VM_CPUS", 1, 1, 255),
        memory=env.size("VM_MEMORY", 1 << 30, minimum=16 << 20),
        accel=accel,
        machine=machine,
        disk_bus=disk_bus,
        nic_model=nic_model,
        vhost=env.choice("VM_VHOST", "auto", VHOSTS),
        no_vnc=env.flag("NO_VNC"),
        vnc_password_file=password_file,
        shutdown_timeout=shutdown.shutdown_timeout(env),
        handshake_timeout=env.duration("HANDSHAKE_TIMEOUT", 120.0),
        metadata=env.path("METADATA", "/metadata"),
        userdata=env.path("USERDATA", "/userdata"),
        config_drive=env.choice("CONFIG_DRIVE", "config-2", DRIVE_KINDS),
        run_dir=env.path("RUN_DIR", "/run/podvm", max_bytes=RUN_DIR_MAX),
        hostname=pod_hostname(env),
        qemu=env.text("QEMU", "qemu-system-x86_64"),
        extra_args=extra_args,
        metrics_port=metrics_port(env, no_vnc=env.flag("NO_VNC")),
        vm_dir_min_free=env.size("VM_DIR_MIN_FREE", 128 << 20, minimum=1 << 20),
        console=_console(env, env.flag("NO_VNC"), metrics_port(env, no_vnc=env.flag("NO_VNC"))),
        backup_dir=env.path("BACKUP_DIR", "/backup"),
        backup_interval=_interval(env),
        backup_keep=env.integer("BACKUP_KEEP", 2, 1, 1000),
        backup_chain_length=env.integer("BACKUP_CHAIN_LENGTH", 6, 0, 1000),
        backup_speed=env.size("BACKUP_SPEED", 0),
        hardware=hardware,
        on_stop=shutdown.on_stop(env),
        suspend_timeout=shutdown.suspend_timeout(env),
        cdroms=parse_cdroms(env.text("VM_CDROMS", ""), machine),
        data_disks=_data_disks(env, disk_bus),
    )


def _data_disks(env: Env, default_bus: str) -> tuple[DataDisk, ...]:
    """DATA_DISKS, none of them on VM_DIR, IMAGE_DIR or BACKUP_DIR (each is a volume of its own)."""
    disks = parse_data_disks(env.text("DATA_DISKS", ""), default_bus)
    for disk in disks:
        for name in ("VM_DIR", "IMAGE_DIR", "BACKUP_DIR"):
            other = env.path(name, {"VM_DIR": "/vm", "IMAGE_DIR": "/image", "BACKUP_DIR": "/backup"}[name])
            if disk.directory.is_relative_to(other) or other.is_relative_to(disk.directory):
                raise ConfigError(
                    f"DATA_DISKS: {disk.name!r}: {disk.directory} is not a volume of its own ({name}={other})"
                )
    return disks


def _ova_disk(env: Env) -> str | None:
    """IMG_OVA_DISK: an OVF disk id or file name (plain characters only: it is part of a cache file's name)."""
    disk = env.optional("IMG_OVA_DISK")
    if disk is not None and not _OVA_DISK.match(disk):
        raise ConfigError(
            f"IMG_OVA_DISK={disk!r}: expected an OVF disk id or file name: up to 64 letters, digits, '.', '_', '+' "
            "or '-', not starting with '.'"
        )
    return disk


def _interval(env: Env) -> float | None:
    """BACKUP_INTERVAL: unset means no schedule; a schedule tighter than 10 s is refused (a backup of a busy
    disk takes longer, and the next one would start at once)."""
    if env.optional("BACKUP_INTERVAL") is None:
        return None
    interval = env.duration("BACKUP_INTERVAL", 0.0)
    if interval < 10:
        raise ConfigError(f"BACKUP_INTERVAL={env.optional('BACKUP_INTERVAL')!r}: expected at least 10s (or unset)")
    return interval


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
