"""The VM's own state beyond its disk, made ready before qemu starts: the firmware's variables, the TPM's state."""

from vmrunner.config import Config
from vmrunner.pet.state import own_state
from vmrunner.run import devices, firmware, tpm


def preflight(cfg: Config) -> None:
    """Every file and program the hardware settings need, checked before anything starts (one line, exit 2)."""
    firmware.preflight(cfg)
    tpm.preflight(cfg)


def ensure(cfg: Config) -> None:
    """The UEFI variable store and the TPM's state directory on VM_DIR, made on the first start only."""
    if cfg.hardware.uefi:
        firmware.ensure_vars(cfg)
    if cfg.hardware.tpm:
        tpm.ensure_state(cfg)


def describe(cfg: Config, accel: str | None) -> dict[str, object]:
    """The hardware settings with where each came from, and the VM's own files, for ``vmrunner plan``."""
    return {
        "settings": [{"variable": n, "value": v, "source": s} for n, v, s in cfg.hardware.sources],
        "hyperv_applied": None if accel is None else devices.hyperv_applied(cfg, accel),
        "own_state": own_state(cfg),
    }
