"""A hostile neighbour on the shared volumes: a second process with the runner's uid, racing the real CLI."""

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import samples
from tests.harness.httpserver import Server
from tests.harness.paths import VMRUNNER
from tests.harness.pod import AS_RUNNER, runner_env

SWAPPER = """
import os, sys, time
tmp, own = sys.argv[1], sys.argv[2]
data = open(own, "rb").read()
end = time.monotonic() + float(sys.argv[3])
n = 0
while time.monotonic() < end:
    try:
        names = os.listdir(tmp)
    except OSError:
        continue
    for name in names:
        mine = os.path.join(tmp, f".n{n}")
        n += 1
        with open(mine, "wb") as out:
            out.write(data)
        try:
            os.replace(mine, os.path.join(tmp, name))
        except OSError:
            os.unlink(mine)
"""


@pytest.fixture
def neighbour_file(shared_dir: Path, other_qcow2_bytes: bytes) -> Path:
    path = shared_dir / "neighbour.qcow2"
    path.write_bytes(other_qcow2_bytes)
    path.chmod(0o644)
    return path


def as_runner(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_RUNNER, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def swapper(shared_dir: Path, neighbour_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    tmp = shared_dir / "image" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.chown(tmp.parent, 10001, 10001)
    os.chown(tmp, 10001, 10001)
    proc = subprocess.Popen([*AS_RUNNER, sys.executable, "-c", SWAPPER, str(tmp), str(neighbour_file), "20"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_download_swapped_at_any_moment_never_stores_or_makes_a_pet_on_other_bytes(
    served: Server, qcow2_bytes: bytes, shared_dir: Path, swapper: subprocess.Popen[bytes]
) -> None:
    served.served.files["/disk.qcow2"] = qcow2_bytes
    served.served.drops = [len(qcow2_bytes) // 4, len(qcow2_bytes) // 2]  # the file lives in tmp/ for a second or two
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2"), VM_DISK_SIZE="64M")
    done = as_runner([*VMRUNNER, "prepare"], env, 60)
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    base = shared_dir / "image" / "sha256" / sha
    if done.returncode == 0:
        assert base.read_bytes() == qcow2_bytes, done.stderr
        assert (shared_dir / "vm" / "vm-0.qcow2").exists()
    else:
        lines = [line for line in done.stderr.splitlines() if "ERROR" in line or "error" in line]
        assert len(lines) == 1 and "internal error" not in done.stderr, done.stderr
        assert not base.exists() or base.read_bytes() == qcow2_bytes
    assert swapper.poll() is None, "the neighbour ran through the whole start"


def plant(kind: str, path: Path) -> None:
    """Plant one file kind at ``path`` as the runner's uid."""
    code = {
        "fifo": "os.mkfifo(p)",
        "zero": "os.symlink('/dev/zero', p)",
        "folder": "os.mkdir(p)",
        "huge": "f = open(p, 'wb'); f.truncate(1 << 30)",
    }[kind]
    script = f"import os, sys\np = sys.argv[1]\nos.makedirs(os.path.dirname(p), exist_ok=True)\n{code}"
    subprocess.run([*AS_RUNNER, sys.executable, "-c", script, str(path)], check=True)


@pytest.mark.parametrize("kind", ["fifo", "zero", "folder", "huge"])
@pytest.mark.parametrize("where", ["name", "ref"])
def test_a_forged_name_or_reference_never_hangs_fetch_prepare_run_or_gc_nor_is_an_internal_error(
    served: Server, qcow2_bytes: bytes, shared_dir: Path, kind: str, where: str
) -> None:
    served.served.files["/disk.qcow2"] = qcow2_bytes
    # run: as far as the fetch and the pet (then no qemu: the machine type cannot be asked), behind a handshake
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2"), IMG_TARGET="debian", QEMU="/nonexistent/qemu")
    samples.handshake().write(shared_dir / "run")
    image = shared_dir / "image"
    os.chown(image, 10001, 10001)
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    if where == "name":
        plant(kind, image / "names" / "debian")
    else:
        assert as_runner([*VMRUNNER, "fetch"], env, 30).returncode == 0
        plant(kind, image / "refs" / sha / "planted.0123456789abcdef")
    for command in (["fetch"], ["prepare"], ["run"], ["gc", "--grace", "0s"]):
        started = time.monotonic()
        done = as_runner([*VMRUNNER, *command], env, 10)
        assert time.monotonic() - started < 10
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") < 20, done.stderr


def test_a_link_at_the_backup_folder_gets_nothing_written_through_it(shared_dir: Path) -> None:
    backups, elsewhere = shared_dir / "backup", shared_dir / "elsewhere"
    for path in (backups, elsewhere):
        path.mkdir()
        os.chown(path, 10001, 10001)
    (backups / "vm-0").symlink_to(elsewhere)
    env = runner_env(shared_dir, BACKUP_DIR=str(backups))
    done = as_runner([*VMRUNNER, "backup"], env, 20)
    assert done.returncode != 0
    assert "symbolic link" in done.stderr and "refused" in done.stderr, done.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_base_swapped_for_a_link_is_not_started_on_even_with_the_same_bytes(
    served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    """A neighbour replaces ``sha256/<hex>`` with a link to a file of its own holding the very same bytes: the hash
    matches, but the pet would then read a file the neighbour may change at any time. The start refuses it."""
    served.served.files["/disk.qcow2"] = qcow2_bytes
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2"), VM_DISK_SIZE="64M", VERIFY_BASE="always")
    assert as_runner([*VMRUNNER, "prepare"], env, 60).returncode == 0
    base = shared_dir / "image" / "sha256" / hashlib.sha256(qcow2_bytes).hexdigest()
    own = shared_dir / "neighbour-copy"
    own.write_bytes(base.read_bytes())
    script = "import os, sys; os.rename(sys.argv[1], sys.argv[1] + '.gone'); os.symlink(sys.argv[2], sys.argv[1])"
    subprocess.run([*AS_RUNNER, sys.executable, "-c", script, str(base), str(own)], check=True)
    done = as_runner([*VMRUNNER, "prepare"], env, 60)
    assert done.returncode == 7, done.stderr  # BaseMismatch: not started
    assert f"{base}: the pet's base is not a regular file any more; not starting the VM" in done.stderr


def test_an_old_layout_base_the_runner_cannot_link_is_copied_and_a_swap_in_tmp_never_stores_other_bytes(
    shared_dir: Path, swapper: subprocess.Popen[bytes]
) -> None:
    """A pet of the first release's layout on a base another uid owns: fs.protected_hardlinks forbids the runner a
    link to it, so the base is copied into ``tmp/`` to be stored under its digest, while a neighbour renames its own
    qcow2 over every name there. What is stored and bound is the old base's bytes, or nothing."""
    image, vm = shared_dir / "image", shared_dir / "vm"
    old, raw = image / "old.qcow2", shared_dir / "data.raw"
    raw.write_bytes(os.urandom(24 << 20))  # copied for a good fraction of a second: the neighbour has time
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(old)], check=True)
    raw.unlink()
    qcow2_bytes = old.read_bytes()
    old.chmod(0o444)  # root's: the runner may read it, not link it
    vm.mkdir(exist_ok=True)
    os.chown(vm, 10001, 10001)
    pet = vm / "vm-0.qcow2"
    made = [*AS_RUNNER, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(old), str(pet)]
    subprocess.run(made, check=True)
    env = runner_env(shared_dir, IMG_SOURCE="https://example.invalid/old.qcow2")
    done = as_runner([*VMRUNNER, "prepare"], env, 60)
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    base = image / "sha256" / sha
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    if done.returncode == 0:
        assert base.read_bytes() == qcow2_bytes and base.stat().st_ino != old.stat().st_ino, "copied, not linked"
        info = subprocess.run(["qemu-img", "info", "--output=json", str(pet)], capture_output=True, check=True)
        assert f'"backing-filename": "{base}"' in info.stdout.decode()
    else:
        assert not base.exists() or base.read_bytes() == qcow2_bytes, done.stderr
    assert [p for p in (image / "sha256").iterdir() if p.read_bytes() != qcow2_bytes] == []
    assert swapper.poll() is None, "the neighbour ran through the whole start"
