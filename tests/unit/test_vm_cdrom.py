"""CD-ROMs: VM_CDROMS parsed into slots, ISOs vetted from their own bytes (ISO 9660, UDF; not an ISO, truncated, a
link, a FIFO refused), local ISOs copied into the cache by digest and kept from gc while a slot holds them, and the
drives in qemu's argv on both pc and q35 without taking a unit another drive has."""

import io
import os
import re
import threading
from pathlib import Path

import pycdlib
import pytest

from shared.errors import ConfigError, ImageRejected
from tests.harness import samples
from vmrunner.config import Cdrom, Config, load, parse_cdrom
from vmrunner.images import cdroms, iso
from vmrunner.images.gc import collect
from vmrunner.images.layout import Layout
from vmrunner.run import cdrom
from vmrunner.run.argv import plan_qemu

BASE = {"IMG_SOURCE": "https://example.org/images/w.qcow2", "HOSTNAME": "vm-0", "RUN_DIR": "/r", "VM_DIR": "/vm"}
SHA = "sha256:" + "ab" * 32
HS = samples.handshake()


def cfg(**values: str) -> Config:
    return load({**BASE, **values})


def make_iso(path: Path, label: str, *, udf: bool = False) -> Path:
    """A small ISO with one file (ISO 9660 with Joliet and Rock Ridge, or ISO 9660 with UDF beside it)."""
    path.parent.mkdir(exist_ok=True)
    disc = pycdlib.PyCdlib()
    if udf:
        disc.new(vol_ident=label, udf="2.60")
        disc.add_fp(io.BytesIO(b"driver\n"), 7, "/DRIVER.INF;1", udf_path="/driver.inf")
    else:
        disc.new(interchange_level=3, vol_ident=label, joliet=3, rock_ridge="1.09")
        disc.add_fp(io.BytesIO(b"driver\n"), 7, "/DRIVER.INF;1", rr_name="driver.inf", joliet_path="/driver.inf")
    disc.write(str(path))
    disc.close()
    return path


# ---- VM_CDROMS -----------------------------------------------------------------------------------------------------


def test_slots_take_urls_paths_checksums_and_empty_drives() -> None:
    c = cfg(VM_CDROMS=f"https://example.org/isos/virtio-win.iso {SHA}\n  empty /isos/tools.iso", VM_MACHINE="q35")
    assert c.cdroms == (
        Cdrom("https://example.org/isos/virtio-win.iso", parse_cdrom("x", "/a", SHA).checksum),
        None,
        Cdrom("/isos/tools.iso"),
    )
    assert c.cdroms[0] is not None and str(c.cdroms[0].checksum) == SHA
    assert cfg().cdroms == ()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("isos/tools.iso", "VM_CDROMS='isos/tools.iso': expected an http(s) URL or an absolute path of an ISO"),
        ("ftp://example.org/a.iso", "expected an http(s) URL or an absolute path"),
        ("https:///a.iso", "VM_CDROMS='https:///a.iso': the URL has no host"),
        (f"{SHA} /a.iso", "a checksum must follow the URL or path it checks"),
        (f"/a.iso {SHA} {SHA}", "a checksum must follow the URL or path it checks"),
        ("empty sha256:00", "a checksum must follow"),
        ("/a.iso sha256:00", "VM_CDROMS='sha256:00': expected sha256:<64 hex digits>"),
        ("/a.iso /b.iso /c.iso", "VM_CDROMS: 3 entries, but VM_MACHINE=pc has 2 CD-ROM slots"),
    ],
)
def test_bad_slots_are_one_line_naming_vm_cdroms(value: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        cfg(VM_CDROMS=value)
    assert error in str(raised.value) and "\n" not in str(raised.value)


def test_a_url_with_credentials_is_never_shown() -> None:
    with pytest.raises(ConfigError) as raised:
        cfg(VM_CDROMS="https://user:secret@[::1/a.iso?token=t0k")
    assert "secret" not in str(raised.value) and "t0k" not in str(raised.value)


def test_q35_has_four_slots() -> None:
    assert len(cfg(VM_CDROMS="/a.iso /b.iso /c.iso /d.iso", VM_MACHINE="q35").cdroms) == 4
    with pytest.raises(ConfigError, match="5 entries, but VM_MACHINE=q35 has 4"):
        cfg(VM_CDROMS="/a.iso /b.iso /c.iso /d.iso /e.iso", VM_MACHINE="q35")


# ---- vetting ---------------------------------------------------------------------------------------------------------


def test_iso9660_and_udf_are_accepted_with_their_label(tmp_path: Path) -> None:
    plain = iso.vet(make_iso(tmp_path / "a.iso", "PODVMCDA"), 1 << 30, "a.iso")
    assert (plain.kind, plain.label) == ("iso9660", "PODVMCDA")
    udf = iso.vet(make_iso(tmp_path / "u.iso", "PODVMCDU", udf=True), 1 << 30, "u.iso")
    assert (udf.kind, udf.label) == ("iso9660+udf", "PODVMCDU")


def test_a_udf_only_disc_is_accepted(tmp_path: Path) -> None:
    """The ISO 9660 set of a bridge disc blanked: what remains is UDF's recognition sequence and anchor."""
    path = make_iso(tmp_path / "u.iso", "PODVMCDU", udf=True)
    data = bytearray(path.read_bytes())
    ids = [bytes(data[i * 2048 + 1 : i * 2048 + 6]) for i in range(16, 64)]
    begin, end = 16 + ids.index(b"BEA01"), 16 + ids.index(b"TEA01") + 1
    sequence = data[begin * 2048 : end * 2048]
    data[16 * 2048 : end * 2048] = bytes((end - 16) * 2048)
    data[16 * 2048 : 16 * 2048 + len(sequence)] = sequence
    path.write_bytes(bytes(data))
    assert iso.vet(path, 1 << 30, "u.iso").kind == "udf"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"QFI\xfb" + bytes(100_000), "not an ISO 9660 or UDF image"),
        (bytes(200_000), "not an ISO 9660 or UDF image"),
        (b"CD001" * 10, "too short for an ISO 9660 or UDF image"),
    ],
)
def test_what_is_not_an_iso_is_refused(tmp_path: Path, content: bytes, error: str) -> None:
    path = tmp_path / "x.iso"
    path.write_bytes(content)
    with pytest.raises(ImageRejected, match=error):
        iso.vet(path, 1 << 30, "x.iso")


def test_a_truncated_iso_is_refused(tmp_path: Path) -> None:
    path = make_iso(tmp_path / "a.iso", "PODVMCDA")
    os.truncate(path, path.stat().st_size - 2048)
    with pytest.raises(ImageRejected, match=r"the volume holds \d+ bytes but the file only \d+ \(truncated\)"):
        iso.vet(path, 1 << 30, "a.iso")
    udf = make_iso(tmp_path / "u.iso", "PODVMCDU", udf=True)
    os.truncate(udf, 200 * 2048)
    with pytest.raises(ImageRejected, match="UDF image without its anchor at sector 256"):
        iso.vet(udf, 1 << 30, "u.iso")


def test_an_iso_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = make_iso(tmp_path / "a.iso", "PODVMCDA")
    with pytest.raises(ImageRejected, match=r"more than IMG_MAX_SIZE \(4096\)"):
        iso.vet(path, 4096, "a.iso")


def test_a_link_a_fifo_and_a_folder_are_refused_without_waiting(tmp_path: Path) -> None:
    target = make_iso(tmp_path / "a.iso", "PODVMCDA")
    (tmp_path / "link.iso").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.iso")
    (tmp_path / "dir.iso").mkdir()
    outcome: dict[str, str] = {}

    def vet_all() -> None:
        for name in ("link.iso", "fifo.iso", "dir.iso"):
            try:
                iso.vet(tmp_path / name, 1 << 30, name)
                outcome[name] = "accepted"
            except ImageRejected as err:
                outcome[name] = str(err)

    worker = threading.Thread(target=vet_all, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "vetting waited on the FIFO"
    assert outcome["link.iso"] == "link.iso: a symbolic link; refused"
    assert outcome["fifo.iso"] == "fifo.iso: not a regular file; refused"
    assert outcome["dir.iso"] == "dir.iso: not a regular file; refused"


# ---- the cache -------------------------------------------------------------------------------------------------------


def volumes(tmp_path: Path, **values: str) -> Config:
    for name in ("image", "vm", "run", "isos"):
        (tmp_path / name).mkdir(exist_ok=True)
    env = {"IMAGE_DIR": str(tmp_path / "image"), "VM_DIR": str(tmp_path / "vm"), "RUN_DIR": str(tmp_path / "run")}
    return cfg(**env, **values)


def test_a_local_iso_is_cached_by_digest_and_kept_while_a_slot_holds_it(tmp_path: Path) -> None:
    source = make_iso(tmp_path / "isos" / "tools.iso", "PODVMCDA")
    c = volumes(tmp_path, VM_CDROMS=f"{source} empty")
    (tmp_path / "vm" / "vm-0.qcow2").write_bytes(b"pet")  # the pet the references point to
    assert cdrom.planned(c)[1][0]["cached"] is False
    media = cdrom.prepare(c)
    medium = cdroms.ensure(c, Cdrom(str(source)), "VM_CDROMS")  # a second use: no copy, the same file
    assert media == (medium.path, None)
    assert medium.path == Layout(c.image_dir).base(medium.hex) and medium.path.read_bytes() == source.read_bytes()
    assert medium.disc.label == "PODVMCDA"
    assert cdrom.planned(c)[1][0] == {
        "slot": 1,
        "device": "ide.1 unit 1",
        "source": str(source),
        "checksum": None,
        "digest": f"sha256:{medium.hex}",
        "cached": True,
    }
    assert cdroms.holding(c, 1) == medium.hex and cdroms.holding(c, 2) is None
    assert f"sha256:{medium.hex}" not in collect(c.image_dir, 0.0, dry_run=False).removed_digests()
    cdroms.let_go(c, 1)  # ejected
    assert f"sha256:{medium.hex}" in collect(c.image_dir, 0.0, dry_run=False).removed_digests()


def test_a_slot_moved_to_another_iso_lets_the_first_go(tmp_path: Path) -> None:
    c = volumes(tmp_path)
    first = cdroms.ensure(c, Cdrom(str(make_iso(tmp_path / "isos" / "a.iso", "A"))), "VM_CDROMS")
    second = cdroms.ensure(c, Cdrom(str(make_iso(tmp_path / "isos" / "b.iso", "B"))), "VM_CDROMS")
    cdroms.hold(c, 1, first.hex)
    cdroms.hold(c, 1, second.hex)
    assert cdroms.holding(c, 1) == second.hex
    assert not list((c.image_dir / "refs" / first.hex).iterdir())


def test_a_checksum_is_checked_and_a_refused_iso_leaves_nothing(tmp_path: Path) -> None:
    c = volumes(tmp_path)
    source = make_iso(tmp_path / "isos" / "a.iso", "A")
    with pytest.raises(ImageRejected, match=rf"^VM_CDROMS: {source} has sha256:[0-9a-f]{{64}}, expected {SHA}"):
        cdroms.ensure(c, Cdrom(str(source), parse_cdrom("x", "/a", SHA).checksum), "VM_CDROMS")
    not_iso = tmp_path / "isos" / "disk.qcow2"
    not_iso.write_bytes(b"QFI\xfb" + bytes(100_000))
    with pytest.raises(ImageRejected, match="not an ISO 9660 or UDF image"):
        cdroms.ensure(c, Cdrom(str(not_iso)), "cdrom insert")
    assert not list((c.image_dir / "sha256").iterdir())


def test_a_local_link_or_fifo_is_refused_naming_the_setting(tmp_path: Path) -> None:
    c = volumes(tmp_path)
    (tmp_path / "isos" / "link.iso").symlink_to(make_iso(tmp_path / "isos" / "a.iso", "A"))
    os.mkfifo(tmp_path / "isos" / "fifo.iso")
    with pytest.raises(ConfigError, match=r"^VM_CDROMS=.*/link.iso: a symbolic link; refused$"):
        cdroms.ensure(c, Cdrom(str(tmp_path / "isos" / "link.iso")), "VM_CDROMS")
    with pytest.raises(
        ConfigError, match=r"^cdrom insert=.*/fifo.iso: not a regular file \(a FIFO, device or folder\)"
    ):
        cdroms.ensure(c, Cdrom(str(tmp_path / "isos" / "fifo.iso")), "cdrom insert")
    assert not list((c.image_dir / "sha256").iterdir())


# ---- argv ------------------------------------------------------------------------------------------------------------


def ide_units(argv: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every (bus, unit) an IDE device of the argv takes."""
    return re.findall(r"ide-(?:cd|hd),.*?bus=(ide\.\d),unit=(\d)", " ".join(argv))


@pytest.mark.parametrize(
    ("machine", "units"),
    [("pc", [("ide.1", "1"), ("ide.0", "1")]), ("q35", [("ide.2", "0"), ("ide.3", "0")])],
)
def test_drives_are_read_only_raw_on_units_no_other_drive_takes(machine: str, units: list[tuple[str, str]]) -> None:
    c = cfg(VM_CDROMS="/a.iso empty", VM_MACHINE=machine, VM_DISK_BUS="ide")
    argv = plan_qemu(c, HS, "tcg", False, Path("/r/config-drive.iso"), cdroms=(Path("/image/sha256/ab"), None)).argv
    assert "file=/image/sha256/ab,format=raw,if=none,id=cd1,readonly=on,media=cdrom" in argv
    assert "if=none,id=cd2,readonly=on,media=cdrom" in argv
    assert f"ide-cd,drive=cd1,id=cdrom1,bus={units[0][0]},unit={units[0][1]}" in argv
    assert f"ide-cd,drive=cd2,id=cdrom2,bus={units[1][0]},unit={units[1][1]}" in argv
    taken = ide_units(argv)
    assert len(taken) == 4 and len(set(taken)) == 4  # the pet, the config drive and two CD-ROMs
    assert all("format=raw" in a and "readonly=on" in a for a in argv if "file=/image/sha256/" in a)


def test_no_cdroms_no_drives() -> None:
    argv = plan_qemu(cfg(), HS, "tcg", False, None).argv
    assert not [a for a in argv if "cdrom" in a]


def test_a_slot_the_vm_lacks_is_one_line() -> None:
    c = cfg(VM_CDROMS="/a.iso")
    with pytest.raises(ConfigError, match=r"^cdrom slot '2': no such CD-ROM slot \(this VM has 1 to 1\)$"):
        cdrom._slot(c, "2")
    with pytest.raises(ConfigError, match="none: VM_CDROMS gives the VM its drives"):
        cdrom._slot(cfg(), "1")


def test_status_shows_what_qemu_says_each_slot_holds(tmp_path: Path) -> None:
    c = volumes(tmp_path, VM_CDROMS="/a.iso empty")
    medium = cdroms.ensure(c, Cdrom(str(make_iso(tmp_path / "isos" / "a.iso", "PODVMCDA"))), "VM_CDROMS")
    block = [
        {"qdev": "cdrom1", "tray_open": False, "inserted": {"file": str(medium.path), "ro": True}},
        {"qdev": "cdrom2", "tray_open": True},
    ]
    assert cdrom.describe(c, block) == [
        {"slot": 1, "tray_open": False, "inserted": True, "digest": f"sha256:{medium.hex}", "label": "PODVMCDA"},
        {"slot": 2, "tray_open": True, "inserted": False, "digest": None, "label": None},
    ]
    assert cdrom.describe(c, None)[0]["inserted"] is False
