"""Pets bound to their base, with real qemu-img: every way the cache can change under a pet, migration of the old
layout, rebase, standalone pets, garbage collection and the one-line failures. No guest boots here: what the guest
sees is compared as ``qemu-img convert -O raw`` output, and a refusal is proven before qemu would start.
"""

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import ImageRejected, PodvmError
from tests.harness.httpserver import Server
from tests.harness.paths import VMRUNNER
from tests.harness.pod import runner_env
from vmrunner.config import Config, load
from vmrunner.images import vet
from vmrunner.images.gc import collect
from vmrunner.images.layout import Layout, locked
from vmrunner.images.refs import references
from vmrunner.images.store import ensure_image
from vmrunner.pet.binding import prepare, read_trust, rebase, trust_path


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def write_pattern(path: Path, pattern: int, offset: str, length: str = "1M", fmt: str = "qcow2") -> None:
    """Write bytes the way a guest would: through qemu's block layer."""
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} {offset} {length}", str(path)],
        capture_output=True,
        check=True,
    )


def guest_view(pet: Path) -> bytes:
    """Every byte the guest sees on the pet disk (through its whole backing chain), as one raw image."""
    out = pet.parent / f".{pet.name}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(pet), str(out)], check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def backing(pet: Path) -> str | None:
    info = json.loads(qemu_img("info", "-U", "-f", "qcow2", "--output=json", str(pet)))
    found: str | None = info.get("backing-filename")
    return found


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """Two valid qcow2 bases with data (v1, v2) and one with a backing file."""
    found = {}
    for name, pattern in (("v1", 0x11), ("v2", 0x22)):
        path = tmp_path / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
        write_pattern(path, pattern, "0")
        write_pattern(path, pattern + 1, "8M")
        found[name] = path
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(evil), "16M")
    found["evil"] = evil
    return found


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def env(shared_dir: Path, images: dict[str, Path]) -> dict[str, str]:
    return runner_env(shared_dir, IMG_SOURCE=str(images["v1"]))


def cfg_of(env: dict[str, str], **change: str) -> Config:
    return load({**env, **change})


@pytest.fixture
def made(env: dict[str, str], shared_dir: Path) -> Iterator[Path]:
    """A pet made on v1 with guest data of its own at 4 MiB."""
    prepare(cfg_of(env))
    pet = shared_dir / "vm" / "vm-0.qcow2"
    write_pattern(pet, 0x5A, "4M")
    yield pet


def run_prepare(env: dict[str, str], **change: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMRUNNER, "prepare"], env={**env, **change}, capture_output=True, text=True, check=False)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def test_a_new_pet_is_bound_to_its_bases_digest_and_referenced(
    env: dict[str, str], images: dict[str, Path], shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    started = prepare(cfg_of(env))
    digest = sha(images["v1"])
    pet = shared_dir / "vm" / "vm-0.qcow2"
    assert started.digest == digest
    info = json.loads(qemu_img("info", "-U", "-f", "qcow2", "--output=json", str(pet)))
    assert info["backing-filename"] == f"{shared_dir}/image/sha256/{digest}"
    assert info["backing-filename-format"] == "qcow2"
    refs = references(Layout(shared_dir / "image"), digest)
    volume = (shared_dir / "vm" / ".podvm-volume").read_text().strip()
    assert list(refs) == [f"vm-0.{volume}"]
    trust = read_trust(cfg_of(env))
    assert trust is not None and trust.digest == digest
    plan = json.loads(subprocess.run([*VMRUNNER, "plan"], env=env, capture_output=True, check=True).stdout)
    assert plan["image"]["digest"] == f"sha256:{digest}" and plan["image"]["cached"] is True
    assert plan["pet"]["binding"]["digest"] == f"sha256:{digest}"
    assert plan["pet"]["binding"]["next_start"] == "cheap check"
    assert plan["pet"]["references"] == [f"vm-0.{volume}"]
    caplog.clear()
    prepare(cfg_of(env))
    assert "hashing" not in caplog.text, "an unchanged base costs no re-hash"
    prepare(cfg_of(env, VERIFY_BASE="always"))
    assert "hashing the pet's base" in caplog.text and "VERIFY_BASE=always" in caplog.text


def test_a_changed_configuration_leaves_the_pet_on_its_own_base(
    made: Path, env: dict[str, str], images: dict[str, Path], served: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    view = guest_view(made)
    digest = sha(images["v1"])
    served.served.files["/v1.qcow2"] = images["v2"].read_bytes()
    for change in (
        {"IMG_SOURCE": served.url("/v1.qcow2")},
        {"IMG_CHECKSUM": f"sha256:{sha(images['v2'])}"},
        {"IMG_TARGET": "another-name"},
        {"IMG_SOURCE": str(images["v2"])},
    ):
        caplog.clear()
        assert prepare(cfg_of(env, **change)).digest == digest
        assert f"this pet keeps its own base sha256:{digest}" in caplog.text, change
        assert guest_view(made) == view
    assert served.served.requests == [], "an existing pet fetches nothing"


def test_a_base_changed_in_place_is_refused_even_with_its_mtime_restored(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    base = shared_dir / "image" / "sha256" / sha(images["v1"])
    original = base.read_bytes()
    st = base.stat()
    base.chmod(0o644)
    with open(base, "r+b") as f:  # what a compromised pod with the cache's uid can do
        f.seek(len(original) - 4096)
        f.write(b"\xff" * 16)
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))
    base.chmod(0o444)
    plan = json.loads(subprocess.run([*VMRUNNER, "plan"], env=env, capture_output=True, check=True).stdout)
    assert plan["pet"]["binding"]["next_start"] == "full re-hash", "plan shows the doubt before any start"
    done = run_prepare(env)
    assert done.returncode == 7
    line = one_line_error(done)
    assert f"{base}: the pet's base was changed (its bytes hash to sha256:" in line and "not starting" in line
    base.chmod(0o644)
    base.write_bytes(original)
    base.chmod(0o444)
    done = run_prepare(env)
    assert done.returncode == 0, done.stderr
    assert "hashing the pet's base" in done.stderr, "the restored file is hashed before it is trusted again"


def test_a_base_replaced_by_one_with_a_backing_file_is_refused(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    base = shared_dir / "image" / "sha256" / sha(images["v1"])
    fake = base.with_name("fake")
    shutil.copyfile(images["evil"], fake)
    os.replace(fake, base)
    done = run_prepare(env)
    assert done.returncode == 7
    assert "the pet's base was changed" in one_line_error(done)


def test_a_base_replaced_by_a_fifo_or_a_device_is_refused_without_hanging(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    base = shared_dir / "image" / "sha256" / sha(images["v1"])
    original = base.read_bytes()
    base.unlink()
    os.mkfifo(base)
    done = run_prepare(env)
    assert done.returncode == 7 and "is not a regular file any more" in one_line_error(done)
    base.unlink()
    base.symlink_to("/dev/zero")
    done = run_prepare(env)
    assert done.returncode == 7 and "is not a regular file any more" in one_line_error(done)
    base.unlink()
    base.write_bytes(original)
    assert run_prepare(env).returncode == 0


def test_a_lost_cache_is_fetched_again_only_when_it_gives_the_same_bytes(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path, served: Server
) -> None:
    view = guest_view(made)
    served.served.files["/disk.qcow2"] = images["v2"].read_bytes()
    url = served.url("/disk.qcow2")
    shutil.rmtree(shared_dir / "image")
    (shared_dir / "image").mkdir()
    done = run_prepare(env, IMG_SOURCE=url)
    assert done.returncode == 7
    line = one_line_error(done)
    assert f"its base sha256:{sha(images['v1'])} is missing" in line and f"gives sha256:{sha(images['v2'])}" in line
    assert backing(made) == f"{shared_dir}/image/sha256/{sha(images['v1'])}", "the pet is never re-pointed"
    served.served.files["/disk.qcow2"] = images["v1"].read_bytes()
    shutil.rmtree(shared_dir / "image")
    (shared_dir / "image").mkdir()
    done = run_prepare(env, IMG_SOURCE=url)
    assert done.returncode == 0, done.stderr
    assert guest_view(made) == view


def test_a_pet_of_the_old_layout_is_migrated_without_changing_a_byte(
    env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    image_dir = shared_dir / "image"
    old = image_dir / "v1.qcow2"
    shutil.copyfile(images["v1"], old)
    old.chmod(0o444)
    record = {"format": "qcow2", "virtual_size": 16 << 20, "size": 0, "mtime_ns": 0, "inode": 0, "digests": {}}
    (image_dir / ".v1.qcow2.vetted").write_text(json.dumps({**record, "digests": {"sha256": sha(old)}}))
    pet = shared_dir / "vm" / "vm-0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(old), str(pet))
    write_pattern(pet, 0x5A, "4M")
    view = guest_view(pet)
    done = run_prepare(env, IMG_SOURCE="https://example.invalid/v1.qcow2")
    assert done.returncode == 0, done.stderr
    assert "the old cache layout" in done.stderr
    digest = sha(images["v1"])
    assert backing(pet) == f"{image_dir}/sha256/{digest}"
    assert guest_view(pet) == view
    assert (image_dir / "sha256" / digest).stat().st_ino == old.stat().st_ino, "hard-linked, not copied"
    assert len(references(Layout(image_dir), digest)) == 1


def test_an_old_layout_base_changed_since_it_was_cached_is_refused(
    env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    old = shared_dir / "image" / "v1.qcow2"
    shutil.copyfile(images["v2"], old)
    (shared_dir / "image" / ".v1.qcow2.vetted").write_text(json.dumps({"digests": {"sha256": sha(images["v1"])}}))
    pet = shared_dir / "vm" / "vm-0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(old), str(pet))
    done = run_prepare(env)
    assert done.returncode == 7
    assert "not sha256:" in one_line_error(done)


def test_a_cache_mounted_elsewhere_is_followed_by_digest(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    view = guest_view(made)
    moved = shared_dir / "image-moved"
    (shared_dir / "image").rename(moved)
    assert prepare(cfg_of(env, IMAGE_DIR=str(moved))).digest == sha(images["v1"])
    assert backing(made) == f"{moved}/sha256/{sha(images['v1'])}"
    assert "hashing the pet's base" in caplog.text, "bytes at a new place are hashed before the pet points there"
    assert guest_view(made) == view


def test_a_backing_file_outside_the_cache_is_refused(env: dict[str, str], shared_dir: Path) -> None:
    pet = shared_dir / "vm" / "vm-0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", str(pet))
    done = run_prepare(env)
    assert done.returncode == 7
    assert "its backing file /etc/hostname is not a base of IMAGE_DIR" in one_line_error(done)


def test_rebase_moves_the_pet_and_keeps_every_byte_the_guest_sees(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    v1, v2 = sha(images["v1"]), sha(images["v2"])
    ensure_image(cfg_of(env, IMG_SOURCE=str(images["v2"]), IMG_TARGET="v2"))
    view = guest_view(made)
    done = subprocess.run([*VMRUNNER, "rebase", "v2"], env=env, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, f"sha256:{v2}"), done.stderr
    assert backing(made) == f"{shared_dir}/image/sha256/{v2}"
    assert guest_view(made) == view
    layout = Layout(shared_dir / "image")
    assert references(layout, v1) == {} and len(references(layout, v2)) == 1
    trust = read_trust(cfg_of(env))
    assert trust is not None and trust.digest == v2
    assert prepare(cfg_of(env)).digest == v2
    with pytest.raises(PodvmError, match="no such base"):
        rebase(load(env, image=False), "sha256:" + "0" * 64)


def test_standalone_pets_have_no_backing_file_and_no_reference(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    view = guest_view(made)
    prepare(cfg_of(env, VM_DISK_MODE="standalone"))
    assert backing(made) is None
    assert guest_view(made) == view
    assert references(Layout(shared_dir / "image"), sha(images["v1"])) == {}
    assert not trust_path(cfg_of(env)).exists()
    shutil.rmtree(shared_dir / "image")
    (shared_dir / "image").mkdir()
    assert prepare(cfg_of(env)).digest is None, "a standalone pet needs no cache, and stays standalone"
    fresh = cfg_of(env, HOSTNAME="vm-1", VM_DISK_MODE="standalone")
    prepare(fresh)
    assert backing(fresh.pet_path) is None
    assert guest_view(fresh.pet_path)[:4096] == bytes([0x11]) * 4096


def test_gc_removes_only_unreferenced_bases_and_two_at_once_do_no_harm(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    image_dir = shared_dir / "image"
    v1, v2 = sha(images["v1"]), sha(images["v2"])
    ensure_image(cfg_of(env, IMG_SOURCE=str(images["v2"]), IMG_TARGET="v2"))
    dry = collect(image_dir, 0, dry_run=True)
    assert dry.removed_digests() == [f"sha256:{v2}"]
    assert (image_dir / "sha256" / v2).exists() and (image_dir / "names" / "v2").exists()
    assert collect(image_dir, 3600, dry_run=False).removed_digests() == []
    gc = [*VMRUNNER, "gc", "--grace", "0s"]
    procs = [subprocess.Popen(gc, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    removed = [r["digest"] for out, _ in outs for r in json.loads(out)["removed"]]
    assert removed == [f"sha256:{v2}"], "removed once, by one of the two"
    assert not (image_dir / "sha256" / v2).exists() and not (image_dir / "names" / "v2").exists()
    assert (image_dir / "sha256" / v1).exists()
    assert guest_view(made)


def test_gc_never_takes_a_base_being_claimed_and_drops_references_of_deleted_pets(
    made: Path, env: dict[str, str], images: dict[str, Path], shared_dir: Path
) -> None:
    image_dir = shared_dir / "image"
    v1 = sha(images["v1"])
    made.unlink()
    with locked(Layout(image_dir).lock(v1)):  # a runner taking a reference right now
        busy = collect(image_dir, 0, dry_run=False)
    assert busy.removed == [] and (image_dir / "sha256" / v1).exists()
    assert busy.kept == [{"digest": f"sha256:{v1}", "why": "being claimed (its lock is busy)"}]
    done = collect(image_dir, 0, dry_run=False)
    assert len(done.dropped_refs) == 1
    assert done.removed_digests() == [f"sha256:{v1}"]


def test_a_full_vm_volume_is_one_line_naming_it(env: dict[str, str], shared_dir: Path) -> None:
    script = 'mount -t tmpfs -o size=64k tmpfs "$VM_DIR" && exec "$@"'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *VMRUNNER, "prepare"],
        env={**env, "VM_DISK_MODE": "standalone"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    line = one_line_error(done)
    assert f"VM_DIR={shared_dir}/vm: no space left on device while creating the pet disk" in line
    assert not (shared_dir / "vm" / "vm-0.qcow2").exists()


def test_a_hung_qemu_img_is_a_refusal_not_a_traceback(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled network volume cannot be made here: a qemu-img that never answers stands in for it."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qemu-img").write_text("#!/bin/sh\nexec sleep 30\n")
    (fake / "qemu-img").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(vet, "WALL_SECONDS", 0.5)
    with pytest.raises(ImageRejected, match=r"^/.*v1\.qcow2: qemu-img info took longer than 0.5s; refused$"):
        vet.vet(Path(env["IMG_SOURCE"]), "qcow2", 1 << 30, env["IMG_SOURCE"])


def test_commands_without_an_image_do_not_ask_for_one(shared_dir: Path) -> None:
    env = runner_env(shared_dir)
    (shared_dir / "metadata").write_text("name: x\n")
    out = shared_dir / "run" / "drive.iso"
    for argv in (["configdrive", str(out)], ["gc", "--dry-run"]):
        done = subprocess.run([*VMRUNNER, *argv], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0 and "IMG_SOURCE" not in done.stderr, (argv, done.stderr)
    assert out.exists()
    done = subprocess.run([*VMRUNNER, "rebase", "x"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "no pet disk to rebase" in done.stderr
    done = subprocess.run([*VMRUNNER, "gc", "--grace", "soon"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--grace='soon': expected a duration" in done.stderr


def test_a_cache_the_runner_cannot_write_is_one_line_naming_it(env: dict[str, str], shared_dir: Path) -> None:
    image_dir = shared_dir / "image"
    for sub in ("sha256", "names", "refs", "locks", "tmp"):
        (image_dir / sub).mkdir()
    os.chown(image_dir, 0, 0)
    drop = ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups", "--"]
    done = subprocess.run([*drop, *VMRUNNER, "prepare"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert f"IMAGE_DIR={image_dir}: Permission denied: {image_dir}/locks/" in one_line_error(done)


def test_a_missing_base_is_fetched_anew_even_when_the_name_points_elsewhere(
    shared_dir: Path, images: dict[str, Path], served: Server
) -> None:
    """The URL served other bytes for a while (the name now points to them) and then the pet's own bytes again: a
    pet whose base is missing asks the URL, is refused while it gives other bytes, and starts on its own base once
    it gives them again."""
    served.served.files["/disk.qcow2"] = images["v1"].read_bytes()
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2"))
    prepare(cfg_of(env))
    pet = shared_dir / "vm" / "vm-0.qcow2"
    write_pattern(pet, 0x5A, "4M")
    view = guest_view(pet)
    v1, v2 = sha(images["v1"]), sha(images["v2"])
    (shared_dir / "image" / "sha256" / v1).unlink()
    served.served.files["/disk.qcow2"] = images["v2"].read_bytes()
    fetched = subprocess.run([*VMRUNNER, "fetch"], env=env, capture_output=True, text=True, check=False)
    assert fetched.returncode == 0 and ensure_image(cfg_of(env)).hex == v2, "the name now points to v2"
    asked = len(served.served.requests)
    done = run_prepare(env)
    assert done.returncode == 7 and f"IMG_SOURCE now gives sha256:{v2}" in one_line_error(done)
    assert len(served.served.requests) == asked + 1, "the source was asked, not the name"
    served.served.files["/disk.qcow2"] = images["v1"].read_bytes()
    done = run_prepare(env)
    assert done.returncode == 0, done.stderr
    assert f"fetched the pet's base sha256:{v1} again" in done.stderr
    assert backing(pet) == f"{shared_dir}/image/sha256/{v1}" and guest_view(pet) == view
