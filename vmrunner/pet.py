"""The pet disk: the VM's own qcow2 overlay on the cached base, created once and then only ever grown."""

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.errors import PodvmError
from vmrunner.config import Config

log = logging.getLogger("vmrunner.pet")


@dataclass(frozen=True)
class PetPlan:
    """The qemu-img commands that prepare the pet disk (none when it exists at the right size)."""

    path: Path
    staging: Path | None  # where ``create`` writes before the rename
    create: tuple[str, ...] | None
    resize: tuple[str, ...] | None


def plan_pet(cfg: Config, base_virtual_size: int, exists: bool, current_size: int | None) -> PetPlan:
    """Create the overlay when missing (at VM_DISK_SIZE if that is larger), else grow it; never shrink or rebase."""
    want = cfg.vm_disk_size
    if not exists:
        size = [str(want)] if want is not None and want > base_virtual_size else []
        tmp = cfg.vm_dir / f".{cfg.pet_path.name}.tmp"
        create = ("qemu-img", "create", "-q", "-f", "qcow2", "-F", cfg.img_format, "-b", str(cfg.base_path), str(tmp))
        return PetPlan(cfg.pet_path, tmp, (*create, *size), None)
    if want is None or current_size is None or want <= current_size:
        if want is not None and current_size is not None and want < current_size:
            log.warning(
                "VM_DISK_SIZE=%d is smaller than the pet disk (%d bytes): disks are never shrunk", want, current_size
            )
        return PetPlan(cfg.pet_path, None, None, None)
    return PetPlan(cfg.pet_path, None, None, ("qemu-img", "resize", "-q", "-f", "qcow2", str(cfg.pet_path), str(want)))


def virtual_size(path: Path) -> int:
    """The pet disk's virtual size as qemu-img reports it."""
    out = _run(("qemu-img", "info", "-f", "qcow2", "-U", "--output=json", str(path)))
    size: int = json.loads(out)["virtual-size"]
    return size


def _run(argv: tuple[str, ...]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise PodvmError(f"{argv[0]} {argv[1]} {argv[-1]} failed: {last}")
    return done.stdout


def ensure_pet(cfg: Config, base_virtual_size: int) -> PetPlan:
    """Apply the pet plan: an atomic create (temporary name, then rename) or a grow-only resize."""
    exists = cfg.pet_path.exists()
    current = virtual_size(cfg.pet_path) if exists and cfg.vm_disk_size is not None else None
    plan = plan_pet(cfg, base_virtual_size, exists, current)
    if plan.create is not None and plan.staging is not None:
        try:
            _run(plan.create)
            os.replace(plan.staging, cfg.pet_path)
        except BaseException:
            plan.staging.unlink(missing_ok=True)
            raise
        log.info("created pet disk %s on %s", cfg.pet_path, cfg.base_path)
    elif plan.resize is not None:
        _run(plan.resize)
        log.info("grew pet disk %s to %s bytes", cfg.pet_path, plan.resize[-1])
    else:
        log.info("using pet disk %s as it is", cfg.pet_path)
    return plan
