"""Where things are: the repository, the project's installed commands, the components' entry points."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VMRUNNER = [sys.executable, "-c", "from vmrunner.cli import main; main()"]
NETSIDECAR = [sys.executable, "-c", "from netsidecar.cli import main; main()"]
