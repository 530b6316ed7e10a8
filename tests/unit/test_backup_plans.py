"""Backup plans as data: which kind of backup comes next and why, the qemu-img argv and QMP documents, the
manifest's checks, retention, leftovers, and which point a restore picks."""

import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ConfigError
from vmrunner import cli
from vmrunner.backups import plans
from vmrunner.backups.job import Result
from vmrunner.backups.plans import Bitmap, Chain, Point, decide, may_offload, plan_backup
from vmrunner.config import load
from vmrunner.run.argv import data_node

SIZE = 64 << 20
T0 = datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC).timestamp()


def point(seq: int, unix: float = T0) -> Point:
    kind = "full" if seq == 0 else "incremental"
    return Point(seq, kind, plans.point_file(seq, kind), "2026-11-28T04:00:00Z", unix, 1 << 20, 1 << 19, 1.0, False)


def chain(n: int = 2, cid: str = "20261128T040000Z", size: int = SIZE) -> Chain:
    return Chain(cid, size, tuple(point(i, T0 + 60 * i) for i in range(n)))


def ok(name: str = "podvm-20261128T040000Z") -> Bitmap:
    return Bitmap(name, inconsistent=False, recording=True)


def decision(chains: list[Chain], bitmaps: list[Bitmap], **kw: object) -> plans.Decision:
    args: dict[str, object] = {"want_full": False, "interrupted": False, "chain_length": 6, **kw}
    size = int(str(args.pop("size", SIZE)))
    return decide(chains, bitmaps, size, **args)  # type: ignore[arg-type]


def test_incremental_when_the_newest_chain_and_its_bitmap_are_intact() -> None:
    older = chain(3, "20261127T040000Z")
    got = decision([older, chain(2)], [ok("podvm-20261127T040000Z"), ok()])
    assert got.kind == "incremental"
    assert got.chain == chain(2)
    assert got.reason == "changes since 20261128T040000Z.1"


@pytest.mark.parametrize(
    ("chains", "bitmaps", "extra", "reason"),
    [
        ([chain()], [ok()], {"want_full": True}, "a full backup was asked for"),
        ([], [ok()], {}, "no backup chain yet"),
        ([chain()], [], {}, "the pet has no bitmap podvm-20261128T040000Z"),
        ([chain()], [ok("podvm-20261127T040000Z")], {}, "the pet has no bitmap podvm-20261128T040000Z"),
        ([chain()], [Bitmap("podvm-20261128T040000Z", True, True)], {}, "is inconsistent: qemu stopped without"),
        ([chain()], [Bitmap("podvm-20261128T040000Z", False, False)], {}, "is not recording"),
        ([chain()], [ok()], {"interrupted": True}, "was interrupted at an unknown point"),
        ([chain()], [ok()], {"missing": ("0001-incremental.qcow2",)}, "lost its files 0001-incremental.qcow2"),
        ([chain()], [ok()], {"size": SIZE * 2}, f"the disk's size changed from {SIZE} to {SIZE * 2} bytes"),
        ([chain(7)], [ok()], {}, "has 6 incrementals (BACKUP_CHAIN_LENGTH)"),
        ([chain(1)], [ok()], {"chain_length": 0}, "has 0 incrementals (BACKUP_CHAIN_LENGTH)"),
    ],
)
def test_every_reason_for_a_full_backup_is_said(
    chains: list[Chain], bitmaps: list[Bitmap], extra: dict[str, object], reason: str
) -> None:
    got = decision(chains, bitmaps, **extra)
    assert got.kind == "full"
    assert got.chain is None
    assert reason in got.reason


def test_full_plan_adds_a_persistent_bitmap_in_the_same_transaction_as_the_job() -> None:
    full = decision([], [])
    stale = [ok("podvm-20261120T000000Z"), Bitmap("someone-elses", False, True)]
    plan = plan_backup(Path("/backup/vm-0"), full, SIZE, stale, chain_id="20261128T050000Z", speed=0)
    assert plan.create == (
        "qemu-img", "create", "-q", "-u", "-f", "qcow2", "/dev/fd/0", str(SIZE),
    )  # fmt: skip
    assert plan.final == Path("/backup/vm-0/20261128T050000Z/0000-full.qcow2")
    assert plan.partial == Path("/backup/vm-0/20261128T050000Z/.0000-full.qcow2.partial")
    assert plan.attach == {
        "driver": "qcow2",
        "node-name": "podvm-backup-target",
        "file": {"driver": "file", "filename": "/dev/fdset/25"},
        "backing": None,
        "cache": {"no-flush": True},  # written out by the runner's fsync once the job completed
    }
    assert plan.transaction == {
        "actions": [
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": "pet0", "name": "podvm-20261128T050000Z", "persistent": True},
            },
            {
                "type": "blockdev-backup",
                "data": {
                    "job-id": "podvm-backup",
                    "device": "pet0",
                    "target": "podvm-backup-target",
                    "auto-dismiss": False,
                    "sync": "full",
                },
            },
        ]
    }
    assert plan.remove_bitmaps == ("podvm-20261120T000000Z",)  # ours only; another tool's bitmap is left alone


def test_full_plan_clears_a_bitmap_of_the_same_name_instead_of_adding_it() -> None:
    plan = plan_backup(Path("/b"), decision([], []), SIZE, [ok()], chain_id="20261128T040000Z", speed=0)
    assert plan.transaction["actions"][0] == {  # type: ignore[index]
        "type": "block-dirty-bitmap-clear",
        "data": {"node": "pet0", "name": "podvm-20261128T040000Z"},
    }
    assert plan.remove_bitmaps == ()


def test_incremental_plan_is_backed_by_the_previous_file_by_relative_name_and_uses_the_chain_bitmap() -> None:
    inc = decision([chain(2)], [ok()])
    plan = plan_backup(Path("/b/vm"), inc, SIZE, [ok()], chain_id="ignored", speed=1 << 20)
    assert plan.seq == 2
    assert plan.create == (
        "qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "0001-incremental.qcow2",
        "/dev/fd/0", str(SIZE),
    )  # fmt: skip
    assert plan.transaction == {
        "actions": [
            {
                "type": "blockdev-backup",
                "data": {
                    "job-id": "podvm-backup",
                    "device": "pet0",
                    "target": "podvm-backup-target",
                    "auto-dismiss": False,
                    "speed": 1 << 20,
                    "sync": "incremental",
                    "bitmap": "podvm-20261128T040000Z",
                    "bitmap-mode": "on-success",
                },
            }
        ]
    }
    assert plan.remove_bitmaps == ()
    assert (plan.virtual_size, plan.previous) == (SIZE, chain(2).points), "the manifest is extended, not rewritten"


def test_retention_keeps_the_newest_chains() -> None:
    chains = [chain(1, f"2026112{d}T040000Z") for d in range(5)]
    assert plans.plan_retention(chains, 2) == ["20261120T040000Z", "20261121T040000Z", "20261122T040000Z"]
    assert plans.plan_retention(chains, 5) == []
    assert plans.plan_retention(chains[:1], 1) == []


def test_chain_ids_sort_by_time_and_never_collide() -> None:
    now = datetime(2026, 11, 28, 4, 5, 6, tzinfo=UTC)
    assert plans.new_chain_id(now, set()) == "20261128T040506Z"
    assert plans.new_chain_id(now, {"20261128T040506Z", "20261128T040506Z-1"}) == "20261128T040506Z-2"


def test_manifest_round_trips() -> None:
    c = chain(3)
    assert plans.parse_manifest(plans.manifest_document(c), c.id) == c


def _doc(c: Chain, **changes: object) -> bytes:
    doc = json.loads(plans.manifest_document(c))
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "not JSON"),
        (_doc(chain(), version=2), "version 1"),
        (_doc(chain(), chain="20261111T000000Z"), "in directory"),
        (_doc(chain(), points=[]), "at least the full"),
        (_doc(chain(), virtual_size=-1), "virtual_size"),
        (_doc(chain(), points=[{"seq": 0}]), "unexpected fields"),
    ],
)
def test_a_bad_manifest_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plans.parse_manifest(data, "20261128T040000Z")


@pytest.mark.parametrize(
    "bad",
    [
        replace(point(1), file="../../etc/shadow"),  # a path out of the chain
        replace(point(1), file="0001-full.qcow2", kind="full"),  # a second full in a chain
        replace(point(1), file="0002-incremental.qcow2"),  # a file of another point
        replace(point(1), seq=5),
        replace(point(1), frozen="yes"),  # type: ignore[arg-type]
    ],
)
def test_a_point_naming_another_file_is_refused(bad: Point) -> None:
    c = Chain("20261128T040000Z", SIZE, (point(0), bad))
    with pytest.raises(ValueError):
        plans.parse_manifest(plans.manifest_document(c), c.id)


def test_chains_and_leftovers_on_disk(tmp_path: Path) -> None:
    good = chain(2)
    (tmp_path / good.id).mkdir()
    (tmp_path / good.id / plans.MANIFEST).write_bytes(plans.manifest_document(good))
    (tmp_path / good.id / ".0002-incremental.qcow2.partial").write_bytes(b"x")
    half = tmp_path / "20261128T050000Z"  # an interrupted first backup: no manifest
    half.mkdir()
    (half / ".0000-full.qcow2.partial").write_bytes(b"x")
    foreign = tmp_path / "20261128T060000Z"  # no manifest, but holding someone's file: not removed
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "not-a-chain").mkdir()
    chains, broken = plans.read_chains(tmp_path)
    assert chains == [good]
    assert broken == [half, foreign]
    assert plans.leftovers(tmp_path, chains, broken) == [tmp_path / good.id / ".0002-incremental.qcow2.partial", half]
    assert plans.read_chains(tmp_path / "absent") == ([], [])


def test_bitmaps_are_read_from_the_pet_node_only() -> None:
    nodes = [
        {"node-name": "pet0", "dirty-bitmaps": [{"name": "podvm-a", "recording": True, "inconsistent": True}]},
        {"node-name": "other", "dirty-bitmaps": [{"name": "podvm-b"}]},
        "junk",
    ]
    assert plans.parse_bitmaps(nodes) == [Bitmap("podvm-a", inconsistent=True, recording=True)]
    assert plans.parse_bitmaps(None) == []


def test_restore_selects_points_by_id_chain_or_time() -> None:
    old, new = chain(2, "20261127T040000Z"), chain(3, "20261128T040000Z")
    old = Chain(old.id, SIZE, tuple(replace(p, unix=p.unix - 86400) for p in old.points))
    chains = [old, new]
    assert plans.select_point(chains, None) == (new, new.points[2])
    assert plans.select_point(chains, "20261127T040000Z") == (old, old.points[1])
    assert plans.select_point(chains, "20261128T040000Z.1") == (new, new.points[1])
    assert plans.select_point(chains, "2026-11-28T04:01:30Z") == (new, new.points[1])
    assert plans.select_point(chains, "2026-11-27") == (old, old.points[1])  # a date: the end of that day
    for wanted, message in [
        ("2026-11-01", "no backup was taken at or before"),
        ("20261128T040000Z.9", "no such point"),
        ("../x", "no such point"),
    ]:
        with pytest.raises(ConfigError, match=message):
            plans.select_point(chains, wanted)
    with pytest.raises(ConfigError, match="holds no complete chain"):
        plans.select_point([], None)


def test_restore_plan_converts_through_the_chain_into_one_standalone_file() -> None:
    c = chain(3)
    argv = plans.plan_restore(["/dev/fd/7", "/dev/fd/6"], Path("/vm/.vm-0.qcow2.restore.tmp"))
    assert argv[:5] == ("qemu-img", "convert", "-p", "-O", "qcow2")
    assert argv[6] == "/vm/.vm-0.qcow2.restore.tmp"
    assert argv[5].startswith("json:")
    assert json.loads(argv[5].removeprefix("json:")) == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/dev/fd/7"},
        "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/dev/fd/6"}, "backing": None},
    }, "every layer is a descriptor the runner opened, the oldest backed by nothing"
    assert plans.expected_backings(c, c.points[2]) == [
        ("0002-incremental.qcow2", "0001-incremental.qcow2"),
        ("0001-incremental.qcow2", "0000-full.qcow2"),
        ("0000-full.qcow2", None),
    ]


def test_backup_settings_are_validated() -> None:
    base = {"HOSTNAME": "vm-0"}
    cfg = load(base, image=False)
    assert (cfg.backup_dir, cfg.backup_interval, cfg.backup_keep, cfg.backup_chain_length, cfg.backup_speed) == (
        Path("/backup"), None, 2, 6, 0,
    )  # fmt: skip
    cfg = load({**base, "BACKUP_INTERVAL": "6h", "BACKUP_KEEP": "4", "BACKUP_SPEED": "50M"}, image=False)
    assert (cfg.backup_interval, cfg.backup_keep, cfg.backup_speed) == (21600.0, 4, 50 << 20)
    for name, value, message in [
        ("BACKUP_INTERVAL", "5s", "at least 10s"),
        ("BACKUP_INTERVAL", "daily", "expected a duration"),
        ("BACKUP_KEEP", "0", "from 1 to 1000"),
        ("BACKUP_CHAIN_LENGTH", "-1", "from 0 to 1000"),
        ("BACKUP_DIR", "backup", "absolute path"),
        ("BACKUP_SPEED", "fast", "expected a size"),
    ]:
        with pytest.raises(ConfigError, match=f"^{name}=.*{message}"):
            load({**base, name: value}, image=False)


def test_result_line_says_kind_bytes_time_rate_and_freeze() -> None:
    line = Result("incremental", "c.2", 3 << 20, 4 << 20, 1.5, False, "no guest agent channel").line()
    assert line == (
        "backup c.2 done: incremental, copied 3.0 MiB (file 4.0 MiB) in 1.5 s, 2.1 MB/s, "
        "frozen: no (no guest agent channel)"
    )
    assert "frozen: yes" in Result("full", "c.0", 1, 1, 0.0, True, "froze 1 file systems").line()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["backup", "--fast"], "backup: unexpected argument '--fast'"),
        (["restore", "--bogus"], "restore: unexpected argument '--bogus'"),
        (["restore", "a", "b"], "restore: unexpected argument 'b'"),
        (["restore", "--name", "../etc"], "restore --name '../etc': expected up to 63"),
        (["gc", "--now"], "gc: unexpected argument '--now' (expected [--dry-run] [--grace DURATION])"),
        (["gc", "--grace"], "gc: argument --grace: expected one argument"),
    ],
)
def test_backup_and_restore_arguments_are_one_line_errors(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOSTNAME", "vm-0")
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path))
    monkeypatch.setenv("VM_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(message)):
        cli.dispatch(args)


def test_the_schedule_counts_from_the_last_success_not_from_the_start() -> None:
    """A pod restarted more often than BACKUP_INTERVAL still gets its backups; a failure is retried, not hammered;
    a time from the future (bad clock, forged record) cannot hold the backups off."""
    day, now = 86400.0, 1_000_000.0
    ok = {"last": {"time": now - 3600, "result": "ok"}, "last_success": {"time": now - 3600, "result": "ok"}}
    assert plans.next_backup_in(ok, now, day, first=True) == day - 3600, "a restart does not start the day over"
    overdue = {"last_success": {"time": now - 2 * day}}
    assert plans.next_backup_in(overdue, now, day, first=True) == plans.BOOT_SETTLE, "after the boot settles"
    assert plans.next_backup_in(overdue, now, day, first=False) == 0
    assert plans.next_backup_in({}, now, day, first=True) == plans.BOOT_SETTLE, "never backed up: soon"
    assert plans.next_backup_in({}, now, 10.0, first=True) == 10.0, "a short interval settles for less"
    failed: dict[str, dict[str, object]] = {"last_success": {"time": now - 2 * day}}
    failed["last"] = {"time": now - 60, "result": "failed"}
    assert plans.next_backup_in(failed, now, day, first=False) == plans.RETRY_AFTER - 60
    future: dict[str, dict[str, object]] = {"last_success": {"time": now + 10 * day}, "last": {"time": "x"}}
    assert plans.next_backup_in(future, now, day, first=False) == day


# ---- data disks: one transaction, one manifest -----------------------------------------------------------------------

DATA_SIZE = 8 << 20


def data_chain(n: int = 2, names: tuple[str, ...] = ("db", "share")) -> Chain:
    base = chain(n)
    points = tuple(
        replace(p, disks={name: plans.data_file(p.seq, p.kind, name) for name in names}) for p in base.points
    )
    return Chain(base.id, base.virtual_size, points, dict.fromkeys(names, DATA_SIZE))


def data(
    *names: str, bitmaps: list[Bitmap] | None = None, size: int = DATA_SIZE
) -> dict[str, tuple[int, list[Bitmap]]]:
    return {name: (size, [ok()] if bitmaps is None else bitmaps) for name in names}


def test_a_manifest_names_each_data_disks_file_of_each_point() -> None:
    c = data_chain()
    doc = json.loads(plans.manifest_document(c))
    assert doc["data_disks"] == {"db": DATA_SIZE, "share": DATA_SIZE}
    assert doc["points"][1]["disks"] == {"db": "0001-incremental.db.qcow2", "share": "0001-incremental.share.qcow2"}
    assert plans.parse_manifest(plans.manifest_document(c), c.id) == c
    assert "data_disks" not in json.loads(plans.manifest_document(chain())), "a pet alone: the manifest as before"


@pytest.mark.parametrize(
    "forge",
    [
        lambda d: d["points"][0]["disks"].pop("share"),
        lambda d: d["points"][1]["disks"].update(db="0000-full.db.qcow2"),
        lambda d: d["points"][0]["disks"].update(db="../../vm/vm-0.qcow2"),
        lambda d: d["data_disks"].update({"../x": 1}),
        lambda d: d["data_disks"].update(db=-1),
    ],
)
def test_a_manifest_with_forged_data_disk_files_is_refused(forge: object) -> None:
    doc = json.loads(plans.manifest_document(data_chain()))
    forge(doc)  # type: ignore[operator]
    with pytest.raises(ValueError):
        plans.parse_manifest(json.dumps(doc).encode(), "20261128T040000Z")


def test_an_incremental_needs_every_data_disks_bitmap_and_the_same_disks() -> None:
    assert decision([data_chain()], [ok()], data=data("db", "share")).kind == "incremental"
    for changed, why in (
        (data("db"), "the data disks changed since chain 20261128T040000Z"),
        (data("db", "share", size=2 * DATA_SIZE), "the data disks changed"),
        ({**data("db"), **data("share", bitmaps=[])}, "the data disk share's bitmap podvm-20261128T040000Z is missing"),
        (
            {**data("db", bitmaps=[Bitmap("podvm-20261128T040000Z", True, True)]), **data("share")},
            "the data disk db's bitmap podvm-20261128T040000Z is inconsistent",
        ),
    ):
        got = decision([data_chain()], [ok()], data=changed)
        assert got.kind == "full" and why in got.reason, (changed, got.reason)
    assert decision([chain()], [ok()], data=data("db")).kind == "full", "a data disk added since the chain"


def test_one_transaction_backs_up_the_pet_and_every_data_disk() -> None:
    full = plan_backup(
        Path("/b/vm"), decision([], []), SIZE, [], chain_id="20261128T050000Z", speed=0,
        data=data("db", "share", bitmaps=[ok("podvm-20261120T000000Z")]),
    )  # fmt: skip
    actions: list[dict[str, Any]] = full.transaction["actions"]  # type: ignore[assignment]
    assert [(a["type"], a["data"].get("node") or a["data"]["device"]) for a in actions] == [
        ("block-dirty-bitmap-add", "pet0"),
        ("blockdev-backup", "pet0"),
        ("block-dirty-bitmap-add", "data-db"),
        ("blockdev-backup", "data-db"),
        ("block-dirty-bitmap-add", "data-share"),
        ("blockdev-backup", "data-share"),
    ]
    assert "properties" not in full.transaction, "qemu takes no bitmap-add in a grouped transaction"
    db = full.data[0]
    assert (db.file, db.partial, db.final, db.fdset) == (
        "0000-full.db.qcow2",
        Path("/b/vm/20261128T050000Z/.0000-full.db.qcow2.partial"),
        Path("/b/vm/20261128T050000Z/0000-full.db.qcow2"),
        26,
    )
    assert db.attach["node-name"] == "podvm-backup-target-db" and full.data[1].fdset == 27
    assert actions[3]["data"] == {
        "job-id": "podvm-backup-db", "device": "data-db", "target": "podvm-backup-target-db", "auto-dismiss": False,
        "sync": "full",
    }  # fmt: skip
    assert db.remove_bitmaps == ("podvm-20261120T000000Z",)

    inc = plan_backup(
        Path("/b/vm"), decision([data_chain()], [ok()], data=data("db", "share")), SIZE, [ok()],
        chain_id="ignored", speed=0, data=data("db", "share"),
    )  # fmt: skip
    assert inc.transaction["properties"] == {"completion-mode": "grouped"}
    assert inc.data[0].create == (
        "qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "0001-incremental.db.qcow2",
        "/dev/fd/0", str(DATA_SIZE),
    )  # fmt: skip
    assert inc.transaction["actions"][1]["data"]["bitmap-mode"] == "on-success"  # type: ignore[index]


def test_a_restore_reads_each_data_disk_through_its_own_files() -> None:
    c = data_chain(3)
    assert plans.expected_backings(c, c.points[2], "db") == [
        ("0002-incremental.db.qcow2", "0001-incremental.db.qcow2"),
        ("0001-incremental.db.qcow2", "0000-full.db.qcow2"),
        ("0000-full.db.qcow2", None),
    ]
    assert plans.plan_restore(["/dev/fd/5"], Path("/d/.db.raw.restore.tmp"), "raw")[3:5] == ("-O", "raw")


@pytest.mark.parametrize(
    ("fstypes", "offload"),
    [
        (["ext4"], True),
        (["ext4", "tmpfs"], True),
        (["xfs"], False),  # reflinks: the backup would share the pet's blocks
        (["ext4", "btrfs"], False),  # one data disk on a sharing file system turns it off for all
        (["ext4", None], False),  # a volume whose mount is unknown
        (["nfs4"], False),
    ],
)
def test_copy_offload_is_used_only_where_every_disks_file_system_copies_rather_than_shares(
    fstypes: list[str | None], offload: bool
) -> None:
    assert may_offload(fstypes) is offload


def test_an_offloaded_plan_asks_every_job_for_copy_file_range_beside_its_speed() -> None:
    plan = plan_backup(
        Path("/b/vm"), decision([], []), SIZE, [], chain_id="20261128T050000Z", speed=1 << 20, offload=True,
        data=data("db"),
    )  # fmt: skip
    actions: list[dict[str, Any]] = plan.transaction["actions"]  # type: ignore[assignment]
    jobs = [a["data"] for a in actions if a["type"] == "blockdev-backup"]
    assert [(j["device"], j["x-perf"], j["speed"]) for j in jobs] == [
        ("pet0", {"use-copy-range": True}, 1 << 20),
        (data_node("db"), {"use-copy-range": True}, 1 << 20),
    ]
    plain = plan_backup(Path("/b/vm"), decision([], []), SIZE, [], chain_id="20261128T050000Z", speed=0)
    plain_actions: list[dict[str, Any]] = plain.transaction["actions"]  # type: ignore[assignment]
    assert all("x-perf" not in a["data"] for a in plain_actions)
