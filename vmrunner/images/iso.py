"""Vetting a CD-ROM's ISO from its own bytes: ISO 9660 or UDF, read by descriptor, never probed by qemu.

qemu attaches an ISO as ``format=raw`` (read-only), so no header of it is ever interpreted on the host; what is
checked is that the file is what a CD-ROM holds, and whole. An ISO 9660 image starts its volume descriptor set at
sector 16 (byte 0x8000, the identifier ``CD001`` at 0x8001) and ends it with a terminator; its primary descriptor
gives the volume's size, which the file must hold. A UDF image has a volume recognition sequence there (``BEA01``,
``NSR02`` or ``NSR03``, ``TEA01``), perhaps after an ISO 9660 set (a bridge disc), and its anchor at sector 256.
"""

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared import files
from shared.errors import ImageRejected

SECTOR = 2048
FIRST = 16  # the first volume descriptor's sector
MOST = 64  # descriptors read at most: a real disc has a handful
ANCHOR = 256  # UDF's anchor volume descriptor pointer
_ISO9660, _UDF = b"CD001", (b"NSR02", b"NSR03")
_VRS = (b"BEA01", b"TEA01", b"BOOT2", b"CDW02", *_UDF)


@dataclass(frozen=True)
class Disc:
    """What vetting learnt about an accepted ISO."""

    kind: str  # iso9660 or udf
    label: str  # the volume identifier (ISO 9660's; "" for a UDF-only disc)
    size: int  # bytes


def judge(read_at: Callable[[int, int], bytes], size: int, max_size: int, name: str) -> Disc:
    """Accept or refuse the bytes ``read_at(offset, length)`` gives of a file of ``size`` bytes; pure of any file,
    so every rule has a unit test.

    :raise ImageRejected: naming the ISO and the rule it breaks.
    """
    if size > max_size:
        raise ImageRejected(f"{name}: {size} bytes, more than IMG_MAX_SIZE ({max_size}); refused")
    if size < (FIRST + 1) * SECTOR:
        raise ImageRejected(f"{name}: {size} bytes, too short for an ISO 9660 or UDF image; refused")
    label, volume, terminated, vrs, udf = None, 0, False, False, False
    for index in range(FIRST, FIRST + MOST):
        block = read_at(index * SECTOR, SECTOR)
        if len(block) < SECTOR:
            break
        kind, ident = block[0], block[1:6]
        if ident == _ISO9660 and not udf:
            if kind == 1 and label is None:  # the primary volume descriptor
                label = block[40:72].decode("ascii", "replace").rstrip(" \0")
                volume = int.from_bytes(block[80:84], "little") * int.from_bytes(block[128:130], "little")
            elif kind == 255:
                terminated = True
            continue
        if ident in _VRS and (terminated or vrs or index == FIRST):  # UDF's sequence, after an ISO 9660 set or not
            vrs, udf = True, udf or ident in _UDF
            if ident == b"TEA01":
                break
            continue
        break  # the end of the descriptors
    if udf:
        anchor = read_at(ANCHOR * SECTOR, 16)
        if len(anchor) < 16 or int.from_bytes(anchor[0:2], "little") != 2:
            raise ImageRejected(f"{name}: a UDF image without its anchor at sector {ANCHOR} (truncated?); refused")
        return Disc("udf" if label is None else "iso9660+udf", label or "", size)
    if label is None or not terminated:
        raise ImageRejected(
            f"{name}: not an ISO 9660 or UDF image (no complete volume descriptor set at byte 0x8000); refused"
        )
    if volume > size:
        raise ImageRejected(f"{name}: the volume holds {volume} bytes but the file only {size} (truncated); refused")
    return Disc("iso9660", label, size)


def judge_fd(fd: int, max_size: int, name: str) -> Disc:
    """:func:`judge` on the open file ``fd`` (its size from fstat, its bytes by ``pread``)."""
    return judge(lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size, max_size, name)


def vet(path: Path, max_size: int, name: str, root: Path | None = None) -> Disc:
    """Vet the ISO at ``path``: opened without following a link (below ``root``, the cache, when given) and without
    waiting on a FIFO, and a regular file.

    :raise ImageRejected: when it is not a regular file or not a whole ISO 9660 or UDF image.
    """
    try:
        fd = files.open_file(path, root or path.parent)
    except files.Forged:
        raise ImageRejected(f"{name}: not a regular file; refused") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageRejected(f"{name}: a symbolic link; refused") from None
        raise ImageRejected(f"{name}: cannot be opened ({err.strerror}); refused") from None
    try:
        return judge_fd(fd, max_size, name)
    finally:
        os.close(fd)
