"""Restore and the backup lock with real qemu-img, on a chain built by hand the way ``vmrunner backup`` lays it out
(docs/backups.md): every point restores to exactly its bytes, never over a disk without being told nor over one a
process holds, and two backups never run at once. No guest boots here."""

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import ConfigError, PodvmError
from tests.harness.paths import VMRUNNER
from tests.harness.pod import runner_env
from vmrunner.backups import plans
from vmrunner.backups.job import locked
from vmrunner.backups.plans import Chain, Point
from vmrunner.backups.restore import restore
from vmrunner.config import Config, load

CHAIN = "20261128T040000Z"
SIZE = 16 << 20


def qemu(*argv: str) -> None:
    subprocess.run(argv, capture_output=True, check=True)


def raw_digest(path: Path) -> str:
    """What a guest would read from the disk ``path`` (through its chain, without locking it): its bytes' digest."""
    raw = path.with_name(f"{path.name}.raw")
    qemu("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    try:
        return hashlib.sha256(raw.read_bytes()).hexdigest()
    finally:
        raw.unlink()


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Config, list[str]]]:
    """A three-point chain (pattern 1 at 0, then 2 at 4M, then 3 at 8M) and each point's expected digest."""
    cfg = load(runner_env(tmp_path, BACKUP_DIR=str(tmp_path / "backup")), image=False)
    directory = tmp_path / "backup" / "vm-0" / CHAIN
    directory.mkdir(parents=True)
    cfg.vm_dir.mkdir()
    reference = tmp_path / "reference.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(reference), str(SIZE))
    points: list[Point] = []
    digests: list[str] = []
    for seq, offset in enumerate(("0", "4M", "8M")):
        kind = "full" if seq == 0 else "incremental"
        name = plans.point_file(seq, kind)
        backing = ["-F", "qcow2", "-b", points[-1].file] if points else []
        qemu("qemu-img", "create", "-q", "-f", "qcow2", *backing, str(directory / name), str(SIZE))
        for target in (directory / name, reference):
            qemu("qemu-io", "-f", "qcow2", "-c", f"write -P {seq + 1} {offset} 1M", str(target))
        points.append(Point(seq, kind, name, f"2026-11-28T04:0{seq}:00Z", 1795838400.0 + 60 * seq, 1, 1, 0.1, False))
        digests.append(raw_digest(reference))
    (directory / plans.MANIFEST).write_bytes(plans.manifest_document(Chain(CHAIN, SIZE, tuple(points))))
    yield cfg, digests


def test_every_point_restores_to_exactly_its_bytes_and_boots_standalone(chain: tuple[Config, list[str]]) -> None:
    cfg, digests = chain
    for seq, digest in enumerate(digests):
        dest = restore(cfg, f"{CHAIN}.{seq}", f"r{seq}", overwrite=False)
        assert dest == cfg.vm_dir / f"r{seq}.qcow2"
        assert raw_digest(dest) == digest
        info = subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", str(dest)], capture_output=True, text=True, check=True
        )
        assert "backing file" not in info.stdout, "a restored pet is standalone"
    assert sorted(p.name for p in cfg.vm_dir.iterdir()) == ["r0.qcow2", "r1.qcow2", "r2.qcow2"], "no leftovers"


def test_overwrite_only_when_told_and_never_under_a_running_process(chain: tuple[Config, list[str]]) -> None:
    cfg, digests = chain
    pet = restore(cfg, None, None, overwrite=False)  # the newest point, as <hostname>.qcow2
    assert pet == cfg.pet_path and raw_digest(pet) == digests[2]
    with pytest.raises(ConfigError, match="exists: restore beside it with --name NAME, or replace it with --overwrite"):
        restore(cfg, f"{CHAIN}.0", None, overwrite=False)
    trust = cfg.vm_dir / f".{pet.name}.base.json"
    trust.write_text("{}")  # the old disk's record of its base
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(pet)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        with pytest.raises(PodvmError, match="in use by a running qemu"):
            restore(cfg, f"{CHAIN}.0", None, overwrite=True)
    finally:
        holder.communicate(b"quit\n", timeout=10)
    assert raw_digest(pet) == digests[2], "untouched while in use"
    restore(cfg, f"{CHAIN}.0", None, overwrite=True)
    assert raw_digest(pet) == digests[0]
    assert not trust.exists(), "the replaced disk's base record went with it"


def test_the_command_line_says_one_line_for_a_missing_chain(tmp_path: Path) -> None:
    env = runner_env(tmp_path, BACKUP_DIR=str(tmp_path / "nothing"))
    done = subprocess.run([*VMRUNNER, "restore"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("no backup to restore: the backup volume holds no complete chain for this VM")
    assert len(done.stderr.strip().splitlines()) == 1


def test_two_backups_never_run_at_once(tmp_path: Path) -> None:
    cfg = load(runner_env(tmp_path, BACKUP_DIR=str(tmp_path / "backup")), image=False)
    root = plans.vm_root(cfg.backup_dir, cfg.hostname)
    with locked(cfg, root):
        done = subprocess.run(
            [*VMRUNNER, "backup"], env=runner_env(tmp_path, BACKUP_DIR=str(tmp_path / "backup")),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 1
        assert "another backup is running; this one is not started" in done.stderr
    with locked(cfg, root):
        pass  # free again once the first one ended


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_chain_swapped_after_it_was_read_is_refused_in_one_line_and_nothing_restored(
    chain: tuple[Config, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A neighbour acts once the manifest was read: it links the chain folder's name to a forged copy (every file
    checks out there), or puts a FIFO in place of the newest point. The checks read the files through descriptors
    opened below BACKUP_DIR without following a link: one line, never a hang, and no pet made."""
    cfg, _ = chain
    directory = tmp_path / "backup" / "vm-0" / CHAIN
    real = plans.select_point

    def select_then_swap(chains: list[Chain], wanted: str | None) -> tuple[Chain, Point]:
        selected = real(chains, wanted)
        if kind == "folder":
            forged = tmp_path / "forged"
            directory.rename(forged)
            qemu("qemu-io", "-f", "qcow2", "-c", "write -P 9 12M 1M", str(forged / selected[1].file))
            directory.symlink_to(forged)
        else:
            (directory / selected[1].file).unlink()
            os.mkfifo(directory / selected[1].file)
        return selected

    monkeypatch.setattr(plans, "select_point", select_then_swap)
    with pytest.raises(PodvmError, match=r"missing from the backup volume; point .* cannot be read$") as caught:
        restore(cfg, f"{CHAIN}.2", "r2", overwrite=False)
    assert "\n" not in str(caught.value)
    assert list(cfg.vm_dir.iterdir()) == []
