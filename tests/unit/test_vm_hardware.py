"""The guest's hardware: profiles and the variables that override them, firmware, TPM, pointer and clock, as argv
lists; the VM's own state on VM_DIR; swtpm supervised as a real process."""

import asyncio
import dataclasses
import itertools
import os
import shutil
from pathlib import Path

import pytest

from shared.errors import ChildFailed, ConfigError
from tests.harness import samples
from vmrunner.config import Config, load
from vmrunner.pet.state import DISK, MACHINE, TPM_STATE, UEFI_VARS, own_files
from vmrunner.profiles import OVMF_FILES, PROFILES
from vmrunner.run import firmware, ownstate, tpm
from vmrunner.run.argv import plan_qemu
from vmrunner.run.devices import HYPERV_FLAGS
from vmrunner.run.supervisor import Supervisor

BASE = {"IMG_SOURCE": "https://example.org/images/w.qcow2", "HOSTNAME": "vm-0", "RUN_DIR": "/r", "VM_DIR": "/vm"}
HS = samples.handshake()
HW_OPTIONS = ("-machine", "-cpu", "-rtc", "-global", "-tpmdev")
CODE, SECURE_CODE = str(OVMF_FILES["uefi"][0]), str(OVMF_FILES["uefi-secure"][0])
HYPERV = ",".join(("host", *HYPERV_FLAGS))
TABLET = [("-device", "qemu-xhci,id=usb0"), ("-device", "usb-tablet,bus=usb0.0")]
TPM = [
    ("-chardev", "socket,id=chrtpm,path=/r/swtpm.sock"),
    ("-tpmdev", "emulator,id=tpm0,chardev=chrtpm"),
    ("-device", "tpm-tis,tpmdev=tpm0"),
]


def cfg(**values: str) -> Config:
    return load({**BASE, **values})


def hardware(argv: tuple[str, ...]) -> list[tuple[str, str]]:
    """The hardware part of an argv as (option, value) pairs in order: machine, CPU, clock, firmware, disk and NIC
    devices, pointer, TPM."""
    pairs = [(a, b) for a, b in itertools.pairwise(argv) if a.startswith("-") and not b.startswith("-")]
    keep = ("pflash", "-hd,", "blk-pci", "netdev=net0", "usb", "tpm")
    return [(a, b) for a, b in pairs if a in HW_OPTIONS or any(k in b for k in keep)]


def disk(device: str) -> tuple[str, str]:
    return ("-device", device)


EXPECTED = {
    ("none", "tcg"): [
        ("-machine", "pc"),
        disk("virtio-blk-pci,drive=disk0,bootindex=1"),
        *TABLET,
        ("-rtc", "base=utc"),
        ("-device", "virtio-net-pci,netdev=net0,mac=0a:58:c0:a8:fe:02"),
    ],
    ("linux", "kvm"): [
        ("-machine", "q35"),
        ("-cpu", "host"),
        disk("virtio-blk-pci,drive=disk0,bootindex=1"),
        ("-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={CODE}"),
        ("-drive", "if=pflash,unit=1,format=raw,file=/vm/vm-0.efivars.fd"),
        *TABLET,
        ("-rtc", "base=utc"),
        ("-device", "virtio-net-pci,netdev=net0,mac=0a:58:c0:a8:fe:02"),
    ],
    ("windows", "kvm"): [
        ("-machine", "q35,smm=on"),
        ("-cpu", HYPERV),
        disk("ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=1"),
        ("-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={SECURE_CODE}"),
        ("-drive", "if=pflash,unit=1,format=raw,file=/vm/vm-0.efivars.fd"),
        ("-global", "driver=cfi.pflash01,property=secure,value=on"),
        *TABLET,
        ("-rtc", "base=localtime"),
        *TPM,
        ("-device", "e1000e,netdev=net0,mac=0a:58:c0:a8:fe:02"),
    ],
    ("windows", "tcg"): [  # the same, without -cpu host and its Hyper-V enlightenments
        ("-machine", "q35,smm=on"),
        disk("ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=1"),
        ("-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={SECURE_CODE}"),
        ("-drive", "if=pflash,unit=1,format=raw,file=/vm/vm-0.efivars.fd"),
        ("-global", "driver=cfi.pflash01,property=secure,value=on"),
        *TABLET,
        ("-rtc", "base=localtime"),
        *TPM,
        ("-device", "e1000e,netdev=net0,mac=0a:58:c0:a8:fe:02"),
    ],
    ("legacy-windows", "kvm"): [
        ("-machine", "pc"),
        ("-cpu", "host"),
        disk("ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=1"),
        ("-rtc", "base=localtime"),
        ("-device", "rtl8139,netdev=net0,mac=0a:58:c0:a8:fe:02"),
    ],
}


@pytest.mark.parametrize(("profile", "accel"), list(EXPECTED))
def test_every_profile_plans_its_hardware(profile: str, accel: str) -> None:
    plan = plan_qemu(cfg(VM_PROFILE=profile), HS, accel, False, None)
    assert hardware(plan.argv) == EXPECTED[(profile, accel)]
    localtime = profile in ("windows", "legacy-windows")
    assert plan.environment == ((("TZ", "UTC"),) if localtime else ())
    assert (plan.swtpm is not None) == (profile == "windows")


def test_every_profile_is_tested() -> None:
    assert {p for p, _ in EXPECTED} == {"none", *PROFILES}


def test_each_field_a_profile_sets_can_be_set_on_its_own() -> None:
    c = cfg(
        VM_PROFILE="windows",
        VM_DISK_BUS="virtio",
        VM_NIC_MODEL="virtio-net-pci",
        VM_TPM="off",
        VM_POINTER="ps2",
        VM_TIMEZONE="Europe/Berlin",
        VM_HYPERV="off",
    )
    plan = plan_qemu(c, HS, "kvm", False, None)
    pairs = hardware(plan.argv)
    assert ("-cpu", "host") in pairs
    assert disk("virtio-blk-pci,drive=disk0,bootindex=1") in pairs
    assert not [p for p in pairs if "usb" in p[1] or "tpm" in p[1]]
    assert plan.environment == (("TZ", "Europe/Berlin"),)
    sources = {name: (value, source) for name, value, source in c.hardware.sources}
    assert sources["VM_PROFILE"] == ("windows", "VM_PROFILE")
    assert sources["VM_FIRMWARE"] == ("uefi-secure", "VM_PROFILE=windows")
    assert sources["VM_DISK_BUS"] == ("virtio", "VM_DISK_BUS")
    assert sources["VM_TPM"] == ("off", "VM_TPM")
    assert sources["VM_RTC"] == ("localtime", "VM_PROFILE=windows")
    assert sources["VM_OVMF_CODE"] == (SECURE_CODE, "VM_FIRMWARE=uefi-secure")
    plain = {name: source for name, _, source in cfg().hardware.sources}
    assert plain["VM_FIRMWARE"] == plain["VM_MACHINE"] == plain["VM_PROFILE"] == "default"


def test_secure_boot_implies_q35_with_smm_unless_the_machine_is_given() -> None:
    c = cfg(VM_FIRMWARE="uefi-secure")
    assert c.machine == "q35"
    assert ("VM_MACHINE", "q35", "implied by VM_FIRMWARE=uefi-secure") in c.hardware.sources
    assert hardware(plan_qemu(c, HS, "tcg", False, None).argv)[0] == ("-machine", "q35,smm=on")
    versioned = cfg(VM_FIRMWARE="uefi-secure", VM_MACHINE="pc-q35-7.2,smm=on")
    assert hardware(plan_qemu(versioned, HS, "tcg", False, None).argv)[0] == ("-machine", "pc-q35-7.2,smm=on")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"VM_PROFILE": "macos"}, "VM_PROFILE='macos': expected one of none, linux, windows, legacy-windows"),
        ({"VM_FIRMWARE": "coreboot"}, "VM_FIRMWARE='coreboot': expected one of bios, uefi, uefi-secure"),
        (
            {"VM_FIRMWARE": "uefi-secure", "VM_MACHINE": "pc"},
            "VM_FIRMWARE=uefi-secure: Secure Boot needs SMM, which only a q35 machine has; VM_MACHINE='pc' cannot",
        ),
        ({"VM_PROFILE": "windows", "VM_MACHINE": "pc-i440fx-7.2"}, "VM_MACHINE='pc-i440fx-7.2' cannot"),
        ({"VM_FIRMWARE": "uefi-secure", "VM_MACHINE": "q35,smm=off"}, "VM_MACHINE='q35,smm=off': VM_FIRMWARE"),
        ({"VM_TPM": "maybe"}, "VM_TPM='maybe': expected true or false"),
        ({"VM_POINTER": "mouse"}, "VM_POINTER='mouse': expected one of tablet, ps2"),
        ({"VM_RTC": "gps"}, "VM_RTC='gps': expected one of utc, localtime"),
        ({"VM_RTC": "localtime", "VM_TIMEZONE": "Mars/Olympus"}, "VM_TIMEZONE='Mars/Olympus': not a time zone"),
        ({"VM_RTC": "localtime", "VM_TIMEZONE": "../../etc/passwd"}, "VM_TIMEZONE='../../etc/passwd'"),
        ({"VM_TIMEZONE": "Europe/Berlin"}, "VM_TIMEZONE='Europe/Berlin': only used with VM_RTC=localtime"),
        ({"ACCEL": "tcg", "VM_HYPERV": "on"}, "VM_HYPERV=on: Hyper-V enlightenments need ACCEL=kvm"),
        ({"VM_FIRMWARE": "uefi", "VM_OVMF_CODE": "code.fd"}, "VM_OVMF_CODE='code.fd': expected an absolute path"),
    ],
)
def test_bad_hardware_settings_are_one_line_naming_them(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(**values)
    assert message in str(err.value)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_a_profile_s_hyperv_under_tcg_is_left_out_not_refused() -> None:
    c = cfg(VM_PROFILE="windows", ACCEL="tcg")
    assert c.hardware.hyperv
    assert ownstate.describe(c, "tcg")["hyperv_applied"] is False
    assert ownstate.describe(c, "kvm")["hyperv_applied"] is True


def test_missing_firmware_file_or_swtpm_is_one_line_before_anything(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^VM_OVMF_VARS=/nowhere/vars.fd: no such firmware file"):
        ownstate.preflight(cfg(VM_FIRMWARE="uefi", VM_OVMF_VARS="/nowhere/vars.fd"))
    with pytest.raises(ConfigError, match=r"^SWTPM=/nowhere/swtpm: no such program \(VM_TPM=on needs"):
        ownstate.preflight(cfg(VM_TPM="on", SWTPM="/nowhere/swtpm"))
    ownstate.preflight(cfg(VM_FIRMWARE="bios", VM_TPM="off", SWTPM="/nowhere/swtpm"))  # nothing needed, no refusal


def test_own_state_lists_disk_machine_vars_and_tpm_with_modes() -> None:
    pin = (MACHINE, "/vm/vm-0.machine.json")
    assert [(f.kind, str(f.path)) for f in own_files(cfg())] == [(DISK, "/vm/vm-0.qcow2"), pin]
    files = own_files(cfg(VM_PROFILE="windows"))
    assert [(f.kind, str(f.path), f.mode, f.directory) for f in files] == [
        (DISK, "/vm/vm-0.qcow2", None, False),
        (*pin, 0o644, False),
        (UEFI_VARS, "/vm/vm-0.efivars.fd", 0o600, False),
        (TPM_STATE, "/vm/vm-0.tpm", 0o700, True),
    ]
    assert files[2].template == OVMF_FILES["uefi-secure"][1]


def test_variable_store_is_copied_once_and_never_overwritten(tmp_path: Path) -> None:
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"T" * 4096)
    c = cfg(VM_DIR=str(tmp_path), VM_FIRMWARE="uefi", VM_OVMF_VARS=str(template))
    store = firmware.ensure_vars(c)
    assert store == tmp_path / "vm-0.efivars.fd" and store.read_bytes() == b"T" * 4096
    assert store.stat().st_mode & 0o777 == 0o600
    store.write_bytes(b"G" * 4096)  # what the guest wrote
    template.write_bytes(b"N" * 4096)  # a firmware upgrade
    firmware.ensure_vars(c)
    assert store.read_bytes() == b"G" * 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VARS.fd", "vm-0.efivars.fd"]  # no temporary left
    template.write_bytes(b"N" * 8192)
    with pytest.raises(ConfigError, match=r"vm-0.efivars.fd holds 4096 bytes but VM_OVMF_VARS=.* has 8192"):
        firmware.ensure_vars(c)


def test_tpm_state_is_private_and_never_another_vm_s(tmp_path: Path) -> None:
    c = cfg(VM_DIR=str(tmp_path), VM_TPM="on")
    state = tpm.ensure_state(c)
    assert state.stat().st_mode & 0o777 == 0o700 and (state / "vm").read_text() == "vm-0\n"
    assert tpm.ensure_state(c) == state
    with pytest.raises(ConfigError, match=r"vm-1.tpm holds the TPM state of 'vm-0', not of HOSTNAME=vm-1"):
        other = tmp_path / "vm-1.tpm"
        shutil.copytree(state, other)
        tpm.ensure_state(cfg(VM_DIR=str(tmp_path), VM_TPM="on", HOSTNAME="vm-1"))
    state.chmod(0o755)
    with pytest.raises(ConfigError, match=r"vm-0.tpm is open to others \(mode 755\)"):
        tpm.ensure_state(c)


def test_links_planted_for_the_vm_s_own_state_are_refused_not_followed(tmp_path: Path) -> None:
    """A neighbour's links in place of the variable store and the TPM's folder: neither is written through."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    vm = tmp_path / "vm"
    vm.mkdir()
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"T" * 4096)
    (elsewhere / "victim").write_bytes(b"V" * 4096)
    (vm / "vm-0.efivars.fd").symlink_to(elsewhere / "victim")
    with pytest.raises(ConfigError, match=r"vm-0.efivars.fd is not a file of the runner's"):
        firmware.ensure_vars(cfg(VM_DIR=str(vm), VM_FIRMWARE="uefi", VM_OVMF_VARS=str(template)))
    (vm / "vm-0.tpm").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=r"vm-0.tpm is not a directory"):
        tpm.ensure_state(cfg(VM_DIR=str(vm), VM_TPM="on"))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim"]
    assert (elsewhere / "victim").read_bytes() == b"V" * 4096


def test_swtpm_plan_is_unprivileged_and_private() -> None:
    plan = tpm.plan_swtpm(cfg(VM_TPM="on"))
    assert list(plan.argv) == [
        "swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        "dir=/vm/vm-0.tpm,mode=0600",
        "--ctrl",
        "type=unixio,path=/r/swtpm.sock,mode=0600",
        "--terminate",
    ]


def test_a_dead_swtpm_is_reported_and_stops_the_vm(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real swtpm beside a stand-in qemu (sleep): killing swtpm stops the VM with the reason, exit status 5."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    c = cfg(VM_DIR=str(tmp_path), RUN_DIR=str(run_dir), VM_TPM="on", SHUTDOWN_TIMEOUT="1")
    tpm.ensure_state(c)
    plan = plan_qemu(c, HS, "tcg", False, None)
    plan = dataclasses.replace(plan, argv=("sleep", "30"))  # a stand-in qemu that ignores the power button

    async def scenario() -> None:
        supervisor = Supervisor(plan, 1.0)
        running = asyncio.create_task(supervisor.run())
        for _ in range(100):
            if (run_dir / "swtpm.sock").exists():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_swtpm(p, run_dir)]
        assert len(pids) == 1
        os.kill(pids[0], 9)
        await running

    with pytest.raises(ChildFailed, match=r"^swtpm \(pid \d+\) exited with status -9"):
        asyncio.run(scenario())
    assert "while the VM runs: the guest's TPM is gone; stopping the VM" in caplog.text
    assert not (run_dir / "swtpm.sock").exists()


def _is_swtpm(proc: Path, run_dir: Path) -> bool:
    try:
        return f"path={run_dir}/swtpm.sock".encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_a_boot_option_the_firmware_refuses_is_recognised_in_ovmf_s_own_words() -> None:
    refused = 'BdsDxe: failed to load Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x1,0x0): Access Denied'
    assert firmware.boot_refusal(refused) == 'Boot0001 "UEFI Misc Device": Access Denied'
    shell = 'BdsDxe: failed to start Boot0002 "EFI Internal Shell" from Fv(7CB8)/FvFile(7C04): Security Violation'
    assert firmware.boot_refusal(shell) == 'Boot0002 "EFI Internal Shell": Security Violation'
    assert firmware.boot_refusal('BdsDxe: loading Boot0001 "UEFI Misc Device" from PciRoot(0x0)') is None
    assert firmware.boot_refusal("podvm-guest: Access Denied") is None
