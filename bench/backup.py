"""Backup figures: full and incremental backup throughput against ``qemu-img convert`` of the same disk, and the
guest's disk writes during a backup against without one (all in the same run)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.table import Figure, Results
from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.paths import VMRUNNER
from tests.harness.pod import PodNet
from tests.harness.scenario import pod_scenario

SEC = "7. live backups"
DISK = 1 << 30
FILLED = 512 << 20  # random data in the first half of the disk: a full backup copies it, zeros cost nothing
CHANGED = 16 << 20  # rewritten before each incremental: 1.6 % of the disk
RESOLV = "nameserver 10.96.0.10\n"
WRITE_KIB = 4096


def _qemu(root: Path, pet: Path) -> subprocess.Popen[bytes]:
    """qemu with its vCPU stopped (-S): the pet disk as vmrunner names it, the monitor in RUN_DIR."""
    return subprocess.Popen(
        [
            "qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64M", "-S",
            "-drive", f"file={pet},if=none,id=disk0,node-name=pet0,format=qcow2",
            "-device", "virtio-blk-pci,drive=disk0",
            "-chardev", f"socket,id=qmp,path={root / 'run' / 'qmp.sock'},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _hmp(root: Path, line: str) -> str:
    """An HMP command through vmrunner's own QMP client (qemu-io writes into the running disk, as the guest would:
    through the drive, so the dirty bitmap sees them); its answer (empty when it worked)."""
    code = (
        "import asyncio, sys; from pathlib import Path; from vmrunner.qemu import qmp; "
        "print(asyncio.run(qmp.execute(Path(sys.argv[1]), 'human-monitor-command', 60, {'command-line': sys.argv[2]})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(root / "run" / "qmp.sock"), line], check=True, capture_output=True, text=True
    )
    return done.stdout


def _backup(env: dict[str, str], *args: str) -> tuple[Path, dict[str, object]]:
    """One ``vmrunner backup``; its chain's folder and the point it recorded."""
    subprocess.run([*VMRUNNER, "backup", *args], env=env, check=True, capture_output=True)
    root = Path(env["BACKUP_DIR"]) / env["HOSTNAME"]
    last = json.loads((root / "last.json").read_text())["last_success"]
    chain, seq = str(last["point"]).split(".")
    point: dict[str, object] = json.loads((root / chain / "manifest.json").read_text())["points"][int(seq)]
    return root / chain, point


def _warm(path: Path) -> None:
    """Read ``path`` once, so that the copy timed next and its reference both read it from the page cache: a
    reference read sometimes from the cache and sometimes from the disk moved fivefold within one run."""
    with path.open("rb") as f:
        while f.read(1 << 20):
            pass


def _settle(root: Path) -> None:
    """Write and remove a file larger than the copy timed next, then write everything back, so that the copy and
    its reference both start alike: with nothing left to write back of the step before (ext4's ordered journal
    makes a file's flush write out other files' dirty data too), and with the page cache's free pages at hand. On a
    VM that hands its free memory back to the host (virtio-balloon free page reporting, as on the machines these
    figures come from), a write into pages given back runs at a tenth of the speed: `dd` of 512 MiB ran at 4.4 GB/s
    right after the same file was removed and at 0.3 GB/s six seconds later, in every one of six tries."""
    scratch = root / "settle"
    with scratch.open("wb") as out:
        block = bytes(1 << 20)
        for _ in range((FILLED >> 20) * 3 // 2):
            out.write(block)
    scratch.unlink()
    os.sync()


def _timed(root: Path, argv: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds ``argv`` takes, from a settled start (:func:`_settle`)."""
    _settle(root)
    begin = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - begin


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _round(root: Path, pet: Path, env: dict[str, str], run: int, got: dict[str, list[float]]) -> None:
    """One round: convert and a full backup, a change, an incremental, then the point restored and its chain
    converted; each pair in the other order every other round (whichever runs first pays for a cold page cache)."""
    out = root / "convert.qcow2"
    order = 1 if run % 2 == 0 else -1

    def convert() -> None:
        _warm(pet)
        seconds = _timed(root, ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", str(pet), str(out)])
        got["convert"].append(FILLED / seconds / 1e6)
        begin = time.perf_counter()
        _fsync(out)
        got["convert durable"].append(FILLED / (seconds + time.perf_counter() - begin) / 1e6)
        out.unlink()

    def full() -> None:
        _warm(pet)
        _settle(root)
        begin = time.perf_counter()
        _, point = _backup(env, "--full")
        got["full command"].append(FILLED / (time.perf_counter() - begin) / 1e6)
        got["full"].append(FILLED / float(str(point["seconds"])) / 1e6)

    for step in (convert, full)[::order]:
        step()
    wrote = _hmp(root, f'qemu-io disk0 "write -P {run + 1} {run * CHANGED} {CHANGED}"')
    assert wrote.strip() == "", wrote  # qemu-io prints its report on qemu's stdout, errors here
    chain, point = _backup(env)
    assert point["kind"] == "incremental", point
    got["incremental"].append(float(str(point["seconds"])) * 1000 / (CHANGED >> 20))
    got["size"].append(int(str(point["size"])) / (1 << 20))

    def chain_convert() -> None:
        for layer in chain.glob("*.qcow2"):
            _warm(layer)
        argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(chain / str(point["file"])), str(out)]
        seconds = _timed(root, argv)
        begin = time.perf_counter()
        _fsync(out)
        got["chain"].append(FILLED / (seconds + time.perf_counter() - begin) / 1e6)
        out.unlink()

    def restore() -> None:
        for layer in chain.glob("*.qcow2"):
            _warm(layer)
        got["restore"].append(FILLED / _timed(root, [*VMRUNNER, "restore", "--name", "restored"], env) / 1e6)
        (root / "vm" / "restored.qcow2").unlink()

    for step in (chain_convert, restore)[::order]:
        step()


def bench_throughput(res: Results, runs: int) -> None:
    """Full and incremental backups of a running qemu's 1 GiB disk (512 MiB of data) against qemu-img convert, and
    the restore of a point against qemu-img convert of its chain."""
    root = Path(tempfile.mkdtemp(prefix="podvm-bench-backup-"))
    qemu = None
    got: dict[str, list[float]] = {
        name: []
        for name in ("convert", "convert durable", "full", "full command", "incremental", "size", "chain", "restore")
    }
    try:
        for name in ("run", "vm", "backup"):
            (root / name).mkdir()
        raw = root / "data.raw"
        with raw.open("wb") as data:
            data.truncate(DISK)
            for _ in range(FILLED >> 20):
                data.write(os.urandom(1 << 20))
        pet = root / "vm" / "bench.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(pet)], check=True)
        raw.unlink()
        qemu = _qemu(root, pet)
        env = {**os.environ, "RUN_DIR": str(root / "run"), "BACKUP_DIR": str(root / "backup"), "HOSTNAME": "bench"}
        env |= {"VM_DIR": str(root / "vm"), "BACKUP_KEEP": "1", "LOG_LEVEL": "WARNING"}
        for run in range(runs):
            _round(root, pet, env, run, got)
    finally:
        if qemu is not None:
            qemu.kill()
            qemu.wait()
        shutil.rmtree(root, ignore_errors=True)
    ref = "qemu-img convert of the same disk (512 MiB of data)"
    changed = f"incremental after {CHANGED >> 20} MiB changed"
    chain_ref = "qemu-img convert of the chain (full + incremental), then fsync"
    durable = "qemu-img convert of the same disk, then fsync"
    res.add(Figure(SEC, ref, "MB/s", got["convert"]))
    res.add(Figure(SEC, "full live backup (job time, guest agent absent)", "MB/s", got["full"], ref))
    res.add(Figure(SEC, durable, "MB/s", got["convert durable"]))
    res.add(
        Figure(SEC, "  the whole vmrunner backup --full command (written out)", "MB/s", got["full command"], durable)
    )
    res.add(Figure(SEC, f"{changed}: job time per changed MiB", "ms", got["incremental"]))
    res.add(Figure(SEC, f"{changed}: file size", "MiB", got["size"]))
    res.add(Figure(SEC, chain_ref, "MB/s", got["chain"]))
    res.add(Figure(SEC, "vmrunner restore of that point (checks, convert, fsync)", "MB/s", got["restore"], chain_ref))


def _write(pod: PodNet) -> float:
    """Seconds the guest takes to write and flush WRITE_KIB KiB to its disk (dd conv=fsync, timed by curl)."""
    done = harness.in_ns(
        pod.client_ns,
        ["curl", "-sf", "-o", "/dev/null", "-w", "%{time_total}", f"http://{pod.pod_ip}/cgi-bin/write?{WRITE_KIB}"],
        timeout=120,
    )
    assert done.returncode == 0, done
    return float(done.stdout)


def bench_guest_writes(res: Results, runs: int) -> None:
    """The tiny guest's disk writes while a full backup runs (held at 2 MB/s so that it lasts), against without."""
    quiet, during = [], []
    with pod_scenario("bench-backup", hostname="bench-backup", image=ensure_guest(), resolv=RESOLV) as scenario:
        pod, env = scenario.net, scenario.env()
        runner = scenario.boot("runner.log", env)
        for _ in range(runs):
            quiet.append(WRITE_KIB / 1024 / _write(pod))
            procs = scenario.procs
            offset = len(procs[-1].text()) if procs[-1].name == "backup" else 0
            argv = [*harness.AS_RUNNER, str(harness.BIN / "vmrunner"), "backup", "--full"]
            backup = harness.start("backup", argv, {**env, "BACKUP_SPEED": "2M"}, scenario.base / "backup.log")
            procs.append(backup)
            backup.wait_for(r"backup: full backup into", 30, after=offset)
            time.sleep(2.5)  # past the agent's sync timeout: the job runs
            during.append(WRITE_KIB / 1024 / _write(pod))
            assert backup.popen.poll() is None, "the backup ran during the whole write"
            backup.popen.wait(120)
        runner.terminate(40)
    ref = f"guest writes {WRITE_KIB >> 10} MiB + fsync, no backup"
    res.add(Figure(SEC, ref, "MiB/s", quiet))
    res.add(Figure(SEC, "the same during a full backup (copy-before-write)", "MiB/s", during, ref))


def bench(res: Results, runs: int) -> None:
    """The section: throughput first, then the guest's writes."""
    bench_throughput(res, runs)
    bench_guest_writes(res, runs)
