"""The guest's CPU flags, pointer and clock, planned from the resolved hardware settings (:mod:`vmrunner.profiles`)."""

from vmrunner.config import Config

# What Windows needs on KVM to run well (KubeVirt's windows preference, dockur/windows): fewer exits for spinlocks,
# the APIC and timers, and a paravirtual clock. TCG ignores or refuses several of them, so they are KVM only.
HYPERV_FLAGS = (
    "hv_relaxed",
    "hv_vapic",
    "hv_spinlocks=0x1fff",
    "hv_vpindex",
    "hv_runtime",
    "hv_time",
    "hv_synic",
    "hv_stimer",
    "hv_frequencies",
    "hv_reset",
    "hv_tlbflush",
    "hv_ipi",
)


def cpu_args(cfg: Config, accel: str) -> list[str]:
    """``-cpu host`` under KVM, with the Hyper-V enlightenments when asked for; qemu's default CPU under TCG."""
    if accel != "kvm":
        return []
    return ["-cpu", ",".join(("host", *HYPERV_FLAGS)) if cfg.hardware.hyperv else "host"]


def hyperv_applied(cfg: Config, accel: str) -> bool:
    """True when the enlightenments reach the guest (VM_HYPERV=on and KVM)."""
    return cfg.hardware.hyperv and accel == "kvm"


def pointer_args(cfg: Config) -> list[str]:
    """An absolute pointer (a USB tablet on an xHCI controller), so a VNC viewer's pointer and the guest's match;
    nothing for ``ps2``, which leaves the PS/2 mouse every PC machine has."""
    if cfg.hardware.pointer != "tablet":
        return []
    return ["-device", "qemu-xhci,id=usb0", "-device", "usb-tablet,bus=usb0.0"]


def rtc_args(cfg: Config) -> list[str]:
    """The RTC in UTC, or in the local time of VM_TIMEZONE (qemu reads the zone from TZ, see ``environment``)."""
    return ["-rtc", f"base={cfg.hardware.rtc}"]


def environment(cfg: Config) -> tuple[tuple[str, str], ...]:
    """Variables qemu is started with beyond the runner's own: TZ for a local-time RTC."""
    return (("TZ", cfg.hardware.timezone),) if cfg.hardware.rtc == "localtime" else ()
