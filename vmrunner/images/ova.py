"""An OVA: a tar archive of an OVF descriptor and its disks, read without extracting anything to a path.

The archive is untrusted like any image: a member that is a link, a device, a FIFO, a folder, sparse, absolute, with
``..`` in its name or named twice is refused, and so is an OVF that names a file the archive does not hold or gives
a member another size than it has. The OVF is parsed by defusedxml (no DTD, no entities). The system disk (the
first of the OVF's DiskSection, or the one ``IMG_OVA_DISK`` names) is streamed out of the archive into the file it
is given; the caller vets that as a vmdk.
"""

import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO
from xml.etree.ElementTree import Element

import defusedxml.ElementTree

from shared.errors import ImageRejected

OVF_MAX = 1 << 20  # an OVF descriptor is a few KiB
MEMBERS_MAX = 256
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_OVF_NS = ("http://schemas.dmtf.org/ovf/envelope/1", "http://schemas.dmtf.org/ovf/envelope/2")


@dataclass(frozen=True)
class Disk:
    """One disk of the OVF: its id, the archive member holding it, the size the OVF announces (None: not given)."""

    disk_id: str
    href: str
    size: int | None


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a member may not be read from the archive, or None; pure."""
    name = member.name
    if not member.isreg() or member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
        kind = "a link" if member.issym() or member.islnk() else "a device or FIFO"
        kind = "a folder" if member.isdir() else kind
        return f"member {name!r} is {kind if not member.isreg() else 'sparse'}, not a plain file"
    if name.startswith("/") or "\\" in name or "\0" in name:
        return f"member {name!r} has an absolute or odd path"
    if any(part in ("..", ".") for part in name.split("/")) or "/" in name.strip("/"):
        return f"member {name!r} is not a plain file name at the top of the archive"
    return None


def check_members(members: Iterable[tarfile.TarInfo], name: str) -> dict[str, tarfile.TarInfo]:
    """The archive's members by name, all of them acceptable; pure.

    :raise ImageRejected: at the first member that is not a plain, uniquely named file at the top.
    """
    found: dict[str, tarfile.TarInfo] = {}
    for member in members:
        problem = member_problem(member) or (f"member {member.name!r} appears twice" if member.name in found else None)
        if problem is None and len(found) >= MEMBERS_MAX:
            problem = f"more than {MEMBERS_MAX} members"
        if problem is not None:
            raise ImageRejected(f"{name}: OVA {problem}; refused")
        found[member.name] = member
    return found


def _attribute(element: Element, local: str) -> str | None:
    """An OVF attribute, namespaced (``ovf:href``) as OVF writes it, or plain."""
    for ns in _OVF_NS:
        value = element.get(f"{{{ns}}}{local}")
        if value is not None:
            return value
    return element.get(local)


def _children(element: Element, local: str) -> list[Element]:
    return [child for child in element if child.tag.rpartition("}")[2] == local]


def parse_ovf(data: bytes, name: str) -> list[Disk]:
    """The disks an OVF descriptor names, in its DiskSection's order; pure.

    :raise ImageRejected: for XML that is not an OVF envelope, a DTD or entity, or a disk without its file.
    """
    try:
        root = defusedxml.ElementTree.fromstring(data, forbid_dtd=True)
    except (defusedxml.DefusedXmlException, SyntaxError, ValueError) as err:
        raise ImageRejected(f"{name}: OVF descriptor is not acceptable XML ({type(err).__name__}); refused") from None
    if root.tag.rpartition("}")[2] != "Envelope":
        raise ImageRejected(f"{name}: OVF descriptor is not an OVF Envelope; refused")
    files: dict[str, tuple[str, int | None]] = {}
    for references in _children(root, "References"):
        for file in _children(references, "File"):
            file_id, href, size = _attribute(file, "id"), _attribute(file, "href"), _attribute(file, "size")
            if not file_id or not href:
                raise ImageRejected(f"{name}: OVF File without id or href; refused")
            if size is not None and not size.isdigit():
                raise ImageRejected(f"{name}: OVF File {href!r} with size {size!r}; refused")
            files[file_id] = (href, int(size) if size is not None else None)
    disks = []
    for section in _children(root, "DiskSection"):
        for disk in _children(section, "Disk"):
            disk_id, ref = _attribute(disk, "diskId"), _attribute(disk, "fileRef")
            if not disk_id or ref not in files:
                raise ImageRejected(f"{name}: OVF disk {disk_id!r} names no file of its References; refused")
            disks.append(Disk(disk_id, *files[ref]))
    if not disks:
        raise ImageRejected(f"{name}: OVF descriptor names no disk; refused")
    return disks


def choose(disks: list[Disk], members: dict[str, tarfile.TarInfo], wanted: str | None, name: str) -> Disk:
    """The system disk (the first, or the one ``IMG_OVA_DISK`` names by id or file), held whole by the archive;
    every disk the OVF names must be in it, at the size it announces; pure.

    :raise ImageRejected: naming the file, the disk or the size at fault.
    """
    for disk in disks:
        member = members.get(disk.href)
        if member is None:
            raise ImageRejected(f"{name}: OVF names {disk.href!r}, which is not in the archive; refused")
        if disk.size is not None and disk.size != member.size:
            raise ImageRejected(
                f"{name}: OVA member {disk.href!r} holds {member.size} bytes, its OVF announces {disk.size}; refused"
            )
    chosen = [d for d in disks if wanted in (d.disk_id, d.href)] if wanted is not None else disks[:1]
    if not chosen:
        known = ", ".join(f"{d.disk_id} ({d.href})" for d in disks)
        raise ImageRejected(f"IMG_OVA_DISK={wanted}: {name} has no such disk; it has {known}")
    return chosen[0]


def extract_disk(archive: IO[bytes], out: IO[bytes], wanted: str | None, max_size: int, name: str) -> Disk:
    """Stream the OVA's system disk from ``archive`` (an open, seekable file) into ``out``.

    :raise ImageRejected: for any member, OVF or size the rules above refuse, a truncated archive, or a disk over
        ``max_size`` bytes.
    """
    try:
        check_headers(archive, name)
        archive.seek(0)
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            members = check_members(tar, name)
            ovfs = [m for m in members.values() if m.name.lower().endswith(".ovf")]
            if len(ovfs) != 1 or ovfs[0].size > OVF_MAX:
                raise ImageRejected(f"{name}: an OVA holds one OVF descriptor of at most {OVF_MAX} bytes; refused")
            disk = choose(parse_ovf(_read(tar, ovfs[0], name), name), members, wanted, name)
            member = members[disk.href]
            if member.size > max_size:
                raise ImageRejected(f"{name}: disk {disk.href!r} of {member.size} bytes exceeds IMG_MAX_SIZE; refused")
            src = tar.extractfile(member)
            assert src is not None  # a regular file, checked above
            left = member.size
            while left:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    raise ImageRejected(f"{name}: OVA member {disk.href!r} is truncated; refused")
                out.write(chunk)
                left -= len(chunk)
            return disk
    except tarfile.TarError as err:
        raise ImageRejected(f"{name}: not a readable OVA (tar) archive: {err}; refused") from None


def check_headers(archive: IO[bytes], name: str) -> None:
    """Walk the archive's 512-byte headers before tarfile does: tarfile reads an extended header (pax, a GNU long
    name) whole into memory, so one announcing gigabytes would be a memory bomb. Bounded by ``MEMBERS_MAX``.

    :raise ImageRejected: for an extended header over ``OVF_MAX`` bytes, or too many headers.
    """
    offset = 0
    for _ in range(4 * MEMBERS_MAX):
        archive.seek(offset)
        block = archive.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE or block == bytes(tarfile.BLOCKSIZE):
            return
        size = _size(block[124:136], name)
        if block[156:157] in _EXTENDED and size > OVF_MAX:
            raise ImageRejected(f"{name}: OVA with an extended tar header of {size} bytes; refused")
        offset += tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    raise ImageRejected(f"{name}: OVA with more than {4 * MEMBERS_MAX} tar headers; refused")


def _size(field: bytes, name: str) -> int:
    """A tar header's size field: octal digits, or base-256 (a GNU extension) when its first bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ImageRejected(f"{name}: OVA with a tar header whose size is not a number; refused") from None


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    src = tar.extractfile(member)
    assert src is not None
    data = src.read(member.size)
    if len(data) != member.size:
        raise ImageRejected(f"{name}: OVA member {member.name!r} is truncated; refused")
    return data
