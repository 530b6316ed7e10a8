"""The sidecar's privileges and paths: the capabilities `run` checks for, the handshake's atomic write in the
shared RUN_DIR and the private NET_STATE_DIR.

Real files in a temporary directory; run as root, like the sidecar (ownership checks need it).
"""

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from netsidecar import paths
from netsidecar.capabilities import RUN_CAPABILITIES, missing_capabilities
from shared.errors import ConfigError
from shared.files import write_atomic

RUNNER = 10001


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize(
    ("effective", "missing"),
    [
        ("000001ffffffffff", []),
        ("0000000000000000", ["KILL", "SETGID", "SETUID", "NET_BIND_SERVICE", "NET_ADMIN"]),
        (f"{sum(1 << bit for bit in RUN_CAPABILITIES.values()):016x}", []),
        (f"{sum(1 << bit for name, bit in RUN_CAPABILITIES.items() if name != 'KILL'):016x}", ["KILL"]),
        ("0000000000003000", ["KILL", "SETGID", "SETUID", "NET_BIND_SERVICE"]),  # NET_ADMIN and NET_RAW only
    ],
)
def test_missing_capabilities_are_read_from_the_effective_set(effective: str, missing: list[str]) -> None:
    status = f"Name:\tnetsidecar\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t{effective}\n"
    assert missing_capabilities(status) == missing


@pytest.mark.parametrize("name", RUN_CAPABILITIES)
def test_capability_numbers_match_the_kernels(name: str) -> None:
    """The kernel's own status of a process that setpriv left without ``name`` (util-linux knows the numbers)."""
    drop = f"--bounding-set=-{name.lower()}"
    status = subprocess.run(
        ["setpriv", "--inh-caps=-all", drop, "--", "cat", "/proc/self/status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert missing_capabilities(status) == [name]


def test_write_atomic_sets_the_mode_through_the_descriptor_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "f", b"data", mode=0o644)
    finally:
        os.umask(old)
    assert (tmp_path / "f").read_bytes() == b"data" and _mode(tmp_path / "f") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f"], "no temporary file left"


def test_write_atomic_replaces_a_planted_symlink_instead_of_following_it(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("root's")
    target.chmod(0o600)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "network.json").symlink_to(target)
    write_atomic(shared / "network.json", b"{}")
    assert not (shared / "network.json").is_symlink() and (shared / "network.json").read_bytes() == b"{}"
    assert target.read_text() == "root's" and _mode(target) == 0o600


def test_write_atomic_survives_its_temporary_file_swapped_for_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner renames the new temporary file away and puts a link to a root file in its place, right after it
    is created: the mode is set on the open file, so the root file keeps its mode and content."""
    target = tmp_path / "target"
    target.write_text("root's")
    target.chmod(0o600)
    shared = tmp_path / "shared"
    shared.mkdir()
    real_open = os.open
    swapped: list[str] = []

    def open_then_swap(path: str | Path, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        name = os.path.basename(path)
        if name.startswith(".network.json.") and not swapped:
            os.rename(shared / name, shared / "stolen")
            os.symlink(target, shared / name)
            swapped.append(name)
        return fd

    monkeypatch.setattr(os, "open", open_then_swap)
    write_atomic(shared / "network.json", b"{}", mode=0o644)
    monkeypatch.undo()
    assert swapped, "the swap happened"
    assert target.read_text() == "root's" and _mode(target) == 0o600
    assert (shared / "stolen").read_bytes() == b"{}" and _mode(shared / "stolen") == 0o644


def test_write_atomic_refuses_a_directory_that_is_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(NotADirectoryError):
        write_atomic(tmp_path / "link" / "network.json", b"{}")
    assert list(real.iterdir()) == []


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    assert paths.state_dir(state, create=False) is False and not state.exists()
    assert paths.state_dir(state, create=True) is True
    assert _mode(state) == 0o700 and state.stat().st_uid == os.geteuid()


def _symlink(p: Path) -> None:
    p.symlink_to(p.parent / "elsewhere")


def _directory(mode: int, uid: int = 0, gid: int = 0) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        p.mkdir()
        p.chmod(mode)
        os.chown(p, uid, gid)

    return make


def _file(p: Path) -> None:
    p.write_text("")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_symlink, "is a symbolic link"),
        (_directory(0o777), r"writable by others \(mode 0777\)"),
        (_directory(0o770, gid=RUNNER), r"writable by others \(mode 0770\)"),
        (_directory(0o700, uid=RUNNER, gid=RUNNER), "owned by uid 10001"),
        (_file, "cannot open it: Not a directory"),
    ],
    ids=["symlink", "world-writable", "group-writable", "foreign-owner", "file"],
)
def test_state_dir_refuses_what_others_could_change(tmp_path: Path, make: Callable[[Path], None], message: str) -> None:
    state = tmp_path / "state"
    (tmp_path / "elsewhere").mkdir()
    make(state)
    for create in (False, True):
        with pytest.raises(ConfigError, match=f"^NET_STATE_DIR={state}: {message}"):
            paths.state_dir(state, create=create)


def test_state_dir_below_a_directory_others_can_change_is_refused(tmp_path: Path) -> None:
    """The runner could rename a private directory away and put its own in place, so every parent counts."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    state = shared / "state"
    with pytest.raises(ConfigError, match=f"^NET_STATE_DIR={state}: {shared} above it can be changed by others"):
        paths.state_dir(state, create=True)
    assert not state.exists()
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot rename what root owns there
    assert paths.state_dir(state, create=True)


def test_prepare_claims_a_fresh_world_writable_volume_but_not_a_used_one(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    fresh.chmod(0o2777)  # a Kubernetes emptyDir with an fsGroup
    paths.claim_state_dir(fresh)
    assert _mode(fresh) == 0o700 and paths.state_dir(fresh, create=False)
    used = tmp_path / "used"
    used.mkdir()
    used.chmod(0o777)
    (used / "planted").symlink_to("/etc/shadow")
    with pytest.raises(ConfigError, match="writable by others"):
        paths.claim_state_dir(used)
    assert _mode(used) == 0o777
    paths.claim_state_dir(tmp_path / "new")
    assert _mode(tmp_path / "new") == 0o700


def test_run_dir_is_created_and_a_symlink_refused(tmp_path: Path) -> None:
    paths.check_run_dir(tmp_path / "run")
    assert (tmp_path / "run").is_dir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    with pytest.raises(ConfigError, match=f"^RUN_DIR={tmp_path}/link: is a symbolic link"):
        paths.check_run_dir(tmp_path / "link")
