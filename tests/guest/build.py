"""Build the tiny test guest: Debian's cloud kernel plus a busybox initramfs on a syslinux FAT disk, as qcow2.

Tests need a real guest that boots in seconds under TCG, gets DHCP, reads the config drive by its label, keeps a
counter on its own disk and powers off on the ACPI button. Everything comes from Debian packages and is built
without mounting anything. The result is cached in ``.cache/guest/`` under a hash of its inputs.

Usage: ``python -m tests.guest.build [OUT]`` prints (and optionally copies to OUT) the image's path.
"""

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE.parent.parent / ".cache" / "guest"
BOOT_LABEL = "PODVMBOOT"
DISK_MIB = 64

# What the init needs, in the order the notes give; dependencies found in each .ko are loaded before it.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "scsi_mod",
    "sd_mod",
    "libata",
    "ata_piix",
    "cdrom",
    "sr_mod",
    "isofs",
    "fat",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "button",
    "evdev",
    "virtio_console",
    "loop",
    "efivarfs",  # UEFI variants: the guest reads and writes its firmware's variables
)

# qemu-guest-agent from Debian with the shared libraries it links (its ``ldd``), run from the initramfs so backups
# can freeze the guest's file systems; the libraries by soname, each found in one of these packages.
AGENT_PACKAGES = ("qemu-guest-agent", "libglib2.0-0", "libpcre2-8-0", "libudev1", "libnuma1", "liburing2", "libc6")
AGENT_LIBS = (
    "libudev.so.1",
    "libnuma.so.1",
    "liburing.so.2",
    "libglib-2.0.so.0",
    "libgmodule-2.0.so.0",
    "libpcre2-8.so.0",
    "libm.so.6",
    "libc.so.6",
)

SYSLINUX_CFG = f"""DEFAULT podvm
TIMEOUT 0
PROMPT 0
LABEL podvm
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 quiet panic=-1 podvm.label={BOOT_LABEL}
"""


def _run(argv: list[str], cwd: Path | None = None) -> str:
    """Run a build step; a failure names the command and shows its error output."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError(f"guest build: {argv[0]} is missing; scripts/install-system-deps installs it") from None
    if done.returncode != 0:
        raise RuntimeError(f"guest build: {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def kernel_package() -> str:
    """The versioned cloud kernel package the ``linux-image-cloud-amd64`` metapackage currently points at."""
    out = _run(["apt-cache", "depends", "linux-image-cloud-amd64"])
    match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not match:
        raise RuntimeError("guest build: apt-cache depends linux-image-cloud-amd64 names no kernel package")
    return match.group(1)


def download(package: str, into: Path) -> Path:
    """``apt-get download`` one package into the cache (once) and return the .deb."""
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        _run(["apt-get", "download", package], cwd=into)
        found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        raise RuntimeError(f"guest build: apt-get download {package} produced no .deb in {into}")
    return found[-1]


def _module_index(root: Path) -> dict[str, Path]:
    return {ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in root.rglob("*.ko")}


def module_order(index: dict[str, Path], wanted: tuple[str, ...] = MODULES) -> list[str]:
    """``wanted`` with each module's dependencies (from its ``depends=`` field) placed before it, once each."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in index:
            raise RuntimeError(f"guest build: kernel module {name} is not in the kernel package")
        match = re.search(rb"depends=([a-z0-9_,-]*)", index[name].read_bytes())
        for dep in match.group(1).decode().split(",") if match and match.group(1) else []:
            visit(dep.replace("-", "_"))
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def _cpio_newc(tree: Path, out: Path) -> None:
    """Pack ``tree`` as a gzip'd cpio newc archive, the format the kernel unpacks as its initramfs."""
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    done = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=tree,
        input="\n".join(names).encode() + b"\n",
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"guest build: cpio failed: {done.stderr.decode().strip()}")
    out.write_bytes(gzip.compress(done.stdout, compresslevel=6))


def _agent(agent_root: Path, tree: Path) -> None:
    """qemu-ga and its libraries (symbolic links resolved) into the initramfs ``tree``."""
    (tree / "usr" / "sbin").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(agent_root / "usr" / "sbin" / "qemu-ga", tree / "usr" / "sbin" / "qemu-ga")
    (tree / "usr" / "sbin" / "qemu-ga").chmod(0o755)
    libs = tree / "lib" / "x86_64-linux-gnu"
    libs.mkdir(parents=True, exist_ok=True)
    for name in AGENT_LIBS:
        found = [p for d in ("lib", "usr/lib") if (p := agent_root / d / "x86_64-linux-gnu" / name).exists()]
        if not found:
            raise RuntimeError(f"guest build: {name} is in none of {', '.join(AGENT_PACKAGES)}")
        shutil.copyfile(found[0].resolve(), libs / name)
    (tree / "lib64").mkdir(exist_ok=True)
    shutil.copyfile((agent_root / "lib64" / "ld-linux-x86-64.so.2").resolve(), tree / "lib64" / "ld-linux-x86-64.so.2")
    (tree / "lib64" / "ld-linux-x86-64.so.2").chmod(0o755)


def _initramfs(kernel_root: Path, busybox_root: Path, agent_root: Path, work: Path) -> Path:
    tree = work / "initramfs"
    for sub in ("bin", "lib/modules", "etc/acpi/PWRF"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox_root / "bin" / "busybox", tree / "bin" / "busybox")
    index = _module_index(kernel_root / "lib" / "modules")
    order = module_order(index)
    for name in order:
        shutil.copyfile(index[name], tree / "lib" / "modules" / f"{name}.ko")
    (tree / "lib" / "modules" / "order").write_text("\n".join(order) + "\n")
    _agent(agent_root, tree)
    for source, target in (
        ("init.sh", "init"),
        ("udhcpc.script", "etc/udhcpc.script"),
        ("power-button.sh", "etc/acpi/PWRF/00000080"),
    ):
        shutil.copyfile(HERE / source, tree / target)
        (tree / target).chmod(0o755)
    initrd = work / "initrd.gz"
    _cpio_newc(tree, initrd)
    return initrd


def _disk(kernel: Path, initrd: Path, work: Path, out: Path) -> None:
    """A syslinux-bootable FAT 'superfloppy' image, made without mounting, converted to qcow2 at ``out``."""
    raw = work / "disk.raw"
    _run(["mkfs.vfat", "-C", "-n", BOOT_LABEL, str(raw), str(DISK_MIB * 1024)])
    _run(["syslinux", "--install", str(raw)])
    cfg = work / "syslinux.cfg"
    cfg.write_text(SYSLINUX_CFG)
    for source, name in ((kernel, "vmlinuz"), (initrd, "initrd.gz"), (cfg, "syslinux.cfg")):
        _run(["mcopy", "-o", "-i", str(raw), str(source), f"::{name}"])
    tmp = out.with_name(f".{out.name}.tmp")
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
    tmp.replace(out)


def _inputs_hash(debs: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in [*debs, *(HERE / n for n in ("build.py", "init.sh", "udhcpc.script", "power-button.sh"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.suffix != ".deb" else str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def ensure_guest(cache: Path = CACHE) -> Path:
    """Path of the guest qcow2, built on first use and reused while its inputs are unchanged."""
    debs = [download(kernel_package(), cache / "debs"), download("busybox-static", cache / "debs")]
    debs += [download(package, cache / "debs") for package in AGENT_PACKAGES]
    out = cache / f"podvm-guest-{_inputs_hash(debs)}.qcow2"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="podvm-guest-") as tmp:
        work = Path(tmp)
        for deb, name in zip(debs, ("kernel", "busybox", *["agent"] * len(AGENT_PACKAGES)), strict=True):
            _run(["dpkg-deb", "-x", str(deb), str(work / name)])
        kernels = sorted((work / "kernel" / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise RuntimeError(f"guest build: no /boot/vmlinuz-* in {debs[0].name}")
        initrd = _initramfs(work / "kernel", work / "busybox", work / "agent", work)
        _disk(kernels[-1], initrd, work, out)
    return out


# ---- UEFI variants (one block) -----------------------------------------------------------------------------------
# The same kernel and initramfs on a GPT disk whose EFI system partition (FAT32, labelled PODVMBOOT, so the init finds
# its counter there) holds a bootloader from Debian's packages: ``uefi`` a standalone GRUB (unsigned: Secure Boot
# must refuse it), ``secure`` Debian's signed shim and GRUB, which boot the signed cloud kernel with Secure Boot on.
UEFI_KINDS = ("uefi", "secure")
ESP_MIB = 64
SHIM = Path("/usr/lib/shim/shimx64.efi.signed")
SIGNED_GRUB = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")
GRUB_CFG = f"""set timeout=0
search --no-floppy --label {BOOT_LABEL} --set=root
linux /vmlinuz console=ttyS0 quiet panic=-1 podvm.label={BOOT_LABEL}
initrd /initrd.gz
boot
"""


def _bootloader(kind: str, work: Path) -> dict[str, Path]:
    """The ESP's bootloader files by their path on the ESP."""
    cfg = work / "grub.cfg"
    # Debian's signed GRUB has these modules built in and refuses insmod under Secure Boot; the standalone one needs
    # them loaded to find the ESP by its label.
    cfg.write_text(GRUB_CFG if kind == "secure" else f"insmod part_gpt\ninsmod fat\ninsmod search_label\n{GRUB_CFG}")
    if kind == "secure":
        for path in (SHIM, SIGNED_GRUB):
            if not path.exists():
                raise RuntimeError(f"guest build: {path} is missing; scripts/install-system-deps installs it")
        return {
            "EFI/BOOT/BOOTX64.EFI": SHIM,
            "EFI/BOOT/grubx64.efi": SIGNED_GRUB,
            "EFI/BOOT/grub.cfg": cfg,
            "EFI/debian/grub.cfg": cfg,  # where Debian's signed GRUB looks first
        }
    standalone = work / "BOOTX64.EFI"
    _run(["grub-mkstandalone", "-O", "x86_64-efi", "-o", str(standalone), f"boot/grub/grub.cfg={cfg}"])
    return {"EFI/BOOT/BOOTX64.EFI": standalone}


def _uefi_disk(kind: str, kernel: Path, initrd: Path, work: Path, out: Path) -> None:
    """A GPT disk with one FAT32 ESP, made without mounting, converted to qcow2 at ``out``."""
    esp = work / "esp.raw"
    _run(["mkfs.vfat", "-C", "-F", "32", "-n", BOOT_LABEL, str(esp), str(ESP_MIB * 1024)])
    files = {**_bootloader(kind, work), "vmlinuz": kernel, "initrd.gz": initrd}
    for folder in ("EFI", "EFI/BOOT", "EFI/debian"):
        _run(["mmd", "-i", str(esp), f"::{folder}"])
    for name, source in files.items():
        _run(["mcopy", "-o", "-i", str(esp), str(source), f"::{name}"])
    raw = work / "disk.raw"
    with open(raw, "wb") as disk:
        disk.truncate((ESP_MIB + 2) << 20)  # 1 MiB before the ESP, room for the backup GPT after it
    _run(["sgdisk", "-n", f"1:2048:+{ESP_MIB}M", "-t", "1:ef00", "-c", "1:ESP", str(raw)])
    with open(esp, "rb") as src, open(raw, "r+b") as dst:
        dst.seek(1 << 20)
        shutil.copyfileobj(src, dst)
    tmp = out.with_name(f".{out.name}.tmp")
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)])
    tmp.replace(out)


def ensure_uefi_guest(kind: str, cache: Path = CACHE) -> Path:
    """Path of the UEFI guest of ``kind`` (see UEFI_KINDS), built on first use like :func:`ensure_guest`."""
    if kind not in UEFI_KINDS:
        raise ValueError(f"guest build: unknown UEFI kind {kind!r}")
    bios = ensure_guest(cache)
    out = cache / f"{bios.stem}-{kind}.qcow2"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="podvm-guest-") as tmp:
        work = Path(tmp)
        # The BIOS guest's FAT holds the very kernel and initramfs: read them back rather than build them twice.
        for name in ("vmlinuz", "initrd.gz"):
            raw = work / "bios.raw"
            if not raw.exists():
                _run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(bios), str(raw)])
            _run(["mcopy", "-i", str(raw), f"::{name}", str(work / name)])
        _uefi_disk(kind, work / "vmlinuz", work / "initrd.gz", work, out)
    return out


# ---- end of UEFI variants ---------------------------------------------------------------------------------------


def main() -> int:
    """Build (or reuse) the guest and print its path; with an argument, also copy it there."""
    image = ensure_guest()
    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
        shutil.copyfile(image, target)
        image = target
    sys.stdout.write(f"{os.fspath(image)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
