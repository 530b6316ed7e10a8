"""The VM's own state beyond its disk, made ready before qemu starts: the machine type's pin, the firmware's variables,
the TPM's state."""

from vmrunner.config import Config
from vmrunner.pet.state import own_state
from vmrunner.run import devices, firmware, machine, suspend, tpm


def preflight(cfg: Config) -> None:
    """Every file and program the hardware settings need, checked before anything starts (one line, exit 2)."""
    firmware.preflight(cfg)
    tpm.preflight(cfg)


def ensure(cfg: Config) -> Config:
    """The machine type's pin, the UEFI variable store and the TPM's state directory on VM_DIR, made on the first
    start only; ``cfg`` on the pinned machine type."""
    record = suspend.saved(cfg)  # a VM suspended before it had a pin: the guest knows the machine it was saved on
    cfg = machine.ensure(cfg, None if record is None else machine.Pin(machine.kind_of(record.machine), record.pinned))
    if cfg.hardware.uefi:
        firmware.ensure_vars(cfg)
    if cfg.hardware.tpm:
        tpm.ensure_state(cfg)
    return cfg


def describe(cfg: Config, accel: str | None) -> dict[str, object]:
    """The hardware settings with where each came from, and the VM's own files, for ``vmrunner plan``."""
    return {
        "settings": [{"variable": n, "value": v, "source": s} for n, v, s in cfg.hardware.sources],
        "hyperv_applied": None if accel is None else devices.hyperv_applied(cfg, accel),
        "machine": {"setting": cfg.machine, "pinned": machine.applied(cfg.machine, machine.read(cfg))},
        "own_state": own_state(cfg),
    }
