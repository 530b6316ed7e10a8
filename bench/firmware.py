"""Section 6b, firmware: the same guest's cold start and memory with SeaBIOS, with UEFI, and with UEFI and a TPM."""

import shutil
import tempfile
from pathlib import Path

from bench.coldstart import cold_start
from bench.table import Results
from tests.guest.build import ensure_guest, ensure_uefi_guest

SECTION = "6b. firmware: cold start and memory (image cached, TCG)"
VARIANTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("bios", {}),
    ("uefi", {"VM_FIRMWARE": "uefi", "VM_MACHINE": "q35"}),
    ("uefi + tpm", {"VM_FIRMWARE": "uefi", "VM_MACHINE": "q35", "VM_TPM": "on"}),
)


def bench_firmware(res: Results, rounds: int) -> None:
    """Each variant started ``rounds`` times on a cached image, side by side in one run: time to the first HTTP
    answer on the pod IP, and the RSS of the runner, qemu and swtpm once the guest answers."""
    images = {"bios": ensure_guest(), "uefi": ensure_uefi_guest("uefi")}
    base = Path(tempfile.mkdtemp(prefix="podvm-bench-firmware-"))
    base.chmod(0o755)
    reference = "pod start -> first HTTP answer, bios"
    try:
        for _ in range(rounds):
            for name, extra in VARIANTS:
                image = images["bios" if name == "bios" else "uefi"]
                cold_start(base / name, image, True, **extra)  # fills this variant's cache: the next is cached
                total, _, runner_rss, programs = cold_start(base / name, image, True, **extra)
                res.sample(SECTION, f"pod start -> first HTTP answer, {name}", total, ref=reference)
                res.sample(SECTION, f"runner RSS, {name}", runner_rss, unit="MiB", ref="runner RSS, bios")
                qemu = programs.get("qemu-system-x86", 0.0)
                res.sample(SECTION, f"qemu RSS, {name}", qemu, unit="MiB", ref="qemu RSS, bios")
                if "swtpm" in programs:
                    res.sample(SECTION, f"swtpm RSS, {name}", programs["swtpm"], unit="MiB")
    finally:
        shutil.rmtree(base, ignore_errors=True)
