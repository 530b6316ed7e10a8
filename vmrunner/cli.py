"""Command line of vmrunner."""

import logging

from shared.cli import run_main
from shared.log import configure


def main() -> None:
    """Entry point of the `vmrunner` console script."""
    logger: logging.Logger = configure("vmrunner")
    run_main(logger, lambda: 0)
