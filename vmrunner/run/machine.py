"""The VM's machine type, pinned to qemu's versioned name on the pet's first start and kept from then on.

``pc`` and ``q35`` are aliases that each qemu release moves to its newest version (``pc`` is ``pc-i440fx-7.2`` in
qemu 7.2 and ``pc-i440fx-8.2`` in 8.2). Without a pin, an upgraded podvm image would change the guest's chipset
under it (a Windows guest may see new hardware and ask to be activated again) and could not load a state saved by
the previous image: qemu keeps loading a stream on the versioned machine it was taken on. The pin is a small record
beside the pet (``<hostname>.machine.json``), written once; a VM_MACHINE changed to another type is pinned anew
with one line saying so. Everything else (the argv, a save, ``plan``) reads the pinned name.
"""

import json
import logging
import re
import subprocess
from dataclasses import dataclass, replace

from shared import documents, files
from shared.errors import ConfigError
from vmrunner.config import Config
from vmrunner.pet.state import machine_path_of

log = logging.getLogger("vmrunner")
RECORD_VERSION = 1
RECORD_MAX = 4 << 10
HELP_TIMEOUT = 30.0  # seconds for ``qemu -machine help``
# A machine type's name: it goes into qemu's argv, so a forged record can add no option (no comma, no space).
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_ALIAS = re.compile(r"^(\S+)\s.*\(alias of (\S+)\)\s*$")


@dataclass(frozen=True)
class Pin:
    """What VM_MACHINE named when the pet was first started, and the versioned type that was then."""

    asked: str  # ``pc``
    machine: str  # ``pc-i440fx-7.2``


def kind_of(machine: str) -> str:
    """VM_MACHINE's type without its options (``q35,smm=on`` -> ``q35``)."""
    return machine.split(",", 1)[0]


def parse(data: bytes) -> Pin:
    """A pin from its record, each name checked (it becomes part of qemu's argv).

    :raise ValueError: saying what is wrong.
    """
    doc = documents.parse(data, documents.exactly(RECORD_VERSION, "machine type record"))
    if set(doc) != {"version", "asked", "machine"}:
        raise ValueError("expected exactly the fields version, asked and machine")
    names = doc["asked"], doc["machine"]
    if not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
        raise ValueError("asked and machine must be machine type names")
    return Pin(doc["asked"], doc["machine"])


def document(pin: Pin) -> bytes:
    """The pin's record."""
    return json.dumps({"version": RECORD_VERSION, "asked": pin.asked, "machine": pin.machine}, indent=2).encode()


def applied(machine: str, pin: Pin | None) -> str | None:
    """``machine`` (VM_MACHINE with its options) on the pinned type; None when the pin is missing or was made for
    another type (VM_MACHINE changed since). Pure."""
    kind, comma, options = machine.partition(",")
    if pin is None or kind not in (pin.asked, pin.machine):
        return None
    return pin.machine + comma + options


def versioned(help_text: str, kind: str) -> str | None:
    """The versioned name of ``kind`` in the output of ``qemu -machine help`` (``kind`` itself when it is not an
    alias), None when qemu has no such type. Pure."""
    for line in help_text.splitlines()[1:]:  # the first line is a header
        found = _ALIAS.match(line)
        if found is not None and found[1] == kind:
            return found[2]
        if line.split(" ", 1)[0] == kind:
            return kind
    return None


def resolve(cfg: Config, kind: str) -> str:
    """What this qemu calls ``kind`` with its version.

    :raise ConfigError: naming QEMU when it is missing, VM_MACHINE when qemu has no such type or cannot say.
    """
    try:
        shown = subprocess.run(
            [cfg.qemu, "-machine", "help"], capture_output=True, text=True, timeout=HELP_TIMEOUT, check=True
        ).stdout
    except FileNotFoundError:
        raise ConfigError(f"QEMU={cfg.qemu}: no such program") from None
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigError(f"VM_MACHINE={cfg.machine}: {cfg.qemu} -machine help failed: {err}") from None
    name = versioned(shown, kind)
    if name is None or not _NAME.fullmatch(name):
        raise ConfigError(f"VM_MACHINE={cfg.machine}: {cfg.qemu} has no machine type {kind!r}")
    return name


def read(cfg: Config) -> Pin | None:
    """The VM's pin, or None when there is none yet (or it is forged, with one warning)."""
    path = machine_path_of(cfg.vm_dir, cfg.hostname)
    raw = files.read_record(path, RECORD_MAX, cfg.vm_dir)
    if raw is None:
        return None
    try:
        return parse(raw)
    except ValueError as err:
        log.warning("%s is unusable (%s): the machine type is pinned anew", path, err)
        return None


def pinned(cfg: Config) -> Config:
    """``cfg`` on its pinned machine type when it has a pin that applies (for ``plan``: reads only)."""
    value = applied(cfg.machine, read(cfg))
    return cfg if value is None else replace(cfg, machine=value)


def ensure(cfg: Config, saved: Pin | None) -> Config:
    """``cfg`` on its pinned machine type, pinning it first when there is no pin for VM_MACHINE's type yet.

    ``saved`` is what a saved state of this VM was taken on (a VM suspended before it had a pin): that versioned
    type is the machine the guest knows, so it becomes the pin.

    :raise ConfigError: when qemu has no such machine type.
    :raise OSError: when the record cannot be written.
    """
    pin = read(cfg)
    value = applied(cfg.machine, pin)
    if value is not None:
        return replace(cfg, machine=value)
    kind = kind_of(cfg.machine)
    if saved is not None and _NAME.fullmatch(str(saved.machine)) and applied(cfg.machine, saved) is not None:
        machine = saved.machine
    else:
        machine = resolve(cfg, kind)
    if pin is not None:
        log.warning("VM_MACHINE is %s now, the VM was pinned to %s: the guest sees a new chipset", kind, pin.machine)
    new = Pin(kind, machine)
    files.write_atomic(machine_path_of(cfg.vm_dir, cfg.hostname), document(new), 0o644, root=cfg.vm_dir)
    log.info("machine type %s pinned as %s: kept when qemu is upgraded", kind, machine)
    return replace(cfg, machine=applied(cfg.machine, new) or cfg.machine)
