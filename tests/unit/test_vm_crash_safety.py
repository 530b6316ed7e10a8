"""The runner's crash-safety decisions as data: the full-disk watch's steps, the record of how a run ended, the
drive's error and cache policy."""

import logging
import os
from pathlib import Path

import pytest

from shared.errors import ConfigError
from tests.harness import samples
from vmrunner.config import load
from vmrunner.metrics import runs, sources
from vmrunner.metrics.tracker import Tracker
from vmrunner.run import diskwatch
from vmrunner.run.argv import plan_qemu
from vmrunner.run.diskwatch import Seen, step

MIB = 1 << 20
VM_DIR = Path("/vm")
ENV = {"IMG_SOURCE": "/img/base.qcow2", "HOSTNAME": "vm-0"}


def run(seen: Seen, status: str, free_mib: float) -> diskwatch.Step:
    return step(seen, status, int(free_mib * MIB), 64 * MIB, VM_DIR)


def test_a_running_vm_needs_nothing() -> None:
    assert run(Seen(), "running", 1) == diskwatch.Step(Seen(), False)
    assert run(Seen(), "paused", 1) == diskwatch.Step(Seen(), False), "paused by someone else: not ours to resume"


def test_a_pause_on_a_full_vm_dir_is_one_line_naming_it_and_no_resume() -> None:
    first = run(Seen(), "io-error", 2)
    assert (first.resume, first.seen) == (False, Seen(paused=True))
    assert len(first.warnings) == 1 and "VM_DIR=/vm is full (2.0 MiB free)" in first.warnings[0]
    assert "VM_DIR_MIN_FREE" in first.warnings[0] and "64.0 MiB" in first.warnings[0]
    again = run(first.seen, "io-error", 10)
    assert again == diskwatch.Step(Seen(paused=True), False), "told once, and still too little room"


def test_room_again_resumes_once_with_a_line() -> None:
    paused = run(Seen(), "io-error", 2).seen
    resumed = run(paused, "io-error", 64)
    assert resumed.resume and resumed.seen == Seen(paused=False, resumed_with=64 * MIB)
    assert resumed.warnings == () and resumed.infos == ("VM_DIR=/vm has 64.0 MiB free again: resuming the VM",)
    assert run(resumed.seen, "running", 60) == diskwatch.Step(Seen(), False), "the resume held: a fresh start"


def test_a_pause_already_with_room_is_told_and_resumed_at_once() -> None:
    decided = run(Seen(), "io-error", 500)
    assert decided.resume and len(decided.warnings) == 1 and len(decided.infos) == 1


def test_a_vm_dir_that_fills_again_at_once_is_no_loop_of_resumes() -> None:
    """Space that statvfs shows but the VM cannot use (a quota, another writer): resumed once, then only when
    there is more room than at that resume."""
    resumed = run(run(Seen(), "io-error", 2).seen, "io-error", 100).seen
    repaused = run(resumed, "io-error", 100)
    assert not repaused.resume and len(repaused.warnings) == 1, "the new pause is told"
    assert run(repaused.seen, "io-error", 100).warnings == ()
    assert not run(repaused.seen, "io-error", 100).resume
    assert run(repaused.seen, "io-error", 101).resume, "more room than before: worth another try"


def test_a_resume_by_someone_else_is_noticed() -> None:
    paused = run(Seen(), "io-error", 2).seen
    assert run(paused, "running", 2) == diskwatch.Step(Seen(), False, infos=("the VM runs again",))


def test_free_bytes_is_what_an_unprivileged_writer_gets(tmp_path: Path) -> None:
    stat = os.statvfs(tmp_path)
    assert diskwatch.free_bytes(tmp_path) == stat.f_bavail * stat.f_frsize


def test_the_drive_pauses_on_enospc_and_flushes_through_the_host_cache() -> None:
    cfg = load({**ENV, "RUN_DIR": "/r"})
    argv = plan_qemu(cfg, samples.handshake(), "tcg", False, None).argv
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith("file=/vm/vm-0.qcow2,")
    assert {"cache=writeback", "werror=enospc", "rerror=report"} <= set(drive.split(","))


def test_vm_dir_min_free_is_a_size() -> None:
    assert load(ENV).vm_dir_min_free == 128 * MIB
    assert load({**ENV, "VM_DIR_MIN_FREE": "1G"}).vm_dir_min_free == 1 << 30
    with pytest.raises(ConfigError, match="VM_DIR_MIN_FREE"):
        load({**ENV, "VM_DIR_MIN_FREE": "lots"})


def tracker(tmp_path: Path) -> Tracker:
    (tmp_path / "run").mkdir(exist_ok=True)
    found = sources.Sources(tmp_path / "run", tmp_path, runs.runs_file(tmp_path, "vm-0"), tmp_path / "no.sock")
    return Tracker(found, "vm-0")


@pytest.mark.parametrize(
    ("ended", "said"),
    [
        (None, "ended without a shutdown"),  # killed with qemu: no outcome was ever recorded
        ("crashed", "ended when qemu died"),
        ("hard", "ended in a hard stop"),
        ("clean", None),
    ],
)
def test_the_next_start_says_how_the_previous_run_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, ended: str | None, said: str | None
) -> None:
    first = tracker(tmp_path)
    first.qemu_started(os.getpid())
    if ended is not None:
        first.finished(ended)
    caplog.clear()
    tracker(tmp_path).qemu_started(os.getpid())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if said is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and said in warnings[0] and str(runs.runs_file(tmp_path, "vm-0")) in warnings[0]
    assert runs.read_runs(runs.runs_file(tmp_path, "vm-0"))["boots"] == 2


def test_a_first_boot_and_an_older_record_say_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker(tmp_path).qemu_started(os.getpid())
    runs.runs_file(tmp_path, "vm-0").write_text('{"boots": 3, "clean": 2, "hard": 0, "crashed": 0}')
    tracker(tmp_path).qemu_started(os.getpid())
    runs.runs_file(tmp_path, "vm-0").write_text('{"boots": 3, "last": ["running"]}')
    tracker(tmp_path).qemu_started(os.getpid())
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []
