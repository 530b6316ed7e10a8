"""The machine type pinned on the pet's first start: resolved by the real qemu, kept across upgrades, taken from a
state saved before there was a pin, changed only when VM_MACHINE names another type; a forged record adds nothing
to qemu's argv."""

import json
import logging
import os
from pathlib import Path

import pytest

from shared.errors import ConfigError
from tests.harness import samples
from vmrunner.config import Config, load
from vmrunner.run import machine
from vmrunner.run.argv import plan_qemu

HELP = """Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-8.2)
pc-i440fx-8.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-8.2)
pc-q35-8.2           Standard PC (Q35 + ICH9, 2009)
none                 empty machine
"""


def cfg(vm_dir: Path, **values: str) -> Config:
    return load({"IMG_SOURCE": "https://example.org/a.qcow2", "HOSTNAME": "vm-0", "VM_DIR": str(vm_dir), **values})


def record(vm_dir: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((vm_dir / "vm-0.machine.json").read_text())
    return loaded


def test_an_alias_resolves_to_its_versioned_name_and_a_versioned_name_to_itself() -> None:
    assert machine.versioned(HELP, "pc") == "pc-i440fx-8.2"
    assert machine.versioned(HELP, "q35") == "pc-q35-8.2"
    assert machine.versioned(HELP, "pc-i440fx-7.2") == "pc-i440fx-7.2"
    assert machine.versioned(HELP, "microvm") == "microvm"
    assert machine.versioned(HELP, "Supported") is None  # the header is no machine
    assert machine.versioned(HELP, "pc-i440fx-1.0") is None


def test_the_pin_keeps_the_options_and_applies_only_to_its_own_type() -> None:
    pin = machine.Pin("q35", "pc-q35-7.2")
    assert machine.applied("q35,smm=on", pin) == "pc-q35-7.2,smm=on"
    assert machine.applied("pc-q35-7.2", pin) == "pc-q35-7.2"
    assert machine.applied("pc", pin) is None
    assert machine.applied("q35", None) is None


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"version": 1, "asked": "pc", "machine": "pc,memory-backend=evil"}, "machine type names"),
        ({"version": 1, "asked": "pc", "machine": "pc -object x"}, "machine type names"),
        ({"version": 1, "asked": "pc", "machine": 7}, "machine type names"),
        ({"version": 1, "asked": "pc", "machine": "pc-i440fx-7.2", "more": 1}, "exactly the fields"),
        ({"version": 2, "asked": "pc", "machine": "pc-i440fx-7.2"}, "version 1"),
    ],
)
def test_a_forged_record_is_refused(doc: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        machine.parse(json.dumps(doc).encode())


def test_the_first_start_pins_the_real_qemus_version_and_later_starts_keep_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vmrunner")
    first = machine.ensure(cfg(tmp_path), None)
    assert first.machine.startswith("pc-i440fx-") and first.machine != "pc"
    assert record(tmp_path) == {"version": 1, "asked": "pc", "machine": first.machine}
    assert oct(os.stat(tmp_path / "vm-0.machine.json").st_mode & 0o777) == "0o644"
    # An upgraded qemu would call pc something newer: the pin written by the old one is what the VM keeps.
    (tmp_path / "vm-0.machine.json").write_bytes(machine.document(machine.Pin("pc", "pc-i440fx-2.12")))
    again = machine.ensure(cfg(tmp_path), None)
    assert again.machine == "pc-i440fx-2.12"
    argv = plan_qemu(again, samples.handshake(), "tcg", False, None).argv
    assert argv[argv.index("-machine") + 1] == "pc-i440fx-2.12"
    assert machine.pinned(cfg(tmp_path)).machine == "pc-i440fx-2.12"  # what plan shows, reading only


def test_another_type_is_pinned_anew_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "vm-0.machine.json").write_bytes(machine.document(machine.Pin("pc", "pc-i440fx-2.12")))
    moved = machine.ensure(cfg(tmp_path, VM_MACHINE="q35"), None)
    assert moved.machine.startswith("pc-q35-")
    assert "VM_MACHINE is q35 now, the VM was pinned to pc-i440fx-2.12" in caplog.text
    assert record(tmp_path)["asked"] == "q35"


def test_a_state_saved_before_the_pin_gives_the_pin(tmp_path: Path) -> None:
    saved = machine.Pin("pc", "pc-i440fx-2.12")  # no qemu is asked: the guest knows this machine already
    assert machine.ensure(cfg(tmp_path, QEMU="/nowhere/qemu"), saved).machine == "pc-i440fx-2.12"
    forged = machine.Pin("pc", "pc,memory-backend=x")
    with pytest.raises(ConfigError, match=r"^QEMU=/nowhere/qemu: no such program$"):
        machine.ensure(cfg(tmp_path / "other", QEMU="/nowhere/qemu"), forged)


def test_a_pin_through_a_link_or_fifo_is_not_read_and_an_unknown_type_is_one_line(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(machine.document(machine.Pin("pc", "pc-i440fx-2.12")))
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    (vm_dir / "vm-0.machine.json").symlink_to(elsewhere)
    assert machine.read(cfg(vm_dir)) is None
    (vm_dir / "vm-0.machine.json").unlink()
    os.mkfifo(vm_dir / "vm-0.machine.json")
    assert machine.read(cfg(vm_dir)) is None
    with pytest.raises(ConfigError, match=r"^VM_MACHINE=pc-i440fx-0.1: .* has no machine type 'pc-i440fx-0.1'$"):
        machine.ensure(cfg(tmp_path, VM_MACHINE="pc-i440fx-0.1"), None)
