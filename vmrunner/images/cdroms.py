"""A CD-ROM's ISO in the shared cache: fetched (or copied) by digest exactly like a base, vetted as ISO 9660 or UDF,
and kept from gc by a reference per slot while the VM has it in a drive."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from shared.errors import PodvmError
from vmrunner.config import ISO_FORMAT, Cdrom, Config, name_key, redact
from vmrunner.images import iso
from vmrunner.images.layout import Layout
from vmrunner.images.names import resolve
from vmrunner.images.refs import claim, held, release
from vmrunner.images.store import ensure_image

log = logging.getLogger("vmrunner.cache")


@dataclass(frozen=True)
class Medium:
    """An ISO in the cache, vetted: what a slot holds."""

    hex: str
    path: Path
    disc: iso.Disc


def iso_config(cfg: Config, cdrom: Cdrom, setting: str) -> Config:
    """The fetch of ``cdrom`` as the cache knows a base's: its own name (``cdrom-`` and the source's file name and
    hash, never a base's name), its checksum, the ISO format, and errors naming ``setting``."""
    file_name = cdrom.source.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return replace(
        cfg,
        img_source=cdrom.source,
        img_target=file_name or "cdrom.iso",
        img_name=f"cdrom-{name_key(cdrom.source, None)}",
        img_checksum=cdrom.checksum,
        img_format=ISO_FORMAT,
        img_ova_disk=None,
        source_setting=setting,
        checksum_setting=setting,
    )


def ensure(cfg: Config, cdrom: Cdrom, setting: str) -> Medium:
    """The ISO of ``cdrom`` in the cache (fetched unless its name already means a cached one), vetted from the
    cached file's own bytes at every use.

    :raise ImageRejected: when it is not a whole ISO 9660 or UDF image, over IMG_MAX_SIZE or fails its checksum.
    :raise PodvmError: when it cannot be fetched or stored.
    """
    wanted = iso_config(cfg, cdrom, setting)
    cached = ensure_image(wanted)
    path = Layout(cfg.image_dir).base(cached.hex)
    disc = iso.vet(path, cfg.img_max_size, f"{setting}={redact(cdrom.source)}", root=cfg.image_dir)
    return Medium(cached.hex, path, disc)


def cached(cfg: Config, cdrom: Cdrom) -> str | None:
    """The digest ``cdrom`` means in the cache without fetching (``plan``), or None."""
    return resolve(iso_config(cfg, cdrom, "VM_CDROMS"), Layout(cfg.image_dir))


def suffix(slot: int) -> str:
    """The slot's reference name after the pet's (:func:`vmrunner.images.refs.claim`)."""
    return f".cd{slot}"


def hold(cfg: Config, slot: int, hexdigest: str) -> None:
    """Reference the ISO from ``slot`` and drop the slot's reference to any other: gc keeps what is in a drive.

    :raise PodvmError: when gc removed the ISO between its fetch and the reference.
    """
    if not claim(cfg, hexdigest, suffix(slot)):
        raise PodvmError(f"IMAGE_DIR={cfg.image_dir}: sha256:{hexdigest} was removed right after its fetch; try again")
    for other in held(cfg, suffix(slot)):
        if other != hexdigest:
            release(cfg, other, suffix(slot))


def let_go(cfg: Config, slot: int) -> None:
    """Drop the slot's references: its drive is empty."""
    for other in held(cfg, suffix(slot)):
        release(cfg, other, suffix(slot))


def holding(cfg: Config, slot: int) -> str | None:
    """The digest the slot's reference is on (the ISO last put there), or None."""
    found = held(cfg, suffix(slot))
    return found[0] if found else None
