"""The one place where podvm's errors become log lines and exit statuses."""

import logging
import sys
from collections.abc import Callable

from shared.errors import PodvmError, escape_controls


def describe_os_error(err: OSError) -> str:
    """``FILE: reason`` (``FILE -> OTHER: reason`` for a rename or link) of an OSError, on one line."""
    where = "" if err.filename is None else str(err.filename)
    if err.filename2 is not None:
        where += f" -> {err.filename2}"
    reason = err.strerror or str(err) or type(err).__name__
    return escape_controls(f"{where}: {reason}" if where else reason)


def run_main(logger: logging.Logger, command: Callable[[], int]) -> None:
    """Run ``command`` and exit with its status, never with a traceback (see ``shared.errors``).

    A PodvmError becomes one log line and its exit status; an OSError nothing expected (a full disk, a refused
    permission, a file system without locks) one line naming the file, exit 1; anything else is a bug: one line,
    exit 1, the traceback only at LOG_LEVEL=DEBUG.
    """
    try:
        status = command()
    except PodvmError as err:
        logger.error("%s", err)
        status = err.exit_code
    except KeyboardInterrupt:
        status = 130
    except OSError as err:
        logger.debug("unexpected OSError", exc_info=True)
        logger.error("%s", describe_os_error(err))
        status = PodvmError.exit_code
    except Exception as err:
        logger.debug("internal error", exc_info=True)
        logger.error(
            "internal error (a bug in podvm; LOG_LEVEL=DEBUG shows where): %s: %s",
            type(err).__name__,
            escape_controls(str(err)),
        )
        status = PodvmError.exit_code
    sys.exit(status)
