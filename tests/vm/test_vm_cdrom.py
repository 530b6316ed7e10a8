"""CD-ROM drives against a real qemu on both machine types: the planned drives start beside an IDE pet and the config
drive (no unit taken twice), ``insert`` and ``eject`` change the disc through QMP, read-only and raw, and an ISO
refused by vetting never reaches qemu."""

import asyncio
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pycdlib
import pytest

from shared.errors import ImageRejected
from tests.harness.qemu import monitored
from vmrunner.config import Cdrom, Config, load
from vmrunner.qemu import qmp
from vmrunner.run import cdrom
from vmrunner.run.argv import _disk_args


def make_iso(path: Path, label: str) -> Path:
    disc = pycdlib.PyCdlib()
    disc.new(interchange_level=3, vol_ident=label)
    disc.add_fp(io.BytesIO(b"x"), 1, "/X.TXT;1")
    disc.write(str(path))
    disc.close()
    return path


def config(tmp: Path, machine: str) -> Config:
    for name in ("image", "vm", "run"):
        (tmp / name).mkdir(exist_ok=True)
    return load({
        "IMG_SOURCE": "https://example.org/w.qcow2", "HOSTNAME": "cd-0", "IMAGE_DIR": str(tmp / "image"),
        "VM_DIR": str(tmp / "vm"), "RUN_DIR": str(tmp / "run"), "VM_MACHINE": machine, "VM_DISK_BUS": "ide",
        "VM_CDROMS": f"{make_iso(tmp / 'a.iso', 'PODVMCDA')} empty", "CONSOLE_PORT": "off",
    })  # fmt: skip


@pytest.fixture(params=["pc", "q35"])
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Config, Path]]:
    """qemu (no guest to boot: it stays in the firmware) with the pet on IDE, the config drive and both slots."""
    cfg = config(tmp_path, request.param)
    pet = cfg.pet_path
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(pet), "16M"], check=True)
    drive = make_iso(tmp_path / "config.iso", "config-2")
    monitor = cfg.run_dir / "status.sock"
    devices = [
        *_disk_args("ide", pet),
        "-drive", f"file={drive},if=none,id=cd0,format=raw,readonly=on,media=cdrom",
        "-device", "ide-cd,drive=cd0,bus=ide.1,unit=0",
        *cdrom.cdrom_args(cfg, cdrom.prepare(cfg)),
    ]  # fmt: skip
    with monitored(cfg.machine, devices, monitor):
        yield cfg, monitor


def slots(cfg: Config, monitor: Path) -> list[dict[str, object]]:
    return cdrom.describe(cfg, asyncio.run(qmp.execute(monitor, "query-block")))


def test_insert_and_eject_change_the_disc_read_only(running: tuple[Config, Path], tmp_path: Path) -> None:
    cfg, monitor = running
    start = slots(cfg, monitor)
    assert [(s["inserted"], s["label"]) for s in start] == [(True, "PODVMCDA"), (False, None)]

    other = make_iso(tmp_path / "b.iso", "PODVMCDB")
    done = asyncio.run(cdrom.insert(cfg, monitor, "2", Cdrom(str(other))))
    assert done["label"] == "PODVMCDB"
    asyncio.run(cdrom.eject(cfg, monitor, "1"))
    assert [(s["inserted"], s["label"]) for s in slots(cfg, monitor)] == [(False, None), (True, "PODVMCDB")]
    block = asyncio.run(qmp.execute(monitor, "query-block"))
    assert isinstance(block, list)
    inserted = next(entry["inserted"] for entry in block if entry.get("qdev") == "cdrom2")
    assert inserted["ro"] is True and inserted["drv"] == "raw"

    not_iso = tmp_path / "disk.iso"
    not_iso.write_bytes(b"QFI\xfb" + bytes(100_000))
    with pytest.raises(ImageRejected, match="not an ISO 9660 or UDF image"):
        asyncio.run(cdrom.insert(cfg, monitor, "1", Cdrom(str(not_iso))))
    assert slots(cfg, monitor)[0]["inserted"] is False
