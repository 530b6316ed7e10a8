"""Garbage collection of bases no pet has referenced for the grace period, decided as data then applied."""

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.files import list_below, open_below, read_small, remove_below, stat_below
from vmrunner.images.layout import HEX64, TMP_MIN_AGE, VOLUME_FILE, Layout, check_locks, locked
from vmrunner.images.names import read_name
from vmrunner.images.refs import Ref, references

log = logging.getLogger("vmrunner.cache")


@dataclass(frozen=True)
class DigestFacts:
    """What gc observed about one base: when it was cached, its references, when one was last removed."""

    hex: str
    base_ctime: float
    refs: dict[str, Ref | None]
    refs_mtime: float | None  # the refs folder's mtime: the last reference added or removed
    stale: frozenset[str]  # references whose volume gc sees and whose pet is gone
    names: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """What gc does with one base."""

    hex: str
    drop_refs: tuple[str, ...]
    remove: bool
    why: str


def judge_digest(facts: DigestFacts, now: float, grace: float) -> Decision:
    """Keep or remove one base; pure, so every rule has a unit test."""
    live = [name for name in facts.refs if name not in facts.stale]
    drop = tuple(sorted(facts.stale))
    if live:
        return Decision(facts.hex, drop, False, f"referenced by {', '.join(live)}")
    claimed = max(facts.base_ctime, facts.refs_mtime or 0.0)
    if drop:
        claimed = now  # dropping a reference now starts the grace period
    idle = now - claimed
    if idle < grace:
        return Decision(facts.hex, drop, False, f"unreferenced for {idle:.0f}s, under the grace period")
    return Decision(facts.hex, drop, True, f"unreferenced for {idle:.0f}s")


def _stale(ref: Ref | None) -> bool:
    """A reference whose pet is provably gone: its volume is visible here (same id) and the pet file is not."""
    if ref is None:
        return False
    pet = Path(ref.pet)
    try:
        return read_small(pet.parent / VOLUME_FILE, 64).decode().strip() == ref.volume and not pet.exists()
    except (OSError, ValueError):
        return False


def observe(layout: Layout, hexdigest: str) -> DigestFacts | None:
    """Facts about one base, or None when it is gone."""
    base = stat_below(layout.root, layout.base(hexdigest))
    if base is None:
        return None
    refs = references(layout, hexdigest)
    folder = stat_below(layout.root, layout.refs(hexdigest))
    refs_mtime = folder.st_mtime if folder is not None else None
    names = []
    for name in list_below(layout.root, layout.root / "names"):
        record = read_name(layout, name)
        if record is not None and record.hex == hexdigest:
            names.append(name)
    stale = frozenset(name for name, ref in refs.items() if _stale(ref))
    return DigestFacts(hexdigest, base.st_ctime, refs, refs_mtime, stale, tuple(names))


def _remove(layout: Layout, decision: Decision, names: tuple[str, ...]) -> None:
    """Apply one decision while holding the digest's lock."""
    for ref in decision.drop_refs:
        remove_below(layout.root, layout.refs(decision.hex) / ref)
    if not decision.remove:
        return
    for name in names:
        record = read_name(layout, name)
        if record is not None and record.hex == decision.hex:
            remove_below(layout.root, layout.name(name))
    remove_below(layout.root, layout.base(decision.hex))
    with contextlib.suppress(OSError):  # not empty (a reference came), or already gone
        refs = open_below(layout.root, layout.root / "refs")
        try:
            os.rmdir(decision.hex, dir_fd=refs)
        finally:
            os.close(refs)
    remove_below(layout.root, layout.lock(decision.hex))


@dataclass
class GcReport:
    """What one gc run did (or would do, with ``dry_run``); printed as JSON."""

    dry_run: bool
    removed: list[dict[str, object]] = field(default_factory=list)  # digest, names, why
    kept: list[dict[str, object]] = field(default_factory=list)
    dropped_refs: list[str] = field(default_factory=list)
    tmp_removed: list[str] = field(default_factory=list)

    def removed_digests(self) -> list[str]:
        """``sha256:<hex>`` of each removed base."""
        return [str(entry["digest"]) for entry in self.removed]


def collect(root: Path, grace: float, dry_run: bool) -> GcReport:
    """Remove bases no reference has claimed for ``grace`` seconds, and stale downloads; return what was done.

    Each base is judged again while its lock is held; a base whose lock is busy is being claimed and is skipped.
    """
    layout = Layout(root)
    report = GcReport(dry_run)
    bases = list_below(root, root / "sha256")
    if not bases:
        return report
    check_locks(root)
    now = time.time()
    for hexdigest in bases:
        if not HEX64.match(hexdigest):
            continue
        guard = contextlib.nullcontext(True) if dry_run else locked(layout.lock(hexdigest), blocking=False)
        with guard as held:
            if not held:
                report.kept.append({"digest": f"sha256:{hexdigest}", "why": "being claimed (its lock is busy)"})
                continue
            facts = observe(layout, hexdigest)
            if facts is None:
                continue
            decision = judge_digest(facts, now, grace)
            if not dry_run:
                _remove(layout, decision, facts.names)
        report.dropped_refs += [f"sha256:{decision.hex}/{ref}" for ref in decision.drop_refs]
        summary: dict[str, object] = {
            "digest": f"sha256:{decision.hex}",
            "names": list(facts.names),
            "why": decision.why,
        }
        (report.removed if decision.remove else report.kept).append(summary)
        for ref in decision.drop_refs:
            log.info("%s reference %s to sha256:%s: its pet is gone", _verb(dry_run, "dropped"), ref, decision.hex)
        if decision.remove:
            log.info("%s sha256:%s (%s)", _verb(dry_run, "removed"), decision.hex, decision.why)
    for name in list_below(root, layout.tmp):
        found = stat_below(root, layout.tmp / name)
        if found is not None and now - found.st_mtime >= max(grace, TMP_MIN_AGE):
            if not dry_run:
                with contextlib.suppress(IsADirectoryError, PermissionError):
                    remove_below(root, layout.tmp / name)
            report.tmp_removed.append(name)
    return report


def _verb(dry_run: bool, done: str) -> str:
    return f"would have {done}" if dry_run else done
