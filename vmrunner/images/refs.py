"""References that keep a base alive while a pet is made on it, one per pet, across pods and nodes."""

import json
import logging
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.errors import PodvmError
from shared.files import list_below, open_below, read_record, remove_below, stat_below, write_atomic
from vmrunner.config import Config
from vmrunner.images.layout import HEX64, RECORD_MAX, VOLUME_FILE, Layout, check_locks, locked, utc_now

log = logging.getLogger("vmrunner.cache")


@dataclass(frozen=True)
class Ref:
    """``refs/<hex>/<pet-id>``: a pet made on the base."""

    pet: str
    volume: str
    hostname: str
    since: str


def volume_id(vm_dir: Path) -> str:
    """The VM volume's random id (``VM_DIR/.podvm-volume``), made on first use."""
    path = vm_dir / VOLUME_FILE
    try:
        found = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{16}", found):
            return found
    except FileNotFoundError:
        pass
    except OSError as err:
        raise PodvmError(f"VM_DIR={vm_dir}: cannot read {path}: {err.strerror}") from None
    new = secrets.token_hex(8)
    try:
        write_atomic(path, f"{new}\n".encode(), mode=0o644)
    except OSError as err:
        raise PodvmError(f"VM_DIR={vm_dir}: cannot write {path}: {err.strerror}") from None
    return new


def pet_id(cfg: Config) -> str:
    """This pet's reference file name: unique across pods and volumes sharing the cache."""
    return f"{cfg.hostname}.{volume_id(cfg.vm_dir)}"


def claim(cfg: Config, hexdigest: str, suffix: str = "") -> bool:
    """Record this pet's reference to the base (``suffix``: one of its CD-ROM slots' to an ISO, ``.cd1``...), under
    its lock; False when the base is not (any more) there."""
    layout = Layout(cfg.image_dir)
    layout.make()
    check_locks(layout.root)
    ref_name = pet_id(cfg) + suffix
    with locked(layout.lock(hexdigest)):
        if stat_below(layout.root, layout.base(hexdigest)) is None:
            return False
        path = layout.refs(hexdigest) / ref_name
        if read_record(path, RECORD_MAX, layout.root) is None:
            remove_below(layout.root, path)  # a forged one: replaced by this pet's own
            os.close(open_below(layout.root, path.parent, create=True))
            ref = Ref(str(cfg.pet_path), volume_id(cfg.vm_dir), cfg.hostname, utc_now())
            write_atomic(path, json.dumps(asdict(ref)).encode(), mode=0o644, root=layout.root)
    return True


def release(cfg: Config, hexdigest: str, suffix: str = "") -> None:
    """Remove this pet's reference to the base (``suffix``: a CD-ROM slot's, as for :func:`claim`)."""
    layout = Layout(cfg.image_dir)
    with locked(layout.lock(hexdigest)):
        remove_below(layout.root, layout.refs(hexdigest) / (pet_id(cfg) + suffix))


def held(cfg: Config, suffix: str) -> list[str]:
    """The digests this pet's reference ``suffix`` (a CD-ROM slot's) is on, found by listing ``refs/``."""
    layout = Layout(cfg.image_dir)
    name = pet_id(cfg) + suffix
    return [
        hexdigest
        for hexdigest in list_below(layout.root, layout.root / "refs")
        if HEX64.match(hexdigest) and stat_below(layout.root, layout.refs(hexdigest) / name) is not None
    ]


def references(layout: Layout, hexdigest: str) -> dict[str, Ref | None]:
    """The base's references by pet id (None: unreadable, still counted)."""
    found: dict[str, Ref | None] = {}
    folder = layout.refs(hexdigest)
    for name in list_below(layout.root, folder):
        if name.startswith("."):
            continue  # a reference being written
        try:
            found[name] = Ref(**json.loads(read_record(folder / name, RECORD_MAX, layout.root) or b"null"))
        except (ValueError, TypeError):
            found[name] = None
    return found
