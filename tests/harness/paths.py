"""Where things are: the repository, the project's installed commands, the components' entry points."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VMRUNNER = [sys.executable, "-c", "from vmrunner.cli import main; main()"]
NETSIDECAR = [sys.executable, "-c", "from netsidecar.cli import main; main()"]


def script(path: str) -> ModuleType:
    """A module of scripts/ (which is not a package) by its path under the repository, loaded once."""
    name = Path(path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
