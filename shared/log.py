"""Logging set up for ``kubectl logs``: one readable line per event, on stderr.

Kubernetes adds its own timestamps on request (``kubectl logs --timestamps``); ours are short and in UTC so the
two containers' logs can be read side by side.
"""

import logging
import os
import sys
import time

_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)-5s %(name)s: %(message)s"
_DATE = "%Y-%m-%dT%H:%M:%S"
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


def configure(component: str) -> logging.Logger:
    """Send the component's log lines to stderr at ``LOG_LEVEL`` (default INFO) and return its logger."""
    level_name = os.environ.get("LOG_LEVEL", "INFO").upper()
    level = LEVELS.get(level_name)
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(_FORMAT, _DATE)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if level is None else level)
    logger = logging.getLogger(component)
    if level is None:  # a typo must not silently hide the DEBUG lines someone asked for
        logger.warning("LOG_LEVEL=%r: expected one of %s; logging at INFO", level_name, ", ".join(LEVELS))
    return logger
