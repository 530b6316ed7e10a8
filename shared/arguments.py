"""Sub-command arguments whose mistakes are bad input like any other (apart from ``shared.cli``, so a command
that takes no arguments, such as `netsidecar run`, does not import argparse on its start)."""

import argparse
from collections.abc import Sequence
from typing import NoReturn

from shared.errors import ConfigError


class Arguments(argparse.ArgumentParser):
    """argparse for one sub-command, whose mistakes are one line and exit 2 like every bad input (a ConfigError
    naming the sub-command and its usage), never argparse's own usage dump and exit."""

    def __init__(self, command: str, usage: str) -> None:
        super().__init__(prog=command, usage=usage, add_help=False, allow_abbrev=False, exit_on_error=False)

    def error(self, message: str) -> NoReturn:
        """Every complaint of argparse's, as one line."""
        raise ConfigError(f"{self.prog}: {message} (expected {self.usage})")

    def parse(self, args: Sequence[str]) -> argparse.Namespace:
        """The parsed ``args``; anything left over is refused by name."""
        try:
            parsed, extra = self.parse_known_args(list(args))
        except argparse.ArgumentError as err:
            self.error(str(err))
        if extra:
            self.error(f"unexpected argument {extra[0]!r}")
        return parsed
