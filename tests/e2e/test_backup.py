"""Live backups of a running guest and their restores, end to end: the real sidecar, the real runner (uid 10001,
no capabilities, TCG), real qemu and qemu-img, the tiny guest writing known data.

One scenario, in the order a pet lives it (each boot serves many checks):

1. boot; write A, full backup; write B, incremental; write C, incremental;
   write D; an incremental stopped half-way by SIGTERM (cancelled cleanly), another killed half-way by SIGKILL
   (its outcome unknown: the next backup must be a full one, in a new chain); then a full backup stopped half-way by
   a SIGTERM of the runner (a restart during a backup);
2. boot the same pet again: the chain's bitmap survived the clean restart, so the backup is incremental; then qemu is
   killed with SIGKILL;
3. boot again: the bitmap is inconsistent, the backup is a full one and says why;
4. restore the first chain's three points into fresh VM_DIRs and boot each: exactly A, A+B, A+B+C; the last of these
   runs a BACKUP_INTERVAL schedule.
The guest runs Debian's qemu-guest-agent: the first backups freeze its (freezable) file system; then the agent is
stopped with SIGSTOP (it holds its port and never answers, a silent hostile agent): the backups go on unfrozen within
the agent's short timeouts and say so, and neither they nor the shutdown during a backup wait for it.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.pod import PodNet, Proc
from tests.harness.scenario import STOP_TIMEOUT, Scenario, pod_scenario

pytestmark = pytest.mark.guest

HOSTNAME = "pet-backup"
DATA_SIZE = 262144
PROGRESS = r"backup: \d+% \("


def data_md5(name: str) -> str:
    """The checksum of what the guest's /cgi-bin/put?NAME writes."""
    line = f"podvm-data {name}\n".encode()
    return hashlib.md5((line * (DATA_SIZE // len(line) + 1))[:DATA_SIZE]).hexdigest()  # noqa: S324 - busybox's


@dataclass
class Run:
    """A finished ``vmrunner backup`` or ``restore``: its exit status and log."""

    status: int
    log: str

    def chain(self) -> str:
        """The chain of the point the result line names."""
        return self.point().split(".", maxsplit=1)[0]

    def point(self) -> str:
        """The point the result line names."""
        match = re.search(r"backup (\S+) done: (full|incremental)", self.log)
        assert match, self.log
        return match.group(1)


@dataclass
class World:
    """Everything the scenario saw."""

    scenario: Scenario
    pod: PodNet
    dirs: dict[str, Path]
    runs: dict[str, Run] = field(default_factory=dict)
    pages: dict[str, dict[str, str]] = field(default_factory=dict)
    logs: list[Proc] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def chains(self) -> Path:
        """This VM's directory on the backup volume."""
        return self.dirs["backup"] / HOSTNAME

    def report(self) -> str:
        """Every log, for a failure's message."""
        runs = "\n".join(f"----- {name} ({r.status}) -----\n{r.log}" for name, r in self.runs.items())
        return f"{harness.report(*self.logs)}\n{runs}"


def _as_runner(env: Mapping[str, str], *args: str, timeout: float = 180) -> Run:
    """``vmrunner ARGS`` as uid 10001, as ``kubectl exec POD -c vm -- vmrunner ARGS`` runs it."""
    done = subprocess.run(
        [*harness.AS_RUNNER, str(harness.BIN / "vmrunner"), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Run(done.returncode, done.stderr + done.stdout)


def _interrupted(env: Mapping[str, str], log: Path, sig: int, *args: str) -> Run:
    """A slow ``vmrunner backup`` (BACKUP_SPEED) sent ``sig`` once its job reported progress: half-way, by
    construction, since at that speed the job needs many seconds more."""
    proc = harness.start("backup", [*harness.AS_RUNNER, str(harness.BIN / "vmrunner"), "backup", *args], env, log)
    try:
        proc.wait_for(PROGRESS, 60)
        os.killpg(proc.popen.pid, sig) if sig == signal.SIGKILL else proc.popen.send_signal(sig)
        status = proc.popen.wait(30)
    finally:
        if proc.popen.poll() is None:
            proc.kill()
    return Run(status, proc.text())


def _put(pod: PodNet, name: str) -> None:
    done = harness.in_ns(pod.client_ns, ["curl", "-sf", "--max-time", "30", f"http://{pod.pod_ip}/cgi-bin/put?{name}"])
    assert done.stdout.decode().strip() == f"put={name}", done


def data_of(page: Mapping[str, str]) -> dict[str, str]:
    """The guest's data files (name to md5) from its page, as it found them at boot."""
    return dict(item.split(":", 1) for item in page.get("data", "").split(",") if item)


def _boot(world: World, env: Mapping[str, str], name: str) -> Proc:
    runner = world.scenario.boot(name, env)
    world.pages[name] = harness.guest_page(world.pod)
    return runner


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False, timeout=60)


def _scenario(world: World, env: dict[str, str]) -> None:
    pod, runs = world.pod, world.runs
    slow = {**env, "BACKUP_SPEED": "16K"}
    runner = _boot(world, env, "boot1.log")
    _put(pod, "a")
    runs["plan"] = _as_runner(env, "backup", "--plan")
    world.notes["after_plan"] = sorted(p.name for p in world.dirs["backup"].rglob("*"))
    runs["full"] = _as_runner(env, "backup")
    _put(pod, "b")
    runs["inc1"] = _as_runner(env, "backup")
    _put(pod, "c")
    stopped = harness.in_ns(
        pod.client_ns, ["curl", "-sf", "--max-time", "10", f"http://{pod.pod_ip}/cgi-bin/agent?stop"]
    )
    assert stopped.stdout.decode().strip() == "agent=stop", stopped
    runs["inc2"] = _as_runner(env, "backup")
    _put(pod, "d")
    runs["sigterm"] = _interrupted(slow, world.dirs["base"] / "sigterm.log", signal.SIGTERM)
    world.notes["after_sigterm"] = sorted(p.name for p in world.chains.glob("*/.*.partial"))
    runs["sigkill"] = _interrupted(slow, world.dirs["base"] / "sigkill.log", signal.SIGKILL)
    world.notes["after_sigkill"] = sorted(p.name for p in world.chains.glob("*/.*.partial"))
    runs["after_kill"] = _as_runner(env, "backup")
    # A restart of the runner while a full backup runs.
    argv = [*harness.AS_RUNNER, str(harness.BIN / "vmrunner"), "backup", "--full"]
    backup = harness.start("restart", argv, {**env, "BACKUP_SPEED": "1M"}, world.dirs["base"] / "restart.log")
    backup.wait_for(PROGRESS, 60)
    world.notes["runner_stop"] = harness.graceful_stop(runner, STOP_TIMEOUT)
    runs["restart"] = Run(backup.popen.wait(30), backup.text())
    world.notes["pet_check"] = _qemu_img("check", "-f", "qcow2", str(world.dirs["vm"] / f"{HOSTNAME}.qcow2"))

    runner = _boot(world, env, "boot2.log")
    runs["after_restart"] = _as_runner(env, "backup")
    qemu = harness.children(runner.popen.pid)
    os.kill(qemu[0], signal.SIGKILL)
    world.notes["crash_status"] = runner.popen.wait(30)

    runner = _boot(world, env, "boot3.log")
    runs["after_crash"] = _as_runner(env, "backup")
    runs["status"] = _as_runner(env, "status")
    harness.graceful_stop(runner, STOP_TIMEOUT)

    for seq in range(3):
        vm_dir = world.dirs["base"] / f"vm-r{seq}"
        vm_dir.mkdir()
        os.chown(vm_dir, harness.RUNNER_UID, harness.RUNNER_UID)
        point = f"{runs['full'].point().split('.')[0]}.{seq}"
        restored = {**env, "VM_DIR": str(vm_dir)}
        runs[f"restore{seq}"] = _as_runner(restored, "restore", point)
        if seq == 2:  # the last restored VM runs the schedule, on a backup volume of its own
            sched = world.dirs["base"] / "backup-sched"
            sched.mkdir()
            os.chown(sched, harness.RUNNER_UID, harness.RUNNER_UID)
            restored.update(BACKUP_DIR=str(sched), BACKUP_INTERVAL="10s")
        runner = _boot(world, restored, f"restored{seq}.log")
        if seq == 2:
            runner.wait_for(r"backup \S+ done: full", 120)
        harness.graceful_stop(runner, STOP_TIMEOUT)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """The whole scenario once; everything is removed afterwards, also on failure."""
    with pod_scenario("e2e-backup", hostname=HOSTNAME, image=ensure_guest(), resolv="nameserver 10.96.0.10\n") as pod:
        dirs = {**pod.dirs, "base": pod.base}
        world = World(pod, pod.net, dirs, logs=pod.procs)
        try:
            _scenario(world, pod.env(SHUTDOWN_TIMEOUT="30s", BACKUP_KEEP="3"))
        except BaseException:
            print(world.report())
            raise
        yield world


def _chain(world: World, point: str) -> dict[str, object]:
    chain = point.split(".", maxsplit=1)[0]
    manifest: dict[str, object] = json.loads((world.chains / chain / "manifest.json").read_text())
    return manifest


def test_full_then_incrementals_extend_one_chain_frozen_by_the_agent_until_it_went_silent(world: World) -> None:
    runs = world.runs
    assert [runs[n].status for n in ("full", "inc1", "inc2")] == [0, 0, 0], world.report()
    assert "full backup into" in runs["full"].log and "no backup chain yet" in runs["full"].log
    chain = runs["full"].chain()
    assert [runs[n].point() for n in ("full", "inc1", "inc2")] == [f"{chain}.0", f"{chain}.1", f"{chain}.2"]
    for name in ("inc1", "inc2"):
        assert "incremental backup into" in runs[name].log
    for name in ("full", "inc1"):
        assert "frozen: yes" in runs[name].log, runs[name].log
    assert "frozen: no (the guest agent did not answer guest-sync-delimited within 2s)" in runs["inc2"].log
    points = _chain(world, chain)["points"]
    assert isinstance(points, list) and [p["frozen"] for p in points] == [True, True, False]


def test_the_plan_says_what_the_backup_will_do_and_changes_nothing(world: World) -> None:
    run = world.runs["plan"]
    assert run.status == 0, run.log
    plan = json.loads(run.log[run.log.index("{") :])
    assert (plan["kind"], plan["reason"], plan["seq"]) == ("full", "no backup chain yet", 0)
    assert plan["create"][:6] == ["qemu-img", "create", "-q", "-u", "-f", "qcow2"]
    assert plan["partial"].endswith("/.0000-full.qcow2.partial")
    assert [a["type"] for a in plan["transaction"]["actions"]] == ["block-dirty-bitmap-add", "blockdev-backup"]
    assert world.notes["after_plan"] == [], "nothing written to the backup volume"


def test_every_backup_file_passes_qemu_img_check_and_is_a_plain_chain(world: World) -> None:
    files = sorted(world.chains.glob("*/*.qcow2"))
    assert len(files) >= 6, files
    for path in files:
        done = _qemu_img("check", "-f", "qcow2", str(path))
        assert done.returncode == 0, (path, done.stdout, done.stderr)
    chain = world.runs["full"].chain()
    top = world.chains / chain / "0002-incremental.qcow2"
    info = json.loads(_qemu_img("info", "--backing-chain", "--output=json", "-f", "qcow2", str(top)).stdout)
    assert [Path(i["filename"]).name for i in info] == [
        "0002-incremental.qcow2", "0001-incremental.qcow2", "0000-full.qcow2",
    ]  # fmt: skip
    assert [i.get("backing-filename") for i in info] == ["0001-incremental.qcow2", "0000-full.qcow2", None]


def test_an_incremental_after_a_small_write_is_a_small_fraction_of_the_full(world: World) -> None:
    chain = world.chains / world.runs["full"].chain()
    full = (chain / "0000-full.qcow2").stat().st_size
    for name in ("0001-incremental.qcow2", "0002-incremental.qcow2"):
        incremental = (chain / name).stat().st_size
        assert incremental < full / 10, (name, incremental, full)


def test_each_restored_point_boots_with_exactly_its_data(world: World) -> None:
    expected = [{"a"}, {"a", "b"}, {"a", "b", "c"}]
    for seq, names in enumerate(expected):
        assert world.runs[f"restore{seq}"].status == 0, world.report()
        assert "restore done:" in world.runs[f"restore{seq}"].log
        data = data_of(world.pages[f"restored{seq}.log"])
        assert data == {n: data_md5(n) for n in names}, (seq, data)


def test_a_backup_stopped_by_sigterm_is_cancelled_and_leaves_the_chain_as_it_was(world: World) -> None:
    run = world.runs["sigterm"]
    assert run.status == 1, run.log
    assert "backup interrupted by a signal; the chain ends at its last complete point" in run.log
    assert world.notes["after_sigterm"] == [], "a cancelled job's target is removed"


def test_a_backup_killed_half_way_leaves_the_chain_usable_and_the_next_is_full(world: World) -> None:
    assert world.notes["after_sigkill"] == [".0003-incremental.qcow2.partial"], world.runs["sigkill"].log
    after = world.runs["after_kill"]
    assert after.status == 0, after.log
    assert "an interrupted backup's job is still in qemu" in after.log
    assert "full backup into" in after.log and "was interrupted at an unknown point" in after.log
    assert after.chain() != world.runs["full"].chain(), "a new chain"
    assert world.runs["restore2"].status == 0, "the older chain still restores"


def test_a_runner_restart_during_a_backup_leaves_a_usable_pet_and_chain(world: World) -> None:
    assert world.notes["runner_stop"] == harness.GRACEFUL_EXIT, world.report()
    assert world.runs["restart"].status == 1, world.runs["restart"].log
    check = world.notes["pet_check"]
    assert isinstance(check, subprocess.CompletedProcess) and check.returncode == 0, check
    after = world.runs["after_restart"]
    assert after.status == 0, after.log
    # the chain's bitmap was saved at the clean stop: the backup after the restart is still incremental
    assert "incremental backup into" in after.log, after.log
    assert "frozen: yes" in after.log, "the new boot's agent answers again"
    assert after.chain() == world.runs["after_kill"].chain()
    assert data_of(world.pages["boot2.log"]) == {n: data_md5(n) for n in "abcd"}


def test_after_qemu_is_killed_the_next_backup_is_full_and_says_why(world: World) -> None:
    assert world.notes["crash_status"] != 0
    after = world.runs["after_crash"]
    assert after.status == 0, after.log
    assert re.search(r"full backup into .*: bitmap podvm-\S+ is inconsistent", after.log), after.log


def test_status_reports_the_last_backup(world: World) -> None:
    figures = json.loads(world.runs["status"].log[world.runs["status"].log.index("{") :])["figures"]
    got = {(f["name"], tuple(sorted(f["labels"].items()))): f["value"] for f in figures}
    assert got[("podvm_backup_last_result", (("result", "ok"),))] == 1
    assert got[("podvm_backup_last_success_kind", (("kind", "full"),))] == 1
    assert got[("podvm_backup_last_success_copied_bytes", ())] > 0


def test_the_schedule_backs_the_vm_up_by_itself(world: World) -> None:
    log = world.logs[-1].text()
    assert "backups every 10s into" in log
    assert re.search(r"backup: full backup into .*: no backup chain yet", log)


def test_restore_refuses_to_overwrite_a_pet_and_names_a_bad_point(world: World) -> None:
    env = world.scenario.env()
    env["VM_DIR"] = str(world.dirs["base"] / "vm-r0")
    before = sorted(os.listdir(env["VM_DIR"]))
    refused = _as_runner(env, "restore")
    assert refused.status == 2, refused.log
    assert f"{HOSTNAME}.qcow2 exists: restore beside it with --name NAME" in refused.log
    assert len(refused.log.strip().splitlines()) == 1 and "Traceback" not in refused.log
    unknown = _as_runner(env, "restore", "20990101T000000Z.0", "--name", "other")
    assert unknown.status == 2 and "no such point" in unknown.log, unknown.log
    assert sorted(os.listdir(env["VM_DIR"])) == before, "nothing made"


def test_restore_refuses_a_damaged_missing_or_redirected_point(world: World, tmp_path: Path) -> None:
    """On a copy of the first chain: each damage is one clear line, exit 1, and nothing in VM_DIR."""
    chain = world.runs["full"].chain()
    backup_dir = tmp_path / "backup"
    shutil.copytree(world.chains, backup_dir / HOSTNAME)
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    env = {**world.scenario.env(), "BACKUP_DIR": str(backup_dir)}
    env["VM_DIR"] = str(vm_dir)
    copy = backup_dir / HOSTNAME / chain
    top = str(copy / "0002-incremental.qcow2")
    redirected = _qemu_img("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "/etc/passwd", top)
    assert redirected.returncode == 0, redirected
    cases = [
        (f"{chain}.2", "its header names the backing file '/etc/passwd', expected '0001-incremental.qcow2'"),
    ]
    with (copy / "0001-incremental.qcow2").open("r+b") as damaged:
        damaged.seek(0)
        damaged.write(b"\0" * 512)
    cases.append((f"{chain}.1", "not a readable qcow2"))
    (copy / "0000-full.qcow2").unlink()
    cases.append((f"{chain}.0", "missing from the backup volume"))
    for point, message in cases:
        run = subprocess.run(
            [str(harness.BIN / "vmrunner"), "restore", point], env=env, capture_output=True, text=True, check=False
        )
        assert run.returncode == 1, (point, run.stderr)
        assert message in run.stderr and len(run.stderr.strip().splitlines()) <= 2, (point, run.stderr)
        assert list(vm_dir.iterdir()) == [], "nothing half-made"
