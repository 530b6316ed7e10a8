"""The guest's firmware: SeaBIOS, or OVMF (UEFI, optionally with Secure Boot) and its variable store on VM_DIR.

The variable store is the VM's own state (see :mod:`vmrunner.pet.state`): copied once from the firmware's template,
then only the guest writes it (boot entries, Secure Boot keys, whatever it stores), across restarts and rebases.
"""

import os
import re
import stat
from pathlib import Path

from shared import files
from shared.errors import ConfigError
from vmrunner.config import Config
from vmrunner.pet.state import vars_path
from vmrunner.profiles import is_q35

# OVMF's boot manager on the serial port when Secure Boot (or a broken image) refuses a boot option.
_REFUSED = re.compile(
    r'BdsDxe: failed to (?:load|start) (Boot[0-9A-F]{4} "[^"]*").*: (Access Denied|Security Violation)$'
)


def boot_refusal(line: str) -> str | None:
    """What the firmware refused to boot and why, from one line of the serial console; None for any other line."""
    found = _REFUSED.search(line)
    return f"{found.group(1)}: {found.group(2)}" if found else None


def preflight(cfg: Config) -> None:
    """One line, before anything starts, when a firmware file the settings need is missing.

    :raise ConfigError: naming the variable of the missing file.
    """
    hw = cfg.hardware
    for name, path in (("VM_OVMF_CODE", hw.ovmf_code), ("VM_OVMF_VARS", hw.ovmf_vars)):
        if path is not None and not path.is_file():
            raise ConfigError(
                f"{name}={path}: no such firmware file (VM_FIRMWARE={hw.firmware} needs Debian's ovmf package)"
            )


def machine_arg(cfg: Config) -> str:
    """``-machine``'s value: VM_MACHINE, with SMM switched on for Secure Boot (the config refused it elsewhere)."""
    if cfg.hardware.secure_boot and is_q35(cfg.machine) and "smm=on" not in cfg.machine.split(","):
        return f"{cfg.machine},smm=on"
    return cfg.machine


def firmware_args(cfg: Config) -> list[str]:
    """The two pflash drives of OVMF (code read-only, the VM's own variables writable); nothing for SeaBIOS."""
    hw = cfg.hardware
    if not hw.uefi or hw.ovmf_code is None:
        return []
    args = [
        "-drive",
        f"if=pflash,unit=0,format=raw,readonly=on,file={hw.ovmf_code}",
        "-drive",
        f"if=pflash,unit=1,format=raw,file={vars_path(cfg)}",
    ]
    if hw.secure_boot:
        # Only code running in SMM may write the variable store: the guest's OS cannot change the Secure Boot keys.
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return args


def ensure_vars(cfg: Config) -> Path:
    """The VM's variable store, copied from the template on the first start only; never overwritten.

    Written whole beside its final name and renamed there (no half store after a crash), through the volume's
    descriptors (no planted link followed). A store that is not a plain file of the runner's, or has another size
    than the template (a 2 MiB build's store under a 4 MiB firmware would not boot), is refused in one line.

    :raise ConfigError: when the store on VM_DIR is forged or does not fit the firmware.
    """
    target = vars_path(cfg)
    template = cfg.hardware.ovmf_vars
    assert template is not None, "ensure_vars without UEFI"
    if files.stat_below(cfg.vm_dir, target) is None:
        files.write_atomic(target, template.read_bytes(), 0o600, root=cfg.vm_dir)
    info = files.stat_below(cfg.vm_dir, target)
    assert info is not None, "the variable store vanished right after it was written"
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"VM_DIR={cfg.vm_dir}: {target.name} is not a file of the runner's (uid {os.getuid()}) closed to others"
        )
    if info.st_size != template.stat().st_size:
        raise ConfigError(
            f"VM_DIR={cfg.vm_dir}: {target.name} holds {info.st_size} bytes but VM_OVMF_VARS={template} "
            f"has {template.stat().st_size}: it belongs to other firmware"
        )
    return target
