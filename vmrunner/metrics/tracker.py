"""The run's tracker: what ``run`` knows of itself (phase, fetch, outcome), saved in RUN_DIR for ``status``."""

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from shared.errors import ChildFailed, ImageRejected, StoppedHard
from shared.files import write_atomic
from vmrunner.images.download import FETCH
from vmrunner.metrics.runs import previous_end, record_run
from vmrunner.metrics.sources import CACHE_SCAN_EVERY, Sources, directory_size
from vmrunner.metrics.state import STATE_FILE, RunState

log = logging.getLogger("vmrunner")


class Tracker:
    """The ``run`` process's state: changed by the runner as it goes, saved for ``status``, read by the endpoint."""

    def __init__(self, sources: Sources, vm: str) -> None:
        self.sources = sources
        self.state = RunState(vm=vm, image=FETCH)
        self._cache_size: tuple[float, int] = (0.0, 0)
        self.spawned = threading.Event()  # qemu has been started: the endpoint's server may load

    def set(self, **changes: Any) -> None:
        """Change fields of the run state and save it (a failure to save is logged; the run goes on)."""
        for key, value in changes.items():
            setattr(self.state, key, value)
        try:
            write_atomic(self.sources.run_dir / STATE_FILE, json.dumps(asdict(self.state)).encode(), mode=0o600)
        except OSError as err:
            log.warning("RUN_DIR=%s: cannot save %s: %s", self.sources.run_dir, STATE_FILE, err.strerror)

    def qemu_started(self, pid: int, *, boot: bool = True) -> None:
        """qemu runs: say how the pet's previous run ended when it was not a clean shutdown, count a boot (not when
        qemu takes up a saved state: the guest does not boot)."""
        ended = previous_end(self.sources.runs_file)
        if ended is not None:
            log.warning("%s", ended)
        record_run(self.sources.runs_file, boot=boot)
        self.set(phase="running", qemu_pid=pid, started=time.time())
        self.spawned.set()

    def finished(self, outcome: str) -> None:
        """qemu has exited; ``outcome`` is clean, hard or crashed."""
        record_run(self.sources.runs_file, outcome=outcome)
        self.set(phase="stopped" if outcome != "crashed" else "error", qemu_pid=0)

    def forget(self) -> None:
        """The run is over: its saved state goes (a status asked later finds no runner)."""
        with contextlib.suppress(OSError):
            (self.sources.run_dir / STATE_FILE).unlink()

    def cache_size(self) -> int:
        """Bytes in IMAGE_DIR, scanned at most once a minute (the cache may be a large network share)."""
        when, size = self._cache_size
        if time.monotonic() - when >= CACHE_SCAN_EVERY or when == 0.0:
            size = directory_size(self.sources.image_dir)
            self._cache_size = (time.monotonic(), size)
        return size


@contextlib.contextmanager
def fetching(tracker: Tracker, name: str) -> Iterator[None]:
    """Time the fetch (with its hashing and vetting) and record the vetting result (refused: the run then ends
    with exit status 3)."""
    image = tracker.state.image
    image.name = name
    started = time.monotonic()
    try:
        yield
    except ImageRejected:
        image.vetting = "refused"
        tracker.set()
        raise
    if image.received:
        image.fetch_seconds = time.monotonic() - started
    image.vetting = "accepted"
    tracker.set()


def base_in_use(tracker: Tracker, hexdigest: str | None) -> None:
    """The base the pet runs on, by its digest (none for a standalone pet)."""
    tracker.state.image.digest = f"sha256:{hexdigest}" if hexdigest else ""
    tracker.set()


@contextlib.contextmanager
def outcome(tracker: Tracker) -> Iterator[None]:
    """Record how the run ended in the pet's record: clean, hard (stopped after the timeout) or crashed."""
    try:
        yield
    except StoppedHard:
        tracker.finished("hard")
        raise
    except ChildFailed:
        tracker.finished("crashed")
        raise
    tracker.finished("suspended" if tracker.state.suspend.startswith("saved") else "clean")
