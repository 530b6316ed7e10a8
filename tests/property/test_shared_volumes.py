"""Every file kind a neighbour can plant, at every shared path podvm opens (the table in docs/security.md): the reader
finishes within a second and says "missing or forged" or one line, never hangs and never fails with an internal
error."""

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from hypothesis import given
from hypothesis import strategies as st

from shared import handshake
from shared.errors import PodvmError
from vmrunner.backups import plans
from vmrunner.images.layout import Layout, locked
from vmrunner.images.names import read_name
from vmrunner.images.refs import references

HEX = "ab" * 32
CHAIN = "20261206T130000Z"


def _plant(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "link":
        path.symlink_to("/etc/hostname")
    elif kind == "folder":
        path.mkdir()
    elif kind == "huge":
        with path.open("wb") as out:
            out.truncate(1 << 30)
    elif kind == "garbage":
        path.write_bytes(b"\x00{\xff\n" * 64)


def _lock(root: Path) -> None:
    with locked(Layout(root / "image").lock(HEX)):
        pass


# path under the scratch root -> the reader that opens it
READERS: dict[str, Callable[[Path], object]] = {
    "image/names/debian": lambda root: read_name(Layout(root / "image"), "debian"),
    f"image/refs/{HEX}/vm-0.0123456789abcdef": lambda root: references(Layout(root / "image"), HEX),
    f"image/refs/{HEX}": lambda root: references(Layout(root / "image"), HEX),
    f"image/locks/{HEX}.lock": _lock,
    "image/locks": _lock,
    "backup/vm-0": lambda root: (
        plans.read_chains(root / "backup" / "vm-0"),
        plans.read_last(root / "backup" / "vm-0"),
    ),
    "backup/vm-0/last.json": lambda root: plans.read_last(root / "backup" / "vm-0"),
    f"backup/vm-0/{CHAIN}": lambda root: plans.read_chains(root / "backup" / "vm-0"),
    f"backup/vm-0/{CHAIN}/manifest.json": lambda root: plans.read_chains(root / "backup" / "vm-0"),
    "run/network.json": lambda root: handshake.read(root / "run" / "network.json"),
}
KINDS = ("fifo", "zero", "link", "folder", "huge", "garbage")


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise TimeoutError("the reader hung on a planted file")


@st.composite
def plantings(draw: st.DrawFn) -> list[tuple[str, str]]:
    return draw(st.lists(st.tuples(st.sampled_from(sorted(READERS)), st.sampled_from(KINDS)), min_size=1, max_size=3))


def _scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="podvm-volumes-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@given(plantings(), st.sampled_from(sorted(READERS)))
def test_every_file_kind_at_every_shared_path_is_missing_or_forged_never_a_hang(
    planted: list[tuple[str, str]], reader: str
) -> None:
    for root in _scratch():
        for sub in ("image/names", "image/locks", f"image/refs/{HEX}", "backup", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for where, kind in planted:
            path = root / where
            inside = path.parent.is_dir() and not path.parent.is_symlink()
            if inside and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()  # a folder made above: the neighbour puts its file there instead
            if inside and not path.exists() and not path.is_symlink():
                _plant(kind, path)
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(2)
        try:
            READERS[reader](root)
        except PodvmError as err:
            assert "\n" not in str(err)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
