"""The runner's configuration, read and validated from the environment before anything is touched."""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from shared.env import Env, pod_hostname
from shared.errors import ConfigError

_HEX = re.compile(r"^[0-9a-f]+$")
_DIGEST_LENGTH = {"sha256": 64, "sha512": 128}
_TARGET = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}$")
ACCELS = ("auto", "kvm", "tcg")
DISK_BUSES = ("virtio", "ide", "scsi")
NIC_MODELS = ("virtio-net-pci", "e1000", "rtl8139")
FORMATS = ("qcow2", "raw")
DRIVE_KINDS = ("config-2", "nocloud")
# Greedy up to the last "@" of a URL: a password with an unescaped "@", "/" or "?" is still masked whole.
_USERINFO = re.compile(r"://[^\s'\"<>]*@")
_QUERY = re.compile(r"[?#][^\s'\"<>]+")


def redact(text: str) -> str:
    """``text`` fit for a log line, an error or the shared cache: no URL credentials, no query (presigned tokens).

    A whole http(s) URL becomes ``scheme://host[:port]/path``; any other text, such as a library's error message
    that quotes a URL, has ``user:password@`` and every query or fragment masked (``***``). The one way
    ``IMG_SOURCE`` is shown anywhere.
    """
    masked = _USERINFO.sub("://***@", text)
    if not masked.startswith(("http://", "https://")) or any(c.isspace() for c in masked):
        return _QUERY.sub("?***", masked)
    parts = urlsplit(masked)
    try:
        port = parts.port
    except ValueError:
        return _QUERY.sub("?***", masked)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urlunsplit((parts.scheme, host if port is None else f"{host}:{port}", parts.path, "", ""))


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
class Config:
    """Everything ``vmrunner`` needs, validated; each field is one environment variable (see the README)."""

    img_source: str  # IMG_SOURCE: http(s) URL or absolute path of the base image
    img_target: str  # IMG_TARGET: the base image's file name in the cache
    img_checksum: Checksum | None  # IMG_CHECKSUM: expected digest of the base image
    img_format: str  # IMG_FORMAT: qcow2 or raw, never probed
    img_max_size: int  # IMG_MAX_SIZE: largest virtual size accepted, bytes
    fetch_retries: int  # FETCH_RETRIES: attempts after a transient download failure
    image_dir: Path  # IMAGE_DIR: the shared cache of base images
    vm_dir: Path  # VM_DIR: the VM's own volume, holding the pet disk
    vm_disk_size: int | None  # VM_DISK_SIZE: grow the pet disk to this size (never shrinks)
    cpus: int  # VM_CPUS
    memory: int  # VM_MEMORY, bytes
    accel: str  # ACCEL: auto, kvm or tcg
    machine: str  # VM_MACHINE: qemu machine type
    disk_bus: str  # VM_DISK_BUS: virtio, ide or scsi
    nic_model: str  # VM_NIC_MODEL
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

    @property
    def is_url(self) -> bool:
        """True when the base image is downloaded rather than copied from a local file."""
        return self.img_source.startswith(("http://", "https://"))

    @property
    def base_path(self) -> Path:
        """Where the vetted base image lives in the shared cache."""
        return self.image_dir / self.img_target

    @property
    def pet_path(self) -> Path:
        """The VM's own overlay disk, named after the pod."""
        return self.vm_dir / f"{self.hostname}.qcow2"


def _source_and_target(env: Env) -> tuple[str, str]:
    source = env.required("IMG_SOURCE", "an http(s) URL or an absolute path of a qcow2 image")
    if source.startswith(("http://", "https://")):
        parts = urlsplit(source)
        if not parts.hostname:
            raise ConfigError(f"IMG_SOURCE={redact(source)!r}: the URL has no host")
        default_target = parts.path.rstrip("/").rsplit("/", 1)[-1]
    elif source.startswith("/"):
        default_target = source.rsplit("/", 1)[-1]
    else:
        raise ConfigError(f"IMG_SOURCE={source!r}: expected an http(s) URL or an absolute path")
    target = env.text("IMG_TARGET", default_target)
    if not _TARGET.match(target) or target.endswith((".lock", ".vetted", ".part")):
        raise ConfigError(
            f"IMG_TARGET={target!r}: expected a plain file name (letters, digits, '.', '_', '+', '-'); "
            "set IMG_TARGET when the URL does not end in one"
        )
    return source, target


def load(values: dict[str, str], extra_args: tuple[str, ...] = ()) -> Config:
    """Validate the environment ``values`` into a Config.

    :raise ConfigError: naming the first variable whose value is wrong.
    """
    env = Env(values)
    source, target = _source_and_target(env)
    checksum_raw = env.optional("IMG_CHECKSUM")
    disk_size = env.size("VM_DISK_SIZE", 0, minimum=1 << 20) if env.optional("VM_DISK_SIZE") else None
    password_file = env.path("VNC_PASSWORD_FILE", "/") if env.optional("VNC_PASSWORD_FILE") else None
    return Config(
        img_source=source,
        img_target=target,
        img_checksum=parse_checksum("IMG_CHECKSUM", checksum_raw) if checksum_raw else None,
        img_format=env.choice("IMG_FORMAT", "qcow2", FORMATS),
        img_max_size=env.size("IMG_MAX_SIZE", 256 << 30, minimum=1 << 20),
        fetch_retries=env.integer("FETCH_RETRIES", 5, 0, 100),
        image_dir=env.path("IMAGE_DIR", "/image"),
        vm_dir=env.path("VM_DIR", "/vm"),
        vm_disk_size=disk_size,
        cpus=env.integer("VM_CPUS", 1, 1, 255),
        memory=env.size("VM_MEMORY", 1 << 30, minimum=16 << 20),
        accel=env.choice("ACCEL", "auto", ACCELS),
        machine=env.text("VM_MACHINE", "pc"),
        disk_bus=env.choice("VM_DISK_BUS", "virtio", DISK_BUSES),
        nic_model=env.choice("VM_NIC_MODEL", "virtio-net-pci", NIC_MODELS),
        no_vnc=env.flag("NO_VNC"),
        vnc_password_file=password_file,
        shutdown_timeout=env.duration("SHUTDOWN_TIMEOUT", 60.0),
        handshake_timeout=env.duration("HANDSHAKE_TIMEOUT", 120.0),
        metadata=env.path("METADATA", "/metadata"),
        userdata=env.path("USERDATA", "/userdata"),
        config_drive=env.choice("CONFIG_DRIVE", "config-2", DRIVE_KINDS),
        run_dir=env.path("RUN_DIR", "/run/podvm"),
        hostname=pod_hostname(env),
        qemu=env.text("QEMU", "qemu-system-x86_64"),
        extra_args=extra_args,
    )
