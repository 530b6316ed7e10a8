"""The pet disk: the VM's own qcow2, created once and then only ever grown, as qemu-img commands planned as data.

A pet is an overlay on a cached base (``VM_DISK_MODE=overlay``) or a standalone qcow2 without a backing file.
Every change that touches which base it uses (create, re-point, rebase, flatten) is planned here and applied by
``vmrunner.pet.binding``, which checks the base first.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from shared.errors import BaseMismatch, PodvmError
from vmrunner.config import Config
from vmrunner.qemu import img

log = logging.getLogger("vmrunner.pet")
Argv = tuple[str, ...]


@dataclass(frozen=True)
class PetPlan:
    """The qemu-img commands that make the pet disk at ``staging`` (renamed to ``path`` after), or grow it."""

    path: Path
    staging: Path | None  # where the create commands write before the rename
    create: tuple[Argv, ...]
    resize: Argv | None


@dataclass(frozen=True)
class PetInfo:
    """What the pet's own qcow2 header says: its backing reference and format, its size."""

    backing: str | None
    backing_format: str | None
    virtual_size: int


def staging_path(cfg: Config) -> Path:
    """Where a new pet is written before it is renamed into place."""
    return cfg.vm_dir / f".{cfg.pet_path.name}.tmp"


def plan_create(cfg: Config, base: Path, base_format: str, base_virtual_size: int) -> PetPlan:
    """A new pet on ``base``: an overlay with an explicit backing format, or a standalone copy; larger when asked."""
    tmp = staging_path(cfg)
    want = cfg.vm_disk_size
    grow = want is not None and want > base_virtual_size
    if cfg.vm_disk_mode == "standalone":
        convert = ("qemu-img", "convert", "-q", "-f", base_format, "-O", "qcow2", str(base), str(tmp))
        resize = ("qemu-img", "resize", "-q", "-f", "qcow2", str(tmp), str(want))
        return PetPlan(cfg.pet_path, tmp, (convert, resize) if grow else (convert,), None)
    size = (str(want),) if grow else ()
    create = ("qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(tmp), *size)
    return PetPlan(cfg.pet_path, tmp, (create,), None)


def plan_grow(cfg: Config, current_size: int) -> PetPlan:
    """Grow an existing pet to VM_DISK_SIZE; never shrink, never recreate."""
    want = cfg.vm_disk_size
    if want is None or want <= current_size:
        if want is not None and want < current_size:
            log.warning(
                "VM_DISK_SIZE=%d is smaller than the pet disk (%d bytes): disks are never shrunk", want, current_size
            )
        return PetPlan(cfg.pet_path, None, (), None)
    return PetPlan(cfg.pet_path, None, (), ("qemu-img", "resize", "-q", "-f", "qcow2", str(cfg.pet_path), str(want)))


def plan_repoint(pet: Path, base: Path, base_format: str) -> Argv:
    """Change only the backing pointer (the new path holds the same bytes: checked by digest before)."""
    return ("qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", base_format, "-b", str(base), str(pet))


def plan_rebase(pet: Path, base: Path, base_format: str) -> Argv:
    """Move the pet to another base, copying into it every cluster the guest would otherwise see change."""
    return ("qemu-img", "rebase", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(pet))


def plan_flatten(pet: Path) -> Argv:
    """Copy everything the pet reads from its base into the pet and drop the backing file."""
    return ("qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(pet))


def run(argv: Argv, cfg: Config, what: str) -> str:
    """Run a qemu-img command on the VM's volume; a full disk or an image in use is one line saying so.

    :raise PodvmError: naming VM_DIR (no space) or the pet (in use, other failures).
    """
    copies = argv[1] == "convert" or (argv[1] == "rebase" and "-u" not in argv)  # the rest touch headers only
    return img.run(argv, img.Job(str(cfg.pet_path), what, f"VM_DIR={cfg.vm_dir}", img.COPY if copies else img.QUICK))


def info(cfg: Config, path: Path) -> PetInfo:
    """The pet's header, read without opening its base (``-U``: also while qemu runs; the base is not probed).

    :raise BaseMismatch: when the header is unreadable or names a backing file without its format.
    """
    out = run(("qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)), cfg, "reading the pet disk")
    try:
        data = json.loads(out)
        size = int(data["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise PodvmError(f"{path}: qemu-img info printed no usable JSON") from None
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    backing_format = data.get("backing-filename-format")
    if backing and not backing_format:
        raise BaseMismatch(f"{path}: its backing file {backing} has no recorded format; refusing to probe it")
    return PetInfo(backing or None, backing_format, size)
