"""Vetting an untrusted base image the way Nova and Glance do since OSSA-2024-001/002.

The format is never probed (``-f`` is always given), ``qemu-img`` runs under CPU and address-space limits, and an
image with a backing file, an external data file, a corrupt flag or a virtual size over the limit is refused.
"""

import json
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ImageRejected, PodvmError

CPU_SECONDS = 30
ADDRESS_SPACE = 1 << 30
WALL_SECONDS = 120


@dataclass(frozen=True)
class Verdict:
    """What vetting learnt about an accepted image."""

    format: str
    virtual_size: int


def _limits() -> None:
    """Run in the child before exec: a crafted image must not make qemu-img spin or balloon."""
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _qemu_img(args: list[str], name: str) -> subprocess.CompletedProcess[str]:
    """qemu-img under the limits; a hang (e.g. a stalled network volume) is a refusal naming ``name``."""
    try:
        return subprocess.run(
            ["qemu-img", *args], capture_output=True, text=True, preexec_fn=_limits, check=False, timeout=WALL_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise ImageRejected(f"{name}: qemu-img {args[0]} took longer than {WALL_SECONDS}s; refused") from None
    except FileNotFoundError:
        raise PodvmError("qemu-img is not installed (it is part of qemu-utils)") from None


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


def vet(path: Path, fmt: str, max_size: int, name: str, *, check: bool = True) -> Verdict:
    """Inspect ``path`` as ``fmt`` with ``qemu-img info`` (and ``check`` for qcow2 unless ``check`` is false: the
    cheap re-vet at every start of a base already checked) and judge it.

    :raise ImageRejected: when qemu-img fails or a rule is broken.
    """
    info = _qemu_img(["info", "-f", fmt, "--output=json", str(path)], name)
    if info.returncode != 0:
        raise ImageRejected(f"{name}: qemu-img info -f {fmt} failed: {_last_line(info.stderr)}")
    try:
        verdict = judge(json.loads(info.stdout), fmt, max_size, name)
    except json.JSONDecodeError:
        raise ImageRejected(f"{name}: qemu-img info printed no JSON") from None
    if fmt == "qcow2" and check:
        checked = _qemu_img(["check", "-f", fmt, "--output=json", str(path)], name)
        # 0: clean; 3: leaked clusters only, which waste space but harm nothing.
        if checked.returncode not in (0, 3):
            raise ImageRejected(f"{name}: qemu-img check found errors: {_last_line(checked.stderr or checked.stdout)}")
    return verdict


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
