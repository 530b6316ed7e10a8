"""Fetching into the shared cache against a real HTTP server on loopback, and vetting crafted images."""

import dataclasses
import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import ConfigError, ImageRejected, PodvmError
from tests.harness import samples
from tests.harness.httpserver import Server
from tests.harness.paths import VMRUNNER
from tests.harness.pod import runner_env
from tests.harness.portforward import free_port
from tests.harness.wait import until
from vmrunner.config import Config, load
from vmrunner.images.download import FETCH, ImageFigures, fetch_into
from vmrunner.images.layout import Layout
from vmrunner.images.names import read_name
from vmrunner.images.store import Writeback, ensure_image


def cache_names(root: Path) -> list[str]:
    """Every file in the cache but lock files: what a fetch leaves behind."""
    image = root / "image"
    return sorted(str(p.relative_to(image)) for p in image.rglob("*") if p.is_file() and p.parent.name != "locks")


def cached(cfg: Config) -> bytes:
    """The bytes the configured image's name points to."""
    layout = Layout(cfg.image_dir)
    record = read_name(layout, cfg.img_name)
    assert record is not None
    return layout.base(record.hex).read_bytes()


def ensure_base(cfg: Config) -> str:
    return ensure_image(cfg).hex


def fetch_growth(before: ImageFigures) -> tuple[int, int, int]:
    """Bytes received, retries and resumes the metrics counted since ``before``."""
    return (FETCH.received - before.received, FETCH.retries - before.retries, FETCH.resumes - before.resumes)


def test_fetch_caches_a_read_only_vetted_image_by_digest_and_reuses_it(
    served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    served.served.files["/img/base.qcow2"] = qcow2_bytes
    digest = hashlib.sha512(qcow2_bytes).hexdigest()
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    url = served.url("/img/base.qcow2")
    cfg = load(runner_env(shared_dir, IMG_SOURCE=url, IMG_CHECKSUM=f"sha512:{digest}"))
    fresh = ensure_image(cfg)
    assert fresh.hex == sha and fresh.fresh is not None and fresh.fresh.virtual_size == 64 << 20
    assert cache_names(shared_dir) == [f"names/{cfg.img_name}", f"sha256/{sha}"]
    base = shared_dir / "image" / "sha256" / sha
    assert base.read_bytes() == qcow2_bytes
    assert base.stat().st_mode & 0o777 == 0o444
    record = read_name(Layout(cfg.image_dir), cfg.img_name)
    assert record is not None and record.source == url and record.checksums == {"sha512": digest}
    again = ensure_image(cfg)
    assert (again.hex, again.fresh) == (sha, None)
    assert len(served.served.requests) == 1, "a cached base is never fetched again"


def test_two_urls_with_one_file_name_never_share_a_name_and_same_bytes_share_a_base(
    served: Server, qcow2_bytes: bytes, other_qcow2_bytes: bytes, shared_dir: Path
) -> None:
    served.served.files["/v1/disk.qcow2"] = qcow2_bytes
    served.served.files["/v2/disk.qcow2"] = other_qcow2_bytes
    served.served.files["/mirror/disk.qcow2"] = qcow2_bytes
    v1 = ensure_base(load(runner_env(shared_dir, IMG_SOURCE=served.url("/v1/disk.qcow2"))))
    v2 = ensure_base(load(runner_env(shared_dir, IMG_SOURCE=served.url("/v2/disk.qcow2"))))
    mirror = ensure_base(load(runner_env(shared_dir, IMG_SOURCE=served.url("/mirror/disk.qcow2"))))
    assert v1 != v2 and mirror == v1
    assert len(list((shared_dir / "image" / "sha256").iterdir())) == 2
    assert len(list((shared_dir / "image" / "names").iterdir())) == 3


def test_a_known_sha256_already_cached_under_another_name_is_not_downloaded(
    served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    served.served.files["/a/disk.qcow2"] = qcow2_bytes
    served.served.files["/b/disk.qcow2"] = qcow2_bytes
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    ensure_base(load(runner_env(shared_dir, IMG_SOURCE=served.url("/a/disk.qcow2"))))
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/b/disk.qcow2"), IMG_CHECKSUM=f"sha256:{sha}"))
    assert ensure_base(cfg) == sha
    assert [request[0] for request in served.served.requests] == ["/a/disk.qcow2"]
    record = read_name(Layout(cfg.image_dir), cfg.img_name)
    assert record is not None and record.hex == sha


def test_a_forged_name_is_not_followed_when_a_checksum_is_set(
    served: Server, qcow2_bytes: bytes, other_qcow2_bytes: bytes, shared_dir: Path
) -> None:
    """A pod with the cache's uid points the name at an image it planted; IMG_CHECKSUM makes the runner fetch."""
    served.served.files["/evil.qcow2"] = other_qcow2_bytes
    served.served.files["/disk.qcow2"] = qcow2_bytes
    evil = ensure_base(load(runner_env(shared_dir, IMG_SOURCE=served.url("/evil.qcow2"), IMG_TARGET="debian")))
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2"), IMG_TARGET="debian")
    assert ensure_base(load(env)) == evil, "without a checksum the shared cache's name is trusted (see the README)"
    assert ensure_base(load({**env, "IMG_CHECKSUM": f"sha256:{sha}"})) == sha
    lock = shared_dir / "image" / "locks" / "name.planted.lock"
    lock.symlink_to(shared_dir / "vm" / "planted")
    with pytest.raises(PodvmError, match=r"^IMAGE_DIR: .*name\.planted\.lock is a symbolic link; refused$"):
        ensure_base(load(runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2"), IMG_TARGET="planted")))
    assert not (shared_dir / "vm" / "planted").exists()


def test_credentials_and_query_never_reach_the_shared_cache(
    served: Server, qcow2_bytes: bytes, shared_dir: Path
) -> None:
    served.served.files["/base.qcow2"] = qcow2_bytes
    served.served.query = "token=s3cret"
    url = served.url("/base.qcow2?token=s3cret").replace("http://", "http://user:pw0rd@")
    ensure_base(load(runner_env(shared_dir, IMG_SOURCE=url)))
    text = "".join(p.read_text(errors="replace") for p in (shared_dir / "image" / "names").iterdir())
    assert "s3cret" not in text and "pw0rd" not in text and "/base.qcow2" in text


def test_dropped_connection_resumes_with_range(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    served.served.files["/base.qcow2"] = qcow2_bytes
    served.served.drops = [65536]
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/base.qcow2"), IMG_CHECKSUM=f"sha256:{sha}"))
    before = dataclasses.replace(FETCH)
    ensure_base(cfg)
    assert cached(cfg) == qcow2_bytes
    assert fetch_growth(before) == (len(qcow2_bytes), 1, 1), "the metrics: every byte once, one retry, one resume"
    etag = served.served.validators(qcow2_bytes)["ETag"]
    assert served.served.requests == [("/base.qcow2", None, None), ("/base.qcow2", "bytes=65536-", etag)]


def test_server_without_range_support_starts_over(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    served.served.files["/base.qcow2"] = qcow2_bytes
    served.served.drops = [65536]
    served.served.ranges = False
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/base.qcow2"), IMG_CHECKSUM=f"sha256:{sha}"))
    before = dataclasses.replace(FETCH)
    ensure_base(cfg)
    assert cached(cfg) == qcow2_bytes
    assert fetch_growth(before) == (65536 + len(qcow2_bytes), 1, 0), "received twice over the first part, no resume"


def test_redirects_are_followed(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    served.served.files["/real/base.qcow2"] = qcow2_bytes
    served.served.redirects["/latest.qcow2"] = "/real/base.qcow2"
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/latest.qcow2")))
    ensure_base(cfg)
    assert cached(cfg) == qcow2_bytes


def test_checksum_mismatch_leaves_nothing_in_the_cache(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    served.served.files["/base.qcow2"] = qcow2_bytes
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/base.qcow2"), IMG_CHECKSUM="sha256:" + "0" * 64))
    with pytest.raises(ImageRejected, match=r"^IMG_CHECKSUM: http://.*/base.qcow2 has sha256:[0-9a-f]{64}, expected"):
        ensure_base(cfg)
    assert cache_names(shared_dir) == []


def test_a_new_checksum_fetches_again_and_never_touches_the_cached_base(
    served: Server, qcow2_bytes: bytes, other_qcow2_bytes: bytes, shared_dir: Path
) -> None:
    served.served.files["/base.qcow2"] = qcow2_bytes
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/base.qcow2"))
    old = ensure_base(load(env))
    before = (shared_dir / "image" / "sha256" / old).stat()
    with pytest.raises(ImageRejected, match=r"^IMG_CHECKSUM: .* expected sha512:a+; nothing was cached$"):
        ensure_base(load({**env, "IMG_CHECKSUM": "sha512:" + "a" * 128}))
    served.served.files["/base.qcow2"] = other_qcow2_bytes
    sha = hashlib.sha256(other_qcow2_bytes).hexdigest()
    assert ensure_base(load({**env, "IMG_CHECKSUM": f"sha256:{sha}"})) == sha, "the name now means the new bytes"
    after = (shared_dir / "image" / "sha256" / old).stat()
    assert (before.st_ino, before.st_ctime_ns) == (after.st_ino, after.st_ctime_ns)
    assert len(served.served.requests) == 3
    assert sorted(p.name for p in (shared_dir / "image" / "tmp").iterdir()) == []


def test_not_found_is_a_clear_error(served: Server, shared_dir: Path) -> None:
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/missing.qcow2")))
    with pytest.raises(PodvmError, match=r"^IMG_SOURCE=http://127.0.0.1:\d+/missing.qcow2: HTTP 404 Not Found$"):
        ensure_base(cfg)
    assert cache_names(shared_dir) == []


def test_refused_connection_is_retried_then_a_clear_error(shared_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = load(runner_env(shared_dir, IMG_SOURCE=f"http://127.0.0.1:{port}/x.qcow2", FETCH_RETRIES="1"))
    with pytest.raises(PodvmError, match=r"download failed after 2 attempts: ConnectionError: .*[Rr]efused"):
        ensure_base(cfg)
    assert cache_names(shared_dir) == []


def test_concurrent_fetchers_download_once(served: Server, qcow2_bytes: bytes, shared_dir: Path) -> None:
    served.served.files["/base.qcow2"] = qcow2_bytes
    served.served.delay = 1.0
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/base.qcow2"))
    procs = [subprocess.Popen([*VMRUNNER, "fetch"], env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        logs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    assert served.served.requests == [("/base.qcow2", None, None)]
    assert sum("waiting for it" in log for log in logs) >= 1
    assert cached(load(env)) == qcow2_bytes


def crafted(tmp_path: Path, *options: str) -> Path:
    path = tmp_path / "crafted.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "64M"], check=True)
    return path


def test_backing_file_image_is_refused_and_not_cached(tmp_path: Path, shared_dir: Path) -> None:
    image = crafted(tmp_path, "-b", "/etc/hostname", "-F", "raw")
    with pytest.raises(ImageRejected, match=r"has a backing file \('/etc/hostname'\); refused"):
        ensure_base(load(runner_env(shared_dir, IMG_SOURCE=str(image))))
    assert cache_names(shared_dir) == []


def test_external_data_file_image_is_refused_and_not_cached(tmp_path: Path, shared_dir: Path) -> None:
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(b"secret" * 1000)
    image = crafted(tmp_path, "-o", f"data_file={host_file}")
    with pytest.raises(ImageRejected, match="has an external data file"):
        ensure_base(load(runner_env(shared_dir, IMG_SOURCE=str(image))))
    assert cache_names(shared_dir) == []


def test_oversized_and_misformatted_images_are_refused(tmp_path: Path, qcow2_bytes: bytes, shared_dir: Path) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(qcow2_bytes)
    with pytest.raises(ImageRejected, match="exceeds IMG_MAX_SIZE"):
        ensure_base(load(runner_env(shared_dir, IMG_SOURCE=str(image), IMG_MAX_SIZE="32M")))
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 65536)
    with pytest.raises(ImageRejected, match="qemu-img info -f qcow2 failed"):
        ensure_base(load(runner_env(shared_dir, IMG_SOURCE=str(raw))))
    assert cache_names(shared_dir) == []


def test_missing_local_source_names_the_variable(shared_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^IMG_SOURCE=/nonexistent/x.qcow2: no such file$"):
        ensure_base(load(runner_env(shared_dir, IMG_SOURCE="/nonexistent/x.qcow2")))
    assert cache_names(shared_dir) == []


def test_fetch_command_exit_status_for_a_refused_image(tmp_path: Path, shared_dir: Path) -> None:
    image = crafted(tmp_path, "-b", "/etc/hostname", "-F", "raw")
    done = subprocess.run(
        [*VMRUNNER, "fetch"],
        env=runner_env(shared_dir, IMG_SOURCE=str(image)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 3
    assert done.stderr.strip().count("\n") == 1 and "has a backing file" in done.stderr


@pytest.mark.parametrize("command", ["fetch", "run"])
def test_sigterm_during_a_download_leaves_nothing(
    served: Server, qcow2_bytes: bytes, shared_dir: Path, command: str
) -> None:
    """``run`` too: the pod is deleted while its image downloads (after the handshake, with the metrics endpoint
    up); it ends at once as SIGTERM asks, with nothing in the cache."""
    served.served.files["/base.qcow2"] = qcow2_bytes
    served.served.delay = 3.0
    samples.handshake(metrics_port=free_port()).write(shared_dir / "run")
    env = runner_env(shared_dir, IMG_SOURCE=served.url("/base.qcow2"))
    proc = subprocess.Popen([*VMRUNNER, command], env=env, stderr=subprocess.PIPE, text=True)
    try:
        until("the download started", lambda: served.served.requests, 10, 0.02)  # its file may have no name
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 143, log
    assert cache_names(shared_dir) == []


# A hostile or merely odd image server. The bodies are raw images (vetting accepts any bytes), so every assertion is
# about the transfer: IMG_CHECKSUM is the digest of the bytes that must end up cached, so a fetch passes only when the
# digest computed while streaming matches the file it recorded, byte for byte.


@pytest.fixture
def body() -> bytes:
    return os.urandom((1 << 20) + 4321)


def raw_env(served: Server, root: Path, expected: bytes, path: str = "/disk.img", **extra: str) -> dict[str, str]:
    sha = hashlib.sha256(expected).hexdigest()
    return runner_env(root, IMG_SOURCE=served.url(path), IMG_FORMAT="raw", IMG_CHECKSUM=f"sha256:{sha}", **extra)


def runner(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``vmrunner fetch`` (or another command) as a process, for its exit status and exact log."""
    return subprocess.run([*VMRUNNER, *(args or ("fetch",))], env=env, capture_output=True, text=True, check=False)


def the_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one ERROR line of a failed run; no traceback, no second error."""
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


@pytest.mark.parametrize("validator", ["etag", "date"])
def test_resume_asks_the_server_to_prove_the_same_file(
    served: Server, body: bytes, shared_dir: Path, validator: str
) -> None:
    """A strong ETag, else Last-Modified, goes back in If-Range: the server sends the rest only of that file."""
    served.served.files["/disk.img"] = body
    served.served.validator = validator
    served.served.drops = [65536]
    cfg = load(raw_env(served, shared_dir, body))
    ensure_base(cfg)
    assert cached(cfg) == body
    (proof,) = served.served.validators(body).values()
    assert served.served.requests == [("/disk.img", None, None), ("/disk.img", "bytes=65536-", proof)]


@pytest.mark.parametrize("validator", ["weak", "none"])
def test_without_a_strong_validator_a_retry_starts_over(
    served: Server, body: bytes, shared_dir: Path, validator: str
) -> None:
    """A weak ETag or none at all proves nothing about the bytes: the retry fetches the whole file again."""
    served.served.files["/disk.img"] = body
    served.served.validator = validator
    served.served.drops = [65536]
    cfg = load(raw_env(served, shared_dir, body))
    ensure_base(cfg)
    assert cached(cfg) == body
    assert served.served.requests == [("/disk.img", None, None), ("/disk.img", None, None)]


@pytest.mark.parametrize(
    ("validator", "honour_if_range"),
    [("etag", True), ("etag", False), ("fixed", False)],
    ids=["honest-server", "ignores-if-range", "same-etag-other-size"],
)
def test_a_file_changed_between_tries_is_never_spliced(
    served: Server, body: bytes, shared_dir: Path, validator: str, honour_if_range: bool
) -> None:
    """The file behind the URL changes after the first try dropped: the cache gets the new file whole.

    An honest server answers the If-Range with the whole new file (200). A server that ignores If-Range answers 206
    with the new file's tail, under another ETag, or under the same ETag with another size: both are caught and the
    download starts over from byte 0.
    """
    new = os.urandom(len(body) + 4096)
    served.served.files["/disk.img"] = body
    served.served.then["/disk.img"] = new
    served.served.validator = validator
    served.served.honour_if_range = honour_if_range
    served.served.drops = [65536]
    cfg = load(raw_env(served, shared_dir, new))
    ensure_base(cfg)
    assert cached(cfg) == new
    ranges = [None, "bytes=65536-"] if honour_if_range else [None, "bytes=65536-", None]
    assert [r[1] for r in served.served.requests] == ranges


def test_a_body_longer_than_announced_is_cut_at_the_announced_length(
    served: Server, body: bytes, shared_dir: Path
) -> None:
    """Content-Length is the most the server gets to write: the extra bytes never reach the cache."""
    served.served.files["/disk.img"] = body
    served.served.length_delta = -1000
    cfg = load(raw_env(served, shared_dir, body[:-1000]))
    ensure_base(cfg)
    assert cached(cfg) == body[:-1000]


def test_a_body_shorter_than_announced_is_never_cached(served: Server, body: bytes, shared_dir: Path) -> None:
    """Every try ends early; resuming past the real end is refused (the size is not the announced one)."""
    served.served.files["/disk.img"] = body
    served.served.length_delta = 1000
    cfg = load(raw_env(served, shared_dir, body))
    with pytest.raises(PodvmError, match=r"^IMG_SOURCE=http://\S+/disk.img: download failed after 3 attempts: "):
        ensure_base(cfg)
    assert cache_names(shared_dir) == []
    assert [r[1] for r in served.served.requests] == [None, f"bytes={len(body)}-", None]


@pytest.mark.parametrize("endless", [True, False], ids=["endless-stream", "announced-too-large"])
def test_a_flood_stops_at_img_max_size_with_one_line(
    served: Server, body: bytes, shared_dir: Path, endless: bool
) -> None:
    """A body without a length stops at IMG_MAX_SIZE; an announced length over it is refused before any byte."""
    served.served.files["/disk.img"] = body
    served.served.forever = endless
    done = runner(raw_env(served, shared_dir, body, IMG_MAX_SIZE="1M"))
    assert done.returncode == 3, done.stderr
    assert "more than IMG_MAX_SIZE (1048576)" in the_error(done)
    assert cache_names(shared_dir) == []


@pytest.mark.parametrize(
    ("drops", "range_answers"),
    [([65536, 300000, 100000], [200, 206]), ([65536, 300000, 100000], [206, 200, 206])],
    ids=["200-then-206", "206-200-206"],
)
def test_mixed_200_and_206_answers_keep_the_digest_true(
    served: Server, body: bytes, shared_dir: Path, drops: list[int], range_answers: list[int]
) -> None:
    """Dropped tries answered now whole (200), now resumed (206): the file and its digest always start together."""
    served.served.files["/disk.img"] = body
    served.served.drops = drops
    served.served.range_answers = range_answers
    cfg = load(raw_env(served, shared_dir, body, FETCH_RETRIES="3"))
    ensure_base(cfg)
    assert cached(cfg) == body
    assert len(served.served.requests) == 4


def test_credentials_and_presigned_tokens_never_reach_the_log(served: Server, body: bytes, shared_dir: Path) -> None:
    """user:password@ and ?token= are needed by the server and are never shown, even with LOG_LEVEL=DEBUG."""
    served.served.files["/disk.img"] = body
    served.served.auth = "alice:PASSWORD"
    served.served.query = "token=SECRET"
    served.served.drops = [65536]
    secret_url = served.url("/disk.img?token=SECRET").replace("http://", "http://alice:PASSWORD@")
    env = {**raw_env(served, shared_dir, body), "IMG_SOURCE": secret_url, "LOG_LEVEL": "DEBUG"}
    fetched = runner(env)
    assert fetched.returncode == 0, fetched.stderr
    assert (shared_dir / "image" / "sha256" / hashlib.sha256(body).hexdigest()).read_bytes() == body
    # without IMG_CHECKSUM, so the cache cannot serve the next two from the digest it already holds
    env["IMG_CHECKSUM"] = ""
    missing = runner({**env, "IMG_SOURCE": secret_url.replace("disk.img", "gone.img")})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    refused_url = secret_url.replace(f":{served.httpd.server_address[1]}/", f":{closed_port}/")
    refused = runner({**env, "IMG_SOURCE": refused_url.replace("disk.img", "other.img"), "FETCH_RETRIES": "0"})
    planned = runner({**env, "IMG_SOURCE": refused_url}, "plan")
    assert [missing.returncode, refused.returncode, planned.returncode] == [1, 1, 0]
    assert "retry 1" in fetched.stderr and "HTTP 404" in missing.stderr and "refused" in refused.stderr
    for done, url in ((fetched, secret_url), (missing, secret_url), (refused, refused_url), (planned, refused_url)):
        shown = done.stdout + done.stderr
        assert "SECRET" not in shown and "PASSWORD" not in shown, shown
        assert url.replace("alice:PASSWORD@", "").split("?")[0].replace("disk.img", "") in shown, shown


def test_redirect_loop_is_one_line(served: Server, shared_dir: Path) -> None:
    served.served.redirects["/loop.img"] = "/loop.img"
    done = runner(runner_env(shared_dir, IMG_SOURCE=served.url("/loop.img")))
    assert done.returncode == 1
    assert the_error(done).endswith("/loop.img: TooManyRedirects: Exceeded 30 redirects.")
    assert cache_names(shared_dir) == []


@pytest.fixture
def tiny_image_dir(shared_dir: Path) -> Iterator[Path]:
    """IMAGE_DIR on a 256 KiB tmpfs: the disk fills up in the middle of a download."""
    path = shared_dir / "image"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "podvm-test-full", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_a_full_image_dir_is_one_line_and_leaves_nothing(
    served: Server, body: bytes, shared_dir: Path, tiny_image_dir: Path
) -> None:
    served.served.files["/disk.img"] = body
    done = runner(raw_env(served, shared_dir, body))
    assert done.returncode == 1
    assert the_error(done).endswith(
        f"IMAGE_DIR={tiny_image_dir}: cannot write disk.img: No space left on device; nothing was cached"
    )
    assert cache_names(shared_dir) == []
    assert shutil.disk_usage(tiny_image_dir).used < 64 << 10, "the partial download was removed"


def test_a_last_chunk_that_only_partly_fits_raises_and_never_leaves_a_short_file(tiny_image_dir: Path) -> None:
    """The disk fills up in the middle of the download's last chunk: the kernel takes part of it without an error,
    so a file written as it comes must write the rest again (and get ENOSPC), else a short file would be stored under
    the digest of every byte received."""
    fd = os.open(tiny_image_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        with Writeback(fd) as out, pytest.raises(OSError) as caught:
            out.write(b"x" * (1 << 20))
        assert caught.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_local_source_larger_than_img_max_size_is_refused_while_copying(tmp_path: Path, shared_dir: Path) -> None:
    source = tmp_path / "big.img"
    source.write_bytes(b"\0" * (2 << 20))
    with pytest.raises(ImageRejected, match=r"^IMG_SOURCE=/\S+/big.img: more than IMG_MAX_SIZE"):
        ensure_base(load(runner_env(shared_dir, IMG_SOURCE=str(source), IMG_FORMAT="raw", IMG_MAX_SIZE="1M")))
    assert cache_names(shared_dir) == []


@pytest.fixture
def no_tmpfile(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A volume without ``O_TMPFILE`` (NFS, some FUSE): the kernel's EOPNOTSUPP for it, every other open real; the
    names the download then creates with ``O_EXCL`` are collected."""
    real_open = os.open
    created: list[str] = []

    def volume_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, os.strerror(95))  # EOPNOTSUPP
        if flags & os.O_EXCL and str(path).endswith(".part"):
            created.append(str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", volume_open)
    return created


def test_without_o_tmpfile_the_download_is_a_fresh_name_held_open_and_leaves_nothing(
    served: Server, qcow2_bytes: bytes, shared_dir: Path, no_tmpfile: list[str]
) -> None:
    served.served.files["/disk.qcow2"] = qcow2_bytes
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2")))
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    assert ensure_base(cfg) == sha
    assert len(no_tmpfile) == 1, "the fallback made its one named file"
    assert cached(cfg) == qcow2_bytes
    assert list((shared_dir / "image" / "tmp").iterdir()) == []


def test_without_o_tmpfile_a_neighbour_swapping_the_named_part_gets_nothing_stored(
    served: Server,
    qcow2_bytes: bytes,
    other_qcow2_bytes: bytes,
    shared_dir: Path,
    *,
    no_tmpfile: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The neighbour replaces the partial file's name once the server's bytes are in it, before the vetting and the
    rename: the rename then moves the neighbour's inode, which the check against the descriptor refuses."""
    served.served.files["/disk.qcow2"] = qcow2_bytes
    tmp = shared_dir / "image" / "tmp"

    def fetch_then_swap(cfg: Config, out: object) -> dict[str, str]:
        digests = fetch_into(cfg, out)  # type: ignore[arg-type]
        (tmp / ".neighbour").write_bytes(other_qcow2_bytes)
        os.replace(tmp / ".neighbour", tmp / no_tmpfile[0])
        return digests

    monkeypatch.setattr("vmrunner.images.store.fetch_into", fetch_then_swap)
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2")))
    with pytest.raises(PodvmError, match=r"is not the file downloaded .*nothing cached$") as caught:
        ensure_image(cfg)
    assert "\n" not in str(caught.value)
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    assert not (shared_dir / "image" / "sha256" / sha).exists()
    assert read_name(Layout(cfg.image_dir), cfg.img_name) is None
    assert list(tmp.iterdir()) == []
    monkeypatch.setattr("vmrunner.images.store.fetch_into", fetch_into)
    assert ensure_base(cfg) == sha and cached(cfg) == qcow2_bytes, "the next start fetches the server's bytes"


@pytest.mark.parametrize("kind", ["link", "fifo", "file"])
def test_without_o_tmpfile_a_planted_part_name_is_never_written_through(
    served: Server,
    qcow2_bytes: bytes,
    shared_dir: Path,
    *,
    no_tmpfile: list[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """A neighbour that guessed the partial file's name plants a link to a file of the VM's volume, a FIFO or a file
    of its own there first: ``O_EXCL | O_NOFOLLOW`` refuses it in one line naming the volume; nothing is written
    through it, nothing cached."""
    monkeypatch.setattr("vmrunner.images.store.secrets", types.SimpleNamespace(token_hex=lambda _n: "0badcafe"))
    served.served.files["/disk.qcow2"] = qcow2_bytes
    cfg = load(runner_env(shared_dir, IMG_SOURCE=served.url("/disk.qcow2")))
    tmp = shared_dir / "image" / "tmp"
    tmp.mkdir(exist_ok=True)
    planted = tmp / f"{cfg.img_name}.{os.getpid()}.0badcafe.part"
    victim = shared_dir / "vm" / "victim"
    victim.write_bytes(b"the VM's own bytes")
    if kind == "link":
        planted.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.write_bytes(b"the neighbour's bytes")
    with pytest.raises(PodvmError, match=rf"^IMAGE_DIR={shared_dir / 'image'}: cannot store .*: File exists: ") as got:
        ensure_image(cfg)
    assert "\n" not in str(got.value)
    assert victim.read_bytes() == b"the VM's own bytes"
    assert os.path.lexists(planted), "the planted name is left as it was, never removed through"
    assert list((shared_dir / "image").glob("sha256/*")) == []
