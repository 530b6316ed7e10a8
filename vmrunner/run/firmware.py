"""The guest's firmware: SeaBIOS, or OVMF (UEFI, optionally with Secure Boot) and its variable store on VM_DIR.

The variable store is the VM's own state (see :mod:`vmrunner.pet.state`): copied once from the firmware's template,
then only the guest writes it (boot entries, Secure Boot keys, whatever it stores), across restarts and rebases.
"""

import contextlib
import os
import shutil
from pathlib import Path

from shared.errors import ConfigError
from vmrunner.config import Config
from vmrunner.pet.state import vars_path
from vmrunner.profiles import is_q35


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

    The copy is written beside its final name and linked there, so a crash leaves no half store, and a store that
    appeared meanwhile wins. A store of another size than the template belongs to other firmware (2 MiB vs 4 MiB
    builds) and would not boot: refused in one line.

    :raise ConfigError: when the store on VM_DIR does not fit the firmware.
    """
    target = vars_path(cfg)
    template = cfg.hardware.ovmf_vars
    assert template is not None, "ensure_vars without UEFI"
    if not target.exists():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with template.open("rb") as src, open(tmp, "xb") as dst:
                os.fchmod(dst.fileno(), 0o600)
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
    if target.stat().st_size != template.stat().st_size:
        raise ConfigError(
            f"VM_DIR={cfg.vm_dir}: {target.name} holds {target.stat().st_size} bytes but VM_OVMF_VARS={template} "
            f"has {template.stat().st_size}: it belongs to other firmware"
        )
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
