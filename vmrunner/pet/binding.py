"""A pet bound to the exact base it was made on, checked at every start before qemu opens the disk.

The binding is the pet's own backing reference, ``IMAGE_DIR/sha256/<hex>``: it cannot drift from what qemu opens.
What the base looked like when it was last fully hashed is kept on the pet's private volume (``VM_DIR``), never in
the shared cache, because every pod on the cache has its uid and can rewrite anything there, but none can set a
file's ctime back. An unchanged identity (size, inode, ctime, mtime) costs a ``stat`` and a cheap re-vet; anything
else costs a full re-hash, and a base that is missing or not its digest stops the start (exit status 7).
"""

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shared import files
from shared.errors import BaseMismatch, ConfigError, PodvmError
from shared.files import write_atomic
from vmrunner.config import Config
from vmrunner.images.layout import HEX64, Layout, utc_now
from vmrunner.images.names import lookup, read_name, resolve
from vmrunner.images.refs import claim, references, release
from vmrunner.images.store import adopt, ensure_image, hash_file
from vmrunner.images.vet import NO_LIMIT, Verdict, vet
from vmrunner.pet import disk

log = logging.getLogger("vmrunner.binding")


@dataclass(frozen=True)
class Trust:
    """The pet's record of its base, on its own volume: valid while the base's identity is unchanged."""

    digest: str  # hex
    backing: str
    format: str
    virtual_size: int
    size: int
    inode: int
    ctime_ns: int
    mtime_ns: int
    hashed_at: str


@dataclass(frozen=True)
class Started:
    """The pet, ready for qemu: its base's digest (None for a standalone pet) and its virtual size."""

    path: Path
    digest: str | None
    virtual_size: int


def trust_path(cfg: Config) -> Path:
    """Where the pet's trust record lives: beside it, on the VM's own volume."""
    return trust_path_of(cfg.pet_path)


def trust_path_of(disk: Path) -> Path:
    """The trust record of the pet disk ``disk``, in the same folder."""
    return disk.parent / f".{disk.name}.base.json"


def read_trust(cfg: Config) -> Trust | None:
    """The pet's trust record, or None (a missing or damaged record only costs a re-hash)."""
    try:
        return Trust(**json.loads(trust_path(cfg).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_trust(cfg: Config, trust: Trust) -> None:
    try:
        write_atomic(trust_path(cfg), json.dumps(asdict(trust)).encode(), mode=0o600)
    except OSError as err:
        raise PodvmError(f"VM_DIR={cfg.vm_dir}: cannot write {trust_path(cfg)}: {err.strerror}") from None


def doubt(trust: Trust | None, hexdigest: str, backing: str, st: os.stat_result, verify: str) -> str | None:
    """Why the base must be hashed again before this start, or None; pure so every rule has a unit test."""
    if verify == "always":
        return "VERIFY_BASE=always"
    if trust is None:
        return "the pet has no record of its base yet"
    if trust.digest != hexdigest or trust.backing != backing:
        return "the pet's record is of another base"
    now = (st.st_size, st.st_ino, st.st_ctime_ns, st.st_mtime_ns)
    then = (trust.size, trust.inode, trust.ctime_ns, trust.mtime_ns)
    if now != then:
        changed = [n for n, a, b in zip(("size", "inode", "ctime", "mtime"), now, then, strict=True) if a != b]
        return f"its {', '.join(changed)} changed since it was last hashed"
    return None


def _fresh_stat(path: Path, root: Path) -> os.stat_result:
    """The file's attributes as its server has them now: an ``open`` revalidates NFS's cached attributes, which a
    plain ``stat`` may serve for up to a minute (close-to-open consistency). Opened without following a link below
    ``root`` and without waiting on a FIFO: a neighbour may have planted either.

    :raise FileNotFoundError: when it is missing.
    :raise BaseMismatch: when it is not a regular file reached without a link.
    """
    try:
        fd = files.open_file(path, root)
    except FileNotFoundError:
        raise
    except (OSError, files.Forged):
        raise BaseMismatch(f"{path}: the pet's base is not a regular file any more; not starting the VM") from None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def verify_base(cfg: Config, hexdigest: str, fmt: str, *, max_size: int = NO_LIMIT) -> Verdict:
    """Check ``sha256/<hex>`` against the pet's trust record; re-hash and fully re-vet it when in doubt.

    :raise BaseMismatch: when it is missing or its bytes are not ``hex``.
    :raise ImageRejected: when it fails vetting.
    """
    path = Layout(cfg.image_dir).base(hexdigest)
    trust = read_trust(cfg)
    try:
        before = _fresh_stat(path, cfg.image_dir)
    except FileNotFoundError:
        raise BaseMismatch(_missing(cfg, hexdigest)) from None
    reason = doubt(trust, hexdigest, str(path), before, cfg.verify_base)
    if reason is None and trust is not None:
        verdict = vet(path, fmt, max_size, str(path), check=False)
        hashed_at = trust.hashed_at
    else:
        log.info("hashing the pet's base %s in full: %s", path, reason)
        got = hash_file(path, cfg.image_dir)
        if got != hexdigest:
            raise BaseMismatch(
                f"{path}: the pet's base was changed (its bytes hash to sha256:{got}); not starting the VM on "
                "other bytes: remove the file to fetch it again from IMG_SOURCE, or restore it"
            )
        verdict = vet(path, fmt, max_size, str(path))
        hashed_at = utc_now()
    after = _fresh_stat(path, cfg.image_dir)
    if (after.st_size, after.st_ino, after.st_ctime_ns) != (before.st_size, before.st_ino, before.st_ctime_ns):
        raise BaseMismatch(f"{path}: the pet's base changed while it was being checked; not starting the VM")
    new = Trust(
        hexdigest, str(path), fmt, verdict.virtual_size, after.st_size, after.st_ino,
        after.st_ctime_ns, after.st_mtime_ns, hashed_at,
    )  # fmt: skip
    if new != trust:
        _write_trust(cfg, new)
    return verdict


def _missing(cfg: Config, hexdigest: str) -> str:
    return (
        f"{cfg.pet_path}: its base sha256:{hexdigest} is missing from IMAGE_DIR={cfg.image_dir}; not starting the "
        "VM on other bytes: restore the base, or move the pet with vmrunner rebase"
    )


def _note_configured(cfg: Config, hexdigest: str) -> None:
    """Say clearly when the configured image is no longer this pet's base."""
    layout = Layout(cfg.image_dir)
    configured = resolve(cfg, layout)
    if configured == hexdigest:
        return
    now = f"is sha256:{configured}" if configured else "is not in the cache (not fetched for an existing pet)"
    log.warning(
        "the configured image (%s, name %s) %s; this pet keeps its own base sha256:%s (vmrunner rebase moves it)",
        cfg.img_target,
        cfg.img_name,
        now,
        hexdigest,
    )


def _restore_missing(cfg: Config, hexdigest: str) -> None:
    """A pet's base is gone (a cleaned cache): fetch the configured image again; use it only if it is the same."""
    log.warning("the pet's base sha256:%s is missing from the cache; fetching IMG_SOURCE again", hexdigest)
    got = ensure_image(cfg, anew=True).hex
    if got != hexdigest:
        raise BaseMismatch(
            f"{cfg.pet_path}: its base sha256:{hexdigest} is missing from IMAGE_DIR={cfg.image_dir} and IMG_SOURCE now "
            f"gives sha256:{got}; not starting the VM on other bytes: restore the base, or move the pet with "
            "vmrunner rebase"
        )
    log.info("fetched the pet's base sha256:%s again", hexdigest)


def _migrate(cfg: Config, old: Path, fmt: str) -> str:
    """A pet of the old layout (backing ``IMAGE_DIR/<target>``): bind it to its base's digest, same bytes.

    The old base is opened once (no link below IMAGE_DIR, no FIFO), and hashed, vetted and stored through that
    descriptor: the bytes bound are the bytes checked, whatever another pod does to the name meanwhile."""
    try:
        fd = files.open_file(old, cfg.image_dir)
    except FileNotFoundError:
        raise BaseMismatch(
            f"{cfg.pet_path}: its base {old} (the old cache layout) is missing; not starting the VM"
        ) from None
    except (OSError, files.Forged):
        raise BaseMismatch(
            f"{old}: the pet's base (the old cache layout) is not a regular file; not starting the VM"
        ) from None
    try:
        hexdigest = _store_old(cfg, old, fmt, fd)
    finally:
        os.close(fd)
    if not claim(cfg, hexdigest):
        raise BaseMismatch(_missing(cfg, hexdigest))
    target = Layout(cfg.image_dir).base(hexdigest)
    disk.run(disk.plan_repoint(cfg.pet_path, target, fmt), cfg, "pointing the pet at its base's digest")
    log.info("pet %s is now bound to sha256:%s (%s)", cfg.pet_path, hexdigest, target)
    return hexdigest


def _store_old(cfg: Config, old: Path, fmt: str, fd: int) -> str:
    """Hash, vet and store the open old base as ``sha256/<hex>``; its digest."""
    log.info("pet %s is on %s, the old cache layout: binding it to the base's digest", cfg.pet_path, old)
    with open(fd, "rb", closefd=False) as src:
        hexdigest = hashlib.file_digest(src, "sha256").hexdigest()
    legacy = old.parent / f".{old.name}.vetted"
    try:
        recorded = (
            json.loads(files.read_record(legacy, 1 << 16, cfg.image_dir) or b"{}").get("digests", {}).get("sha256")
        )
    except (ValueError, AttributeError):
        recorded = None
    if recorded and recorded != hexdigest:
        raise BaseMismatch(
            f"{old}: its bytes hash to sha256:{hexdigest}, not sha256:{recorded} as when it was cached; not starting"
        )
    layout = Layout(cfg.image_dir)
    layout.make()
    try:
        adopt(layout, fd, hexdigest, fmt, str(old))
    except OSError as err:
        raise PodvmError(f"IMAGE_DIR={cfg.image_dir}: cannot store {old} by its digest: {err.strerror}") from None
    return hexdigest


def _bound_digest(cfg: Config, info: disk.PetInfo) -> str:
    """The digest the pet's backing reference names, migrating a pet of the old layout first."""
    layout = Layout(cfg.image_dir)
    assert info.backing is not None and info.backing_format is not None
    hexdigest = layout.digest_of(info.backing)
    if hexdigest is not None:
        return hexdigest
    old = Path(info.backing)
    if old.parent.name == "sha256" and HEX64.match(old.name):
        log.info("pet %s names its base at %s; IMAGE_DIR is now %s: same digest, re-pointed once checked",
                 cfg.pet_path, old, cfg.image_dir)  # fmt: skip
        return old.name
    if old.parent == cfg.image_dir and not old.name.startswith("."):
        return _migrate(cfg, old, info.backing_format)
    raise BaseMismatch(
        f"{cfg.pet_path}: its backing file {info.backing} is not a base of IMAGE_DIR={cfg.image_dir}; not starting"
    )


def check_bound(cfg: Config, info: disk.PetInfo, *, restore: bool) -> tuple[str, Verdict]:
    """The start-time check of an overlay pet: reference claimed, base present and its digest, base vetted."""
    assert info.backing_format is not None
    hexdigest = _bound_digest(cfg, info)
    if not claim(cfg, hexdigest):
        if not restore:
            raise BaseMismatch(_missing(cfg, hexdigest))
        _restore_missing(cfg, hexdigest)
        if not claim(cfg, hexdigest):
            raise BaseMismatch(_missing(cfg, hexdigest))
    verdict = verify_base(cfg, hexdigest, info.backing_format)
    base = Layout(cfg.image_dir).base(hexdigest)
    if info.backing != str(base):  # a cache mounted elsewhere than when the pet was made: same bytes, checked above
        disk.run(disk.plan_repoint(cfg.pet_path, base, info.backing_format), cfg, "pointing the pet at IMAGE_DIR")
    return hexdigest, verdict


def _create(cfg: Config) -> Started:
    """A new pet on the configured image: fetched or found, referenced, checked, then made."""
    for _ in range(3):
        cached = ensure_image(cfg)
        if claim(cfg, cached.hex):
            break
        log.info("sha256:%s was collected while being claimed; fetching again", cached.hex)
    else:
        raise PodvmError(f"IMAGE_DIR={cfg.image_dir}: the base keeps disappearing while it is claimed")
    hexdigest = cached.hex
    base = Layout(cfg.image_dir).base(hexdigest)
    try:
        trust_path(cfg).unlink(missing_ok=True)
        if cached.fresh is not None:  # just downloaded, hashed and vetted by this runner: no second read
            verdict = cached.fresh
            assert cached.identity is not None
            st = cached.identity  # the fstat of the file hashed and vetted, never a fresh look at a shared path
            trust: Trust | None = Trust(
                hexdigest, str(base), cfg.base_format, verdict.virtual_size, st.st_size, st.st_ino,
                st.st_ctime_ns, st.st_mtime_ns, utc_now(),
            )  # fmt: skip
        else:  # found in the shared cache: trusted only once hashed and vetted here
            verdict = verify_base(cfg, hexdigest, cfg.base_format, max_size=cfg.img_max_size)
            trust = None  # verify_base wrote it
        plan = disk.plan_create(cfg, base, cfg.base_format, verdict.virtual_size)
        assert plan.staging is not None
        try:
            for argv in plan.create:
                disk.run(argv, cfg, f"creating the pet disk {cfg.pet_path}")
            os.replace(plan.staging, cfg.pet_path)
        finally:
            plan.staging.unlink(missing_ok=True)
    except BaseException:
        release(cfg, hexdigest)
        raise
    if cfg.vm_disk_mode == "standalone":
        release(cfg, hexdigest)
        trust_path(cfg).unlink(missing_ok=True)
        log.info("created standalone pet disk %s from sha256:%s", cfg.pet_path, hexdigest)
        return Started(cfg.pet_path, None, disk.info(cfg, cfg.pet_path).virtual_size)
    if trust is not None:
        _write_trust(cfg, trust)
    log.info("created pet disk %s on sha256:%s (%s)", cfg.pet_path, hexdigest, base)
    return Started(cfg.pet_path, hexdigest, disk.info(cfg, cfg.pet_path).virtual_size)


def prepare(cfg: Config) -> Started:
    """Everything before qemu: make the pet, or check the existing one's base; flatten or grow it when asked.

    :raise BaseMismatch: when an existing pet's base is missing or changed.
    :raise ImageRejected: when an image fails its checksum or vetting.
    """
    if not cfg.pet_path.exists():
        started = _create(cfg)
    else:
        info = disk.info(cfg, cfg.pet_path)
        if info.backing is None:
            if cfg.vm_disk_mode == "overlay":
                log.info("pet disk %s is standalone (no backing file) and stays so", cfg.pet_path)
            started = Started(cfg.pet_path, None, info.virtual_size)
        else:
            hexdigest, _ = check_bound(cfg, info, restore=True)
            _note_configured(cfg, hexdigest)
            if cfg.vm_disk_mode == "standalone":
                flatten(cfg, hexdigest)
                started = Started(cfg.pet_path, None, info.virtual_size)
            else:
                log.info("pet disk %s is on its base sha256:%s, checked", cfg.pet_path, hexdigest)
                started = Started(cfg.pet_path, hexdigest, info.virtual_size)
    grow = disk.plan_grow(cfg, started.virtual_size)
    if grow.resize is not None:
        disk.run(grow.resize, cfg, f"growing the pet disk {cfg.pet_path}")
        log.info("grew pet disk %s to %s bytes", cfg.pet_path, grow.resize[-1])
    return started


def flatten(cfg: Config, hexdigest: str) -> None:
    """VM_DISK_MODE=standalone on an overlay pet: copy in what it reads from its base, drop the backing file."""
    log.info("VM_DISK_MODE=standalone: copying sha256:%s into pet disk %s", hexdigest, cfg.pet_path)
    disk.run(disk.plan_flatten(cfg.pet_path), cfg, "making the pet disk standalone")
    trust_path(cfg).unlink(missing_ok=True)
    release(cfg, hexdigest)
    log.info("pet disk %s is standalone; it no longer uses the cache", cfg.pet_path)


def rebase(cfg: Config, wanted: str) -> str:
    """``vmrunner rebase``: move the stopped pet to another cached base, keeping every byte the guest sees.

    :raise ConfigError: when ``wanted`` names no cached base.
    :raise BaseMismatch: when the pet's current base is missing or changed (the copy would carry wrong bytes).
    """
    layout = Layout(cfg.image_dir)
    if not cfg.pet_path.exists():
        raise ConfigError(f"{cfg.pet_path}: no pet disk to rebase (HOSTNAME={cfg.hostname}, VM_DIR={cfg.vm_dir})")
    target = lookup(layout, wanted)
    if target is None or layout.stored(target) is None:
        raise ConfigError(f"rebase {wanted}: no such base in IMAGE_DIR={cfg.image_dir} (vmrunner fetch caches one)")
    info = disk.info(cfg, cfg.pet_path)
    current = check_bound(cfg, info, restore=False)[0] if info.backing is not None else None
    if current == target:
        log.info("pet disk %s is already on sha256:%s", cfg.pet_path, target)
        return target
    fmt = info.backing_format or cfg.base_format  # never probed: the pet's current base format, else IMG_FORMAT's
    if not claim(cfg, target):
        raise ConfigError(f"rebase {wanted}: sha256:{target} was removed from IMAGE_DIR={cfg.image_dir} meanwhile")
    try:
        if current is not None:
            trust_path(cfg).unlink(missing_ok=True)
        verify_base(cfg, target, fmt, max_size=cfg.img_max_size)
        disk.run(disk.plan_rebase(cfg.pet_path, layout.base(target), fmt), cfg, "rebasing the pet disk")
    except BaseException:
        release(cfg, target)
        raise
    if current is not None:
        release(cfg, current)
    log.info("pet disk %s moved from %s to sha256:%s", cfg.pet_path, f"sha256:{current}" if current else "none", target)
    return target


def describe(cfg: Config) -> dict[str, object]:
    """The pet's binding and its base's references, read-only (for ``plan`` and ``status``)."""
    layout = Layout(cfg.image_dir)
    doc: dict[str, object] = {"path": str(cfg.pet_path), "exists": cfg.pet_path.exists(), "mode": cfg.vm_disk_mode}
    if not cfg.pet_path.exists():
        return doc
    info = disk.info(cfg, cfg.pet_path)
    doc["virtual_size"] = info.virtual_size
    if info.backing is None:
        doc["binding"] = None
        return doc
    hexdigest = layout.digest_of(info.backing)
    trust = read_trust(cfg)
    base = layout.base(hexdigest) if hexdigest else None
    st = layout.stored(hexdigest) if hexdigest else None
    doc["binding"] = {
        "backing": info.backing,
        "backing_format": info.backing_format,
        "digest": f"sha256:{hexdigest}" if hexdigest else None,
        "layout": "digest" if hexdigest else "old (migrated at the next start)",
        "base_present": Path(info.backing).exists(),
        "trust_record": str(trust_path(cfg)) if trust else None,
        "last_hashed": trust.hashed_at if trust else None,
        "next_start": "cheap check"
        if hexdigest and st is not None and doubt(trust, hexdigest, str(base), st, cfg.verify_base) is None
        else "full re-hash",
    }
    if hexdigest:
        doc["references"] = sorted(references(layout, hexdigest))
        doc["names"] = sorted(
            entry.name
            for entry in (cfg.image_dir / "names").glob("*")
            if (record := read_name(layout, entry.name)) is not None and record.hex == hexdigest
        )
    return doc
