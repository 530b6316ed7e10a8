"""The run's own state (phase, fetch, outcome), kept in RUN_DIR so that ``status`` sees what ``run`` knows."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from shared import figures
from shared.files import read_small
from vmrunner.images.download import ImageFigures

log = logging.getLogger("vmrunner")

STATE_FILE = "vmrunner-state.json"


@dataclass
class RunState:
    """What only the ``run`` process knows; saved in RUN_DIR at each change for ``vmrunner status``."""

    phase: str = "waiting"
    accel: str = ""
    accel_fallback: str = ""  # why ACCEL=auto runs under TCG: KVM was missing or could not be opened
    suspend: str = ""  # how this run began or ended with a saved state: "resumed ...", "cold: why", "saved ..."
    network_path: str = ""  # how the NIC's packets move: "vhost-net" or "qemu", and its queue pairs
    boot_refused: str = ""  # the boot option the firmware refused (Secure Boot: an unsigned bootloader)
    vm: str = ""
    qemu_pid: int = 0
    started: float = 0.0
    image: ImageFigures = field(default_factory=ImageFigures)


def load_state(run_dir: Path) -> RunState | None:
    """The run state the ``run`` process saved, or None when none (or a malformed one) is there."""
    try:
        data = read_small(run_dir / STATE_FILE, figures.MAX_SIZE)
        raw = json.loads(data)
        image = ImageFigures(**raw.pop("image"))
        state = RunState(**raw, image=image)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return state
