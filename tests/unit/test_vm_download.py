"""The download's pure decisions: what a server's answer means for the partial file, and what a log may show."""

import hashlib
from pathlib import Path

import pytest

from shared.errors import ConfigError, ImageRejected
from vmrunner.config import load, redact
from vmrunner.images.download import Entity, NotTheSameFile, Part, WriteFailed, entity_of, judge_answer

FILE = Entity(length=1000, etag='"abc"', last_modified="Tue, 14 Nov 2023 22:13:20 GMT")
BY_DATE = Entity(length=1000, etag=None, last_modified="Tue, 14 Nov 2023 22:13:20 GMT")
RESUMED = {"Content-Range": "bytes 400-999/1000", "Content-Length": "600", "ETag": '"abc"'}


def test_a_whole_file_answer_describes_a_new_entity() -> None:
    headers = {"Content-Length": "1000", "ETag": ' "abc" ', "Last-Modified": FILE.last_modified or ""}
    assert judge_answer(None, 0, 200, headers) == FILE
    assert judge_answer(FILE, 400, 200, headers) == FILE, "a 200 to a resume starts over"
    assert FILE.resumable and FILE.validator == '"abc"'


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"ETag": 'W/"abc"', "Content-Length": "10"}, Entity(10, None, None)),
        ({"ETag": 'W/"abc"', "Last-Modified": "x"}, Entity(None, None, "x")),
        ({"Content-Length": "1e3"}, Entity(None, None, None)),
        ({"Content-Length": "\u0661\u0662"}, Entity(None, None, None)),  # Arabic-Indic digits: int() would take them
        ({"Content-Length": "-5"}, Entity(None, None, None)),
        ({}, Entity(None, None, None)),
    ],
)
def test_weak_etags_and_odd_lengths_prove_nothing(headers: dict[str, str], expected: Entity) -> None:
    assert entity_of(headers) == expected


def test_only_a_known_length_with_a_validator_is_resumable() -> None:
    assert BY_DATE.resumable and BY_DATE.validator == BY_DATE.last_modified
    assert not Entity(None, '"abc"', None).resumable
    assert not Entity(1000, None, None).resumable


def test_the_rest_of_the_same_file_continues_it() -> None:
    assert judge_answer(FILE, 400, 206, RESUMED) is None
    assert judge_answer(FILE, 400, 206, {"Content-Range": "bytes 400-999/1000", "ETag": '"abc"'}) is None
    assert judge_answer(BY_DATE, 400, 206, {"Content-Range": "bytes 400-999/1000"}) is None
    assert judge_answer(BY_DATE, 400, 206, {**RESUMED, "Last-Modified": BY_DATE.last_modified or ""}) is None


@pytest.mark.parametrize(
    ("part", "offset", "headers", "why"),
    [
        (None, 0, RESUMED, "to a request for the whole file"),
        (FILE, 0, RESUMED, "to a request for the whole file"),
        (Entity(None, '"abc"', None), 400, RESUMED, "to a request for the whole file"),
        (FILE, 400, {**RESUMED, "Content-Range": ""}, "without a Content-Range"),
        (FILE, 400, {**RESUMED, "Content-Range": "bytes 400-999/*"}, "without a Content-Range"),
        (FILE, 400, {**RESUMED, "Content-Range": "bytes 0-999/1000"}, r"bytes 0-999/1000, asked bytes 400-999/1000"),
        (FILE, 400, {**RESUMED, "Content-Range": "bytes 400-499/1000"}, "not the same file"),
        (FILE, 400, {**RESUMED, "Content-Range": "bytes 400-1999/2000"}, "not the same file"),
        (FILE, 400, {**RESUMED, "Content-Length": "700"}, "Content-Length other than the 600 bytes"),
        (FILE, 400, {**RESUMED, "ETag": '"def"'}, "another ETag"),
        (FILE, 400, {**RESUMED, "ETag": 'W/"abc"'}, "another ETag"),
        (FILE, 400, {k: v for k, v in RESUMED.items() if k != "ETag"}, "another ETag"),
        (BY_DATE, 400, {**RESUMED, "Last-Modified": "Wed, 15 Nov 2023 00:00:00 GMT"}, "another Last-Modified"),
    ],
)
def test_anything_else_is_not_the_same_file(
    part: Entity | None, offset: int, headers: dict[str, str], why: str
) -> None:
    with pytest.raises(NotTheSameFile, match=why):
        judge_answer(part, offset, 206, headers)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://example.org/images/debian-12.qcow2", "https://example.org/images/debian-12.qcow2"),
        ("https://alice:s3cret@example.org/d.qcow2", "https://example.org/d.qcow2"),
        ("https://tok@example.org/d.qcow2", "https://example.org/d.qcow2"),
        ("https://user:pw@h.example:8443/x.qcow2?token=s3cret#f", "https://h.example:8443/x.qcow2"),
        ("http://[::1]:80/x", "http://[::1]:80/x"),
        ("https://a:p@ss/w?rd@example.org/d.qcow2", "https://example.org/d.qcow2"),  # unescaped '/', '?' or '@'
        ("https://s3.example.org/d.qcow2?X-Amz-Signature=abc&X-Amz-Credential=k", "https://s3.example.org/d.qcow2"),
        ("https://example.org/d.qcow2#frag", "https://example.org/d.qcow2"),
        ("https://a:b@h/d?e=x@y", "https://y"),  # an '@' in the query: more is masked, never less
        ("http://u:p@h:99999/x?t=1", "http://h:99999/x"),  # no valid port: split as text, still redacted
        (
            "Max retries exceeded with url: /d.qcow2?token=abc (Caused by NewConnectionError('refused'))",
            "Max retries exceeded with url: /d.qcow2?*** (Caused by NewConnectionError('refused'))",
        ),
        ("'https://u:p@h/x?t=1', 'https://v:q@h/y?s=2'", "'https://***@h/x?***', 'https://***@h/y?***'"),
        ("/srv/images/debian-12.qcow2", "/srv/images/debian-12.qcow2"),
    ],
)
def test_redact_masks_credentials_and_queries(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_a_url_without_a_host_is_refused_without_its_credentials() -> None:
    with pytest.raises(ConfigError, match=r"^IMG_SOURCE='http:///x.qcow2': the URL has no host$"):
        load({"IMG_SOURCE": "http://alice:s3cret@/x.qcow2?token=abc", "HOSTNAME": "vm-0"})


def test_a_write_error_wins_over_the_error_leaving_the_block() -> None:
    """The disk filled while the connection dropped: the download stops as a disk fault, it is not retried."""
    with open("/dev/full", "wb", buffering=0) as full:
        part = Part(full, ["sha256"])
        with pytest.raises(WriteFailed, match="No space left on device"), part.appending(1 << 20, "") as append:
            append(b"x" * 4096)
            raise ConnectionError("dropped")


def test_appending_past_the_limit_is_refused_before_the_chunk_is_taken(tmp_path: Path) -> None:
    with open(tmp_path / "part", "wb") as out:
        part = Part(out, ["sha256"])
        with pytest.raises(ImageRejected, match=r"^too large$"), part.appending(10, "too large") as append:
            append(b"x" * 6)
            append(b"x" * 5)
        assert part.finish() == {"sha256": hashlib.sha256(b"x" * 6).hexdigest()}
        assert part.size == 6
    assert (tmp_path / "part").read_bytes() == b"x" * 6
