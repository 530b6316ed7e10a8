"""The errors of podvm and the exit status each one means, in one place.

The tree, and what the caller (a person or Kubernetes) should do next::

    PodvmError           exit 1  something failed at run time; a restart may help
     +-- ConfigError     exit 2  bad input: a variable or a file is wrong; fix it, a restart will not help
     +-- ImageRejected   exit 3  the base image failed vetting; use another image
     +-- HandshakeError  exit 4  the sidecar's handshake is missing, malformed or of an unknown major version
     +-- ChildFailed     exit 5  a process podvm supervises (qemu, dnsmasq) died
     +-- StoppedHard     exit 6  the guest ignored the ACPI power-down until the timeout, or qemu's monitor did not
                             answer it, and qemu was stopped hard (quit, then SIGTERM, then SIGKILL)
     +-- BaseMismatch    exit 7  a pet's own base image is missing or not the bytes it was made on; not started

Every message is one line that names the input at fault (line breaks from the input are shown escaped).

What is not a PodvmError never shows a traceback either (``shared.cli.run_main``): an unexpected OSError (ENOSPC,
EACCES, ENOLCK...) is one line with its file and reason, exit 1; any other exception is a bug, one line, exit 1,
with its traceback logged only at ``LOG_LEVEL=DEBUG``.
"""

import os
import re

_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")  # C0, C1 and line separators; not tab


def escape_controls(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): the one escaping of podvm for every text
    an input, a server or a guest controls, so none can split or forge a log line or send escape sequences to the
    terminal of whoever reads ``kubectl logs``."""
    return _CONTROLS.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def reason(err: OSError) -> str:
    """The system's own words for ``err`` ("Address already in use"), without what a library added to its message
    (aiohttp names the address again): for one-line errors that name the setting themselves."""
    return os.strerror(err.errno) if err.errno else str(err)


class PodvmError(Exception):
    """Root of podvm's errors; carries the process exit status that reports it."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(escape_controls(message))


class ConfigError(PodvmError):
    """An environment variable or an input file is invalid; raised before anything is changed."""

    exit_code = 2


class ImageRejected(PodvmError):
    """The base image is unsafe or unusable (backing file, data file, corrupt, too large, checksum)."""

    exit_code = 3


class HandshakeError(PodvmError):
    """The network handshake between the sidecar and the runner is missing or unusable."""

    exit_code = 4


class ChildFailed(PodvmError):
    """A supervised child process exited when it should not have."""

    exit_code = 5


class StoppedHard(PodvmError):
    """The guest did not power off within the shutdown timeout and was stopped without its consent."""

    exit_code = 6


class BaseMismatch(PodvmError):
    """The base image a pet is bound to is missing from the cache or is no longer the bytes the pet was made on.

    Booting would show the guest a disk it never wrote (its file systems would corrupt), so the VM is not started.
    Another image does not help: restore the pet's own base (or let the runner fetch it again), or move the pet
    explicitly with ``vmrunner rebase``.
    """

    exit_code = 7
