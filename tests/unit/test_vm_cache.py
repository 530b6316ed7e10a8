"""The image cache's pure rules: names, redaction, lock detection, gc decisions, when a base is hashed again."""

import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest

from shared.errors import ConfigError
from vmrunner.config import load, name_key, redact
from vmrunner.images.gc import DigestFacts, judge_digest
from vmrunner.images.layout import Layout, Mount, lock_problem, locked, mount_of
from vmrunner.images.names import NameRecord, matches_checksum
from vmrunner.images.refs import Ref
from vmrunner.pet.binding import Trust, doubt

HEX = "ab" * 32
OTHER = "cd" * 32


def test_names_never_collide_across_urls_and_keep_no_credentials() -> None:
    v1 = name_key("https://h.example/v1/disk.qcow2", None)
    v2 = name_key("https://h.example/v2/disk.qcow2", None)
    assert v1.startswith("disk.qcow2@") and v2.startswith("disk.qcow2@") and v1 != v2
    assert name_key("https://user:pw@h.example/v1/disk.qcow2", None) == v1, "credentials do not change the name"
    assert name_key("https://h.example/v1/disk.qcow2?sig=1", None) != v1, "the query is part of what is fetched"
    assert name_key("https://h.example/v1/disk.qcow2", "debian") == "debian"
    assert name_key("https://h.example/", None).startswith("image@")
    assert name_key("https://h.example/a%20b;c", None).startswith("a_20b_c@")
    assert name_key("/srv/disk.qcow2", None) != name_key("/srv/old/disk.qcow2", None)


def test_redacted_sources_lose_credentials_and_query() -> None:
    assert redact("https://user:pw@h.example:8443/x.qcow2?token=s3cret#f") == "https://h.example:8443/x.qcow2"
    assert redact("http://[::1]:80/x") == "http://[::1]:80/x"
    assert redact("/srv/x.qcow2") == "/srv/x.qcow2"


def test_a_name_matches_a_checksum_of_either_algorithm() -> None:
    record = NameRecord(f"sha256:{HEX}", "src", "t", {"sha512": "ee" * 64})
    base = {"IMG_SOURCE": "/srv/x.qcow2", "HOSTNAME": "vm-0"}
    assert matches_checksum(load(base), record)
    assert matches_checksum(load({**base, "IMG_CHECKSUM": f"sha256:{HEX}"}), record)
    assert matches_checksum(load({**base, "IMG_CHECKSUM": "sha512:" + "ee" * 64}), record)
    assert not matches_checksum(load({**base, "IMG_CHECKSUM": f"sha256:{OTHER}"}), record)
    assert not matches_checksum(load({**base, "IMG_CHECKSUM": "sha512:" + "ff" * 64}), record)


def test_only_digest_paths_of_this_cache_are_bases() -> None:
    layout = Layout(Path("/image"))
    assert layout.digest_of(f"/image/sha256/{HEX}") == HEX
    assert layout.digest_of(f"/other/sha256/{HEX}") is None
    assert layout.digest_of("/image/sha256/../sha256/" + HEX) is None
    assert layout.digest_of("/image/debian.qcow2") is None
    assert layout.digest_of(f"/image/sha256/{HEX[:-1]}") is None


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /image rw,relatime shared:9 - nfs srv:/export rw,vers=3,nolock,proto=tcp,local_lock=all
31 22 0:41 / /image4 rw,relatime shared:10 - nfs4 srv:/export rw,vers=4.2,local_lock=none
32 22 0:42 / /image3 rw,relatime shared:11 - nfs srv:/e rw,vers=3,local_lock=flock
33 22 0:43 / /image\\040dir rw - nfs srv:/e rw,vers=3,local_lock=all
"""


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/image", "NFS mount with nolock"),
        ("/image/sub", "NFS mount with nolock"),
        ("/image4", None),
        ("/image3", "local_lock=flock"),
        ("/image dir", "local_lock=all"),
        ("/imagex", None),
        ("/var/cache", None),
    ],
)
def test_locks_that_hold_on_one_node_only_are_detected(path: str, problem: str | None) -> None:
    found = lock_problem(MOUNTINFO, Path(path))
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_a_volume_without_locks_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOLCK cannot be produced here without an NFS server lacking lockd: the kernel's answer is simulated."""

    def no_locks(fd: object, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    message = r"^IMAGE_DIR: .*x\.lock: the volume does not support file locks \(ENOLCK\)"
    with pytest.raises(ConfigError, match=message), locked(tmp_path / "x.lock"):
        pass


def facts(**change: object) -> DigestFacts:
    values: dict[str, object] = {
        "hex": HEX,
        "base_ctime": 1000.0,
        "refs": {},
        "refs_mtime": None,
        "stale": frozenset(),
        "names": ("debian",),
    }
    return DigestFacts(**{**values, **change})  # type: ignore[arg-type]


REF = Ref("/vm/vm-0.qcow2", "0123456789abcdef", "vm-0", "t")


def test_gc_keeps_referenced_bases_and_those_within_the_grace_period() -> None:
    assert not judge_digest(facts(refs={"vm-0.x": REF}), 10**9, 0).remove
    assert not judge_digest(facts(refs={"vm-0.x": None}), 10**9, 0).remove, "an unreadable ref still counts"
    assert judge_digest(facts(), 1000.0 + 3600, 3600).remove
    assert not judge_digest(facts(), 1000.0 + 3599, 3600).remove
    assert not judge_digest(facts(refs_mtime=5000.0), 5000.0 + 100, 3600).remove, "a ref removed lately restarts it"


def test_gc_drops_stale_references_and_waits_a_grace_period_after() -> None:
    decision = judge_digest(facts(refs={"vm-0.x": REF}, stale=frozenset({"vm-0.x"})), 10**9, 60)
    assert decision.drop_refs == ("vm-0.x",) and not decision.remove
    assert judge_digest(facts(refs={"vm-0.x": REF}, stale=frozenset({"vm-0.x"})), 10**9, 0).remove
    mixed = judge_digest(facts(refs={"a": REF, "b": REF}, stale=frozenset({"a"})), 10**9, 0)
    assert mixed.drop_refs == ("a",) and not mixed.remove


class St:
    """The four fields of os.stat_result the identity check reads."""

    def __init__(self, size: int = 10, ino: int = 7, ctime: int = 100, mtime: int = 90) -> None:
        self.st_size, self.st_ino, self.st_ctime_ns, self.st_mtime_ns = size, ino, ctime, mtime


TRUST = Trust(HEX, f"/image/sha256/{HEX}", "qcow2", 1 << 30, 10, 7, 100, 90, "t")


@pytest.mark.parametrize(
    ("trust", "st", "verify", "reason"),
    [
        (TRUST, St(), "changed", None),
        (TRUST, St(), "always", "VERIFY_BASE=always"),
        (None, St(), "changed", "no record"),
        (Trust(OTHER, *list(TRUST.__dict__.values())[1:]), St(), "changed", "another base"),
        (TRUST, St(size=11), "changed", "its size changed"),
        (TRUST, St(ino=8), "changed", "its inode changed"),
        (TRUST, St(ctime=101), "changed", "its ctime changed"),
        (TRUST, St(mtime=91, ctime=101), "changed", "its ctime, mtime changed"),
    ],
)
def test_a_base_is_hashed_again_whenever_its_identity_is_in_doubt(
    trust: Trust | None, st: St, verify: str, reason: str | None
) -> None:
    found = doubt(trust, HEX, f"/image/sha256/{HEX}", st, verify)  # type: ignore[arg-type]
    assert (found is None) if reason is None else (found is not None and reason in found), found


def test_a_lock_file_removed_while_waited_on_is_never_shared(tmp_path: Path) -> None:
    """gc removes a digest's lock file while holding it; a runner that was waiting on the old file must not think it
    holds the lock while a newcomer locks the new file."""
    path = tmp_path / "locks" / "x.lock"
    seen: list[tuple[bool, bool]] = []  # (the waiter holds the lock, someone else could take it meanwhile)

    def waiter() -> None:
        with locked(path) as held, locked(path, blocking=False) as other:
            seen.append((held, other))

    with locked(path):
        thread = threading.Thread(target=waiter)
        thread.start()
        threading.Event().wait(0.3)  # the waiter opens the file and blocks in flock
        path.unlink()
    thread.join(5)
    assert seen == [(True, False)]


def test_the_mount_of_a_path_is_the_longest_mount_point_above_it_and_the_last_of_equal_ones() -> None:
    table = MOUNTINFO + "40 22 0:50 / /vm rw - xfs /dev/sdb rw\n41 22 0:51 / /vm rw - ext4 /dev/sdc rw,noatime\n"
    found = mount_of(table, Path("/vm/pets/vm-0.qcow2"))
    assert found == Mount("/vm", "ext4", ("rw", "rw", "noatime"))
    assert mount_of(table, Path("/image dir/x")) == Mount("/image dir", "nfs", ("rw", "rw", "vers=3", "local_lock=all"))
    assert mount_of(table, Path("/vmx")) == Mount("/", "ext4", ("rw", "relatime", "rw"))
    assert mount_of("garbage\n", Path("/vm")) is None
