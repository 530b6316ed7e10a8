"""The pure judges of foreign disks: vmdk descriptors and qemu-img's reading of them, OVA members and OVF documents,
the settings that name a conversion, and the names that record one."""

import io
import re
import struct
import tarfile
from pathlib import Path

import pytest

from shared.errors import ConfigError, ImageRejected
from tests.harness.pod import runner_env
from vmrunner.config import Config, load
from vmrunner.images import ova, vmdk
from vmrunner.images.names import NameRecord, conversion_key, matches_checksum
from vmrunner.qemu import img

SPARSE = 'createType="monolithicSparse"\nRW 32768 SPARSE "disk.vmdk"\nparentCID=ffffffff\n'
OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"


def cfg(**env: str) -> Config:
    return load(runner_env(Path("/tmp/podvm-unit"), IMG_SOURCE="https://h/disk.vmdk", **env))


def descriptor(text: str) -> vmdk.Descriptor:
    return vmdk.parse_descriptor(text)


@pytest.mark.parametrize("create_type", ["monolithicSparse", "streamOptimized"])
def test_a_single_file_sparse_vmdk_is_accepted(create_type: str) -> None:
    desc = descriptor(SPARSE.replace("monolithicSparse", create_type))
    assert desc == vmdk.Descriptor(create_type, (vmdk.Extent("RW", 32768, "SPARSE", "disk.vmdk"),), False)
    vmdk.judge_descriptor(desc, "img")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('createType="monolithicSparse"\nRW 32768 SPARSE "/etc/shadow"\n', "SPARSE '/etc/shadow' is not the sparse"),
        ('createType="monolithicSparse"\nRW 32768 SPARSE "../other.vmdk"\n', "'../other.vmdk' is not the sparse"),
        ('createType="monolithicSparse"\nRW 32768 FLAT "disk.vmdk" 0\n', "extent FLAT 'disk.vmdk'"),
        ('createType="monolithicSparse"\nRW 32768 SPARSE "a.vmdk"\nRW 32768 SPARSE "b.vmdk"\n', "names 2 extents"),
        ('createType="monolithicSparse"\n', "names 0 extents"),
        ('createType="monolithicSparse"\nRW 32768 SPARSE\n', "SPARSE None is not"),
        ('createType="monolithicSparse"\nRW lots SPARSE "x"\n', "extent unparsed"),
        ('createType="monolithicFlat"\nRW 32768 FLAT "disk-flat.vmdk" 0\n', "type 'monolithicFlat'"),
        ('createType="twoGbMaxExtentSparse"\nRW 4192256 SPARSE "disk-s001.vmdk"\n', "type 'twoGbMaxExtentSparse'"),
        ('RW 32768 SPARSE "disk.vmdk"\n', "type None"),
        (SPARSE.replace("ffffffff", "12345678"), "delta disk on a parent"),
        (SPARSE + 'parentFileNameHint="/etc/shadow"\n', "delta disk on a parent"),
    ],
)
def test_a_descriptor_naming_other_files_is_refused(text: str, words: str) -> None:
    with pytest.raises(ImageRejected, match=r"^img: ") as err:
        vmdk.judge_descriptor(descriptor(text), "img")
    assert words in str(err.value)


def header(capacity: int = 32768, offset: int = 1, size: int = 20) -> bytes:
    return vmdk.SPARSE_MAGIC + struct.pack("<IIQQQQ", 1, 3, capacity, 128, offset, size) + bytes(468)


def test_the_embedded_descriptor_is_read_where_the_header_says() -> None:
    body = header() + SPARSE.encode().ljust(20 * 512, b"\0")
    read = lambda offset, length: body[offset : offset + length]  # noqa: E731
    assert vmdk.embedded_descriptor(body[:512], read, "img").extents[0].file == "disk.vmdk"


@pytest.mark.parametrize(
    ("head", "words"),
    [
        (b"# Disk DescriptorFile\nversion=1\n", "a descriptor file (its data is in other files)"),
        (b"QFI\xfb" + bytes(508), "no sparse vmdk"),
        (header(capacity=0), "capacity 0"),
        (header(offset=0), "without a usable embedded descriptor"),
        (header(size=1 << 20), "without a usable embedded descriptor"),
        (vmdk.SPARSE_MAGIC + bytes(20), "header truncated"),
    ],
)
def test_a_sparse_header_that_defers_to_other_files_is_refused(head: bytes, words: str) -> None:
    with pytest.raises(ImageRejected, match=re.escape(words)):
        vmdk.embedded_descriptor(head, lambda _o, _n: b"", "img")


def info(filename: str, create_type: str = "monolithicSparse", extents: int = 1) -> dict[str, object]:
    extent = {"virtual-size": 1 << 24, "filename": filename, "cluster-size": 65536, "format": ""}
    return {"format-specific": {"type": "vmdk", "data": {"create-type": create_type, "extents": [extent] * extents}}}


def test_qemu_img_must_read_one_extent_the_file_itself() -> None:
    vmdk.judge_extents(info("/proc/1/fd/3"), Path("/proc/1/fd/3"), "img")
    for bad, words in (
        (info("/etc/shadow"), "reads its extent from '/etc/shadow'"),
        (info("/proc/1/fd/3", extents=2), "with extents"),
        (info("/proc/1/fd/3", "monolithicFlat"), "'monolithicFlat' vmdk"),
        ({"format-specific": {}}, "None vmdk"),
    ):
        with pytest.raises(ImageRejected, match=words):
            vmdk.judge_extents(bad, Path("/proc/1/fd/3"), "img")


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 10) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (member("disk.vmdk", tarfile.SYMTYPE), "is a link"),
        (member("disk.vmdk", tarfile.LNKTYPE), "is a link"),
        (member("disk.vmdk", tarfile.CHRTYPE), "a device or FIFO"),
        (member("disk.vmdk", tarfile.BLKTYPE), "a device or FIFO"),
        (member("disk.vmdk", tarfile.FIFOTYPE), "a device or FIFO"),
        (member("disks", tarfile.DIRTYPE), "is a folder"),
        (member("disk.vmdk", tarfile.GNUTYPE_SPARSE), "sparse"),
        (member("/etc/shadow"), "absolute or odd path"),
        (member("../disk.vmdk"), "not a plain file name at the top"),
        (member("a/../../disk.vmdk"), "not a plain file name at the top"),
        (member("sub/disk.vmdk"), "not a plain file name at the top"),
        (member("./disk.vmdk"), "not a plain file name at the top"),
    ],
)
def test_an_ova_member_that_is_not_a_plain_file_at_the_top_is_refused(bad: tarfile.TarInfo, words: str) -> None:
    with pytest.raises(ImageRejected, match=f"^vm.ova: OVA member .*{words}.*; refused$"):
        ova.check_members([member("vm.ovf"), bad], "vm.ova")


def test_members_named_twice_or_too_many_are_refused() -> None:
    assert list(ova.check_members([member("vm.ovf"), member("disk.vmdk")], "x")) == ["vm.ovf", "disk.vmdk"]
    with pytest.raises(ImageRejected, match=re.escape("'disk.vmdk' appears twice")):
        ova.check_members([member("disk.vmdk"), member("disk.vmdk")], "x")
    with pytest.raises(ImageRejected, match="more than 256 members"):
        ova.check_members([member(f"f{i}") for i in range(257)], "x")


def ovf(files: str, disks: str) -> bytes:
    return (
        f'<?xml version="1.0"?><Envelope xmlns="{OVF_NS}" xmlns:ovf="{OVF_NS}"><References>{files}</References>'
        f"<DiskSection><Info>disks</Info>{disks}</DiskSection></Envelope>"
    ).encode()


TWO = ovf(
    '<File ovf:id="f1" ovf:href="system.vmdk" ovf:size="10"/><File ovf:id="f2" ovf:href="data.vmdk"/>',
    '<Disk ovf:diskId="vmdisk1" ovf:fileRef="f1" ovf:capacity="1"/><Disk ovf:diskId="vmdisk2" ovf:fileRef="f2"/>',
)


def test_the_ovf_names_its_disks_in_order_and_the_first_is_the_system_disk() -> None:
    disks = ova.parse_ovf(TWO, "vm.ova")
    assert disks == [ova.Disk("vmdisk1", "system.vmdk", 10), ova.Disk("vmdisk2", "data.vmdk", None)]
    members = {"system.vmdk": member("system.vmdk"), "data.vmdk": member("data.vmdk", size=99)}
    assert ova.choose(disks, members, None, "vm.ova").href == "system.vmdk"
    assert ova.choose(disks, members, "vmdisk2", "vm.ova").href == "data.vmdk"
    assert ova.choose(disks, members, "data.vmdk", "vm.ova").disk_id == "vmdisk2"
    with pytest.raises(ImageRejected, match=r"^IMG_OVA_DISK=vmdisk9: vm.ova has no such disk; it has vmdisk1"):
        ova.choose(disks, members, "vmdisk9", "vm.ova")


def test_an_ovf_naming_a_file_not_in_the_archive_or_another_size_is_refused() -> None:
    disks = ova.parse_ovf(TWO, "vm.ova")
    with pytest.raises(ImageRejected, match=re.escape("OVF names 'data.vmdk', which is not in the archive; refused")):
        ova.choose(disks, {"system.vmdk": member("system.vmdk")}, None, "vm.ova")
    larger = {"system.vmdk": member("system.vmdk", size=11), "data.vmdk": member("data.vmdk")}
    with pytest.raises(ImageRejected, match=re.escape("'system.vmdk' holds 11 bytes, its OVF announces 10")):
        ova.choose(disks, larger, None, "vm.ova")


@pytest.mark.parametrize(
    ("document", "words"),
    [
        (b'<!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>', "not acceptable XML"),
        (b"<Envelope", "not acceptable XML"),
        (b"\xff\xfe", "not acceptable XML"),
        (b"<Other/>", "not an OVF Envelope"),
        (ovf('<File ovf:id="f1" ovf:href="d.vmdk"/>', ""), "names no disk"),
        (ovf('<File ovf:id="f1" ovf:href="d.vmdk"/>', '<Disk ovf:diskId="d" ovf:fileRef="f9"/>'), "names no file"),
        (ovf('<File ovf:id="f1"/>', ""), "File without id or href"),
        (ovf('<File ovf:id="f1" ovf:href="d" ovf:size="-1"/>', ""), "with size '-1'"),
    ],
)
def test_an_ovf_that_is_not_a_plain_envelope_of_disks_is_refused(document: bytes, words: str) -> None:
    with pytest.raises(ImageRejected, match=f"^vm.ova: .*{words}"):
        ova.parse_ovf(document, "vm.ova")


def archive(*members: tuple[str, bytes]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out.seek(0)
    return out


def test_the_system_disk_is_streamed_out_and_a_truncated_archive_refused() -> None:
    one = ovf('<File ovf:id="f1" ovf:href="disk.vmdk"/>', '<Disk ovf:diskId="d1" ovf:fileRef="f1"/>')
    out = io.BytesIO()
    src = archive(("vm.ovf", one), ("disk.vmdk", b"x" * 3000))
    assert ova.extract_disk(src, out, None, 1 << 20, "vm.ova").href == "disk.vmdk"
    assert out.getvalue() == b"x" * 3000
    truncated = io.BytesIO(src.getvalue()[:2048])
    with pytest.raises(ImageRejected, match=r"^vm\.ova: .*(truncated|not a readable OVA)"):
        ova.extract_disk(truncated, io.BytesIO(), None, 1 << 20, "vm.ova")
    with pytest.raises(ImageRejected, match="exceeds IMG_MAX_SIZE"):
        ova.extract_disk(archive(("vm.ovf", one), ("disk.vmdk", b"x" * 3000)), io.BytesIO(), None, 100, "vm.ova")
    with pytest.raises(ImageRejected, match="one OVF descriptor"):
        ova.extract_disk(archive(("disk.vmdk", b"x")), io.BytesIO(), None, 100, "vm.ova")
    with pytest.raises(ImageRejected, match="a tar header whose size is not a number"):
        ova.extract_disk(io.BytesIO(b"\x01" * 2048), io.BytesIO(), None, 100, "vm.ova")
    with pytest.raises(ImageRejected, match="not a readable OVA"):
        ova.extract_disk(io.BytesIO(b"0" * 2048), io.BytesIO(), None, 100, "vm.ova")


def test_a_conversion_is_named_by_format_and_disk_and_makes_a_qcow2_base() -> None:
    assert (cfg().conversion, cfg().base_format) == (None, "qcow2")
    assert (cfg(IMG_FORMAT="raw").conversion, cfg(IMG_FORMAT="raw").base_format) == (None, "raw")
    for fmt in ("vmdk", "vhdx", "vdi", "vpc", "ova"):
        assert (cfg(IMG_FORMAT=fmt).conversion, cfg(IMG_FORMAT=fmt).base_format) == (fmt, "qcow2")
    assert cfg(IMG_FORMAT="ova", IMG_OVA_DISK="vmdisk2").conversion == "ova-vmdisk2"
    assert cfg(IMG_FORMAT="vmdk", IMG_OVA_DISK="vmdisk2").conversion == "vmdk"
    for bad in ("../x", ".hidden", "a b", "x" * 65):
        with pytest.raises(ConfigError, match=r"^IMG_OVA_DISK='"):
            cfg(IMG_FORMAT="ova", IMG_OVA_DISK=bad)


def test_a_converted_name_matches_only_its_conversion_and_its_sources_checksum() -> None:
    source, base = "a" * 64, "b" * 64
    record = NameRecord(f"sha256:{base}", "s", "t", {}, {"from": "vmdk", "sha256": source})
    assert matches_checksum(cfg(IMG_FORMAT="vmdk"), record)
    assert matches_checksum(cfg(IMG_FORMAT="vmdk", IMG_CHECKSUM=f"sha256:{source}"), record)
    assert not matches_checksum(cfg(IMG_FORMAT="vmdk", IMG_CHECKSUM=f"sha256:{base}"), record), "not the base's"
    assert not matches_checksum(cfg(IMG_FORMAT="vdi"), record)
    assert not matches_checksum(cfg(IMG_FORMAT="qcow2"), record)
    plain = NameRecord(f"sha256:{base}", "s", "t")
    assert matches_checksum(cfg(IMG_CHECKSUM=f"sha256:{base}"), plain)
    assert not matches_checksum(cfg(IMG_FORMAT="vmdk"), plain)
    assert conversion_key("ova-vmdisk2", source) == f".ova-vmdisk2.{source}"


def test_conversion_progress_is_a_line_of_the_latest_percent_at_most_every_interval() -> None:
    said: list[str] = []
    progress = img.percent_lines(said.append, every=0.0)
    progress(b"    (0.00/100%)\r    (12.50/100%)\r")
    progress(b"no figure here")
    progress(b"    (100.00/100%)\r")
    assert said == ["12.50", "100.00"]
    quiet: list[str] = []
    seldom = img.percent_lines(quiet.append, every=3600.0)
    seldom(b"    (50.00/100%)\r")
    assert quiet == [], "the first line waits for the interval: a quick conversion logs no percentages"


def test_an_extended_tar_header_announcing_gigabytes_is_refused_before_tarfile_reads_it() -> None:
    bomb = tarfile.TarInfo("././@PaxHeader")
    bomb.type, bomb.size = tarfile.XHDTYPE, 4 << 30
    data = bomb.tobuf(tarfile.USTAR_FORMAT) + b"x" * 1024
    with pytest.raises(ImageRejected, match=r"^vm\.ova: OVA with an extended tar header of 4294967296 bytes"):
        ova.extract_disk(io.BytesIO(data), io.BytesIO(), None, 1 << 20, "vm.ova")
