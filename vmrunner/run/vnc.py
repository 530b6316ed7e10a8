"""The VNC password: read from the Secret as a person writes it, checked against what VNC can use, handed to qemu.

VNC authentication (RFB security type 2) keys DES with the first 8 bytes of the password: qemu silently cuts a
longer one, and ``-object secret,file=...,format=raw`` would keep the newline that ``echo`` or an editor leaves at the
end of a Secret, so such a password never matches. The runner therefore reads the file itself, drops trailing line
ends, refuses what VNC cannot use, and gives qemu exactly the cleaned bytes through a pipe on qemu's standard input
(``file=/dev/stdin``): never in argv (every process in the pod reads ``/proc/PID/cmdline``), never in a file on a
volume, never in the log, and read by qemu once, before its VNC server listens, so there is no window without it.
"""

import logging
import os
from pathlib import Path

from shared.errors import ConfigError
from shared.secrets import read_secret

log = logging.getLogger("vmrunner.vnc")

MAX_LENGTH = 8  # RFB's VNC authentication uses one DES key: 8 bytes
SECRET_ID = "vncpass"  # noqa: S105 the name of qemu's secret object, not a password
SECRET_SOURCE = "/dev/stdin"  # noqa: S105 where qemu reads it: a pipe the runner fills
_READ_LIMIT = 4096  # a password file is tiny; a larger one (or /dev/zero) is not read to its end


def clean_password(raw: bytes, source: str) -> bytes:
    """The password in ``raw`` without its trailing line ends, as VNC will compare it.

    :raise ConfigError: naming ``source`` (never the password) when it is empty, longer than 8 bytes, or holds
        anything but printable ASCII.
    """
    password = raw.rstrip(b"\r\n")
    if not password:
        raise ConfigError(f"{source}: the VNC password is empty")
    if any(byte < 0x20 or byte > 0x7E for byte in password):
        raise ConfigError(f"{source}: the VNC password holds control or non-ASCII characters; use printable ASCII")
    if len(password) > MAX_LENGTH:
        raise ConfigError(
            f"{source}: the VNC password is {len(password)} characters long; VNC uses at most {MAX_LENGTH} "
            "and would silently ignore the rest: shorten it"
        )
    return password


def read_password(path: Path | None) -> bytes | None:
    """The cleaned password from ``VNC_PASSWORD_FILE``, or None when it is not set.

    :raise ConfigError: when the file cannot be read or holds no password VNC can use.
    """
    read = read_secret("VNC_PASSWORD_FILE", path, _READ_LIMIT, f"a password of at most {MAX_LENGTH}")
    return None if read is None else clean_password(*read)


def warn_if_open(vnc: bool, password_file: Path | None) -> None:
    """Say loudly that anyone who reaches TCP 5900 gets the VM's screen and keyboard, and how to close it."""
    if vnc and password_file is None:
        log.warning(
            "VNC on TCP 5900 has no password: anyone who reaches the pod on 5900 gets the VM's screen and keyboard; "
            "set VNC_PASSWORD_FILE to a Secret holding a password of at most %d characters, or NO_VNC=true "
            "in both containers",
            MAX_LENGTH,
        )


def password_pipe(password: bytes) -> int:
    """The read end of a pipe that holds ``password`` and then EOF: qemu's standard input for the secret object."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, password)  # at most 8 bytes: far below a pipe's buffer, so this never blocks
    finally:
        os.close(write_end)
    return read_end
