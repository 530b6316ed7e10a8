"""The VM's own state, as one list: the pet disk, its machine type, the UEFI variables, the TPM's state on VM_DIR,
and the data disks, each on a volume of its own.

Backups, restore, ``status`` and the runner all follow this list, so a file the VM keeps (a Windows guest's boot
entries, its BitLocker keys sealed in the TPM) is never left out of one of them. Pure: nothing here touches a file.
"""

from dataclasses import dataclass
from pathlib import Path

from vmrunner.config import Config

DISK = "disk"
UEFI_VARS = "uefi-vars"
TPM_STATE = "tpm-state"
SUSPENDED = "suspended"
DATA_DISK = "data-disk"
MACHINE = "machine"
COPIED = (MACHINE, UEFI_VARS, TPM_STATE)  # what a backup copies as files beside the disk's own job
LIVE = (UEFI_VARS, TPM_STATE)  # what the VM writes while it runs: copied with the VM paused, for one instant


@dataclass(frozen=True)
class OwnFile:
    """One file (or directory) of the VM's own state and how it comes to be."""

    kind: str  # DISK, MACHINE, UEFI_VARS, TPM_STATE, SUSPENDED or DATA_DISK
    path: Path
    mode: int | None  # what the runner makes it with (None: as qemu-img makes it); the TPM's never readable by others
    directory: bool
    created: str  # how it is made, once; none of them is ever overwritten by a start
    template: Path | None = None  # the file it is copied from, once (the firmware's variable template)
    volume: Path | None = None  # the volume it lives on when not VM_DIR (a data disk's own)
    name: str | None = None  # a data disk's name (DATA_DISKS)

    def root(self, vm_dir: Path) -> Path:
        """The volume its path is opened below (:mod:`shared.files`)."""
        return self.volume if self.volume is not None else vm_dir


TPM_OWNER = "vm"  # in the TPM's state directory: the hostname of the VM the state belongs to


def vars_path_of(vm_dir: Path, name: str) -> Path:
    """The UEFI variable store of the VM ``name`` beside its pet: ``<name>.efivars.fd``."""
    return vm_dir / f"{name}.efivars.fd"


def tpm_dir_of(vm_dir: Path, name: str) -> Path:
    """The TPM's state directory of the VM ``name`` beside its pet: ``<name>.tpm/``."""
    return vm_dir / f"{name}.tpm"


def machine_path_of(vm_dir: Path, name: str) -> Path:
    """The versioned machine type the VM ``name`` was pinned to when its pet was made: ``<name>.machine.json``."""
    return vm_dir / f"{name}.machine.json"


def path_of(vm_dir: Path, name: str, kind: str) -> Path:
    """Where the VM ``name`` keeps its own file of ``kind`` (MACHINE, UEFI_VARS or TPM_STATE), for a restore."""
    return {MACHINE: machine_path_of, UEFI_VARS: vars_path_of, TPM_STATE: tpm_dir_of}[kind](vm_dir, name)


def vars_path(cfg: Config) -> Path:
    """This VM's UEFI variable store."""
    return vars_path_of(cfg.vm_dir, cfg.hostname)


def tpm_dir(cfg: Config) -> Path:
    """This VM's TPM state directory."""
    return tpm_dir_of(cfg.vm_dir, cfg.hostname)


def own_files(cfg: Config) -> tuple[OwnFile, ...]:
    """The VM's own files on VM_DIR for ``cfg``, the pet disk first."""
    files = [
        OwnFile(DISK, cfg.pet_path, None, False, "made by qemu-img on the base image (or restored)"),
        OwnFile(
            MACHINE,
            machine_path_of(cfg.vm_dir, cfg.hostname),
            0o644,
            False,
            "written on the first start: VM_MACHINE's versioned name then, kept across upgrades of qemu",
        ),
    ]
    hw = cfg.hardware
    if hw.uefi and hw.ovmf_vars is not None:
        files.append(
            OwnFile(
                UEFI_VARS,
                vars_path(cfg),
                0o600,
                False,
                "copied once from the firmware's variable template, never overwritten",
                hw.ovmf_vars,
            )
        )
    if hw.tpm:
        files.append(
            OwnFile(TPM_STATE, tpm_dir(cfg), 0o700, True, "made empty by the runner; swtpm keeps its state there")
        )
    if cfg.on_stop == "suspend":
        files.append(
            OwnFile(
                SUSPENDED,
                cfg.vm_dir / f"{cfg.hostname}.suspended",
                0o600,
                False,
                "the running VM saved on SIGTERM (ON_STOP=suspend), taken up once by the next start",
            )
        )
    files += [
        OwnFile(
            DATA_DISK,
            disk.path,
            0o600,
            False,
            f"made once by qemu-img ({disk.format}, {disk.size} bytes, {disk.bus}), grown but never shrunk; bound to "
            f"this VM by {disk.owner_path.name}",
            volume=disk.directory,
            name=disk.name,
        )
        for disk in cfg.data_disks
    ]
    return tuple(files)


def own_state(cfg: Config) -> list[dict[str, object]]:
    """The VM's own files as ``status`` and ``plan`` show them: what each is, where, and whether it is there yet."""
    return [
        {
            "kind": own.kind,
            "path": str(own.path),
            "mode": None if own.mode is None else f"{own.mode:04o}",
            "created": own.created,
            "template": None if own.template is None else str(own.template),
            "exists": own.path.exists(),
            **({"name": own.name, "volume": str(own.volume)} if own.kind == DATA_DISK else {}),
        }
        for own in own_files(cfg)
    ]
