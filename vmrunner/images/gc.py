"""Garbage collection of bases no pet has referenced for the grace period, decided as data then applied."""

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

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
        return (pet.parent / VOLUME_FILE).read_text().strip() == ref.volume and not pet.exists()
    except OSError:
        return False


def observe(layout: Layout, hexdigest: str) -> DigestFacts | None:
    """Facts about one base, or None when it is gone."""
    try:
        base_ctime = layout.base(hexdigest).stat().st_ctime
    except FileNotFoundError:
        return None
    refs = references(layout, hexdigest)
    try:
        refs_mtime: float | None = layout.refs(hexdigest).stat().st_mtime
    except FileNotFoundError:
        refs_mtime = None
    names = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted((layout.root / "names").iterdir()):
            record = read_name(layout, entry.name)
            if record is not None and record.hex == hexdigest:
                names.append(entry.name)
    stale = frozenset(name for name, ref in refs.items() if _stale(ref))
    return DigestFacts(hexdigest, base_ctime, refs, refs_mtime, stale, tuple(names))


def _remove(layout: Layout, decision: Decision, names: tuple[str, ...]) -> None:
    """Apply one decision while holding the digest's lock."""
    for ref in decision.drop_refs:
        (layout.refs(decision.hex) / ref).unlink(missing_ok=True)
    if not decision.remove:
        return
    for name in names:
        record = read_name(layout, name)
        if record is not None and record.hex == decision.hex:
            layout.name(name).unlink(missing_ok=True)
    layout.base(decision.hex).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError, OSError):
        layout.refs(decision.hex).rmdir()
    layout.lock(decision.hex).unlink(missing_ok=True)


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
    if not (root / "sha256").is_dir():
        return report
    check_locks(root)
    now = time.time()
    for entry in sorted((root / "sha256").iterdir()):
        if not HEX64.match(entry.name):
            continue
        guard = contextlib.nullcontext(True) if dry_run else locked(layout.lock(entry.name), blocking=False)
        with guard as held:
            if not held:
                report.kept.append({"digest": f"sha256:{entry.name}", "why": "being claimed (its lock is busy)"})
                continue
            facts = observe(layout, entry.name)
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
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(layout.tmp.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime >= max(grace, TMP_MIN_AGE):
                    if not dry_run:
                        entry.unlink()
                    report.tmp_removed.append(entry.name)
    return report


def _verb(dry_run: bool, done: str) -> str:
    return f"would have {done}" if dry_run else done
