"""Two data disks end to end, one scenario: the real sidecar, the real runner (uid 10001, TCG) and the tiny guest,
which finds each disk by its serial (the disk's name) and keeps a marker in its first sector.

Boot: both disks are made empty; the guest writes A to both, a backup takes one point of the pet and both disks,
the guest writes B to both; then the data disk ``share``, on a small tmpfs of its own, fills its volume under a
write of the guest: the VM pauses with one line naming it and resumes once there is room. A restart keeps B on both
disks (never recreated); a runner of another VM is refused the disks; the restore of the point brings back A on both
disks (the same instant), bound to this VM again."""

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.scenario import Scenario, pod_scenario

pytestmark = pytest.mark.guest

HOSTNAME = "pet-disks"
SHARE_TMPFS_MIB = 40
ROOM_LEFT_MIB = 4  # what the ballast leaves free on share's volume: less than the guest's write
FILL_KIB = 8192


def ask(s: Scenario, path: str, timeout: float = 60) -> dict[str, str]:
    """A guest CGI's ``key=value`` lines."""
    argv = ["curl", "-sf", "--max-time", str(int(timeout)), f"http://{s.net.pod_ip}/cgi-bin/{path}"]
    done = harness.in_ns(s.bed.client.ns, argv, timeout=timeout + 10)
    assert done.returncode == 0, (path, done.stderr)
    return dict(line.split("=", 1) for line in done.stdout.decode().splitlines() if "=" in line)


def markers(s: Scenario) -> dict[str, str]:
    """Each data disk's marker as the guest reads it from the disk: serial -> value ("-": none)."""
    line = ask(s, "disks")["disks"]
    return dict(entry.split(":", 1) for entry in line.split(",") if ":" in entry)


def marker_on_file(path: Path) -> str:
    """The marker in the first sector of a data disk file, read on the host."""
    done = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", "read -v 0 32", str(path)], capture_output=True, text=True, check=True
    )
    dump = [line.split(":", 1)[1].split()[:16] for line in done.stdout.splitlines() if line[:8].isalnum()]
    sector = bytes(int(byte, 16) for row in dump for byte in row).split(b"\n", 1)[0].decode(errors="replace")
    return sector.removeprefix("podvm-mark ") if sector.startswith("podvm-mark ") else "-"


@dataclass
class Seen:
    """What the scenario saw."""

    fresh: dict[str, str]
    after_a: dict[str, str]
    backup: subprocess.CompletedProcess[str]
    after_b: dict[str, str]
    status: dict[str, object]
    paused_log: list[str]
    paused_state: object
    filled: dict[str, str]
    resumed_log: list[str]
    first_stop: int
    after_restart: dict[str, str]
    second_stop: int
    other: tuple[int | None, str]
    restore: subprocess.CompletedProcess[str]
    restored: dict[str, str]
    owners: dict[str, object]
    manifest: dict[str, object]


@pytest.fixture(scope="module")
def seen() -> Iterator[Seen]:
    with pod_scenario("e2e-disks", hostname=HOSTNAME, image=ensure_guest()) as s:
        db = s.base / "data-db"
        db.mkdir()
        os.chown(db, harness.RUNNER_UID, harness.RUNNER_UID)
        with harness.small_tmpfs(s.base / "data-share", SHARE_TMPFS_MIB) as share:
            env = s.env(DATA_DISKS=f"db:{db}:64M:virtio,share:{share}:64M:virtio:qcow2", VM_DIR_MIN_FREE="8M")
            runner = s.boot("first.log", env)
            fresh = markers(s)
            for disk in ("db", "share"):
                assert ask(s, f"mark?{disk}.a")["mark"] == f"{disk}:a"
            after_a = markers(s)
            backup = s.vmrunner(env, "backup")
            for disk in ("db", "share"):
                ask(s, f"mark?{disk}.b")
            after_b = markers(s)
            status = json.loads(s.vmrunner(env, "status").stdout)
            ballast = share / "ballast"
            room = os.statvfs(share).f_bavail * os.statvfs(share).f_frsize
            ballast.write_bytes(b"\xff" * (room - ROOM_LEFT_MIB * (1 << 20)))
            url = f"http://{s.net.pod_ip}/cgi-bin/diskfill?share.{FILL_KIB}"
            writer = subprocess.Popen(
                ["ip", "netns", "exec", s.bed.client.ns, "curl", "-sf", "--max-time", "180", url],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                runner.wait_for("is full", 60)
                paused_state = json.loads(s.vmrunner(env, "status").stdout)["state"]
                time.sleep(7)  # two looks of the watch: no resume while the volume is still full
                paused_log = [line for line in runner.text().splitlines() if "is full" in line]
                ballast.unlink()
                runner.wait_for("resuming the VM", 30)
                answer, _ = writer.communicate(timeout=180)
            finally:
                writer.kill()
            filled = dict(line.split("=", 1) for line in answer.splitlines() if "=" in line)
            resumed_log = [line for line in runner.text().splitlines() if "resuming the VM" in line]
            first_stop = s.stop(runner)

            runner = s.boot("second.log", env)
            after_restart = markers(s)
            second_stop = s.stop(runner)

            other = s.start("other.log", {**env, "HOSTNAME": "pet-intruder"})
            try:
                code = other.popen.wait(120)
            except subprocess.TimeoutExpired:
                code = None
            other_log = other.text()

            found = sorted((s.dirs["backup"] / HOSTNAME).glob("*/manifest.json"))
            manifest = json.loads(found[0].read_text()) if found else {}
            restore = s.vmrunner(env, "restore", "--overwrite")
            restored = {d: marker_on_file(p / f"{d}.qcow2") for d, p in (("db", db), ("share", share))}
            owners = {d: json.loads((p / f".{d}.owner").read_text()) for d, p in (("db", db), ("share", share))}
            yield Seen(
                fresh, after_a, backup, after_b, status, paused_log, paused_state, filled, resumed_log, first_stop,
                after_restart, second_stop, (code, other_log), restore, restored, owners, manifest,
            )  # fmt: skip


def test_both_disks_are_made_empty_and_the_guest_finds_each_by_its_serial(seen: Seen) -> None:
    assert seen.fresh == {"db": "-", "share": "-"}
    assert seen.after_a == {"db": "a", "share": "a"}
    shown = {d["name"]: d for d in seen.status["data_disks"]}  # type: ignore[attr-defined]
    assert set(shown) == {"db", "share"}
    assert all(d["exists"] and d["owner"] == HOSTNAME and d["virtual_size"] == 64 << 20 for d in shown.values())


def test_the_metrics_have_each_data_disk_as_a_drive_of_its_own(seen: Seen) -> None:
    written = {
        f["labels"].get("drive"): f["value"]
        for f in seen.status["figures"]  # type: ignore[attr-defined]
        if f["name"] == "podvm_vm_storage_write_traffic_bytes_total"
    }
    assert written.get("data-db", 0) >= 1024 and written.get("data-share", 0) >= 1024, written
    assert "disk0" in written, "the pet's drive as before"


def test_one_backup_point_holds_the_pet_and_both_disks(seen: Seen) -> None:
    assert seen.backup.returncode == 0, seen.backup.stderr
    points = seen.manifest["points"]
    assert isinstance(points, list) and len(points) == 1
    assert points[0]["disks"] == {"db": "0000-full.db.qcow2", "share": "0000-full.share.qcow2"}
    assert seen.manifest["data_disks"] == {"db": 64 << 20, "share": 64 << 20}


def test_a_full_data_disk_volume_pauses_and_resumes_the_vm(seen: Seen) -> None:
    assert len(seen.paused_log) == 1, seen.paused_log
    assert "DATA_DISKS share=" in seen.paused_log[0] and "qemu paused the VM" in seen.paused_log[0]
    assert seen.paused_state == "io-error"
    assert len(seen.resumed_log) == 1, seen.resumed_log
    assert seen.filled == {"filled": str(FILL_KIB * 1024)}
    assert seen.first_stop == harness.GRACEFUL_EXIT


def test_the_markers_survive_a_restart(seen: Seen) -> None:
    assert seen.after_b == {"db": "b", "share": "b"}
    assert seen.after_restart == {"db": "b", "share": "b"}, "never recreated"
    assert seen.second_stop == harness.GRACEFUL_EXIT


def test_a_runner_of_another_vm_is_refused_the_disks(seen: Seen) -> None:
    code, log = seen.other
    assert code == 2, log
    assert f"belongs to the VM {HOSTNAME!r} (.db.owner), not to HOSTNAME=pet-intruder; refused" in log


def test_the_restore_brings_back_both_disks_at_the_backups_instant(seen: Seen) -> None:
    assert seen.restore.returncode == 0, seen.restore.stderr
    assert seen.restored == {"db": "a", "share": "a"}
    assert seen.owners == {d: {"vm": HOSTNAME, "made": True} for d in ("db", "share")}
