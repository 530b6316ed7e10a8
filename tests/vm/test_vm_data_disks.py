"""Data disks against a real qemu on both machine types: the disks the runner made (virtio, scsi, sata; qcow2 and
raw) start beside an IDE pet, the config drive and both CD-ROM slots with no unit taken twice, each is its own node
with its name as the device's serial, the qcow2 ones with no backing file; and while a qemu holds a disk the runner's
lock refuses a second runner."""

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import ConfigError
from tests.harness.qemu import monitored
from vmrunner.config import Config, load
from vmrunner.pet import datadisks
from vmrunner.qemu import qmp
from vmrunner.run import cdrom
from vmrunner.run.argv import _disk_args, data_disk_args


def config(tmp: Path, machine: str) -> Config:
    for name in ("image", "vm", "run", "db", "share", "logs"):
        (tmp / name).mkdir(exist_ok=True)
    disks = f"db:{tmp / 'db'}:8M:virtio,share:{tmp / 'share'}:4M:scsi:raw,logs:{tmp / 'logs'}:2M:sata"
    return load({
        "IMG_SOURCE": "https://example.org/w.qcow2", "HOSTNAME": "dd-0", "IMAGE_DIR": str(tmp / "image"),
        "VM_DIR": str(tmp / "vm"), "RUN_DIR": str(tmp / "run"), "VM_MACHINE": machine, "VM_DISK_BUS": "ide",
        "VM_CDROMS": "empty empty", "CONSOLE_PORT": "off", "DATA_DISKS": disks,
    })  # fmt: skip


@pytest.fixture(params=["pc", "q35"])
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Config, Path]]:
    """qemu (no guest: it stays in the firmware) with the pet on IDE, the config drive, two CD-ROM slots and the
    three data disks, held by the runner's locks."""
    cfg = config(tmp_path, request.param)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(cfg.pet_path), "16M"], check=True)
    drive = tmp_path / "config.iso"
    drive.write_bytes(bytes(64 << 10))
    monitor = cfg.run_dir / "status.sock"
    with datadisks.held(cfg):
        devices = [
            *_disk_args("ide", cfg.pet_path),
            "-drive", f"file={drive},if=none,id=cd0,format=raw,readonly=on,media=cdrom",
            "-device", "ide-cd,drive=cd0,bus=ide.1,unit=0",
            *cdrom.cdrom_args(cfg, (None, None)),
            *data_disk_args(cfg.data_disks),
        ]  # fmt: skip
        with monitored(cfg.machine, devices, monitor):
            yield cfg, monitor


def test_each_disk_is_its_own_node_with_its_serial_and_no_backing(running: tuple[Config, Path]) -> None:
    cfg, monitor = running
    nodes = asyncio.run(qmp.execute(monitor, "query-named-block-nodes", arguments={"flat": True}))
    assert isinstance(nodes, list)
    by_name = {n["node-name"]: n for n in nodes if isinstance(n, dict)}
    for disk in cfg.data_disks:
        node = by_name[f"data-{disk.name}"]
        assert (node["drv"], node["file"], node["image"]["virtual-size"]) == (disk.format, str(disk.path), disk.size)
        assert "backing-image" not in node["image"] and not node.get("backing_file")
    for disk in cfg.data_disks:
        serial = asyncio.run(
            qmp.execute(
                monitor,
                "qom-get",
                arguments={"path": f"/machine/peripheral/datadisk-{disk.name}", "property": "serial"},
            )
        )
        assert serial == disk.name


def test_a_second_runner_is_refused_a_disk_qemu_holds(running: tuple[Config, Path]) -> None:
    cfg, _ = running
    with pytest.raises(ConfigError, match="in use by another VM"), datadisks.held(cfg):
        pass
