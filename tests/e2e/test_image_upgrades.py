"""Base image upgrades end to end: the real sidecar, the real runner (uid 10001, no capabilities, TCG), the tiny guest.

The guest keeps a boot counter on its own disk: that is the marker. A pet made by the old cache layout boots first
(migrated on the way) and writes counter 1. Then the cache and the configuration change under it in every way the
issue lists; each change either keeps the same pet with its counter or is refused with one line, checked before
qemu (``vmrunner prepare``) where a boot proves nothing more. Four boots in all: after the changes, after
``vmrunner rebase``, and as a standalone pet; ``gc`` runs twice at once while a VM runs.
"""

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness.scenario import IMAGE_PORT, Scenario, pod_scenario

pytestmark = pytest.mark.guest

HOSTNAME = "pet-upgrade"
UID = str(harness.RUNNER_UID)


def sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def variant(image: Path, out: Path) -> None:
    """The same guest with one more file on its boot disk: another image, another digest, still bootable."""
    raw = out.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    note = out.with_suffix(".txt")
    note.write_text("v2\n")
    subprocess.run(["mcopy", "-o", "-i", str(raw), str(note), "::version"], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    note.unlink()


def marker(pet: Path) -> str:
    """The boot counter on the pet's disk, read without booting (what the guest would see); "" when unreadable,
    e.g. while the pet's base is missing."""
    raw = pet.parent.parent / "marker.raw"
    try:
        convert = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(pet), str(raw)]
        if subprocess.run(convert, capture_output=True, check=False).returncode != 0:
            return ""
        done = subprocess.run(["mtype", "-i", str(raw), "::counter"], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""
    finally:
        raw.unlink(missing_ok=True)


def guest_view(pet: Path) -> str:
    """A digest of every byte the guest sees on the pet disk."""
    raw = pet.parent.parent / "view.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(pet), str(raw)], check=True)
    try:
        return sha(raw)
    finally:
        raw.unlink()


def backing(pet: Path) -> str | None:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(pet)], capture_output=True, check=True
    )
    found: str | None = json.loads(info.stdout).get("backing-filename")
    return found


@dataclass
class Step:
    """One runner command before qemu: its exit status, its error lines, the marker and backing afterwards."""

    status: int
    errors: list[str]
    log: str
    marker: str
    backing: str | None


@dataclass
class World:
    """Everything the scenario observed, for the tests below to judge."""

    v1: str
    v2: str
    image_dir: Path
    boots: dict[str, dict[str, str]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    steps: dict[str, Step] = field(default_factory=dict)
    views: dict[str, str] = field(default_factory=dict)
    gc: list[dict[str, Any]] = field(default_factory=list)
    page_after_gc: dict[str, str] = field(default_factory=dict)
    cache_after_gc: list[str] = field(default_factory=list)


class Upgrades:
    """The pod and the runner commands the scenario uses."""

    def __init__(self, scenario: Scenario, env: dict[str, str]) -> None:
        self.scenario, self.base, self.pod, self.env = scenario, scenario.base, scenario.net, env
        self.image_dir, self.pet = Path(env["IMAGE_DIR"]), Path(env["VM_DIR"]) / f"{HOSTNAME}.qcow2"

    def argv(self, *args: str) -> list[str]:
        """A vmrunner command as uid 10001 in the pod's network namespace (the image server is there)."""
        drop = ["setpriv", "--reuid", UID, "--regid", UID, "--clear-groups", "--inh-caps=-all", "--no-new-privs"]
        return ["ip", "netns", "exec", self.pod.pod_ns, *drop, "--", str(harness.BIN / "vmrunner"), *args]

    def as_runner(self, *args: str, **change: str) -> subprocess.CompletedProcess[str]:
        """Run ``vmrunner ARGS`` as the runner and wait for it."""
        return subprocess.run(
            self.argv(*args),
            env={**self.env, **change},
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )

    def step(self, **change: str) -> Step:
        done = self.as_runner("prepare", **change)
        errors = [line for line in done.stderr.splitlines() if " ERROR " in line or "Traceback" in line]
        return Step(done.returncode, errors, done.stderr, marker(self.pet), backing(self.pet))

    def start(self, name: str, **change: str) -> harness.Proc:
        return self.scenario.boot(f"runner-{name}.log", {**self.env, **change})

    def stop(self, runner: harness.Proc) -> None:
        status = self.scenario.stop(runner)
        assert status == harness.GRACEFUL_EXIT, runner.text()


def _legacy_pet(image: Path, image_dir: Path, pet: Path) -> None:
    """A cache and a pet exactly as the previous layout made them: IMAGE_DIR/<target> and a record beside it."""
    old = image_dir / "guest.qcow2"
    shutil.copyfile(image, old)
    record = {"format": "qcow2", "virtual_size": 0, "size": 0, "mtime_ns": 0, "inode": 0}
    (image_dir / ".guest.qcow2.vetted").write_text(json.dumps({**record, "digests": {"sha256": sha(old)}}))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(old), str(pet)], check=True)
    for path in (old, image_dir / ".guest.qcow2.vetted", pet):
        os.chown(path, harness.RUNNER_UID, harness.RUNNER_UID)
    old.chmod(0o444)


def _tamper_in_place(base: Path) -> bytes:
    """What a compromised pod with the cache's uid can do: chmod, rewrite some bytes, put the mtime back."""
    original = base.read_bytes()
    st = base.stat()
    base.chmod(0o644)
    with open(base, "r+b") as f:
        f.seek(len(original) // 2)
        f.write(b"\xa5" * 512)
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))
    base.chmod(0o444)
    return original


def _replace(path: Path, content: bytes) -> None:
    tmp = path.with_name(".replacement")
    tmp.write_bytes(content)
    tmp.chmod(0o444)
    os.replace(tmp, path)


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _run_scenario(s: Upgrades, srv: Path, v1_image: Path, v2_image: Path, world: World) -> None:
    served = srv / "guest.qcow2"
    # Boot 1: a pet of the old layout is migrated and boots; the guest writes counter 1 on its disk.
    runner = s.start("legacy")
    world.boots["legacy"] = harness.guest_page(s.pod)
    s.stop(runner)
    world.logs["legacy"] = runner.text()
    world.views["after boot 1"] = guest_view(s.pet)
    base = world.image_dir / "sha256" / world.v1

    # Changes checked before qemu: each keeps the pet on its base (status 0) or refuses in one line (status 7).
    _replace(served, v2_image.read_bytes())
    world.steps["new image behind the same URL"] = s.step()
    world.steps["IMG_CHECKSUM changed"] = s.step(IMG_CHECKSUM=f"sha256:{world.v2}")
    world.steps["IMG_TARGET changed"] = s.step(IMG_TARGET="guest-next")
    original = _tamper_in_place(base)
    world.steps["cached base corrupted"] = s.step()
    _replace(base, original)
    world.steps["corrupted base restored"] = s.step()
    evil = s.base / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(evil)], check=True)
    _replace(base, evil.read_bytes())
    world.steps["base replaced by one with a backing file"] = s.step()
    _empty(world.image_dir)
    world.steps["cache deleted, URL serves another image"] = s.step()
    _replace(served, v1_image.read_bytes())
    _empty(world.image_dir)
    world.steps["cache deleted, URL serves the same image"] = s.step()

    # Boot 2: the configured image now differs in checksum and name; the same pet boots with its marker.
    changed = {"IMG_CHECKSUM": f"sha256:{world.v2}", "IMG_TARGET": "guest-next"}
    runner = s.start("changed", **changed)
    world.boots["changed"] = harness.guest_page(s.pod)
    fetched = s.as_runner("fetch", IMG_SOURCE=f"http://127.0.0.1:{IMAGE_PORT}/guest-v2.qcow2", IMG_TARGET="v2")
    assert fetched.returncode == 0, fetched.stderr
    gc = s.argv("gc", "--grace", "0s")
    gcs = [subprocess.Popen(gc, env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    for proc in gcs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        world.gc.append(json.loads(out))
    world.cache_after_gc = sorted(p.name for p in (world.image_dir / "sha256").iterdir())
    world.page_after_gc = harness.guest_page(s.pod)
    s.stop(runner)
    world.logs["changed"] = runner.text()

    # Boot 3: rebase onto v2, proven byte for byte before booting.
    fetched = s.as_runner("fetch", IMG_SOURCE=f"http://127.0.0.1:{IMAGE_PORT}/guest-v2.qcow2", IMG_TARGET="v2")
    assert fetched.returncode == 0, fetched.stderr
    world.views["before rebase"] = guest_view(s.pet)
    rebased = s.as_runner("rebase", "v2")
    assert rebased.returncode == 0, rebased.stderr
    world.views["after rebase"] = guest_view(s.pet)
    world.steps["after rebase"] = Step(0, [], rebased.stderr, marker(s.pet), backing(s.pet))
    runner = s.start("rebased")
    world.boots["rebased"] = harness.guest_page(s.pod)
    s.stop(runner)

    # Boot 4: standalone, then the cache emptied by gc: the pet no longer needs it.
    world.views["before standalone"] = guest_view(s.pet)
    world.steps["standalone"] = s.step(VM_DISK_MODE="standalone")
    world.views["after standalone"] = guest_view(s.pet)
    last_gc = s.as_runner("gc", "--grace", "0s")
    world.gc.append(json.loads(last_gc.stdout))
    runner = s.start("standalone", VM_DISK_MODE="standalone")
    world.boots["standalone"] = harness.guest_page(s.pod)
    s.stop(runner)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    image = ensure_guest()
    with pod_scenario("e2e-upgrades", hostname=HOSTNAME, image=None) as pod:
        base, dirs = pod.base, pod.dirs
        v1_image, v2_image = base / "v1.qcow2", base / "v2.qcow2"
        shutil.copyfile(image, v1_image)
        variant(image, v2_image)
        shutil.copyfile(v1_image, dirs["srv"] / "guest.qcow2")
        shutil.copyfile(v2_image, dirs["srv"] / "guest-v2.qcow2")
        _legacy_pet(v1_image, dirs["image"], dirs["vm"] / f"{HOSTNAME}.qcow2")
        world = World(sha(v1_image), sha(v2_image), dirs["image"])
        _run_scenario(Upgrades(pod, pod.env(SHUTDOWN_TIMEOUT="30s")), dirs["srv"], v1_image, v2_image, world)
        yield world


def test_a_pet_of_the_old_layout_boots_and_is_bound_to_its_digest(world: World) -> None:
    assert world.boots["legacy"]["counter"] == "1"
    log = world.logs["legacy"]
    assert "the old cache layout: binding it to the base's digest" in log
    assert f"is now bound to sha256:{world.v1}" in log


@pytest.mark.parametrize(
    "case", ["new image behind the same URL", "IMG_CHECKSUM changed", "IMG_TARGET changed", "corrupted base restored"]
)
def test_a_changed_configuration_keeps_the_pet_on_its_base(world: World, case: str) -> None:
    step = world.steps[case]
    assert (step.status, step.errors, step.marker) == (0, [], "1"), step.log
    assert step.backing == f"{world.image_dir}/sha256/{world.v1}"
    if case in ("IMG_CHECKSUM changed", "IMG_TARGET changed"):
        assert f"this pet keeps its own base sha256:{world.v1}" in step.log
    if case == "new image behind the same URL":
        assert "fetching" not in step.log, "an existing pet does not fetch; its base is what it was made on"


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("cached base corrupted", "the pet's base was changed (its bytes hash to sha256:"),
        ("base replaced by one with a backing file", "the pet's base was changed"),
        ("cache deleted, URL serves another image", "is missing from IMAGE_DIR="),
    ],
)
def test_a_base_that_is_not_the_pets_is_refused_in_one_line(world: World, case: str, words: str) -> None:
    step = world.steps[case]
    assert step.status == 7, step.log
    assert len(step.errors) == 1 and words in step.errors[0], step.log
    assert step.backing == f"{world.image_dir}/sha256/{world.v1}", "the pet is never re-pointed"


def test_a_deleted_cache_is_fetched_again_when_the_url_still_serves_the_pets_base(world: World) -> None:
    step = world.steps["cache deleted, URL serves the same image"]
    assert (step.status, step.errors, step.marker) == (0, [], "1"), step.log
    assert "fetched the pet's base sha256:" in step.log


def test_the_same_pet_boots_with_its_marker_after_every_change(world: World) -> None:
    assert world.boots["changed"]["counter"] == "2"
    assert world.boots["changed"]["uuid"] == world.boots["legacy"]["uuid"]
    assert f"this pet keeps its own base sha256:{world.v1}" in world.logs["changed"]


def test_gc_while_a_vm_runs_removes_only_the_unreferenced_base_once(world: World) -> None:
    removed = [entry["digest"] for run in world.gc[:2] for entry in run["removed"]]
    assert removed == [f"sha256:{world.v2}"]
    assert world.cache_after_gc == [world.v1]
    assert world.page_after_gc["counter"] == "2", "the running guest did not notice"


def test_rebase_keeps_every_byte_and_the_pet_boots_on_the_new_base(world: World) -> None:
    assert world.views["after rebase"] == world.views["before rebase"]
    step = world.steps["after rebase"]
    assert step.backing == f"{world.image_dir}/sha256/{world.v2}" and step.marker == "2"
    assert world.boots["rebased"]["counter"] == "3"


def test_a_standalone_pet_keeps_every_byte_boots_and_needs_no_cache(world: World) -> None:
    step = world.steps["standalone"]
    assert (step.status, step.backing) == (0, None), step.log
    assert world.views["after standalone"] == world.views["before standalone"]
    removed = sorted(entry["digest"] for entry in world.gc[2]["removed"])
    assert removed == sorted([f"sha256:{world.v1}", f"sha256:{world.v2}"])
    assert world.boots["standalone"]["counter"] == "4"
