"""A neighbour on the backup volume acting between the backup's checks and its use of the target, against a real
qemu (a paused machine holding the pet disk: the backup job needs no guest) and the real qemu-img."""

import asyncio
import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.errors import PodvmError
from tests.harness.pod import runner_env
from vmrunner.backups import job, plans
from vmrunner.config import Config, load
from vmrunner.qemu import img, qmp
from vmrunner.run.argv import PET_NODE, RunPaths


@pytest.fixture
def backed_up(shared_dir: Path) -> Iterator[Config]:
    """A runner's configuration with a backup volume, and a qemu holding its pet disk as the runner's node."""
    pet = shared_dir / "vm" / "vm-0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(pet), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 1M", str(pet)], check=True, capture_output=True)
    (shared_dir / "backup").mkdir()
    cfg = load(runner_env(shared_dir, BACKUP_DIR=str(shared_dir / "backup")), image=False)
    qmp = RunPaths.of(cfg.run_dir).qmp
    drive = f"file={pet},if=none,id=disk0,node-name={PET_NODE},format=qcow2"
    argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S"]
    qemu = subprocess.Popen([*argv, "-qmp", f"unix:{qmp},server=on,wait=off", "-drive", drive])
    try:
        deadline = time.monotonic() + 10
        while not qmp.exists() and qemu.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qmp.exists(), "qemu did not start"
        yield cfg
    finally:
        qemu.kill()
        qemu.wait()


def planting(monkeypatch: pytest.MonkeyPatch, act: Callable[[plans.BackupPlan], None]) -> None:
    """Run the neighbour's ``act`` right after the backup planned its target, before anything is made."""
    real = plans.plan_backup

    def plan_then_act(*args: object, **kwargs: object) -> plans.BackupPlan:
        plan = real(*args, **kwargs)  # type: ignore[arg-type]
        act(plan)
        return plan

    monkeypatch.setattr(plans, "plan_backup", plan_then_act)


def test_a_link_planted_at_the_target_name_gets_nothing_written_through_it(
    backed_up: Config, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = shared_dir / "vm" / "victim"
    victim.write_bytes(b"the VM's own bytes")

    def plant(plan: plans.BackupPlan) -> None:
        plan.directory.mkdir(parents=True, exist_ok=True)
        plan.partial.symlink_to(victim)

    planting(monkeypatch, plant)
    with pytest.raises(PodvmError, match=r"^BACKUP_DIR=.*: File exists: .*\.0000-full\.qcow2\.partial$") as caught:
        asyncio.run(job.run_backup(backed_up))
    assert "\n" not in str(caught.value)
    assert victim.read_bytes() == b"the VM's own bytes"


def test_a_chain_folder_swapped_for_a_link_during_the_backup_gets_nothing_written_through_it(
    backed_up: Config, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the target exists the neighbour moves the chain folder away and links its name to a folder of its own
    holding a file under the target's name: qemu still writes the runner's file, nothing reaches the other folder."""
    elsewhere = shared_dir / "elsewhere"
    elsewhere.mkdir()
    own = elsewhere / ".0000-full.qcow2.partial"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(own), "16M"], check=True)
    before = own.read_bytes()
    real = img.run_async

    async def create_then_swap(argv: tuple[str, ...], what: img.Job, **kwargs: int | None) -> str:
        out = await real(argv, what, **kwargs)
        directory = Path(what.subject).parent
        directory.rename(shared_dir / "moved")
        directory.symlink_to(elsewhere)
        return out

    monkeypatch.setattr(img, "run_async", create_then_swap)
    try:
        asyncio.run(job.run_backup(backed_up))
    except PodvmError as err:
        assert "\n" not in str(err) and "symbolic link" in str(err), err
    assert list(elsewhere.iterdir()) == [own] and own.read_bytes() == before, "nothing written through the link"
    written = [p for p in (shared_dir / "moved").iterdir() if p.name.endswith(".qcow2")]
    assert [p.name for p in written] == ["0000-full.qcow2"], "the backup went into the file the runner made"
    check = subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(written[0])], check=False)
    assert check.returncode == 0


def test_a_target_renamed_over_by_a_neighbour_is_refused_not_recorded(
    backed_up: Config, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The neighbour puts its own file under the target's name just before the rename: the name renamed into the
    chain is not the file qemu wrote, so it is removed and the backup fails in one line; no manifest names it."""
    real = job._rename

    def swap_then_rename(cfg: Config, plan: plans.BackupPlan, chain_fd: int, target: int) -> None:
        (plan.directory / ".neighbour").write_bytes(b"forged")
        os.replace(plan.directory / ".neighbour", plan.partial)
        real(cfg, plan, chain_fd, target)

    monkeypatch.setattr(job, "_rename", swap_then_rename)
    with pytest.raises(PodvmError, match=r"is not the file qemu wrote .*; removed it") as caught:
        asyncio.run(job.run_backup(backed_up))
    assert "\n" not in str(caught.value)
    root = plans.vm_root(backed_up.backup_dir, backed_up.hostname)
    assert list(root.glob("*/0000-full.qcow2")) == []
    assert list(root.glob(f"*/{plans.MANIFEST}")) == []


def test_retention_through_a_backup_folder_swapped_for_a_link_removes_nothing_behind_it(
    backed_up: Config, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With BACKUP_KEEP=1 the second full backup removes the first chain. Just before, the neighbour moves the VM's
    backup folder away and links its name to a folder of its own holding a chain of that very name: the removal
    goes through no link, so the neighbour's folder keeps every file."""
    cfg = dataclasses.replace(backed_up, backup_keep=1)
    first = asyncio.run(job.run_backup(cfg, want_full=True))
    root = plans.vm_root(cfg.backup_dir, cfg.hostname)
    (chain,) = [p.name for p in root.iterdir() if p.is_dir()]
    elsewhere = shared_dir / "elsewhere"
    (elsewhere / chain).mkdir(parents=True)
    (elsewhere / chain / "0000-full.qcow2").write_bytes(b"another VM's backup")
    real = plans.plan_retention

    def swap_then_plan(chains: list[plans.Chain], keep: int) -> list[str]:
        planned = real(chains, keep)
        root.rename(shared_dir / "moved")
        root.symlink_to(elsewhere)
        return planned

    monkeypatch.setattr(plans, "plan_retention", swap_then_plan)
    try:
        asyncio.run(job.run_backup(cfg, want_full=True))
    except PodvmError as err:
        assert "\n" not in str(err), err
    assert first.kind == "full"
    assert (elsewhere / chain / "0000-full.qcow2").read_bytes() == b"another VM's backup"


def test_an_incremental_refused_after_its_copy_makes_the_next_backup_full_not_one_missing_its_changes(
    backed_up: Config, shared_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The neighbour's swap comes once the incremental's job has succeeded, so qemu has already cleared the copied
    changes from the chain's bitmap: the runner removes the bitmap, and the next backup is a full one (an incremental
    on the last recorded point would silently lack the changes of the refused one)."""
    assert asyncio.run(job.run_backup(backed_up)).kind == "full"
    monitor = RunPaths.of(backed_up.run_dir).qmp
    write: dict[str, object] = {"command-line": 'qemu-io disk0 "write -P 0xbb 2M 1M"'}
    assert asyncio.run(qmp.execute(monitor, "human-monitor-command", 10, write)) == ""
    real = job._rename

    def swap_then_rename(cfg: Config, plan: plans.BackupPlan, chain_fd: int, target: int) -> None:
        (plan.directory / ".neighbour").write_bytes(b"forged")
        os.replace(plan.directory / ".neighbour", plan.partial)
        real(cfg, plan, chain_fd, target)

    with monkeypatch.context() as patched:
        patched.setattr(job, "_rename", swap_then_rename)
        with pytest.raises(PodvmError, match=r"is not the file qemu wrote"):
            asyncio.run(job.run_backup(backed_up))
    assert "the point was not recorded; the next backup is a full one" in caplog.text
    after = asyncio.run(job.run_backup(backed_up))
    assert after.kind == "full", after
    assert after.copied == 16 << 20, "the whole disk copied again, the changes of the refused point with it"


MARGIN_KIB = 2048  # the target's header and tables, not the 8 MiB of changes the incremental copies


@pytest.fixture
def failing_volume(backed_up: Config, shared_dir: Path) -> Iterator[Callable[[int], None]]:
    """BACKUP_DIR on a real ext4 whose device loses its writes on demand: a loop device over a file on a tmpfs,
    which ``full(margin_kib)`` makes too small for the device's blocks not yet written but for that margin, so their
    write-back fails as on a failing disk: the page cache takes the writes, the fsync gets the device's error.
    The teardown detaches lazily, as qemu may still hold the target."""
    backing = shared_dir / "backing"
    backing.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "podvm-test", str(backing)], check=True)
    device = ""
    try:
        subprocess.run(["truncate", "-s", "48M", str(backing / "volume")], check=True)
        device = subprocess.run(
            ["losetup", "--find", "--show", str(backing / "volume")], capture_output=True, text=True, check=True
        ).stdout.strip()
        # Every block of metadata written now, so that only the backups' data find the device failing later.
        init = "lazy_itable_init=0,lazy_journal_init=0,nodiscard"
        subprocess.run(["mkfs.ext4", "-q", "-E", init, device], check=True)
        subprocess.run(["mount", device, str(backed_up.backup_dir)], check=True)

        def full(margin_kib: int) -> None:
            subprocess.run(["sync"], check=True)
            size = os.stat(backing / "volume").st_blocks // 2 + margin_kib
            subprocess.run(["mount", "-o", f"remount,size={size}k", str(backing)], check=True)

        yield full
    finally:
        if device:
            subprocess.run(["umount", "--lazy", str(backed_up.backup_dir)], check=False)
            subprocess.run(["losetup", "--detach", device], check=False)  # once its last user is gone
        subprocess.run(["umount", "--lazy", str(backing)], check=False)


def test_a_backup_volume_failing_its_write_out_refuses_the_point_and_drops_the_chain_bitmap(
    backed_up: Config, failing_volume: Callable[[int], None], caplog: pytest.LogCaptureFixture
) -> None:
    """The device under BACKUP_DIR fails the incremental's write-back: the fsync before the chain reports it, the
    point is not recorded, and the chain's bitmap is gone, so the next backup copies the whole disk."""
    assert asyncio.run(job.run_backup(backed_up)).kind == "full"
    monitor = RunPaths.of(backed_up.run_dir).qmp

    def chain_bitmaps() -> list[str]:
        nodes = asyncio.run(qmp.execute(monitor, "query-named-block-nodes", 10, {"flat": True}))
        return [b.name for b in plans.parse_bitmaps(nodes) if b.name.startswith(plans.BITMAP_PREFIX)]

    assert len(chain_bitmaps()) == 1
    write: dict[str, object] = {"command-line": 'qemu-io disk0 "write -P 0xcc 4M 8M"'}
    assert asyncio.run(qmp.execute(monitor, "human-monitor-command", 10, write)) == ""
    failing_volume(MARGIN_KIB)
    lost = "(Input/output error|No space left on device)"
    refused = rf"^BACKUP_DIR=.*: cannot write .*/\.0001-incremental\.qcow2\.partial out: {lost}$"
    with pytest.raises(PodvmError, match=refused) as err:
        asyncio.run(job.run_backup(backed_up))
    assert "\n" not in str(err.value)
    assert "the point was not recorded; the next backup is a full one" in caplog.text
    # The failed write-back may leave the file system read-only, so the proof is qemu's: no chain bitmap is left,
    # which makes the next backup a full one (as the neighbour's refusal above shows end to end).
    assert chain_bitmaps() == []


def test_a_target_the_volume_cannot_create_leaves_the_standard_input_link_alone(
    backed_up: Config, failing_volume: Callable[[int], None]
) -> None:
    """qemu-img removes a file it failed to create: the target is named inside procfs, so as root it could not
    remove /dev/stdin (which it did when the target was named so, and the next backup then wrote a file there)."""
    failing_volume(0)
    with pytest.raises(PodvmError, match=r"^BACKUP_DIR=.*: no space left on device while creating the backup target$"):
        asyncio.run(job.run_backup(backed_up))
    assert Path("/dev/stdin").is_symlink()
