"""Foreign disks fetched over HTTP through the real runner (``vmrunner fetch``) with the real qemu-img: the tiny guest
as vmdk (monolithicSparse, streamOptimized), vhdx, vdi, vpc and an OVA holding the vmdk, each converted once into a
qcow2 base holding what the guest sees; and hostile inputs, each refused in one line with nothing cached. No guest
boots here (tests/e2e/test_vm_formats.py boots one)."""

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.guest.build import ensure_guest
from tests.harness import foreign
from tests.harness.httpserver import Server
from tests.harness.paths import VMRUNNER
from tests.harness.pod import runner_env
from vmrunner.config import load
from vmrunner.images.gc import collect
from vmrunner.images.layout import Layout
from vmrunner.images.names import conversion_key, read_name

FORMATS = [*foreign.KINDS, "ova"]


def sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny guest (qcow2) and the same disk in every foreign format, an OVA holding the stream-optimized vmdk."""
    work = tmp_path_factory.mktemp("foreign")
    found = {"guest": ensure_guest()}
    for kind in foreign.KINDS:
        found[kind] = foreign.convert(found["guest"], kind, work / f"guest.{kind}")
    found["ova"] = foreign.ova_of(found["vmdk-stream"], work / "guest.ova")
    return found


def fmt_of(kind: str) -> str:
    return "ova" if kind == "ova" else foreign.KINDS[kind][0]


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def fetch(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMRUNNER, "fetch"], env=env, capture_output=True, text=True, check=False)


def cache_files(root: Path) -> list[str]:
    image = root / "image"
    return sorted(str(p.relative_to(image)) for p in image.rglob("*") if p.is_file() and p.parent.name != "locks")


def the_error(done: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def same_guest_view(base: Path, fmt: str, other: Path) -> bool:
    """qemu-img compare: every byte the guest would read is the same (the format of each named, never probed)."""
    done = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", fmt, str(base), str(other)], check=False)
    return done.returncode == 0


@pytest.mark.parametrize("kind", FORMATS)
def test_a_foreign_disk_is_converted_once_into_a_qcow2_base_the_guest_sees_as_the_original(
    kind: str, sources: dict[str, Path], served: Server, shared_dir: Path
) -> None:
    source = sources[kind]
    served.served.files["/disk"] = source.read_bytes()
    source_hex = sha(source)
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/disk"), IMG_FORMAT=fmt_of(kind),
                     IMG_CHECKSUM=f"sha256:{source_hex}")  # fmt: skip
    done = fetch(env)
    assert done.returncode == 0, done.stderr
    assert "converting " in done.stderr and "converted " in done.stderr
    layout, name = Layout(shared_dir / "image"), load(env).img_name
    key = conversion_key(fmt_of(kind), source_hex)
    record, by_source = read_name(layout, name), read_name(layout, key)
    assert record is not None and by_source is not None and record.digest == by_source.digest
    assert record.converted == {"from": fmt_of(kind), "sha256": source_hex}
    base = layout.base(record.hex)
    assert sha(base) == record.hex and base.stat().st_mode & 0o777 == 0o444
    assert cache_files(shared_dir) == sorted([f"names/{key}", f"names/{name}", f"sha256/{record.hex}"])
    info = json.loads(qemu_img("info", "-f", "qcow2", "--output=json", str(base)))
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert same_guest_view(base, "qcow2", sources["guest"]), "the base holds what the guest saw on the original"
    disk, disk_fmt = (sources["vmdk-stream"], "vmdk") if kind == "ova" else (source, fmt_of(kind))
    assert same_guest_view(base, disk_fmt, disk)
    assert len(served.served.requests) == 1
    again = fetch(env)
    assert again.returncode == 0 and "converting" not in again.stderr and len(served.served.requests) == 1, (
        "a second fetch of the same name asks nobody and converts nothing"
    )
    unchecked = {k: v for k, v in env.items() if k != "IMG_CHECKSUM"}  # with it, the cache's map answers at once
    elsewhere = fetch({**unchecked, "IMG_TARGET": "mirror"})
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "was converted before" in elsewhere.stderr and "converting" not in elsewhere.stderr
    assert len(served.served.requests) == 2, "another name fetches the bytes, and finds their conversion"
    mirror = read_name(layout, "mirror")
    assert mirror is not None and mirror.digest == record.digest


def test_the_sources_checksum_is_checked_and_a_wrong_one_caches_nothing(
    sources: dict[str, Path], served: Server, shared_dir: Path
) -> None:
    served.served.files["/disk.vmdk"] = sources["vmdk-sparse"].read_bytes()
    base_hex = "0" * 64
    url = served.url("/disk.vmdk")
    env = runner_env(shared_dir, IMG_SOURCE=url, IMG_FORMAT="vmdk", IMG_CHECKSUM=f"sha256:{base_hex}")
    done = fetch(env)
    assert done.returncode == 3 and "IMG_CHECKSUM: " in the_error(done) and "nothing was cached" in the_error(done)
    assert cache_files(shared_dir) == []
    known = fetch({**env, "IMG_CHECKSUM": f"sha256:{sha(sources['vmdk-sparse'])}"})
    assert known.returncode == 0, known.stderr
    requests = len(served.served.requests)
    other_name = fetch({**env, "IMG_CHECKSUM": f"sha256:{sha(sources['vmdk-sparse'])}", "IMG_TARGET": "again"})
    assert other_name.returncode == 0 and len(served.served.requests) == requests, (
        "with the source's sha256 known to the cache, another name needs no download and no conversion"
    )
    assert "already cached: not fetched" in other_name.stderr and "converting" not in other_name.stderr


def corrupt(path: Path, out: Path, offsets: list[int]) -> Path:
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset : offset + 16] = b"\xa5" * 16
    out.write_bytes(bytes(data))
    return out


def hostile(kind: str, sources: dict[str, Path], work: Path) -> tuple[str, bytes]:
    """One hostile input: (IMG_FORMAT, bytes)."""
    sparse = sources["vmdk-sparse"]
    shadow = 'version=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicSparse"\nRW 2 FLAT "/etc/shadow" 0\n'
    disk = sources["vmdk-stream"].read_bytes()
    good_ovf = foreign.ovf([("vmdisk1", "disk1.vmdk", len(disk))])
    link = tarfile.TarInfo("disk1.vmdk")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    made: dict[str, tuple[str, Path]] = {
        "descriptor file naming /etc/shadow": ("vmdk", work / "shadow.vmdk"),
        "sparse vmdk whose descriptor names /etc/shadow": ("vmdk", work / "sparse-shadow.vmdk"),
        "sparse vmdk of capacity 0 naming ../other.vmdk": ("vmdk", work / "relative.vmdk"),
        "multi-extent vmdk": ("vmdk", work / "multi.vmdk"),
        "vhdx with a corrupt header": ("vhdx", work / "bad.vhdx"),
        "vdi with a corrupt header": ("vdi", work / "bad.vdi"),
        "ova with a symlink member": ("ova", work / "link.ova"),
        "ova with a ../ member": ("ova", work / "dotdot.ova"),
        "ova member larger than announced": ("ova", work / "larger.ova"),
        "ova naming a file not in the archive": ("ova", work / "missing.ova"),
        "ova truncated in its disk": ("ova", work / "truncated.ova"),
    }
    fmt, out = made[kind]
    if kind == "descriptor file naming /etc/shadow":
        out.write_text("# Disk DescriptorFile\n" + shadow)
    elif kind == "sparse vmdk whose descriptor names /etc/shadow":
        foreign.with_descriptor(sparse, "# Disk DescriptorFile\n" + shadow, out)
    elif kind == "sparse vmdk of capacity 0 naming ../other.vmdk":
        text = 'createType="monolithicSparse"\nRW 32768 SPARSE "../other.vmdk"\n'
        foreign.with_descriptor(sparse, text, out, capacity_zero=True)
    elif kind == "multi-extent vmdk":
        text = 'createType="monolithicSparse"\nRW 16384 SPARSE "guest.vmdk"\nRW 16384 SPARSE "guest-s002.vmdk"\n'
        foreign.with_descriptor(sparse, text, out)
    elif kind == "vhdx with a corrupt header":
        corrupt(sources["vhdx"], out, [64 << 10, 128 << 10])  # both headers
    elif kind == "vdi with a corrupt header":
        corrupt(sources["vdi"], out, [0x40])  # the signature
    elif kind == "ova with a symlink member":
        foreign.ova(out, [("vm.ovf", good_ovf), link])
    elif kind == "ova with a ../ member":
        foreign.ova(out, [("vm.ovf", foreign.ovf([("vmdisk1", "../disk1.vmdk", None)])), ("../disk1.vmdk", disk)])
    elif kind == "ova member larger than announced":
        foreign.ova(out, [("vm.ovf", foreign.ovf([("vmdisk1", "disk1.vmdk", len(disk) - 512)])), ("disk1.vmdk", disk)])
    elif kind == "ova naming a file not in the archive":
        two = foreign.ovf([("vmdisk1", "disk1.vmdk", None), ("vmdisk2", "disk2.vmdk", None)])
        foreign.ova(out, [("vm.ovf", two), ("disk1.vmdk", disk)])
    else:
        foreign.ova_of(sources["vmdk-stream"], out)
        out.write_bytes(out.read_bytes()[: 2048 + len(disk) // 2])
    return fmt, out.read_bytes()


HOSTILE = {
    "descriptor file naming /etc/shadow": "a descriptor file (its data is in other files)",
    "sparse vmdk whose descriptor names /etc/shadow": "extent FLAT '/etc/shadow' is not the sparse file itself",
    "sparse vmdk of capacity 0 naming ../other.vmdk": "capacity 0",
    "multi-extent vmdk": "names 2 extents ('guest.vmdk', 'guest-s002.vmdk'), not one",
    "vhdx with a corrupt header": "qemu-img info -f vhdx failed (vetting)",
    "vdi with a corrupt header": "qemu-img info -f vdi failed (vetting)",
    "ova with a symlink member": "OVA member 'disk1.vmdk' is a link",
    "ova with a ../ member": "OVA member '../disk1.vmdk' is not a plain file name at the top",
    "ova member larger than announced": "OVA member 'disk1.vmdk' holds",
    "ova naming a file not in the archive": "OVF names 'disk2.vmdk', which is not in the archive",
    "ova truncated in its disk": "not a readable OVA (tar) archive: unexpected end of data",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_foreign_disk_is_refused_in_one_line_with_nothing_cached(
    kind: str, sources: dict[str, Path], served: Server, shared_dir: Path, tmp_path: Path
) -> None:
    fmt, data = hostile(kind, sources, tmp_path)
    served.served.files["/evil.img"] = data
    url = served.url("/evil.img")
    done = fetch(runner_env(shared_dir, IMG_SOURCE=url, IMG_FORMAT=fmt))
    assert done.returncode == 3, done.stderr
    line = the_error(done)
    assert f"ERROR vmrunner: {url}: " in line and HOSTILE[kind] in line, line
    assert cache_files(shared_dir) == [], "nothing is left in the cache"
    assert "/etc/shadow" not in {p.name for p in (shared_dir / "image").rglob("*")}


def test_gc_removes_a_converted_base_with_both_its_names(
    sources: dict[str, Path], served: Server, shared_dir: Path
) -> None:
    served.served.files["/disk.vdi"] = sources["vdi"].read_bytes()
    assert fetch(runner_env(shared_dir, IMG_SOURCE=served.url("/disk.vdi"), IMG_FORMAT="vdi")).returncode == 0
    assert len(cache_files(shared_dir)) == 3
    report = collect(shared_dir / "image", 0.0, dry_run=False)
    assert len(report.removed_digests()) == 1 and cache_files(shared_dir) == []
