"""Vetting an untrusted base image the way Nova and Glance do since OSSA-2024-001/002.

The format is never probed (``-f`` is always given), ``qemu-img`` runs under CPU and address-space limits, and an
image with a backing file, an external data file, a corrupt flag or a virtual size over the limit is refused. A
vmdk must be one single file (:mod:`vmrunner.images.vmdk`, judged before qemu-img opens it); vhdx, vdi and vpc have
no extents, and their headers are judged by ``qemu-img info`` and ``check``.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ImageRejected
from vmrunner.config import ISO_FORMAT
from vmrunner.images import iso, vmdk
from vmrunner.qemu import img

CPU_SECONDS = 30
ADDRESS_SPACE = 1 << 30
WALL_SECONDS = 120
CHECKED = ("qcow2", "vmdk", "vhdx", "vdi")  # the formats qemu-img check knows (vpc: "does not support checks")


@dataclass(frozen=True)
class Verdict:
    """What vetting learnt about an accepted image."""

    format: str
    virtual_size: int


def _job(name: str, ok: tuple[int, ...] = (0,)) -> img.Job:
    """Vetting's qemu-img runs: under the limits, and a hang (e.g. a stalled network volume) refuses the image."""
    return img.Job(
        name, "vetting", timeout=WALL_SECONDS, error=ImageRejected, ok=ok, limits=(CPU_SECONDS, ADDRESS_SPACE)
    )


def judge(info: dict[str, Any], fmt: str, max_size: int, name: str) -> Verdict:
    """Accept or refuse ``qemu-img info``'s JSON; pure so every rule has a unit test.

    :raise ImageRejected: naming the image and the rule it breaks.
    """
    if info.get("format") != fmt:
        raise ImageRejected(f"{name}: qemu-img reads it as {info.get('format')!r}, not {fmt}")
    if "backing-filename" in info or "full-backing-filename" in info:
        raise ImageRejected(f"{name}: has a backing file ({info.get('backing-filename')!r}); refused")
    specific = info.get("format-specific", {}).get("data", {})
    if "data-file" in specific or specific.get("data-file-raw"):
        raise ImageRejected(f"{name}: has an external data file ({specific.get('data-file')!r}); refused")
    if specific.get("corrupt"):
        raise ImageRejected(f"{name}: is marked corrupt; refused")
    size = info.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise ImageRejected(f"{name}: no valid virtual size")
    if size > max_size:
        raise ImageRejected(f"{name}: virtual size {size} bytes exceeds IMG_MAX_SIZE ({max_size} bytes); refused")
    return Verdict(fmt, size)


def _vmdk_descriptor(path: Path, name: str) -> None:
    """Judge a vmdk's embedded descriptor from its own bytes, before any qemu-img opens (and follows) it."""
    with open(path, "rb") as src:

        def read_at(offset: int, length: int) -> bytes:
            src.seek(offset)
            return src.read(length)

        vmdk.judge_descriptor(vmdk.embedded_descriptor(src.read(vmdk.SECTOR), read_at, name), name)


NO_LIMIT = 1 << 62  # a base a pet already uses is not refused for a size limit lowered later


def vet(path: Path, fmt: str, max_size: int, name: str, *, check: bool = True) -> Verdict:
    """Inspect ``path`` as ``fmt`` with ``qemu-img info`` (and ``check`` where qemu-img has one, unless ``check`` is
    false: the cheap re-vet at every start of a base already checked) and judge it.

    An ISO (a CD-ROM's, :mod:`vmrunner.images.iso`) is judged from its bytes alone: qemu reads it as raw.

    :raise ImageRejected: when qemu-img fails or a rule is broken.
    """
    if fmt == ISO_FORMAT:
        with open(path, "rb") as src:  # the caller's own file: a download's descriptor
            return Verdict(fmt, iso.judge_fd(src.fileno(), max_size, name).size)
    if fmt == "vmdk":
        _vmdk_descriptor(path, name)
    out = img.run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)], _job(name))
    try:
        info = json.loads(out)
    except json.JSONDecodeError:
        raise ImageRejected(f"{name}: qemu-img info printed no JSON") from None
    verdict = judge(info, fmt, max_size, name)
    if fmt == "vmdk":
        vmdk.judge_extents(info, path, name)
    if fmt in CHECKED and check:
        # 0: clean; 3: leaked clusters only, which waste space but harm nothing.
        img.run(["qemu-img", "check", "-f", fmt, "--output=json", str(path)], _job(name, ok=(0, 3)))
    return verdict
