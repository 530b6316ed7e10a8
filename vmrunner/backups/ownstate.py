"""The VM's own files beside its disk (its machine type, UEFI variables, TPM state) in every backup point and restore.

They follow :func:`vmrunner.pet.state.own_files`, the one list of what the VM keeps. A backup copies them while the
VM is paused for the instant of the disk's transaction, so the disk, the variables and the TPM are of one instant (a
Windows guest whose BitLocker key is sealed in the TPM needs exactly the TPM of its disk). A point whose copy equals
the point before it names that copy instead of storing another. Every file is read and written through the volumes'
descriptors (:mod:`shared.files`): the backup volume is shared with other pods.
"""

import contextlib
import os
from pathlib import Path

from shared import files
from shared.errors import PodvmError
from vmrunner.backups.plans import Chain, Point, own_file
from vmrunner.config import Config
from vmrunner.pet.state import COPIED, MACHINE, TPM_OWNER, TPM_STATE, own_files, path_of

STATE_MAX = 64 << 20  # bytes one own file may hold: OVMF's stores are 2-4 MiB, swtpm's state some KiB
_SKIPPED = (TPM_OWNER, ".lock")  # in the TPM's folder: this VM's name (written anew on restore) and swtpm's lock


def _read_tree(root: Path, path: Path, directory: bool) -> dict[str, bytes]:
    """A file's bytes (under the name "") or a folder's regular files by name, read without following a link."""
    if not directory:
        return {"": files.read_small(path, STATE_MAX, root=root)}
    names = [n for n in files.list_below(root, path) if n not in _SKIPPED]
    return {n: files.read_small(path / n, STATE_MAX, root=root) for n in names}


def _write_tree(root: Path, path: Path, content: dict[str, bytes]) -> None:
    """Write what :func:`_read_tree` read to ``path`` (a new folder of mode 0700 for a folder's files)."""
    if set(content) == {""}:
        files.write_atomic(path, content[""], 0o600, root=root)
        return
    parent = files.open_below(root, path.parent)
    try:
        os.mkdir(path.name, 0o700, dir_fd=parent)
    finally:
        os.close(parent)
    for name, data in content.items():
        files.write_atomic(path / name, data, 0o600, root=root)


def capture(cfg: Config, chain: Path, seq: int, previous: Point | None) -> dict[str, str]:
    """Copy the VM's own files into the chain folder for point ``seq`` (the VM paused by the caller): their names
    by kind, for the point's record.

    :raise PodvmError: when one cannot be read or written.
    """
    taken: dict[str, str] = {}
    for own in own_files(cfg):
        if own.kind not in COPIED or (own.kind == MACHINE and files.stat_below(cfg.vm_dir, own.path) is None):
            continue  # the disk is the job's; a saved RAM image is never backed up; a VM never started has no pin
        try:
            content = _read_tree(cfg.vm_dir, own.path, own.directory)
            before = previous.own.get(own.kind) if previous is not None else None
            if before is not None and _read_tree(cfg.backup_dir, chain / before, own.directory) == content:
                taken[own.kind] = before
                continue
            name = own_file(seq, own.kind)
            _write_tree(cfg.backup_dir, chain / name, content)
            taken[own.kind] = name
        except (OSError, files.Forged) as err:
            raise PodvmError(f"backup: cannot copy the VM's {own.kind} ({own.path}): {err}") from None
    return taken


def restore_own(cfg: Config, chain_dir: Path, chain: Chain, point: Point, name: str) -> list[Path]:
    """Put the point's own files back for the VM ``name`` on VM_DIR (each replaced whole: written beside, then
    renamed over the old one); the paths written.

    :raise PodvmError: when a copy in the backup is missing or forged.
    """
    written = []
    for kind, stored in sorted(point.own.items()):
        directory = kind == TPM_STATE
        target = path_of(cfg.vm_dir, name, kind)
        try:
            content = _read_tree(cfg.backup_dir, chain_dir / stored, directory)
        except (OSError, files.Forged) as err:
            raise PodvmError(
                f"{chain_dir / stored}: the {kind} of point {chain.point_id(point)} cannot be read: {err}"
            ) from None
        if directory:
            content[TPM_OWNER] = f"{name}\n".encode()
            staging = target.with_name(f".{target.name}.restore.tmp")
            files.remove_below(cfg.vm_dir, staging)
            _write_tree(cfg.vm_dir, staging, content)
            old = target.with_name(f".{target.name}.old")
            files.remove_below(cfg.vm_dir, old)
            with contextlib.suppress(FileNotFoundError):
                files.rename_below(cfg.vm_dir, target, old.name)
            files.rename_below(cfg.vm_dir, staging, target.name)
            files.remove_below(cfg.vm_dir, old)
        else:
            _write_tree(cfg.vm_dir, target, content)
        files.fsync_directory(cfg.vm_dir)
        written.append(target)
    return written
