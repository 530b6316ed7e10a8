"""The one place where podvm's errors become log lines and exit statuses."""

import logging
import sys
from collections.abc import Callable

from shared.errors import PodvmError


def run_main(logger: logging.Logger, command: Callable[[], int]) -> None:
    """Run ``command`` and exit with its status; a PodvmError becomes one log line and its exit status."""
    try:
        status = command()
    except PodvmError as err:
        logger.error("%s", err)
        status = err.exit_code
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
