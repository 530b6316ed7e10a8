"""UEFI guests end to end: the real sidecar, the real runner (uid 10001, TCG), Debian's OVMF and swtpm, and the
tiny guest on a GPT disk whose EFI system partition holds a bootloader from Debian's packages.

Two pods. The first boots a standalone (unsigned) GRUB with UEFI, a TPM and a local-time RTC three times: the guest
writes a firmware variable and a value in TPM NV memory, a live backup is taken, the guest writes other values;
after a ``rebase`` onto another base and a restart the later values are there, after a restore the backup's; then
swtpm is killed under the running VM and the runner says so. The second runs Secure Boot:
Debian's signed shim, GRUB and kernel boot with Secure Boot on, and the unsigned GRUB is refused by the firmware,
which the runner's log and ``status`` show.
"""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.guest.build import ensure_guest, ensure_uefi_guest
from tests.harness import pod as harness
from tests.harness.pod import Proc
from tests.harness.scenario import BOOT_TIMEOUT, IMAGE_PORT, Scenario, pod_scenario
from tests.harness.wait import until
from vmrunner.qemu import qmp

pytestmark = pytest.mark.guest

ZONE = "Asia/Kolkata"  # UTC+05:30 all year: an offset no rounding or summer time can fake
SECURE_MEMORY = "512M"  # with 256 MiB Debian's kernel resets in its EFI stub under Secure Boot (SMM takes its share)
NV_DATA = b"podvm-nv-marker!"  # 16 bytes: the size of the NV index defined below; what the backup holds
NV_LATER = b"written-after-it"  # what the guest writes after the backup
# Raw TPM 2.0 commands the guest sends to /dev/tpm0 (owner authorisation with the empty password, TPM_RS_PW):
# define the owner index 0x01000010 of 16 bytes, write NV_DATA into it, read it back.
_AUTH = "00000009" + "40000009" + "0000" + "00" + "0000"
NV_DEFINE = (
    "8002" + "0000002d" + "0000012a" + "40000001" + _AUTH + "0000" + "000e" + "01000010000b000200020000" + "0010"
)

NV_READ = "8002" + "00000023" + "0000014e" + "40000001" + "01000010" + _AUTH + "0010" + "0000"


def uid() -> str:
    return str(harness.RUNNER_UID)


def cgi(s: Scenario, what: str) -> str:
    """One call of the guest's /cgi-bin/WHAT (an efivar write, a raw TPM command) through the pod IP."""
    argv = ["curl", "-sf", "--max-time", "20", f"http://{s.net.pod_ip}/cgi-bin/{what}"]
    done = harness.in_ns(s.bed.client.ns, argv, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def tpm(s: Scenario, command: str) -> str:
    """The guest's TPM's response to ``command`` in hex; its response code must be success."""
    response = cgi(s, f"tpm?{command}").removeprefix("response=")
    assert response[12:20] == "00000000", f"TPM response code {response[12:20]} to {command[12:20]}"
    return response


def nv_write(s: Scenario, data: bytes) -> None:
    """The guest writes 16 bytes into the NV index."""
    tpm(s, "8002" + "00000033" + "00000137" + "40000001" + "01000010" + _AUTH + "0010" + data.hex() + "0000")


def nv_value(s: Scenario) -> bytes:
    """The 16 bytes of the NV index, read by the guest from its TPM."""
    return bytes.fromhex(tpm(s, NV_READ)[32:64])


def rtc_offset(page: dict[str, str]) -> float:
    """Hours between what the guest's RTC read at boot and UTC now (the page is at most a minute old)."""
    now = datetime.now(UTC)
    read = datetime.strptime(page["rtc"], "%H:%M:%S").replace(year=now.year, month=now.month, day=now.day, tzinfo=UTC)
    return ((read - now).total_seconds() / 3600 + 12) % 24 - 12


def esp_variant(image: Path, out: Path) -> None:
    """The same UEFI guest with one more file on its ESP (at 1 MiB on the GPT disk): another base, still bootable."""
    raw = out.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    note = out.with_suffix(".txt")
    note.write_text("v2\n")
    subprocess.run(["mcopy", "-o", "-i", f"{raw}@@1M", str(note), "::version"], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    note.unlink()


@dataclass
class Uefi:
    """What the first pod's three boots showed."""

    pages: dict[str, dict[str, str]] = field(default_factory=dict)
    nv: dict[str, bytes] = field(default_factory=dict)
    rtc: dict[str, float] = field(default_factory=dict)
    efivar_written: str = ""
    state_mode: int = 0
    vars_mode: int = 0
    rebase: str = ""
    swtpm_killed: str = ""
    swtpm_status: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    pointers: list[tuple[str, bool]] = field(default_factory=list)
    backup: "subprocess.CompletedProcess[str] | None" = None
    restore: "subprocess.CompletedProcess[str] | None" = None


def _swtpm_pid(runner: Proc) -> int:
    """The swtpm process the runner started (a child of the runner)."""

    def found() -> int | None:
        for pid in harness.children(runner.popen.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "swtpm":
                    return pid
            except OSError:
                continue
        return None

    return until("the runner's swtpm", found, 10, 0.2)


@pytest.fixture(scope="module")
def uefi() -> Iterator[Uefi]:
    image = ensure_uefi_guest("uefi")
    seen = Uefi()
    with pod_scenario("uefi", hostname="uefi-0", image=image) as s:
        env = s.env(VM_PROFILE="linux", VM_TPM="on", VM_RTC="localtime", VM_TIMEZONE=ZONE)
        seen.plan = json.loads(s.vmrunner(env, "plan").stdout)["hardware"]
        runner = s.boot("first.log", env)
        seen.pages["first"] = harness.guest_page(s.net)
        seen.rtc["first"] = rtc_offset(seen.pages["first"])
        mice: Any = asyncio.run(qmp.execute(s.dirs["run"] / "qmp.sock", "query-mice"))
        seen.pointers = [(m["name"], m["absolute"]) for m in mice]
        seen.efivar_written = cgi(s, "efivar?A.podvm42")
        tpm(s, NV_DEFINE)
        nv_write(s, NV_DATA)
        seen.nv["first"] = nv_value(s)
        seen.backup = s.vmrunner(env, "backup")
        assert cgi(s, "efivar?B.later") == "efivar=later"
        nv_write(s, NV_LATER)
        assert s.stop(runner) == 0, s.report()
        vm = s.dirs["vm"]
        seen.state_mode = (vm / "uefi-0.tpm").stat().st_mode & 0o777
        seen.vars_mode = (vm / "uefi-0.efivars.fd").stat().st_mode & 0o777

        esp_variant(image, s.dirs["srv"] / "guest-v2.qcow2")
        v2 = {**env, "IMG_SOURCE": f"http://127.0.0.1:{IMAGE_PORT}/guest-v2.qcow2", "IMG_TARGET": "v2"}
        fetched = s.vmrunner(v2, "fetch")
        assert fetched.returncode == 0, fetched.stderr
        rebased = s.vmrunner(env, "rebase", "v2")
        seen.rebase = f"{rebased.returncode} {rebased.stderr}"
        runner = s.boot("restarted.log", env)
        seen.pages["restarted"] = harness.guest_page(s.net)
        seen.nv["restarted"] = nv_value(s)
        assert s.stop(runner) == 0, s.report()
        seen.restore = s.vmrunner(env, "restore", "--overwrite")

        runner = s.boot("restored.log", env)
        seen.pages["restored"] = harness.guest_page(s.net)
        seen.nv["restored"] = nv_value(s)

        before = len(runner.text())
        os.kill(_swtpm_pid(runner), signal.SIGKILL)
        seen.swtpm_killed = runner.wait_for(r"swtpm \(pid \d+\) exited with status -9[^\n]*", 60, before).group(0)
        seen.swtpm_status = runner.popen.wait(60)
        yield seen


def test_a_uefi_guest_boots_with_its_tpm_and_answers_on_the_pod_ip(uefi: Uefi) -> None:
    page = uefi.pages["first"]
    assert (page["firmware"], page["secure_boot"], page["tpm"], page["counter"]) == ("uefi", "0", "2", "1")
    assert page["efivars"] == "none"
    assert uefi.efivar_written == "efivar=podvm42"
    assert uefi.nv["first"] == NV_DATA


def test_firmware_variables_and_tpm_memory_survive_a_restart_and_a_rebase(uefi: Uefi) -> None:
    assert uefi.rebase.startswith("0 "), uefi.rebase
    assert (uefi.pages["restarted"]["efivars"], uefi.nv["restarted"]) == ("A:podvm42,B:later", NV_LATER)


def test_a_restore_brings_back_the_variables_and_tpm_of_the_backup_s_instant(uefi: Uefi) -> None:
    assert uefi.backup is not None and uefi.backup.returncode == 0, uefi.backup.stderr if uefi.backup else ""
    assert uefi.restore is not None and uefi.restore.returncode == 0, uefi.restore.stderr if uefi.restore else ""
    assert "uefi-0.efivars.fd of the same point" in uefi.restore.stderr
    assert "uefi-0.tpm of the same point" in uefi.restore.stderr
    assert "uefi-0.machine.json of the same point" in uefi.restore.stderr  # the VM's pinned machine type
    assert (uefi.pages["restored"]["efivars"], uefi.nv["restored"]) == ("A:podvm42", NV_DATA)
    # the disk came back with them: the boot counter of the backup's instant, then this boot
    assert [uefi.pages[b]["counter"] for b in ("first", "restarted", "restored")] == ["1", "2", "2"]


def test_the_vm_s_own_state_is_closed_to_others_and_planned(uefi: Uefi) -> None:
    assert (uefi.state_mode, uefi.vars_mode) == (0o700, 0o600)
    kinds = [entry["kind"] for entry in uefi.plan["own_state"]]
    assert kinds == ["disk", "machine", "uefi-vars", "tpm-state"]


def test_the_guest_has_an_absolute_pointer_by_default(uefi: Uefi) -> None:
    assert ("QEMU HID Tablet", True) in uefi.pointers, uefi.pointers


def test_the_rtc_keeps_the_local_time_of_the_zone_it_is_given(uefi: Uefi) -> None:
    expected = datetime.now(ZoneInfo(ZONE)).utcoffset()
    assert expected is not None
    assert abs(uefi.rtc["first"] - expected.total_seconds() / 3600) < 0.1, uefi.pages["first"]["rtc"]


def test_a_swtpm_killed_under_the_running_vm_is_reported_and_stops_it(uefi: Uefi) -> None:
    assert "exited with status -9" in uefi.swtpm_killed
    assert uefi.swtpm_status not in (None, 0)


@dataclass
class Secure:
    """What the Secure Boot pod showed: the signed chain's page, and the unsigned one's refusal."""

    page: dict[str, str] = field(default_factory=dict)
    refused_log: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    booted_unsigned: bool = False


@pytest.fixture(scope="module")
def secure() -> Iterator[Secure]:
    seen = Secure()
    with pod_scenario("secure-boot", hostname="sb-0", image=ensure_uefi_guest("secure")) as s:
        shutil.copyfile(ensure_uefi_guest("uefi"), s.dirs["srv"] / "unsigned.qcow2")
        env = s.env(VM_FIRMWARE="uefi-secure", VM_MEMORY=SECURE_MEMORY)
        runner = s.boot("signed.log", env)
        seen.page = harness.guest_page(s.net)
        assert s.stop(runner) == 0, s.report()

        unsigned = s.env(
            VM_FIRMWARE="uefi-secure",
            VM_MEMORY=SECURE_MEMORY,
            HOSTNAME="sb-1",
            IMG_SOURCE=f"http://127.0.0.1:{IMAGE_PORT}/unsigned.qcow2",
        )
        runner = s.start("unsigned.log", unsigned)
        seen.refused_log = runner.wait_for(r"the firmware refused to boot [^\n]*", BOOT_TIMEOUT).group(0)
        seen.status = json.loads(s.vmrunner(unsigned, "status").stdout)
        time.sleep(2)
        seen.booted_unsigned = "podvm-guest: booted" in runner.text()
        s.stop(runner)
        yield seen


def test_secure_boot_boots_a_signed_chain_with_secure_boot_on(secure: Secure) -> None:
    assert (secure.page["firmware"], secure.page["secure_boot"]) == ("uefi", "1")


def test_secure_boot_refuses_an_unsigned_bootloader_and_says_so(secure: Secure) -> None:
    assert "Access Denied" in secure.refused_log
    assert not secure.booted_unsigned
    assert "Access Denied" in str(secure.status["boot_refused"])
    refused = [f for f in secure.status["figures"] if f["name"] == "podvm_vm_boot_refused"]
    assert [f["value"] for f in refused] == [1]


@pytest.fixture(scope="module")
def profiles() -> Iterator[dict[str, str]]:
    """Each Windows profile's hardware boots the test guest's kernel under TCG: the signed chain through AHCI with
    Secure Boot and a TPM (``windows``), the BIOS guest from IDE on i440fx (``legacy-windows``). The guest's kernel
    has no AHCI, e1000e or rtl8139 driver, so its init, not its network, is the proof; what each boot logged."""
    logs = {}
    with pod_scenario("profiles", hostname="win-0", image=ensure_uefi_guest("secure")) as s:
        shutil.copyfile(ensure_guest(), s.dirs["srv"] / "bios.qcow2")
        for profile, hostname, image in (("windows", "win-0", "guest"), ("legacy-windows", "legacy-0", "bios")):
            env = s.env(
                VM_PROFILE=profile,
                HOSTNAME=hostname,
                VM_MEMORY=SECURE_MEMORY,
                IMG_SOURCE=f"http://127.0.0.1:{IMAGE_PORT}/{image}.qcow2",
            )
            runner = s.start(f"{profile}.log", env)
            runner.wait_for("podvm-guest: booted", BOOT_TIMEOUT)
            runner.kill()
            logs[profile] = runner.text()
        yield logs


@pytest.mark.parametrize("profile", ["windows", "legacy-windows"])
def test_each_windows_profile_boots_the_guest_s_kernel(profiles: dict[str, str], profile: str) -> None:
    qemu = next(line for line in profiles[profile].splitlines() if "vmrunner: qemu: " in line)
    if profile == "windows":
        assert "OVMF_CODE_4M.secboot.fd" in qemu and "-tpmdev" in qemu and "e1000e" in qemu
        assert re.search(r"-machine pc-q35-[\d.]+,smm=on ", qemu), qemu
        assert "hv_" not in qemu  # Hyper-V enlightenments are KVM only: left out under TCG
    else:
        assert re.search(r"-machine pc-i440fx-[\d.]+ ", qemu), qemu
        assert "rtl8139" in qemu and "pflash" not in qemu and "usb-tablet" not in qemu
    assert "podvm-guest: booted" in profiles[profile]
