"""The one reader of podvm's versioned JSON documents: the handshake, the sidecar's figures, a backup's manifest.

Each is read from a file another party can write (the runner, a guest that escaped qemu, a neighbour on the backup
volume), so the reader is strict and bounded in what it accepts: the bytes must be JSON (nesting past the stack
and numbers past ``int()``'s limit are refused, not crashed on), the top must be an object, and its ``version``
must be one the caller speaks. What each document holds beyond that is its own module's business.
"""

import json
from collections.abc import Callable
from typing import Any


class DocumentError(ValueError):
    """A document is not JSON, not an object, or of a version this side does not speak; the message says which."""


def parse(data: bytes, version_problem: Callable[[object], str | None]) -> dict[str, Any]:
    """The JSON object in ``data``, once ``version_problem`` (given its ``version`` field) has found nothing wrong.

    :raise DocumentError: naming what is wrong: not JSON (with the line), not an object, or what
        ``version_problem`` says of the version.
    """
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as err:
        raise DocumentError(f"not JSON at line {err.lineno}: {err.msg}") from None
    except (ValueError, RecursionError) as err:  # not UTF-8, a number past int()'s limit, nesting past the stack
        raise DocumentError(f"not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise DocumentError("expected a JSON object")
    problem = version_problem(doc.get("version"))
    if problem is not None:
        raise DocumentError(problem)
    return doc


def exactly(version: object, expected: str) -> Callable[[object], str | None]:
    """A version check that accepts only ``version``; otherwise it says ``expected a version V <expected>``."""
    return lambda found: (
        None if found == version and type(found) is type(version) else f"expected a version {version} {expected}"
    )
