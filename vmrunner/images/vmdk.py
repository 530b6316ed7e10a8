"""What a vmdk references, judged before qemu-img opens it: pure, so every rule has a unit test.

A vmdk is a descriptor naming extents, and an extent may be any other file (``/etc/shadow``, ``../other.vmdk``):
the class of OSSA-2024-001/002. Only a single-file vmdk is accepted: a monolithicSparse or streamOptimized sparse
file whose embedded descriptor names exactly one sparse extent and whose header gives it a capacity (qemu follows
the extents of an embedded descriptor when the header's capacity is 0). qemu-img's own reading must agree: one
extent, the file itself.
"""

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ImageRejected

SECTOR = 512
SPARSE_MAGIC = b"KDMV"
DESCRIPTOR_MAX = 64 << 10  # a real embedded descriptor is under 10 KiB
SINGLE_FILE = ("monolithicSparse", "streamOptimized")
_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\S+)(?:\s+"([^"]*)")?(?:\s+(\d+))?\s*$')
_CREATE_TYPE = re.compile(r'^createType\s*=\s*"([^"]*)"\s*$')
_PARENT = re.compile(r"^parentCID\s*=\s*(\S+)\s*$|^parentFileNameHint\s*=")


@dataclass(frozen=True)
class Extent:
    """One extent line of a vmdk descriptor."""

    access: str
    sectors: int
    kind: str  # SPARSE, FLAT, ZERO, VMFS...
    file: str | None


@dataclass(frozen=True)
class Descriptor:
    """What a vmdk descriptor says about where its data lives."""

    create_type: str | None
    extents: tuple[Extent, ...]
    parent: bool  # a parentCID other than ffffffff, or a parentFileNameHint: a delta disk on another file


def parse_descriptor(text: str) -> Descriptor:
    """The create type, extents and parent of a vmdk descriptor's text; pure (unit and property tests)."""
    create_type, extents, parent = None, [], False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if match := _CREATE_TYPE.match(line):
            create_type = match.group(1)
        elif match := _EXTENT.match(line):
            extents.append(Extent(match.group(1), int(match.group(2)), match.group(3), match.group(4)))
        elif match := _PARENT.match(line):
            parent = parent or match.group(1) is None or match.group(1).lower() != "ffffffff"
        elif line.split(maxsplit=1)[0] in ("RW", "RDONLY", "NOACCESS"):
            extents.append(Extent(line.split()[0], 0, "unparsed", line))  # refused below, never guessed
    return Descriptor(create_type, tuple(extents), parent)


def judge_descriptor(desc: Descriptor, name: str) -> None:
    """Refuse a descriptor that is not one single-file sparse vmdk; pure.

    :raise ImageRejected: naming the image and what its descriptor references.
    """
    if desc.create_type not in SINGLE_FILE:
        raise ImageRejected(
            f"{name}: vmdk of type {desc.create_type!r}; only single-file monolithicSparse and streamOptimized "
            "vmdks are accepted (a flat, split or descriptor-only vmdk names other files); refused"
        )
    if len(desc.extents) != 1:
        files = ", ".join(repr(e.file) for e in desc.extents) or "none"
        raise ImageRejected(f"{name}: vmdk descriptor names {len(desc.extents)} extents ({files}), not one; refused")
    extent = desc.extents[0]
    if extent.kind != "SPARSE" or extent.file is None or "/" in extent.file or extent.file in ("", ".", ".."):
        raise ImageRejected(f"{name}: vmdk extent {extent.kind} {extent.file!r} is not the sparse file itself; refused")
    if desc.parent:
        raise ImageRejected(f"{name}: vmdk is a delta disk on a parent file; refused")


def embedded_descriptor(head: bytes, read_at: Callable[[int, int], bytes], name: str) -> Descriptor:
    """The descriptor embedded in a sparse vmdk whose first bytes are ``head``; ``read_at(offset, length)`` reads
    the rest. A file that is a descriptor itself (text) names other files and is refused; pure but for ``read_at``.

    :raise ImageRejected: for a descriptor file, a bad header, or a capacity of 0 (qemu then follows the embedded
        descriptor's extents).
    """
    if head[:4] != SPARSE_MAGIC:
        plain = b"DescriptorFile" in head[:1024]
        what = "a descriptor file (its data is in other files)" if plain else "no sparse vmdk"
        raise ImageRejected(f"{name}: {what}; only single-file monolithicSparse and streamOptimized are accepted")
    if len(head) < 44:
        raise ImageRejected(f"{name}: vmdk header truncated; refused")
    capacity, _grain, offset, size = struct.unpack_from("<QQQQ", head, 12)
    if capacity == 0:
        raise ImageRejected(f"{name}: sparse vmdk with capacity 0 (its descriptor would name the extents); refused")
    if offset == 0 or size == 0 or size * SECTOR > DESCRIPTOR_MAX:
        raise ImageRejected(f"{name}: sparse vmdk without a usable embedded descriptor; refused")
    text = read_at(offset * SECTOR, size * SECTOR)
    return parse_descriptor(text.split(b"\0", 1)[0].decode("latin-1"))


def judge_extents(info: dict[str, Any], path: Path, name: str) -> None:
    """qemu-img's own reading of a vmdk: one extent, the file itself; pure.

    :raise ImageRejected: when qemu-img sees another file or more than one extent.
    """
    data = info.get("format-specific", {}).get("data", {})
    extents = data.get("extents")
    if data.get("create-type") not in SINGLE_FILE or not isinstance(extents, list) or len(extents) != 1:
        kind = data.get("create-type")
        raise ImageRejected(f"{name}: qemu-img reads a {kind!r} vmdk with extents {extents!r}; refused")
    if extents[0].get("filename") != str(path):
        raise ImageRejected(f"{name}: qemu-img reads its extent from {extents[0].get('filename')!r}; refused")
