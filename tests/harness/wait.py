"""The one wait helper: poll a condition until it holds or a deadline passes."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Call ``check`` until it returns something true and return that; past ``timeout`` seconds fail naming
    ``what``. A ``check`` that knows waiting is pointless (its process died) raises its own error."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
