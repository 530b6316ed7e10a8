"""Command line of netsidecar."""

import logging

from shared.cli import run_main
from shared.log import configure


def main() -> None:
    """Entry point of the `netsidecar` console script."""
    logger: logging.Logger = configure("netsidecar")
    run_main(logger, lambda: 0)
