"""Secrets read from files (a Kubernetes Secret mounted in the container) as a person writes them.

One reader for every secret podvm takes (the VNC password, the console's token): the read is bounded, so a
mistaken path such as ``/dev/zero`` costs nothing, and the trailing line ends that ``echo`` or an editor leaves are
dropped. What a secret may hold is its user's business; every message names the variable and the file, never the
secret. ``runners/qemu-runner.sh`` applies the same rules.
"""

from pathlib import Path

from shared.errors import ConfigError


def read_secret(variable: str, path: Path | None, limit: int, expected: str) -> tuple[bytes, str] | None:
    """The secret in ``path`` without trailing line ends, with the ``VARIABLE=path`` text that names it in errors;
    None when the variable is not set.

    :raise ConfigError: when the file cannot be read, or holds more than ``limit`` bytes (``expected`` says what
        it should hold).
    """
    if path is None:
        return None
    source = f"{variable}={path}"
    try:
        with path.open("rb") as secret:
            raw = secret.read(limit + 1)
    except OSError as err:
        raise ConfigError(f"{source}: cannot read: {err.strerror}") from None
    if len(raw) > limit:
        raise ConfigError(f"{source}: expected {expected}, not a file larger than {limit} bytes")
    return raw.rstrip(b"\r\n"), source
