"""Running qemu: the guest's serial console into the log, qemu's errors kept for the report, ACPI shutdown on SIGTERM.

qemu writes everything that crosses the serial port to a FIFO (the console chardev's ``logfile``); the runner reads
it line by line into its log with a ``guest:`` prefix, while ``vmrunner console`` talks to the same port through the
chardev's socket. The FIFO is opened read-write by the runner so it never blocks qemu and never reads EOF.
"""

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence

from shared.errors import ChildFailed, ConfigError, PodvmError, StoppedHard, escape_controls
from shared.shutdown import QUIT_GRACE, QUIT_TIMEOUT
from vmrunner.metrics.tracker import Tracker
from vmrunner.qemu import qmp
from vmrunner.run import agent, firmware, suspend, vnc
from vmrunner.run.argv import QemuPlan
from vmrunner.run.tpm import Swtpm

log = logging.getLogger("vmrunner")
guest_log = logging.getLogger("guest")
STDERR_TAIL = 20
CONSOLE_LINE = 4096  # bytes: a longer console line is logged in pieces of this size

DUTY_GRACE = 2.0  # seconds a cancelled duty gets to clean up before the shutdown goes on without it
Duty = Callable[[], Awaitable[None]]
"""Work that lives as long as qemu runs (a console broker, a backup schedule, a watch on the VM's state): started
once qemu is up, cancelled before the shutdown begins and when qemu exits."""


def prepare_run_dir(plan: QemuPlan) -> None:
    """Remove stale sockets of an earlier qemu and make a fresh console FIFO."""
    for path in plan.paths.made():
        path.unlink(missing_ok=True)
    os.mkfifo(plan.paths.console_log, 0o600)


async def _never() -> str:
    """A companion that never exits: the wait for a dead swtpm when there is none."""
    await asyncio.Event().wait()
    return ""


def _name(duty: Duty) -> str:
    """A duty's name for the log: its qualified name, never its repr (which may show arguments, secrets too)."""
    return getattr(duty, "__qualname__", type(duty).__name__)


class Supervisor:
    """One qemu process from start to exit."""

    def __init__(
        self,
        plan: QemuPlan,
        shutdown_timeout: float,
        vnc_password: bytes | None = None,
        tracker: Tracker | None = None,
        duties: Sequence[Duty] = (),
        *,
        saver: suspend.Saver | None = None,
    ) -> None:
        self.plan = plan
        self.shutdown_timeout = shutdown_timeout
        self.vnc_password = vnc_password  # handed to qemu through a pipe on its stdin, never through argv
        self.tracker = tracker
        self.duties = duties
        self.saver = saver  # ON_STOP=suspend: SIGTERM saves the VM instead of shutting it down
        self._clock: asyncio.Task[None] | None = None  # the guest's clock set after a resume
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.partial = b""

    def _console_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > CONSOLE_LINE:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            for start in range(0, len(line), CONSOLE_LINE):  # cut at 4 KiB however the bytes arrived
                text = line[start : start + CONSOLE_LINE].decode("utf-8", "replace").rstrip("\r")
                if text:
                    guest_log.info("%s", escape_controls(text))
                    self._judge_boot(text)

    def _judge_boot(self, text: str) -> None:
        """A boot option the firmware refuses is an error in the log and in ``status`` (``boot_refused``), not a
        guest that silently never comes up."""
        refused = firmware.boot_refusal(text)
        if refused is None:
            return
        log.error(
            "the firmware refused to boot %s; with Secure Boot the bootloader must be signed by a key the VM's "
            "variable store holds",
            escape_controls(refused),
        )
        if self.tracker is not None and not self.tracker.state.boot_refused:  # the first: the disk's, not the shell's
            self.tracker.set(boot_refused=refused)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                log.warning("qemu: %s", line)

    async def run(self) -> int:
        """Start qemu and supervise it until it exits or SIGTERM/SIGINT asks the guest to stop.

        :raise ChildFailed: when qemu exits with an error, with the tail of its stderr.
        :raise StoppedHard: when the guest ignored the power-down until the timeout.
        """
        loop = asyncio.get_running_loop()
        prepare_run_dir(self.plan)
        fifo = os.open(self.plan.paths.console_log, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(fifo, self._console_readable, fifo)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        swtpm = Swtpm(self.plan.swtpm) if self.plan.swtpm is not None else None
        try:
            if swtpm is not None:
                await swtpm.start()
            proc = await self._spawn()
            assert proc.stderr is not None
            reader = asyncio.create_task(self._read_stderr(proc.stderr))
            log.info("qemu started (pid %d, %s)", proc.pid, self.plan.accel)
            if self.tracker is not None:
                self.tracker.qemu_started(proc.pid, boot=self.plan.incoming is None)
            exited = asyncio.create_task(proc.wait())
            if self.plan.incoming is not None:
                await self._take_up(self.plan.incoming, exited, reader)
            stopping = asyncio.create_task(stop.wait())
            duties = [asyncio.create_task(self._duty(duty), name=_name(duty)) for duty in self.duties]
            # A dead swtpm leaves the guest without its TPM: reported, and the VM stopped, never silently lost.
            lost = asyncio.create_task(swtpm.wait() if swtpm is not None else _never())
            await asyncio.wait({exited, stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
            await self._cancel(duties)
            if lost.done() and not exited.done():
                log.error("%s while the VM runs: the guest's TPM is gone; stopping the VM", lost.result())
                stopping.cancel()
                with contextlib.suppress(StoppedHard):  # the TPM's loss is the report, however the guest stopped
                    await self._shutdown(proc, exited)
                await self._drain(reader)
                raise ChildFailed(lost.result())
            lost.cancel()
            if stopping.done() and not exited.done():
                if self.saver is not None and await self._suspend(proc, exited, self.saver):
                    await self._drain(reader)
                    return 0
                status = await self._shutdown(proc, exited)
                await self._drain(reader)
                return status
            stopping.cancel()
            return self._exited(exited.result(), await self._drain(reader))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self._console_readable(fifo)
            loop.remove_reader(fifo)
            os.close(fifo)
            for path in self.plan.paths.made():
                path.unlink(missing_ok=True)
            if swtpm is not None:
                await swtpm.stop()

    @staticmethod
    async def _cancel(duties: "list[asyncio.Task[None]]") -> None:
        """Cancel the duties and give them DUTY_GRACE to clean up: one that lingers must not hold the shutdown."""
        for task in duties:
            task.cancel()
        if duties:
            _, lingering = await asyncio.wait(duties, timeout=DUTY_GRACE)
            for task in lingering:
                log.warning("%s did not stop within %gs; going on without it", task.get_name(), DUTY_GRACE)

    @staticmethod
    async def _duty(duty: Duty) -> None:
        """One duty; its failure is logged and never takes the VM down with it."""
        try:
            await duty()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a duty's bug must not stop a pet VM; the traceback is there at DEBUG
            log.error("%s stopped: %s", _name(duty), err)
            log.debug("%s stopped", _name(duty), exc_info=True)

    async def _take_up(self, stream: int, exited: "asyncio.Task[int]", reader: "asyncio.Task[None]") -> None:
        """qemu reads the saved state, then the guest runs on; its clock is set through its agent.

        :raise suspend.ResumeRefused: when qemu refuses the state (the caller boots cold).
        """
        try:
            seconds = await suspend.resumed(self.plan.paths.qmp, stream, exited)
        except PodvmError as err:
            raise suspend.ResumeRefused(f"{err}: {await self._drain(reader)}") from None
        log.info("resumed the saved state in %.1f s: the guest runs on where it stopped", seconds)
        if self.tracker is not None:
            self.tracker.set(suspend=f"resumed in {seconds:.1f} s")

        async def correct_clock() -> None:
            log.info("%s", await agent.set_time(self.plan.paths.agent))

        self._clock = asyncio.create_task(correct_clock())

    async def _suspend(
        self, proc: asyncio.subprocess.Process, exited: "asyncio.Task[int]", saver: suspend.Saver
    ) -> bool:
        """Save the VM to VM_DIR and let qemu go; False (the guest running again) when the save failed."""
        budget = saver.cfg.suspend_timeout
        log.info("stopping: saving the VM's devices and RAM to %s (up to %gs)", saver.cfg.vm_dir, budget)
        if self.tracker is not None:
            self.tracker.set(phase="suspending")
        monitor = self.plan.paths.qmp
        try:
            seconds = await suspend.save(monitor, saver.fd, budget)
        except PodvmError as err:
            log.warning("suspend failed: %s; the guest runs again and is shut down instead", err)
            await suspend.undo(monitor)
            return False
        with contextlib.suppress(PodvmError):
            await qmp.execute(monitor, "quit", timeout=QUIT_TIMEOUT)
        try:
            await asyncio.wait_for(asyncio.shield(exited), QUIT_GRACE)
        except TimeoutError:
            proc.kill()
            await exited
        try:
            record = suspend.commit(saver.cfg, saver.fd, saver.cold_argv, seconds)
        except OSError as err:
            log.error("the saved state could not be recorded (%s): the next start boots cold from the disk", err)
            return True
        log.info(
            "suspended: %d MiB of devices and RAM saved in %.1f s; the next start resumes it",
            record.size >> 20,
            seconds,
        )
        if self.tracker is not None:
            self.tracker.set(suspend=f"saved in {seconds:.1f} s")
        return True

    async def _spawn(self) -> asyncio.subprocess.Process:
        stdin = asyncio.subprocess.DEVNULL if self.vnc_password is None else vnc.password_pipe(self.vnc_password)
        try:
            return await asyncio.create_subprocess_exec(
                *self.plan.argv,
                stdin=stdin,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=self.plan.pass_fds,
                env={**os.environ, **dict(self.plan.environment)} if self.plan.environment else None,
            )
        except FileNotFoundError:
            raise ConfigError(f"QEMU={self.plan.argv[0]}: no such program") from None
        finally:
            if stdin != asyncio.subprocess.DEVNULL:
                os.close(stdin)

    async def _drain(self, reader: "asyncio.Task[None]") -> str:
        """qemu's last error lines, once its stderr is read to the end (or 2 s passed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 2.0)
        return " | ".join(self.stderr_tail) or "(no error output)"

    def _exited(self, code: int, tail: str) -> int:
        if code == 0:
            log.info("guest powered off by itself; qemu exited")
            return 0
        raise ChildFailed(f"qemu exited with status {code}: {tail}")

    async def _shutdown(self, proc: asyncio.subprocess.Process, exited: "asyncio.Task[int]") -> int:
        """Press the ACPI power button and wait for the guest; all of it within SHUTDOWN_TIMEOUT, then stop hard.

        A qemu that does not answer QMP (hung, stopped) cannot hold the shutdown longer: the power-down request
        counts against the same deadline, and the hard stop falls back to signals when ``quit`` gets no answer.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        log.info("stopping: ACPI power-down requested; waiting up to %gs for the guest", self.shutdown_timeout)
        if self.tracker is not None:
            self.tracker.set(phase="shutting_down")
        verdict = "the guest ignored the ACPI power-down"
        try:
            await qmp.execute(self.plan.paths.qmp, "system_powerdown", timeout=min(qmp.TIMEOUT, self.shutdown_timeout))
        except PodvmError as err:
            log.warning("QMP system_powerdown failed: %s", err)
            verdict = "qemu did not take the ACPI power-down (its monitor does not answer)"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), max(0.0, deadline - loop.time()))
            log.info("guest powered off")
            return 0
        log.warning("guest did not power off within %gs; stopping qemu hard", self.shutdown_timeout)
        try:
            await qmp.execute(self.plan.paths.qmp, "quit", timeout=QUIT_TIMEOUT)
        except PodvmError as err:
            log.warning("QMP quit failed: %s; sending qemu SIGTERM", err)
            with contextlib.suppress(ProcessLookupError):  # it may have quit after all, and been reaped
                proc.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(exited), QUIT_GRACE)
        except TimeoutError:
            log.warning("qemu still runs %gs later; killing it", QUIT_GRACE)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await exited
        raise StoppedHard(f"SHUTDOWN_TIMEOUT={self.shutdown_timeout:g}s: {verdict}; stopped hard")
