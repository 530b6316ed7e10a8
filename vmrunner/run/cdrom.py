"""The VM's CD-ROM drives: attached at start with the ISO of VM_CDROMS in each slot, and changed on the running VM
by ``vmrunner cdrom insert|eject`` through QMP.

Each slot is an ``ide-cd`` on an IDE unit no other drive takes (:func:`vmrunner.profiles.cdrom_units`), which any
guest reads without a driver of its own (Windows' installer reading the virtio-win disc). Every medium is opened
``format=raw,readonly=on``: qemu never interprets an ISO's bytes as an image format, and the guest cannot write it.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

from shared.errors import ConfigError, PodvmError
from vmrunner.config import Cdrom, Config, redact
from vmrunner.images import cdroms, iso
from vmrunner.images.layout import Layout
from vmrunner.profiles import cdrom_units
from vmrunner.qemu import qmp

log = logging.getLogger("vmrunner")
UNFETCHED = "<digest once fetched>"  # ``plan``'s stand-in for the cache file of an ISO not fetched yet


def drive_id(slot: int) -> str:
    """The slot's block backend (the config drive is cd0)."""
    return f"cd{slot}"


def device_id(slot: int) -> str:
    """The slot's guest device, which QMP's tray and medium commands name."""
    return f"cdrom{slot}"


def cdrom_args(cfg: Config, media: Sequence[Path | None]) -> list[str]:
    """One drive per slot (1 first), with its ISO or empty; read-only raw, spelt out."""
    args: list[str] = []
    for slot, (medium, (bus, unit)) in enumerate(zip(media, cdrom_units(cfg.machine), strict=False), start=1):
        disc = f"file={medium},format=raw," if medium is not None else ""
        args += [
            "-drive",
            f"{disc}if=none,id={drive_id(slot)},readonly=on,media=cdrom",
            "-device",
            f"ide-cd,drive={drive_id(slot)},id={device_id(slot)},bus={bus},unit={unit}",
        ]
    return args


def prepare(cfg: Config) -> tuple[Path | None, ...]:
    """Fetch and vet the ISO of each slot and reference it from there; drop the references of slots now empty.

    :raise ImageRejected: naming VM_CDROMS and the ISO at fault.
    """
    media: list[Path | None] = []
    for slot, cdrom in enumerate(cfg.cdroms, start=1):
        if cdrom is None:
            cdroms.let_go(cfg, slot)
            media.append(None)
            continue
        medium = cdroms.ensure(cfg, cdrom, "VM_CDROMS")
        cdroms.hold(cfg, slot, medium.hex)
        log.info("CD-ROM %d: %s (%s %r, sha256:%s)", slot, redact(cdrom.source), medium.disc.kind,
                 medium.disc.label, medium.hex)  # fmt: skip
        media.append(medium.path)
    for slot in range(len(cfg.cdroms) + 1, len(cdrom_units(cfg.machine)) + 1):
        cdroms.let_go(cfg, slot)
    return tuple(media)


def planned(cfg: Config) -> tuple[tuple[Path | None, ...], list[dict[str, object]]]:
    """What ``prepare`` would attach, from the cache alone (``plan``): each slot's file and its description."""
    layout = Layout(cfg.image_dir)
    media: list[Path | None] = []
    shown: list[dict[str, object]] = []
    for slot, (cdrom, (bus, unit)) in enumerate(zip(cfg.cdroms, cdrom_units(cfg.machine), strict=False), start=1):
        hexdigest = cdroms.cached(cfg, cdrom) if cdrom is not None else None
        path = layout.base(hexdigest) if hexdigest else layout.root / "sha256" / UNFETCHED
        media.append(None if cdrom is None else path)
        shown.append({
            "slot": slot,
            "device": f"{bus} unit {unit}",
            "source": None if cdrom is None else redact(cdrom.source),
            "checksum": str(cdrom.checksum) if cdrom is not None and cdrom.checksum else None,
            "digest": f"sha256:{hexdigest}" if hexdigest else None,
            "cached": hexdigest is not None,
        })  # fmt: skip
    return tuple(media), shown


def _slot(cfg: Config, raw: str) -> int:
    """A slot number the running VM has a drive for."""
    count = len(cfg.cdroms)
    if not raw.isdigit() or not 1 <= int(raw) <= count:
        have = f"1 to {count}" if count else "none: VM_CDROMS gives the VM its drives"
        raise ConfigError(f"cdrom slot {raw!r}: no such CD-ROM slot (this VM has {have})")
    return int(raw)


async def insert(cfg: Config, monitor: Path, raw_slot: str, cdrom: Cdrom) -> dict[str, object]:
    """Fetch and vet the ISO, then put it into the slot's drive of the running VM (a guest-locked tray is opened
    anyway); returns what the slot holds now. The slot's reference moves to the new ISO once qemu has it: until
    then the one in the drive stays referenced (a fresh fetch is young, which gc's grace period spares)."""
    slot = _slot(cfg, raw_slot)
    await qmp.session(monitor, [("query-status", None)], qmp.TIMEOUT, wait=False)  # no fetch for a stopped VM
    medium = cdroms.ensure(cfg, cdrom, "cdrom insert")
    change = {
        "id": device_id(slot),
        "filename": str(medium.path),
        "format": "raw",
        "read-only-mode": "read-only",
        "force": True,
    }
    await qmp.execute(monitor, "blockdev-change-medium", arguments=change)
    cdroms.hold(cfg, slot, medium.hex)
    log.info("CD-ROM %d: inserted %s (%r, sha256:%s)", slot, redact(cdrom.source), medium.disc.label, medium.hex)
    return {"slot": slot, "digest": f"sha256:{medium.hex}", "label": medium.disc.label, "kind": medium.disc.kind}


async def eject(cfg: Config, monitor: Path, raw_slot: str) -> dict[str, object]:
    """Take the disc out of the slot's drive of the running VM, even from a tray the guest locked."""
    slot = _slot(cfg, raw_slot)
    await qmp.execute(monitor, "eject", arguments={"id": device_id(slot), "force": True})
    cdroms.let_go(cfg, slot)
    log.info("CD-ROM %d: ejected", slot)
    return {"slot": slot, "digest": None}


def describe(cfg: Config, block: object) -> list[dict[str, object]]:
    """Each slot as qemu's ``query-block`` answer ``block`` shows it: the disc in it (its digest, and its label
    read from the cached ISO) or none, and whether the tray is open."""
    entries = [entry for entry in block if isinstance(entry, dict)] if isinstance(block, list) else []
    devices = {entry.get("qdev"): entry for entry in entries}
    layout = Layout(cfg.image_dir)
    shown: list[dict[str, object]] = []
    for slot in range(1, len(cfg.cdroms) + 1):
        entry = devices.get(device_id(slot), {})
        inserted = entry.get("inserted")
        hexdigest = layout.digest_of(str(inserted.get("file"))) if isinstance(inserted, dict) else None
        label = None
        if hexdigest is not None:
            try:
                label = iso.vet(layout.base(hexdigest), cfg.img_max_size, hexdigest, root=cfg.image_dir).label
            except PodvmError:
                label = None
        shown.append({
            "slot": slot,
            "tray_open": entry.get("tray_open"),
            "inserted": isinstance(inserted, dict),
            "digest": f"sha256:{hexdigest}" if hexdigest else None,
            "label": label,
        })  # fmt: skip
    return shown
