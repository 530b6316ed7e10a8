"""Foreign disks made from a qcow2 with the real qemu-img (vmdk, vhdx, vdi, vpc) and OVA archives holding them, good
and hostile, for the tests and the benchmark."""

import io
import subprocess
import tarfile
from pathlib import Path

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
# IMG_FORMAT and qemu-img's -O with its options, for each foreign disk the runner imports
KINDS = {
    "vmdk-sparse": ("vmdk", ["-O", "vmdk", "-o", "subformat=monolithicSparse"]),
    "vmdk-stream": ("vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    "vhdx": ("vhdx", ["-O", "vhdx"]),
    "vdi": ("vdi", ["-O", "vdi"]),
    "vpc": ("vpc", ["-O", "vpc", "-o", "force_size=on"]),
}


def convert(source: Path, kind: str, out: Path) -> Path:
    """``source`` (qcow2) as the foreign disk ``kind`` of :data:`KINDS`."""
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", *KINDS[kind][1], str(source), str(out)], check=True)
    return out


def ovf(disks: list[tuple[str, str, int | None]]) -> bytes:
    """An OVF envelope naming ``(disk id, file, announced size)`` disks, in order."""
    files = "".join(
        f'<File ovf:id="file{i}" ovf:href="{href}"' + (f' ovf:size="{size}"' if size is not None else "") + "/>"
        for i, (_, href, size) in enumerate(disks)
    )
    items = "".join(
        f'<Disk ovf:diskId="{d}" ovf:fileRef="file{i}" ovf:capacity="1"/>' for i, (d, _, _) in enumerate(disks)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Envelope xmlns="{OVF_NS}" xmlns:ovf="{OVF_NS}">'
        f"<References>{files}</References><DiskSection><Info>Virtual disks</Info>{items}</DiskSection>"
        '<VirtualSystem ovf:id="vm"><Info>A virtual machine</Info></VirtualSystem></Envelope>'
    ).encode()


def ova(out: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    """A tar archive of ``members``: ``(name, bytes)`` as regular files, or a TarInfo as it is (a link, a device)."""
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size, info.mode = len(m[1]), 0o644
                tar.addfile(info, io.BytesIO(m[1]))
    return out


def ova_of(vmdk: Path, out: Path) -> Path:
    """A well-formed OVA: the OVF first, then the one vmdk it names at its size."""
    data = vmdk.read_bytes()
    return ova(out, [("vm.ovf", ovf([("vmdisk1", "disk1.vmdk", len(data))])), ("disk1.vmdk", data)])


def with_descriptor(sparse: Path, text: str, out: Path, *, capacity_zero: bool = False) -> Path:
    """A monolithicSparse vmdk whose embedded descriptor is replaced by ``text`` (and its header's capacity set to
    0, which makes qemu follow that descriptor's extents): the OSSA-2024-001 shape."""
    data = bytearray(sparse.read_bytes())
    offset, size = (int.from_bytes(data[28 + 8 * i : 36 + 8 * i], "little") * 512 for i in range(2))
    body = text.encode()
    assert len(body) < size
    data[offset : offset + size] = body.ljust(size, b"\0")
    if capacity_zero:
        data[12:20] = bytes(8)
    out.write_bytes(bytes(data))
    return out
