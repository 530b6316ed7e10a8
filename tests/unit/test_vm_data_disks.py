"""Data disks: DATA_DISKS parsed strictly, each disk made once on its volume, grown but never shrunk, bound to its
VM by its owner record, locked against a second runner, forged files refused, and each in qemu's argv as a node and
device of its own with its name as the serial, on no IDE unit of the pet, the config drive or a CD-ROM."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from shared import files
from shared.errors import ConfigError, PodvmError
from tests.harness import samples
from vmrunner.config import Config, DataDisk, load
from vmrunner.pet import datadisks
from vmrunner.pet.state import DATA_DISK, own_files, own_state
from vmrunner.profiles import cdrom_units
from vmrunner.run import suspend
from vmrunner.run.argv import plan_qemu

BASE = {"IMG_SOURCE": "https://example.org/images/w.qcow2", "HOSTNAME": "vm-0", "RUN_DIR": "/r", "VM_DIR": "/vm"}
HS = samples.handshake()
MIB = 1 << 20


def cfg(**values: str) -> Config:
    return load({**BASE, **values})


# ---- DATA_DISKS ----------------------------------------------------------------------------------------------------


def test_entries_give_name_volume_size_bus_and_format() -> None:
    c = cfg(DATA_DISKS="db:/data/db:20G:virtio:qcow2, share:/data/share:5G\n logs:/data/logs:1G:sata:raw")
    assert c.data_disks == (
        DataDisk("db", Path("/data/db"), 20 << 30, "virtio", "qcow2"),
        DataDisk("share", Path("/data/share"), 5 << 30, "virtio", "qcow2"),
        DataDisk("logs", Path("/data/logs"), 1 << 30, "sata", "raw"),
    )
    assert c.data_disks[0].path == Path("/data/db/db.qcow2")
    assert c.data_disks[2].path == Path("/data/logs/logs.raw")
    assert c.data_disks[0].owner_path == Path("/data/db/.db.owner")
    assert cfg().data_disks == ()


def test_the_bus_defaults_to_the_pets_and_an_ide_pet_gives_sata() -> None:
    assert cfg(DATA_DISKS="db:/d:1G", VM_DISK_BUS="scsi").data_disks[0].bus == "scsi"
    assert cfg(DATA_DISKS="db:/d:1G", VM_PROFILE="windows").data_disks[0].bus == "sata"
    assert cfg(DATA_DISKS="db:/d:1G::raw").data_disks[0] == DataDisk("db", Path("/d"), 1 << 30, "virtio", "raw")


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("db:/d", "expected name:/volume/dir:size[:bus[:format]]"),
        ("db:/d:1G:virtio:qcow2:x", "expected name:/volume/dir:size[:bus[:format]]"),
        ("DB:/d:1G", "the name must be"),
        ("a-name-longer-than-twenty:/d:1G", "the name must be"),
        ("../x:/d:1G", "the name must be"),
        ("db:d:1G", "absolute path"),
        ("db:/d/../vm:1G", "without '..'"),
        ("db:/d:lots", "expected a size"),
        ("db:/d:1K", "at least 1M"),
        ("db:/d:1G:ide", "bus 'ide': expected one of virtio, scsi, sata"),
        ("db:/d:1G:virtio:vmdk", "format 'vmdk': expected one of qcow2, raw"),
        ("db:/d:1G,db:/e:1G", "given twice"),
        ("db:/d:1G,logs:/d:1G", "a volume of its own"),
        ("db:/vm/db:1G", "not a volume of its own (VM_DIR=/vm)"),
        ("db:/image:1G", "not a volume of its own (IMAGE_DIR=/image)"),
        ("db:/:1G", "expected the absolute path of the disk's volume"),
        (",".join(f"d{i}:/d{i}:1G" for i in range(7)), "7 disks, at most 6"),
    ],
)
def test_a_bad_entry_is_one_line_naming_data_disks(raw: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(DATA_DISKS=raw)
    assert str(err.value).startswith("DATA_DISKS") and says in str(err.value) and "\n" not in str(err.value)


# ---- the one list of the VM's own state ----------------------------------------------------------------------------


def test_each_data_disk_is_an_own_file_on_its_volume() -> None:
    c = cfg(DATA_DISKS="db:/data/db:1G,share:/data/share:2G:scsi:raw")
    own = [o for o in own_files(c) if o.kind == DATA_DISK]
    assert [(o.name, o.path, o.volume) for o in own] == [
        ("db", Path("/data/db/db.qcow2"), Path("/data/db")),
        ("share", Path("/data/share/share.raw"), Path("/data/share")),
    ]
    assert own[0].root(c.vm_dir) == Path("/data/db") and own_files(c)[0].root(c.vm_dir) == Path("/vm")
    shown = [s for s in own_state(c) if s["kind"] == DATA_DISK]
    assert [(s["name"], s["volume"], s["exists"]) for s in shown] == [
        ("db", "/data/db", False),
        ("share", "/data/share", False),
    ]


def test_a_suspended_state_is_fingerprinted_with_the_data_disks(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    (tmp_path / "db").mkdir()
    c = cfg(VM_DIR=str(tmp_path / "vm"), DATA_DISKS=f"db:{tmp_path / 'db'}:1G")
    (tmp_path / "vm" / "vm-0.qcow2").write_bytes(b"pet")
    (tmp_path / "db" / "db.qcow2").write_bytes(b"data")
    before = suspend.fingerprints(c)
    assert set(before) == {"vm-0.qcow2", str(tmp_path / "db" / "db.qcow2")}
    (tmp_path / "db" / "db.qcow2").write_bytes(b"written")
    assert suspend.fingerprints(c)[str(tmp_path / "db" / "db.qcow2")] != before[str(tmp_path / "db" / "db.qcow2")]


# ---- the decisions, pure -------------------------------------------------------------------------------------------

DISK = DataDisk("db", Path("/data/db"), 2 * MIB, "virtio", "qcow2")


def test_a_missing_disk_without_a_record_or_with_an_unfinished_one_is_made() -> None:
    assert datadisks.judge(DISK, None, False, "vm-0") == "create"
    assert datadisks.judge(DISK, datadisks.Owner("vm-0", False), False, "vm-0") == "create"
    assert datadisks.judge(DISK, datadisks.Owner("vm-0", True), True, "vm-0") == "use"
    assert datadisks.judge(DISK, datadisks.Owner("vm-0", False), True, "vm-0") == "use"


@pytest.mark.parametrize(
    ("owner", "exists", "says"),
    [
        (datadisks.Owner("vm-1", True), True, "belongs to the VM 'vm-1'"),
        (datadisks.Owner("vm-1", False), False, "belongs to the VM 'vm-1'"),
        (None, True, "has no owner record .db.owner"),
        (datadisks.Owner("vm-0", True), False, "is missing, but .db.owner says it was made"),
    ],
)
def test_another_vms_disk_an_unknown_disk_and_a_vanished_one_are_refused(
    owner: datadisks.Owner | None, exists: bool, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        datadisks.judge(DISK, owner, exists, "vm-0")
    assert str(err.value).startswith("DATA_DISKS entry 'db'") and says in str(err.value)


def test_owner_records_round_trip_and_forged_ones_count_as_none() -> None:
    assert datadisks.parse_owner(datadisks.owner_document("vm-0", True)) == datadisks.Owner("vm-0", True)
    for forged in (None, b"", b"vm-0", b"[]", b'{"vm": 1, "made": true}', b'{"vm": "vm-0", "made": "yes"}'):
        assert datadisks.parse_owner(forged) is None


def test_a_disk_is_created_at_its_size_grown_to_a_larger_one_and_never_shrunk() -> None:
    assert datadisks.plan_create(DISK) == ("qemu-img", "create", "-q", "-f", "qcow2", "/dev/fd/0", str(2 * MIB))
    assert datadisks.plan_grow(DISK, MIB) == ("qemu-img", "resize", "-q", "-f", "qcow2", "/dev/fd/0", str(2 * MIB))
    assert datadisks.plan_grow(DISK, 2 * MIB) is None
    assert datadisks.plan_grow(DISK, 3 * MIB) is None


def test_a_header_naming_another_file_is_refused() -> None:
    assert datadisks.header_problem({"virtual-size": MIB}) is None
    assert "backing file '/etc/shadow'" in str(
        datadisks.header_problem({"virtual-size": MIB, "backing-filename": "/etc/shadow"})
    )
    data_file = {"virtual-size": MIB, "format-specific": {"type": "qcow2", "data": {"data-file": "/etc/shadow"}}}
    assert "external data file" in str(datadisks.header_problem(data_file))
    assert datadisks.header_problem({}) == "qemu-img info printed no usable JSON"


# ---- applied on real files with the real qemu-img ------------------------------------------------------------------


def volume_cfg(tmp_path: Path, spec: str = "2M", hostname: str = "vm-0", fmt: str = "qcow2") -> Config:
    (tmp_path / "db").mkdir(exist_ok=True)
    return cfg(VM_DIR=str(tmp_path / "vm"), HOSTNAME=hostname, DATA_DISKS=f"db:{tmp_path / 'db'}:{spec}:virtio:{fmt}")


def virtual_size(path: Path, fmt: str = "qcow2") -> int:
    out = subprocess.run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)], capture_output=True, check=True)
    return int(json.loads(out.stdout)["virtual-size"])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_made_once_kept_across_starts_and_grown(tmp_path: Path, fmt: str) -> None:
    c = volume_cfg(tmp_path, fmt=fmt)
    disk = c.data_disks[0]
    with datadisks.held(c) as ready:
        assert [r.virtual_size for r in ready] == [2 * MIB]
    assert virtual_size(disk.path, fmt) == 2 * MIB
    assert datadisks.parse_owner(disk.owner_path.read_bytes()) == datadisks.Owner("vm-0", True)
    assert disk.path.stat().st_mode & 0o077 == 0
    with open(disk.path, "r+b") as out:  # the guest's data, which a later start must keep
        out.seek(MIB if fmt == "raw" else 0)
        marker = out.read(4) if fmt == "qcow2" else b"mark"
        out.seek(MIB)
        out.write(b"mark")
    inode = disk.path.stat().st_ino
    with datadisks.held(volume_cfg(tmp_path, "4M", fmt=fmt)) as ready:
        assert [r.virtual_size for r in ready] == [4 * MIB]
    assert disk.path.stat().st_ino == inode, "never recreated"
    with open(disk.path, "rb") as back:
        back.seek(MIB)
        assert back.read(4) == b"mark"
        back.seek(0)
        assert fmt == "raw" or back.read(4) == marker
    with datadisks.held(volume_cfg(tmp_path, "3M", fmt=fmt)) as ready:
        assert [r.virtual_size for r in ready] == [4 * MIB], "never shrunk"
    assert [p.name for p in (tmp_path / "db").iterdir() if p.name.endswith(".tmp")] == []


def test_another_vms_disk_is_refused_on_its_volume(tmp_path: Path) -> None:
    with datadisks.held(volume_cfg(tmp_path)):
        pass
    with pytest.raises(ConfigError) as err, datadisks.held(volume_cfg(tmp_path, hostname="vm-1")):
        pass
    assert "belongs to the VM 'vm-0' (.db.owner), not to HOSTNAME=vm-1" in str(err.value)


def test_a_disk_held_by_another_runner_is_refused(tmp_path: Path) -> None:
    c = volume_cfg(tmp_path)
    with datadisks.held(c), pytest.raises(ConfigError) as err, datadisks.held(c):
        pass
    assert "in use by another VM (its lock .db.lock is held)" in str(err.value)
    with datadisks.held(c):  # released with the first runner
        pass


def test_a_disk_without_a_record_is_refused_and_nothing_is_made(tmp_path: Path) -> None:
    c = volume_cfg(tmp_path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(c.data_disks[0].path), "1M"], check=True)
    with pytest.raises(ConfigError, match="has no owner record"), datadisks.held(c):
        pass
    assert not c.data_disks[0].owner_path.exists()


def test_a_link_planted_as_the_disk_or_a_header_naming_a_file_is_refused(tmp_path: Path) -> None:
    c = volume_cfg(tmp_path)
    disk = c.data_disks[0]
    files.write_atomic(disk.owner_path, datadisks.owner_document("vm-0", True), 0o600)
    os.symlink("/etc/passwd", disk.path)
    with pytest.raises(PodvmError, match="cannot be opened as a regular file"), datadisks.held(c):
        pass
    disk.path.unlink()
    base = tmp_path / "secret.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk.path)], check=True
    )
    with pytest.raises(PodvmError, match="names the backing file"), datadisks.held(c):
        pass


def test_a_missing_volume_is_one_line(tmp_path: Path) -> None:
    c = cfg(VM_DIR=str(tmp_path / "vm"), DATA_DISKS=f"db:{tmp_path / 'absent'}:1G")
    with pytest.raises(ConfigError, match="is not a directory"), datadisks.held(c):
        pass


def test_plan_and_status_describe_each_disk(tmp_path: Path) -> None:
    c = volume_cfg(tmp_path)
    assert datadisks.describe(c)[0]["next_start"] == "create"
    with datadisks.held(c):
        pass
    shown = datadisks.describe(volume_cfg(tmp_path, "8M"))[0]
    assert shown["virtual_size"] == 2 * MIB and shown["owner"] == "vm-0" and shown["next_start"] == "grow"
    other = datadisks.describe(volume_cfg(tmp_path, hostname="vm-1"))[0]
    assert other["next_start"] == "refused" and "belongs to the VM 'vm-0'" in str(other["problem"])


# ---- qemu's argv ---------------------------------------------------------------------------------------------------


def argv(**values: str) -> list[str]:
    return list(plan_qemu(cfg(**values), HS, "tcg", False, Path("/r/config-drive.iso")).argv)


def blockdevs(args: list[str]) -> list[dict[str, object]]:
    return [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-blockdev"]


def devices(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "-device"]


def test_each_disk_is_its_own_node_and_device_with_its_name_as_serial() -> None:
    args = argv(DATA_DISKS="db:/data/db:1G,share:/data/share:1G:scsi:raw,logs:/data/logs:1G:sata")
    nodes = blockdevs(args)
    assert [n["node-name"] for n in nodes] == ["data-db", "data-share", "data-logs"]
    assert nodes[0] == {
        "driver": "qcow2",
        "node-name": "data-db",
        "discard": "unmap",
        "cache": {"direct": False, "no-flush": False},
        "file": {"driver": "file", "filename": "/data/db/db.qcow2", "discard": "unmap"},
        "backing": None,
    }
    assert "backing" not in nodes[1] and nodes[1]["driver"] == "raw"
    errors = "werror=enospc,rerror=report,write-cache=on"
    found = devices(args)
    assert f"virtio-blk-pci,drive=data-db,id=datadisk-db,serial=db,{errors}" in found
    assert f"scsi-hd,drive=data-share,id=datadisk-share,serial=share,{errors},bus=datascsi.0" in found
    assert f"ide-hd,drive=data-logs,id=datadisk-logs,serial=logs,{errors},bus=datasata.0" in found
    assert found.count("virtio-scsi-pci,id=datascsi") == 1 and found.count("ich9-ahci,id=datasata") == 1
    assert not any("bootindex" in d for d in found if "datadisk" in d)
    assert blockdevs(argv()) == []


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_sata_disks_take_ports_of_their_own_controller_never_an_ide_unit(machine: str) -> None:
    spec = ",".join(f"d{i}:/d{i}:1G:sata" for i in range(6))
    found = devices(argv(DATA_DISKS=spec, VM_MACHINE=machine, VM_DISK_BUS="ide", VM_CDROMS="empty empty"))
    data = [d for d in found if "datadisk" in d]
    assert [d.rsplit("bus=", 1)[1] for d in data] == [f"datasata.{n}" for n in range(6)]
    taken = {f"bus={bus},unit={unit}" for bus, unit in cdrom_units(machine)} | {"bus=ide.0,unit=0", "bus=ide.1,unit=0"}
    assert not any(unit in d for d in data for unit in taken)
