"""``runners/qemu-runner.sh`` before qemu: durations read as shared/env.py reads them, the shared cache of the runner
contract's section 7 (vetted before it is cached, one download under a lock, nothing partial left behind), and the
binding of a pet to its base. Real curl, flock, qemu-img and a loopback HTTP server; ``QEMU=true`` stands in for the
emulator, so these tests stop where a boot would begin (tests/e2e/test_conformance.py boots the real guest).
"""

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from shared.env import Env, parse_size
from shared.errors import ConfigError
from tests.harness import samples
from tests.harness.httpserver import Server
from tests.harness.paths import REPO
from tests.harness.wait import until

SCRIPT = REPO / "runners" / "qemu-runner.sh"
HOSTNAME = "vm-0"


def env_for(root: Path, source: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "IMG_SOURCE": source,
        "IMAGE_DIR": str(root / "image"),
        "VM_DIR": str(root / "vm"),
        "RUN_DIR": str(root / "run"),
        "ACCEL": "tcg",
        "QEMU": "true",
        "HANDSHAKE_TIMEOUT": "5s",
        "FETCH_RETRIES": "1",
        **extra,
    }


def run(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def with_handshake(root: Path) -> Path:
    samples.handshake(hostname=HOSTNAME).write(root / "run")
    return root


def files(root: Path, sub: str) -> list[str]:
    path = root / "image" / sub
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def backing_of(pet: Path) -> tuple[str | None, str | None]:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(pet)],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    return info.get("backing-filename"), info.get("backing-filename-format")


def contract_name(url: str) -> str:
    """The name section 7 gives an image without IMG_TARGET, spelt out independently of both runners."""
    scheme, rest = url.split("://", 1)
    netloc, _, path_and_query = rest.partition("/")
    keyed = f"{scheme}://{netloc.rpartition('@')[2]}/{path_and_query}"
    file_name = path_and_query.split("?", 1)[0].rsplit("/", 1)[-1]
    return f"{file_name}@{hashlib.sha256(keyed.encode()).hexdigest()[:16]}"


ACCEPTED = ["0", "0s", "200ms", "0.3s", "0m", "0h", " 300ms ", "300 ms", "0.0001h"]
REFUSED = ["1d", "ms", "-1s", "1e3", ".5s", "5.s", "1,5s", "1S", "1 h 2", "0x10", "1s1"]


@pytest.mark.parametrize("value", ACCEPTED + REFUSED)
def test_durations_are_read_as_shared_env_reads_them(shared_dir: Path, value: str) -> None:
    """The same words accepted and refused as vmrunner; an accepted wait for a missing handshake ends in exit 4."""
    try:
        seconds: float | None = Env({"HANDSHAKE_TIMEOUT": value}).duration("HANDSHAKE_TIMEOUT", 120.0)
    except ConfigError:
        seconds = None
    assert (seconds is None) == (value in REFUSED)
    done = run(env_for(shared_dir, "/nonexistent.qcow2", HANDSHAKE_TIMEOUT=value))
    if seconds is None:
        assert done.returncode == 2 and f"HANDSHAKE_TIMEOUT='{value}': expected a duration" in error_line(done)
    else:
        assert done.returncode == 4 and "no network handshake after" in error_line(done)


@pytest.mark.parametrize("value", ["1048576", "1M", "2m", "1GiB", "1 G", "3TB", "1MiB", "1Mx", "M", "1.5G", "1e6"])
def test_sizes_are_read_as_shared_env_reads_them(shared_dir: Path, value: str) -> None:
    try:
        parse_size(value)
        valid = True
    except ValueError:
        valid = False
    done = run(env_for(shared_dir, "/nonexistent.qcow2", IMG_MAX_SIZE=value, HANDSHAKE_TIMEOUT="0"))
    assert done.returncode == (4 if valid else 2), done.stderr


def test_fetch_follows_the_shared_cache_layout_and_hides_secrets(
    served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    """sha256/<hex> (0444), names/<name> pointing to it, this pet's reference, the pet bound to sha256/<hex>."""
    served.served.files["/img/base.qcow2"] = qcow2_bytes
    served.served.auth, served.served.query = "alice:Pl4nted-pw", "token=Pl4nted-token"
    url = served.url("/img/base.qcow2?token=Pl4nted-token").replace("http://", "http://alice:Pl4nted-pw@")
    env = env_for(with_handshake(shared_dir), url)
    done = run(env)
    assert done.returncode == 0, done.stderr
    assert "Pl4nted-token" not in done.stderr and "Pl4nted-pw" not in done.stderr, done.stderr
    hexdigest = hashlib.sha256(qcow2_bytes).hexdigest()
    base = shared_dir / "image" / "sha256" / hexdigest
    assert base.read_bytes() == qcow2_bytes and base.stat().st_mode & 0o777 == 0o444
    name = contract_name(url)
    assert files(shared_dir, "names") == [name]
    record = json.loads((shared_dir / "image" / "names" / name).read_text())
    assert record["digest"] == f"sha256:{hexdigest}"
    assert record["source"] == served.url("/img/base.qcow2"), "no credentials, no query in the shared cache"
    volume = (shared_dir / "vm" / ".podvm-volume").read_text().strip()
    ref = json.loads((shared_dir / "image" / "refs" / hexdigest / f"{HOSTNAME}.{volume}").read_text())
    assert (ref["pet"], ref["volume"], ref["hostname"]) == (
        str(shared_dir / "vm" / f"{HOSTNAME}.qcow2"),
        volume,
        HOSTNAME,
    )
    assert backing_of(shared_dir / "vm" / f"{HOSTNAME}.qcow2") == (str(base), "qcow2")
    assert files(shared_dir, "tmp") == []
    again = run(env)
    assert again.returncode == 0, again.stderr
    assert len(served.served.requests) == 1, "a named, present base is used without any network access"
    assert "hashing the base" not in again.stderr, "an unchanged base costs a stat, not a re-hash"


def test_an_unsafe_image_is_vetted_before_it_is_cached(tmp_path: Path, served: Server, shared_dir: Path) -> None:
    image = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(image), "64M"],
                   check=True)  # fmt: skip
    served.served.files["/evil.qcow2"] = image.read_bytes()
    done = run(env_for(with_handshake(shared_dir), served.url("/evil.qcow2")))
    assert done.returncode == 3 and "has a backing file ('/etc/hostname'); refused" in error_line(done)
    assert files(shared_dir, "sha256") == files(shared_dir, "names") == files(shared_dir, "tmp") == []
    assert not (shared_dir / "vm" / f"{HOSTNAME}.qcow2").exists()


@pytest.mark.parametrize("endless", [True, False], ids=["endless-stream", "announced-too-large"])
def test_a_flood_stops_at_img_max_size(served: Server, shared_dir: Path, endless: bool) -> None:
    served.served.files["/disk.qcow2"] = b"\0" * (3 << 20)
    served.served.forever = endless
    done = run(env_for(with_handshake(shared_dir), served.url("/disk.qcow2"), IMG_MAX_SIZE="1M"))
    assert done.returncode == 3 and "more than IMG_MAX_SIZE (1048576) bytes" in error_line(done)
    assert files(shared_dir, "sha256") == files(shared_dir, "tmp") == []


def test_concurrent_runners_download_once(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    """Three pods on one cache: one download under the name's lock, the others wait and use it."""
    served.served.files["/base.qcow2"] = qcow2_bytes
    served.served.delay = 1.0
    procs = []
    for i in range(3):
        pod = shared_dir / f"pod{i}"
        (pod / "run").mkdir(parents=True)
        (pod / "vm").mkdir()
        with_handshake(pod)
        env = {**env_for(pod, served.url("/base.qcow2")), "IMAGE_DIR": str(shared_dir / "image")}
        procs.append(subprocess.Popen(["sh", str(SCRIPT)], env=env, stderr=subprocess.PIPE, text=True))
    logs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    assert len(served.served.requests) == 1
    assert sum("waiting for it" in log for log in logs) >= 1
    assert len(os.listdir(shared_dir / "image" / "refs" / hashlib.sha256(qcow2_bytes).hexdigest())) == 3


def test_sigterm_during_a_download_leaves_nothing(served: Server, shared_dir: Path) -> None:
    served.served.files["/disk.qcow2"] = b"\0" * (1 << 20)
    served.served.drops = [4096]
    served.served.delay = 4.0
    env = env_for(with_handshake(shared_dir), served.url("/disk.qcow2"))
    proc = subprocess.Popen(["sh", str(SCRIPT)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        until("the download started", lambda: files(shared_dir, "tmp"), 10, 0.05)
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 143, log
    assert files(shared_dir, "tmp") == files(shared_dir, "sha256") == []
    assert subprocess.run(["pgrep", "-f", served.url("/disk.qcow2")], check=False).returncode == 1, "curl left behind"


def first_start(served: Server, qcow2_bytes: bytes, root: Path, **extra: str) -> tuple[dict[str, str], Path]:
    served.served.files["/base.qcow2"] = qcow2_bytes
    env = env_for(with_handshake(root), served.url("/base.qcow2"), **extra)
    done = run(env)
    assert done.returncode == 0, done.stderr
    return env, root / "image" / "sha256" / hashlib.sha256(qcow2_bytes).hexdigest()


def other_image(tmp_path: Path) -> bytes:
    path = tmp_path / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "32M"], check=True)
    return path.read_bytes()


def test_a_rewritten_base_stops_the_start(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    """Any pod with the cache's uid can chmod and rewrite a base: the pet's own record catches it (exit 7)."""
    env, base = first_start(served, qcow2_bytes, shared_dir)
    base.chmod(0o644)
    with base.open("r+b") as out:
        out.seek(len(qcow2_bytes) - 1)
        out.write(b"\1")
    base.chmod(0o444)
    done = run(env)
    assert done.returncode == 7 and "not the bytes" in error_line(done)
    assert "qemu started" not in done.stderr


def test_a_missing_base_is_fetched_again_only_if_it_is_the_same_bytes(
    tmp_path: Path, served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    env, base = first_start(served, qcow2_bytes, shared_dir)
    base.unlink()
    again = run(env)
    assert again.returncode == 0 and base.read_bytes() == qcow2_bytes, again.stderr
    base.unlink()
    served.served.files["/base.qcow2"] = other_image(tmp_path)
    done = run(env)
    assert done.returncode == 7 and "is missing and" in error_line(done)
    assert "qemu started" not in done.stderr


def test_a_changed_image_leaves_the_pet_on_its_own_base(
    tmp_path: Path, served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    env, base = first_start(served, qcow2_bytes, shared_dir)
    served.served.files["/v2.qcow2"] = other_image(tmp_path)
    done = run({**env, "IMG_SOURCE": served.url("/v2.qcow2")})
    assert done.returncode == 0, done.stderr
    assert f"keeps its own base sha256:{base.name}" in done.stderr
    assert backing_of(shared_dir / "vm" / f"{HOSTNAME}.qcow2")[0] == str(base)
    assert files(shared_dir, "sha256") == [base.name], "an existing pet needs no download of another image"


def test_a_pet_on_a_base_outside_the_cache_is_refused(tmp_path: Path, shared_dir: Path) -> None:
    outside = tmp_path / "elsewhere.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(outside), "32M"], check=True)
    pet = shared_dir / "vm" / f"{HOSTNAME}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(outside), str(pet)],
                   check=True)  # fmt: skip
    done = run(env_for(with_handshake(shared_dir), str(outside)))
    assert done.returncode == 7 and f"its base {outside} is not in" in error_line(done)


def test_a_base_cached_under_another_name_is_hashed_not_downloaded(
    served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    """With a sha256 IMG_CHECKSUM, a mirror's URL finds the bytes another name cached: one download per digest."""
    _, base = first_start(served, qcow2_bytes, shared_dir)
    served.served.files["/mirror/base.qcow2"] = qcow2_bytes
    other = shared_dir / "other-pod"
    (other / "run").mkdir(parents=True)
    (other / "vm").mkdir()
    with_handshake(other)
    done = run(
        {
            **env_for(other, served.url("/mirror/base.qcow2"), IMG_CHECKSUM=f"sha256:{base.name}"),
            "IMAGE_DIR": str(shared_dir / "image"),
        }
    )
    assert done.returncode == 0, done.stderr
    assert len(served.served.requests) == 1
    names = [json.loads((shared_dir / "image" / "names" / n).read_text()) for n in files(shared_dir, "names")]
    assert [n["digest"] for n in names] == [f"sha256:{base.name}"] * 2


def test_a_new_pet_is_never_made_on_a_base_that_is_not_its_digest(
    served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    """The name and the base in the shared cache are forgeable: a new pet's base is hashed first, and repaired."""
    env, base = first_start(served, qcow2_bytes, shared_dir)
    base.chmod(0o644)
    base.write_bytes(qcow2_bytes[:-1] + b"\1")
    base.chmod(0o444)
    (shared_dir / "vm" / f"{HOSTNAME}.qcow2").unlink()
    done = run(env)
    assert done.returncode == 0, done.stderr
    assert "does not hash to its name" in done.stderr
    assert base.read_bytes() == qcow2_bytes and len(served.served.requests) == 2


def test_a_symlink_planted_as_a_lock_is_refused(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    served.served.files["/base.qcow2"] = qcow2_bytes
    url = served.url("/base.qcow2")
    victim = shared_dir / "vm" / "victim"
    locks = shared_dir / "image" / "locks"
    locks.mkdir(parents=True)
    (locks / f"name.{contract_name(url)}.lock").symlink_to(victim)
    done = run(env_for(with_handshake(shared_dir), url))
    assert done.returncode == 1 and "is a symbolic link; refused" in error_line(done)
    assert not victim.exists()


def test_a_full_image_dir_is_one_line_and_leaves_nothing(served: Server, shared_dir: Path) -> None:
    served.served.files["/disk.qcow2"] = os.urandom(1 << 20)
    image_dir = shared_dir / "image"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "podvm-test-full", str(image_dir)], check=True)
    try:
        done = run(env_for(with_handshake(shared_dir), served.url("/disk.qcow2")))
        assert done.returncode == 1, done.stderr
        assert f"IMAGE_DIR={image_dir}: cannot write disk.qcow2@" in error_line(done)
        assert files(shared_dir, "tmp") == files(shared_dir, "sha256") == []
    finally:
        subprocess.run(["umount", "--lazy", str(image_dir)], check=True)


def test_a_base_that_is_not_a_regular_file_is_refused(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    """A symbolic link planted over a base (even to the same bytes) is not followed: another pod could retarget it."""
    env, base = first_start(served, qcow2_bytes, shared_dir)
    copy = shared_dir / "copy.qcow2"
    copy.write_bytes(qcow2_bytes)
    base.unlink()
    base.symlink_to(copy)
    done = run(env)
    assert done.returncode == 7 and "not a regular file" in error_line(done)
    assert "qemu started" not in done.stderr


def test_a_pet_on_a_cache_mounted_elsewhere_is_followed_by_digest(
    served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    env, base = first_start(served, qcow2_bytes, shared_dir)
    moved = shared_dir / "image-moved"
    (shared_dir / "image").rename(moved)
    done = run({**env, "IMAGE_DIR": str(moved)})
    assert done.returncode == 0, done.stderr
    assert f"re-pointed {shared_dir / 'vm' / HOSTNAME}.qcow2 from {base}" in done.stderr
    assert backing_of(shared_dir / "vm" / f"{HOSTNAME}.qcow2") == (str(moved / "sha256" / base.name), "qcow2")
    assert len(served.served.requests) == 1
