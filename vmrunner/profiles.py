"""The guest's virtual hardware: named presets (``VM_PROFILE``) and the settings each one sets, resolved with the
source of every value, so ``vmrunner plan`` can say whether a value came from a variable, a profile or a default.

A profile only fills in what the environment leaves unset: every field it sets can still be set on its own. It lives
beside the config rather than under ``run/`` because the config resolves it and the pet's state follows it.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.env import Env
from shared.errors import ConfigError

FIRMWARES = ("bios", "uefi", "uefi-secure")
POINTERS = ("tablet", "ps2")
RTC_BASES = ("utc", "localtime")
OVMF = Path("/usr/share/OVMF")
# Debian's ovmf package (2022.11): the 4 MiB builds; the Secure Boot build needs SMM and comes with a variable
# template that has Microsoft's keys enrolled (so Windows and Debian's signed shim both boot).
OVMF_FILES = {
    "uefi": (OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd"),
    "uefi-secure": (OVMF / "OVMF_CODE_4M.secboot.fd", OVMF / "OVMF_VARS_4M.ms.fd"),
}


@dataclass(frozen=True)
class Profile:
    """A named preset: variable -> value, and where the choice comes from."""

    values: Mapping[str, str]
    source: str


PROFILES: Mapping[str, Profile] = {
    # A guest built for UEFI with virtio drivers (any current distribution's cloud image).
    "linux": Profile(
        {
            "VM_MACHINE": "q35",
            "VM_DISK_BUS": "virtio",
            "VM_NIC_MODEL": "virtio-net-pci",
            "VM_FIRMWARE": "uefi",
            "VM_RTC": "utc",
            "VM_POINTER": "tablet",
            "VM_TPM": "off",
            "VM_HYPERV": "off",
        },
        "KubeVirt's linux preferences: q35, EFI, virtio disk and NIC",
    ),
    # Windows 10/11 and Server 2016+: boots from AHCI and e1000e with its own drivers (virtio after the drivers are
    # installed), Secure Boot and a TPM 2.0 (Windows 11 requires both), local time in the RTC, Hyper-V
    # enlightenments on KVM.
    "windows": Profile(
        {
            "VM_MACHINE": "q35",
            "VM_DISK_BUS": "ide",  # on q35 the ide bus is the ICH9 AHCI controller, which Windows drives itself
            "VM_NIC_MODEL": "e1000e",
            "VM_FIRMWARE": "uefi-secure",
            "VM_RTC": "localtime",
            "VM_POINTER": "tablet",
            "VM_TPM": "on",
            "VM_HYPERV": "on",
        },
        "KubeVirt's windows preference (q35, EFI with Secure Boot and SMM, persistent TPM, sata, e1000e, "
        "Hyper-V enlightenments) and dockur/windows (-rtc base=localtime)",
    ),
    # Windows XP/2003 and other guests of that age: i440fx, IDE, an RTL8139, SeaBIOS, local time; no USB 3
    # controller they know, so the PS/2 mouse.
    "legacy-windows": Profile(
        {
            "VM_MACHINE": "pc",
            "VM_DISK_BUS": "ide",
            "VM_NIC_MODEL": "rtl8139",
            "VM_FIRMWARE": "bios",
            "VM_RTC": "localtime",
            "VM_POINTER": "ps2",
            "VM_TPM": "off",
            "VM_HYPERV": "off",
        },
        "KubeVirt's legacy-Windows guide and dockur/windows for very old Windows (pc, ide, rtl8139, BIOS)",
    ),
}


@dataclass(frozen=True)
class Hardware:
    """The resolved hardware settings beyond the machine type, disk bus and NIC (which the Config holds)."""

    profile: str | None = None  # VM_PROFILE
    firmware: str = "bios"  # VM_FIRMWARE: bios, uefi or uefi-secure
    ovmf_code: Path | None = None  # VM_OVMF_CODE: the firmware, read-only (None with bios)
    ovmf_vars: Path | None = None  # VM_OVMF_VARS: the variable store's template, copied once to VM_DIR
    tpm: bool = False  # VM_TPM: a TPM 2.0 emulated by swtpm
    swtpm: str = "swtpm"  # SWTPM: the swtpm binary
    pointer: str = "tablet"  # VM_POINTER: tablet (absolute, USB) or ps2 (relative, no USB)
    rtc: str = "utc"  # VM_RTC: utc or localtime
    timezone: str = "UTC"  # VM_TIMEZONE: the zone of the RTC's local time
    hyperv: bool = False  # VM_HYPERV: Hyper-V enlightenments, applied only under KVM
    sources: tuple[tuple[str, str, str], ...] = ()  # (variable, value, where it came from)

    @property
    def uefi(self) -> bool:
        """True for either UEFI firmware."""
        return self.firmware != "bios"

    @property
    def secure_boot(self) -> bool:
        """True when the firmware enforces Secure Boot (and so needs SMM on a q35 machine)."""
        return self.firmware == "uefi-secure"


class _Picker:
    """Reads each setting from the environment, else the profile, else the default, and records which it was."""

    def __init__(self, env: Env, profile: str | None) -> None:
        self.env = env
        self.profile = profile
        self.sources: dict[str, tuple[str, str]] = {}

    def _raw(self, name: str, default: str) -> tuple[str, str]:
        given = self.env.optional(name)
        if given is not None:
            return given, name
        if self.profile is not None and name in PROFILES[self.profile].values:
            return PROFILES[self.profile].values[name], f"VM_PROFILE={self.profile}"
        return default, "default"

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        raw, source = self._raw(name, default)
        value = Env({name: raw}).choice(name, default, choices)
        self.sources[name] = (value, source)
        return value

    def flag(self, name: str) -> bool:
        raw, source = self._raw(name, "off")
        value = Env({name: raw}).flag(name)
        self.sources[name] = ("on" if value else "off", source)
        return value

    def text(self, name: str, default: str) -> str:
        value, source = self._raw(name, default)
        self.sources[name] = (value, source)
        return value

    def imply(self, name: str, value: str, why: str) -> str:
        self.sources[name] = (value, f"implied by {why}")
        return value

    def given(self, name: str) -> bool:
        return self.sources.get(name, ("", ""))[1] == name


def is_q35(machine: str) -> bool:
    """True for qemu's q35 machine types (``q35``, ``pc-q35-7.2``), the only ones with SMM for Secure Boot."""
    kind = machine.split(",", 1)[0]
    return kind == "q35" or kind.startswith("pc-q35-")


def cdrom_units(machine: str) -> tuple[tuple[str, int], ...]:
    """The ``(bus, unit)`` of each CD-ROM slot, 1 first: IDE units no other drive takes, which every guest (a Windows
    installer without virtio drivers too) reads. The pet on ``ide`` holds ide.0 unit 0 and the config drive ide.1
    unit 0; on q35 each ide.N is one AHCI port with one unit, on pc ide.0 and ide.1 have a master and a slave."""
    if is_q35(machine):
        return (("ide.2", 0), ("ide.3", 0), ("ide.4", 0), ("ide.5", 0))
    return (("ide.1", 1), ("ide.0", 1))


def resolve(
    env: Env, disk_buses: Iterable[str], nic_models: Iterable[str], accel: str
) -> tuple[str, str, str, Hardware]:
    """``(machine, disk_bus, nic_model, hardware)`` from VM_PROFILE and the variables that override it.

    :raise ConfigError: naming the first setting that is wrong, or that cannot work with another.
    """
    profile = env.choice("VM_PROFILE", "none", ("none", *PROFILES))
    pick = _Picker(env, None if profile == "none" else profile)
    machine = pick.text("VM_MACHINE", "pc")
    disk_bus = pick.choice("VM_DISK_BUS", "virtio", disk_buses)
    nic_model = pick.choice("VM_NIC_MODEL", "virtio-net-pci", nic_models)
    firmware = pick.choice("VM_FIRMWARE", "bios", FIRMWARES)
    if firmware == "uefi-secure" and not is_q35(machine):
        if pick.given("VM_MACHINE"):
            raise ConfigError(
                f"VM_FIRMWARE=uefi-secure: Secure Boot needs SMM, which only a q35 machine has; VM_MACHINE={machine!r} "
                "cannot (use q35 or VM_FIRMWARE=uefi)"
            )
        machine = pick.imply("VM_MACHINE", "q35", "VM_FIRMWARE=uefi-secure")
    if firmware == "uefi-secure" and "smm=off" in machine.split(","):
        raise ConfigError(f"VM_MACHINE={machine!r}: VM_FIRMWARE=uefi-secure needs SMM; remove smm=off")
    code, template = OVMF_FILES.get(firmware, (None, None))
    ovmf_code = env.path("VM_OVMF_CODE", str(code)) if code is not None else None
    ovmf_vars = env.path("VM_OVMF_VARS", str(template)) if template is not None else None
    for name, path in (("VM_OVMF_CODE", ovmf_code), ("VM_OVMF_VARS", ovmf_vars)):
        if path is not None:
            pick.sources[name] = (str(path), name if env.optional(name) else f"VM_FIRMWARE={firmware}")
    tpm = pick.flag("VM_TPM")
    pointer = pick.choice("VM_POINTER", "tablet", POINTERS)
    rtc = pick.choice("VM_RTC", "utc", RTC_BASES)
    timezone = pick.text("VM_TIMEZONE", "UTC")
    if rtc == "utc" and pick.given("VM_TIMEZONE"):
        raise ConfigError(f"VM_TIMEZONE={timezone!r}: only used with VM_RTC=localtime (the RTC keeps UTC)")
    _check_timezone(timezone)
    hyperv = pick.flag("VM_HYPERV")
    if hyperv and accel == "tcg" and pick.given("VM_HYPERV"):
        raise ConfigError("VM_HYPERV=on: Hyper-V enlightenments need ACCEL=kvm (TCG ignores or refuses them)")
    sources = tuple((name, value, source) for name, (value, source) in pick.sources.items())
    hardware = Hardware(
        profile=pick.profile,
        firmware=firmware,
        ovmf_code=ovmf_code,
        ovmf_vars=ovmf_vars,
        tpm=tpm,
        swtpm=env.text("SWTPM", "swtpm"),
        pointer=pointer,
        rtc=rtc,
        timezone=timezone,
        hyperv=hyperv,
        sources=(("VM_PROFILE", profile, "VM_PROFILE" if env.optional("VM_PROFILE") else "default"), *sources),
    )
    return machine, disk_bus, nic_model, hardware


def _check_timezone(name: str) -> None:
    """An IANA zone name that this machine's tz database holds (qemu reads it through TZ)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"VM_TIMEZONE={name!r}: not a time zone this runner knows (e.g. Europe/Berlin)") from None
