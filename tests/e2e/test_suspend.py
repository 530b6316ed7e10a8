"""Suspend on stop and resume on start, end to end: the real sidecar, the real runner (uid 10001, TCG), the tiny
guest, ``ON_STOP=suspend``.

One pod, its network torn down and made again between runs (a new pod on the same volume). The guest keeps a value
in RAM only: after SIGTERM and a new start it still serves it, with the same kernel boot id and its uptime gone on,
and its serial console shows no boot. Then each way a saved state must not be used: a start after a resumed run
that was killed (single use), a changed memory setting (seen by ``plan``), a stream with one byte flipped, a disk
written while the VM was away, a save whose budget is too short (the guest is shut down instead), and a runner
killed mid-save: each a cold boot with one line naming why, and the pet passing ``qemu-img check``.
"""

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.pod import Proc
from tests.harness.scenario import BOOT_TIMEOUT, Scenario, pod_scenario
from tests.harness.wait import until

pytestmark = pytest.mark.guest

HOSTNAME = "sleeper-0"
RESUMED = "resumed the saved state"
SUSPENDED = "suspended: "
SMALL_VM_DIR_MIB = 48  # a VM_DIR for the pet, filled up to SMALL_LEFT: the stream (about 100 MiB) cannot fit
SMALL_LEFT = 4 << 20


def ram(s: Scenario, value: str = "") -> dict[str, str]:
    """The guest's RAM-only value (set to ``value`` first when given), boot id and uptime."""
    argv = ["curl", "-sf", "--max-time", "10", f"http://{s.net.pod_ip}/cgi-bin/ram?{value}"]

    def answered() -> subprocess.CompletedProcess[bytes] | None:
        done = harness.in_ns(s.bed.client.ns, argv, timeout=20)
        return done if done.returncode == 0 else None

    done = until("the guest's RAM page", answered, 60, 0.5)
    return dict(line.split("=", 1) for line in done.stdout.decode().splitlines() if "=" in line)


def new_pod(s: Scenario) -> None:
    """What a new pod on the same volumes has: a fresh sidecar and an empty RUN_DIR."""
    s.sidecar.term()
    for entry in s.dirs["run"].iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    s.start_sidecar()


def check(pet: Path) -> int:
    """``qemu-img check`` of the pet: 0, or 3 for leaked clusters only (a kill between two metadata writes)."""
    return subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(pet)], check=False).returncode


@dataclass
class World:
    """What the pod's runs showed."""

    before: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, int] = field(default_factory=dict)
    files_after_save: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    backups: list[str] = field(default_factory=list)
    pinned_first: str = ""
    files_no_room: list[str] = field(default_factory=list)
    plan_no_room: dict[str, Any] = field(default_factory=dict)


def _run(s: Scenario, world: World, name: str, env: dict[str, str], ready: str = harness.READY) -> Proc:
    runner = s.start(f"{name}.log", env)
    runner.wait_for(ready, BOOT_TIMEOUT)
    return runner


def _stop(s: Scenario, world: World, name: str, runner: Proc) -> None:
    world.codes[name] = s.stop(runner)
    world.logs[name] = runner.text()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    seen = World()
    with pod_scenario("suspend", hostname=HOSTNAME, image=ensure_guest()) as s:
        env = s.env(ON_STOP="suspend", SUSPEND_TIMEOUT="60s")
        pet = s.dirs["vm"] / f"{HOSTNAME}.qcow2"

        runner = _run(s, seen, "first", env)
        seen.before = ram(s, "kept0in0ram")
        seen.backups.append(s.vmrunner(env, "backup").stderr)
        _stop(s, seen, "first", runner)
        seen.files_after_save = sorted(p.name for p in s.dirs["vm"].iterdir() if "suspend" in p.name)
        seen.plan = json.loads(s.vmrunner(env, "plan").stdout)
        seen.plan["memory changed"] = json.loads(s.vmrunner({**env, "VM_MEMORY": "320M"}, "plan").stdout)["resume"]
        # As a release without the machine pin saved it: on the alias, with no pin beside the pet. The guest must
        # resume on the versioned machine it ran on, which becomes its pin.
        saved = s.dirs["vm"] / f"{HOSTNAME}.suspended.json"
        seen.pinned_first = json.loads((s.dirs["vm"] / f"{HOSTNAME}.machine.json").read_text())["machine"]
        saved.write_text(json.dumps({**json.loads(saved.read_text()), "machine": "pc"}))
        (s.dirs["vm"] / f"{HOSTNAME}.machine.json").unlink()

        new_pod(s)
        runner = _run(s, seen, "resumed", env, RESUMED)
        seen.after = ram(s)
        seen.backups.append(s.vmrunner(env, "backup").stderr)
        seen.status = json.loads(s.vmrunner(env, "status").stdout)
        runner.kill()  # no save: the state it was resumed from is spent
        seen.logs["resumed"] = runner.text()

        new_pod(s)
        runner = _run(s, seen, "after kill", env)  # cold: the claimed state is never taken up twice
        _stop(s, seen, "after kill", runner)
        stream = s.dirs["vm"] / f"{HOSTNAME}.suspended"
        with open(stream, "r+b") as f:  # one byte flipped in the middle of the stream
            f.seek(stream.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x40]))

        new_pod(s)
        runner = _run(s, seen, "flipped", env)
        _stop(s, seen, "flipped", runner)
        io = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 60M 64k", str(pet)]
        subprocess.run([*harness.AS_RUNNER, *io], check=True, capture_output=True)

        new_pod(s)
        runner = _run(s, seen, "disk written", env)
        _stop(s, seen, "disk written", runner)  # saved again

        new_pod(s)
        short = {**env, "SUSPEND_TIMEOUT": "0.001s"}  # not hardware: resumed; a save takes longer
        runner = _run(s, seen, "short budget", short, RESUMED)
        _stop(s, seen, "short budget", runner)

        new_pod(s)
        runner = _run(s, seen, "killed mid-save", env)
        before = len(runner.text())
        runner.popen.send_signal(signal.SIGTERM)
        runner.wait_for("saving the VM's devices and RAM", 30, before)
        runner.kill()
        seen.logs["killed mid-save"] = runner.text()
        seen.checks["killed mid-save"] = check(pet)

        new_pod(s)
        runner = _run(s, seen, "after mid-save kill", env)
        _stop(s, seen, "after mid-save kill", runner)
        seen.checks["end"] = check(pet)

        new_pod(s)  # a VM_DIR with no room for the save: the guest is shut down instead, nothing half-saved is left
        with harness.small_tmpfs(s.base / "vm-small", SMALL_VM_DIR_MIB) as small:
            on_small = {**env, "VM_DIR": str(small)}
            runner = _run(s, seen, "no room", on_small)
            room = os.statvfs(small)
            (small / "filler").write_bytes(bytes(room.f_bavail * room.f_frsize - SMALL_LEFT))
            _stop(s, seen, "no room", runner)
            (small / "filler").unlink()
            seen.files_no_room = sorted(p.name for p in small.iterdir())
            seen.plan_no_room = json.loads(s.vmrunner(on_small, "plan").stdout)
            seen.checks["no room"] = check(small / f"{HOSTNAME}.qcow2")
        yield seen


def test_a_suspended_vm_resumes_in_the_next_pod_with_its_ram(world: World) -> None:
    assert world.codes["first"] == 0 and SUSPENDED in world.logs["first"], world.logs["first"][-2000:]
    assert world.files_after_save == [f"{HOSTNAME}.suspended", f"{HOSTNAME}.suspended.json"]
    assert world.plan["resume"]["resumes"] is True
    assert world.after["ram"] == "kept0in0ram"
    assert world.after["boot_id"] == world.before["boot_id"]
    assert float(world.after["uptime"]) >= float(world.before["uptime"])
    assert "podvm-guest: booted" not in world.logs["resumed"]
    assert world.status["state"] == "running" and world.status["suspend"].startswith("resumed in ")


def test_a_state_saved_on_the_alias_before_any_pin_resumes_and_pins_that_machine(world: World) -> None:
    assert world.pinned_first.startswith("pc-i440fx-"), world.pinned_first
    assert f"machine type pc pinned as {world.pinned_first}" in world.logs["resumed"]
    assert f"-machine {world.pinned_first} " in world.logs["resumed"]


def test_the_backup_after_a_resume_is_incremental(world: World) -> None:
    assert " done: full," in world.backups[0], world.backups[0][-1000:]
    assert " done: incremental," in world.backups[1], world.backups[1][-1000:]


def test_the_guest_s_clock_is_set_after_the_resume(world: World) -> None:
    assert "the guest's clock was set to the host's" in world.logs["resumed"]


def test_a_saved_state_is_used_once(world: World) -> None:
    log = world.logs["after kill"]
    assert "podvm-guest: booted" in log and RESUMED not in log


def test_a_changed_memory_setting_means_a_cold_boot(world: World) -> None:
    assert world.plan["memory changed"] == {
        "resumes": False,
        "why": "the VM's hardware settings changed since the save (memory, CPUs, devices or firmware)",
    }


@pytest.mark.parametrize(
    ("run", "why"),
    [
        ("flipped", "the stream is damaged"),
        ("disk written", f"{HOSTNAME}.qcow2 changed since the save"),
    ],
)
def test_a_damaged_stream_or_a_disk_written_since_means_a_cold_boot_saying_why(
    world: World, run: str, why: str
) -> None:
    log = world.logs[run]
    assert f"suspended state of {HOSTNAME} discarded: {why}" in log
    assert "podvm-guest: booted" in log and RESUMED not in log


def test_a_save_past_its_budget_shuts_the_guest_down_instead(world: World) -> None:
    log = world.logs["short budget"]
    assert "suspend failed: SUSPEND_TIMEOUT=0.001s" in log
    assert "guest powered off" in log and world.codes["short budget"] == 0


def test_a_runner_killed_mid_save_leaves_a_clean_cold_boot(world: World) -> None:
    log = world.logs["after mid-save kill"]
    assert "podvm-guest: booted" in log and RESUMED not in log
    assert world.checks["killed mid-save"] in (0, 3) and world.checks["end"] in (0, 3)  # 3: leaked clusters only


def test_a_save_without_room_on_vm_dir_shuts_the_guest_down_and_leaves_nothing_half_saved(world: World) -> None:
    log = world.logs["no room"]
    assert "suspend failed: qemu could not save the VM" in log, log[-3000:]
    assert "guest powered off" in log and world.codes["no room"] == 0
    assert [name for name in world.files_no_room if "suspend" in name] == []
    assert world.plan_no_room["resume"] is None  # the next start boots cold from the disk
    assert world.checks["no room"] == 0
