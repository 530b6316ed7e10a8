"""Generated hostile foreign disks at the pure judges: a vmdk's header and descriptor, an OVF document, an OVA
archive. Each either passes or is refused in one line (ImageRejected); nothing else escapes."""

import io
import struct
import tarfile

from hypothesis import example, given
from hypothesis import strategies as st

from tests.harness.strategies import one_line_or_nothing
from vmrunner.images import ova, vmdk

LINES = st.sampled_from(
    [
        'createType="monolithicSparse"',
        'createType="streamOptimized"',
        'createType="monolithicFlat"',
        'RW 32768 SPARSE "disk.vmdk"',
        'RW 32768 SPARSE "/etc/shadow"',
        'RW 32768 FLAT "../disk-flat.vmdk" 0',
        "RW 1 ZERO",
        "parentCID=ffffffff",
        "parentCID=1",
        'parentFileNameHint="x"',
        "# comment",
    ]
)


@given(st.lists(st.one_of(LINES, st.text(max_size=40)), max_size=8))
def test_a_descriptor_passes_only_as_one_sparse_extent_of_its_own(lines: list[str]) -> None:
    def judge() -> None:
        desc = vmdk.parse_descriptor("\n".join(lines))
        vmdk.judge_descriptor(desc, "img")
        assert len(desc.extents) == 1 and desc.extents[0].kind == "SPARSE" and not desc.parent
        assert desc.extents[0].file is not None and "/" not in desc.extents[0].file

    one_line_or_nothing(judge)


@given(st.binary(max_size=64), st.integers(0, 1 << 64 - 1), st.integers(0, 1 << 64 - 1), st.binary(max_size=600))
def test_a_sparse_header_never_escapes_but_as_a_refusal(tail: bytes, offset: int, size: int, rest: bytes) -> None:
    head = vmdk.SPARSE_MAGIC + struct.pack("<IIQQQQ", 1, 3, 1, 128, offset, size) + tail
    one_line_or_nothing(lambda: vmdk.embedded_descriptor(head, lambda o, n: rest[o : o + n], "img"))


@given(st.binary(max_size=400))
@example(b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/shadow">]><Envelope>&e;</Envelope>')
def test_any_ovf_document_is_parsed_or_refused_in_one_line(document: bytes) -> None:
    one_line_or_nothing(lambda: ova.parse_ovf(document, "vm.ova"))


@given(st.binary(max_size=3000), st.integers(0, 2048))
def test_any_archive_is_read_or_refused_in_one_line(noise: bytes, cut: int) -> None:
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tar:
        info = tarfile.TarInfo("vm.ovf")
        info.size = len(noise)
        tar.addfile(info, io.BytesIO(noise))
    data = good.getvalue()
    one_line_or_nothing(lambda: ova.extract_disk(io.BytesIO(data[:cut] + noise), io.BytesIO(), None, 1 << 20, "x"))
