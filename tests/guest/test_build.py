"""The guest builder's module ordering: dependencies named in each .ko's modinfo come first, once each."""

from pathlib import Path

import pytest

from tests.guest.build import module_order


def _modules(tmp_path: Path, depends: dict[str, str]) -> dict[str, Path]:
    index = {}
    for name, deps in depends.items():
        path = tmp_path / f"{name}.ko"
        path.write_bytes(b"\x7fELF...license=GPL\x00depends=" + deps.encode() + b"\x00vermagic=6.1\x00")
        index[name] = path
    return index


def test_dependencies_are_loaded_first_and_once(tmp_path: Path) -> None:
    index = _modules(tmp_path, {"a": "", "b": "a", "c": "a,b", "d": ""})
    assert module_order(index, ("c", "d", "b")) == ["a", "b", "c", "d"]


def test_a_missing_module_is_named(tmp_path: Path) -> None:
    index = _modules(tmp_path, {"sr_mod": "cdrom"})
    with pytest.raises(RuntimeError, match="cdrom"):
        module_order(index, ("sr_mod",))
