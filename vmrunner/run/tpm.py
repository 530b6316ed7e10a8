"""The guest's TPM 2.0: swtpm, unprivileged, planned as data, started before qemu and supervised with it.

Its state lives on VM_DIR (see :mod:`vmrunner.pet.state`), mode 0700 and owned by the runner, and carries the name
of the VM it belongs to: a state directory of another VM is refused rather than handed to this guest.
"""

import asyncio
import collections
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shared import files
from shared.errors import ConfigError, escape_controls
from vmrunner.config import Config
from vmrunner.pet.state import TPM_OWNER, tpm_dir

log = logging.getLogger("vmrunner")
SOCKET = "swtpm.sock"  # in RUN_DIR: swtpm's control channel, which qemu connects to
READY_TIMEOUT = 10.0  # seconds swtpm gets to open its socket


@dataclass(frozen=True)
class SwtpmPlan:
    """swtpm's argv, its state directory and the socket qemu reaches it on."""

    argv: tuple[str, ...]
    state: Path
    socket: Path


def preflight(cfg: Config) -> None:
    """One line, before anything starts, when VM_TPM=on but there is no swtpm to serve it.

    :raise ConfigError: naming SWTPM.
    """
    if cfg.hardware.tpm and shutil.which(cfg.hardware.swtpm) is None:
        raise ConfigError(f"SWTPM={cfg.hardware.swtpm}: no such program (VM_TPM=on needs Debian's swtpm package)")


def plan_swtpm(cfg: Config) -> SwtpmPlan:
    """swtpm as a TPM 2.0 on a Unix control socket; it exits when qemu closes the channel (``--terminate``)."""
    state, socket = tpm_dir(cfg), cfg.run_dir / SOCKET
    argv = (
        cfg.hardware.swtpm,
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state},mode=0600",
        "--ctrl",
        f"type=unixio,path={socket},mode=0600",
        "--terminate",
    )
    return SwtpmPlan(argv, state, socket)


def tpm_args(plan: SwtpmPlan) -> list[str]:
    """qemu's side: the emulator backend on swtpm's socket and a TIS device (what Windows and Linux both drive)."""
    return [
        "-chardev",
        f"socket,id=chrtpm,path={plan.socket}",
        "-tpmdev",
        "emulator,id=tpm0,chardev=chrtpm",
        "-device",
        "tpm-tis,tpmdev=tpm0",
    ]


def ensure_state(cfg: Config) -> Path:
    """The state directory, made 0700 on the first start and marked with this VM's name; opened through the volume's
    descriptors, so a link planted in its place is refused, never followed.

    :raise ConfigError: when it is not the runner's, is open to others, or belongs to another VM.
    """
    state = tpm_dir(cfg)
    with contextlib.suppress(FileExistsError):
        os.mkdir(state, 0o700)
    try:
        os.close(files.open_below(cfg.vm_dir, state))
    except OSError:
        raise ConfigError(f"VM_DIR={cfg.vm_dir}: {state.name} is not a directory") from None
    info = files.stat_below(cfg.vm_dir, state)
    assert info is not None, "the TPM state directory vanished right after it was opened"
    if info.st_uid != os.getuid():
        raise ConfigError(f"VM_DIR={cfg.vm_dir}: {state.name} is not a directory of the runner's (uid {os.getuid()})")
    if info.st_mode & 0o077:
        raise ConfigError(f"VM_DIR={cfg.vm_dir}: {state.name} is open to others (mode {info.st_mode & 0o777:o})")
    owner = state / TPM_OWNER
    recorded = files.read_record(owner, 256, cfg.vm_dir)
    if recorded is None:
        files.write_atomic(owner, f"{cfg.hostname}\n".encode(), 0o600, root=cfg.vm_dir)
    elif (found := recorded.decode(errors="replace").strip()) != cfg.hostname:
        raise ConfigError(
            f"VM_DIR={cfg.vm_dir}: {state.name} holds the TPM state of {escape_controls(found)!r}, "
            f"not of HOSTNAME={cfg.hostname}"
        )
    return state


class Swtpm:
    """One swtpm process beside qemu: started first, watched while qemu runs, stopped after it."""

    name = "swtpm"

    def __init__(self, plan: SwtpmPlan) -> None:
        self.plan = plan
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=10)

    async def start(self) -> None:
        """Start swtpm and wait until its control socket is there, so qemu finds it.

        :raise ConfigError: when the program is missing. :raise ChildFailed: when it exits or never gets ready.
        """
        from shared.errors import ChildFailed

        self.plan.socket.unlink(missing_ok=True)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.plan.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise ConfigError(f"SWTPM={self.plan.argv[0]}: no such program") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while not self.plan.socket.exists():
            if self.proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise ChildFailed(f"swtpm did not start: {await self._tail()}")
            await asyncio.sleep(0.05)
        log.info("swtpm started (pid %d, state %s)", self.proc.pid, self.plan.state)

    async def wait(self) -> str:
        """Wait for swtpm to exit; the reason, for the runner's report."""
        assert self.proc is not None
        code = await self.proc.wait()
        return f"swtpm (pid {self.proc.pid}) exited with status {code}: {await self._tail()}"

    async def _tail(self) -> str:
        if self.proc is not None and self.proc.stderr is not None:
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(self.proc.stderr.read(65536), 1.0)
                self.stderr_tail.extend(line for line in data.decode("utf-8", "replace").splitlines() if line)
        return " | ".join(self.stderr_tail) or "(no error output)"

    async def stop(self) -> None:
        """Stop swtpm if it still runs (after qemu exited it normally has: ``--terminate``); its socket goes too."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        self.plan.socket.unlink(missing_ok=True)
