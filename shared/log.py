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


def configure(component: str) -> logging.Logger:
    """Send the component's log lines to stderr at ``LOG_LEVEL`` (default INFO) and return its logger."""
    level_name = os.environ.get("LOG_LEVEL", "INFO").upper()
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        level = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(_FORMAT, _DATE)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(component)
