"""The shared contract: validated environment readers and the handshake schema."""

import errno
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from shared import handshake
from shared.cli import run_main
from shared.env import Env, pod_hostname
from shared.errors import ConfigError, HandshakeError
from shared.log import configure
from tests.harness import samples

SAMPLE = samples.handshake()


def test_flag_accepts_common_spellings_and_rejects_others() -> None:
    env = Env({"A": "true", "B": "No", "C": "", "D": "maybe"})
    assert env.flag("A") is True
    assert env.flag("B") is False
    assert env.flag("C") is False
    assert env.flag("UNSET", default=True) is True
    with pytest.raises(ConfigError, match=r"^D='maybe': expected true or false$"):
        env.flag("D")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024", 1024), ("512M", 512 << 20), ("20G", 20 << 30), ("20GiB", 20 << 30), ("1t", 1 << 40)],
)
def test_size_reads_binary_multiples(text: str, expected: int) -> None:
    assert Env({"S": text}).size("S", 0) == expected


@pytest.mark.parametrize(("text", "expected"), [("30", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1.5s", 1.5)])
def test_duration(text: str, expected: float) -> None:
    assert Env({"T": text}).duration("T", 0) == expected


@pytest.mark.parametrize(
    ("values", "call", "message"),
    [
        ({"N": "x"}, lambda e: e.integer("N", 1, 1, 4), "N='x': expected a whole number"),
        ({"N": "9"}, lambda e: e.integer("N", 1, 1, 4), "N=9: expected a number from 1 to 4"),
        ({"S": "lots"}, lambda e: e.size("S", 0), "S='lots': expected a size such as 512M or 20G"),
        ({"T": "soon"}, lambda e: e.duration("T", 0), "T='soon': expected a duration such as 30s, 500ms or 2m"),
        ({"IP": "1.2.3"}, lambda e: e.ipv4("IP", "10.0.0.1"), "IP='1.2.3': expected an IPv4 address"),
        ({"P": "rel/path"}, lambda e: e.path("P", "/x"), "P='rel/path': expected an absolute path"),
        ({"C": "xen"}, lambda e: e.choice("C", "kvm", ("kvm", "tcg")), "C='xen': expected one of kvm, tcg"),
        ({}, lambda e: e.required("R", "a URL"), "R is required: set it to a URL"),
        ({"HOSTNAME": "bad_name"}, pod_hostname, "HOSTNAME='bad_name': expected a DNS name"),
        # 250 characters made a pet disk name longer than a file name may be: a traceback at the first stat()
        ({"HOSTNAME": ".".join(["a" * 62] * 4)[:250]}, pod_hostname, "HOSTNAME='aaaa"),
        ({"HOSTNAME": "a" * 61 + ".bc"}, pod_hostname, "HOSTNAME='aaaa"),
    ],
)
def test_bad_values_give_one_line_naming_the_variable(values: dict[str, str], call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        call(Env(values))
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_longest_pod_hostname_is_accepted() -> None:
    assert pod_hostname(Env({"HOSTNAME": "a" * 61 + ".b"})) == "a" * 61 + ".b"


def test_handshake_round_trips_through_its_file(tmp_path: Path) -> None:
    path = SAMPLE.write(tmp_path)
    assert path.name == "network.json"
    assert handshake.read(path) == SAMPLE
    assert handshake.wait(tmp_path, timeout=0.1) == SAMPLE
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_handshake_follows_its_published_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(handshake.schema())
    jsonschema.validate(SAMPLE.to_dict(), handshake.schema(), format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "2.0"}, "h: handshake version 2.0 is not supported (this side speaks 1.x)"),
        ({"version": "one"}, "h: missing or malformed 'version'"),
        ({"mac": "0A-58-C0-A8-FE-02"}, "h.mac: '0A-58-C0-A8-FE-02' does not match"),
        ({"vm_ip": "192.168.254.300"}, "h.vm_ip: '192.168.254.300' is not an IPv4 address"),
        ({"mtu": 100}, "h.mtu: 100 is out of range"),
        ({"dns": ["10.0.0.1", 5]}, "h.dns[1]: expected string"),
        ({"vnc_in_pod": 1}, "h.vnc_in_pod: expected boolean"),
        ({"tap_owner": True}, "h.tap_owner: expected ['integer', 'null']"),
        ({"metrics_port": 0}, "h.metrics_port: 0 is out of range"),
        ({"metrics_port": "9100"}, "h.metrics_port: expected ['integer', 'null']"),
    ],
)
def test_handshake_rejects_what_the_schema_rejects(change: dict[str, object], message: str) -> None:
    data = {**SAMPLE.to_dict(), **change}
    with pytest.raises(HandshakeError, match="^" + re.escape(message)):
        handshake.Handshake.from_dict(data, "h")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, handshake.schema(), format_checker=jsonschema.FormatChecker())


def test_handshake_missing_field_is_named() -> None:
    data = SAMPLE.to_dict()
    del data["tap"]
    with pytest.raises(HandshakeError, match=r"^h: missing field 'tap'$"):
        handshake.Handshake.from_dict(data, "h")


def test_handshake_minor_versions_are_compatible() -> None:
    data = {**SAMPLE.to_dict(), "version": "1.7", "future_field": "ignored"}
    assert handshake.Handshake.from_dict(data).tap == "podvm-tap0"


def test_a_handshake_before_1_2_has_no_metrics_port_and_1_2_carries_one() -> None:
    """1.2 added metrics_port; an older sidecar's handshake (without it) still reads, as "no metrics endpoint", and
    a 1.2 handshake with a port is still valid for a runner written for 1.0."""
    for version in ("1.0", "1.1"):
        old = {k: v for k, v in SAMPLE.to_dict().items() if k != "metrics_port"} | {"version": version}
        assert handshake.Handshake.from_dict(old).metrics_port is None
    new = handshake.Handshake.from_dict({**SAMPLE.to_dict(), "metrics_port": 9100})
    assert (new.metrics_port, new.version) == (9100, handshake.VERSION)
    jsonschema.validate(new.to_dict(), SCHEMA_1_0, format_checker=jsonschema.FormatChecker())


def test_a_handshake_before_1_3_has_no_console_port_and_1_3_carries_one() -> None:
    """1.3 added console_port: absent means the browser console is not served on the pod IP."""
    old = {k: v for k, v in SAMPLE.to_dict().items() if k != "console_port"} | {"version": "1.2"}
    assert handshake.Handshake.from_dict(old).console_port is None
    new = handshake.Handshake.from_dict({**SAMPLE.to_dict(), "console_port": 6080})
    assert (new.console_port, new.version) == (6080, handshake.VERSION)
    jsonschema.validate(new.to_dict(), SCHEMA_1_0, format_checker=jsonschema.FormatChecker())


def test_waiting_for_a_missing_handshake_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(HandshakeError, match=rf"^{tmp_path}/network.json: no network handshake after 0.2s"):
        handshake.wait(tmp_path, timeout=0.2)


def test_unreadable_json_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "network.json").write_text('{\n"version": \n')
    with pytest.raises(HandshakeError, match="not JSON at line 3"):
        handshake.read(tmp_path / "network.json")
    assert json.loads(json.dumps(SAMPLE.to_dict()))["dns"] == ["10.96.0.10", "10.96.0.11"]


def test_a_handshake_is_read_only_from_a_regular_file_of_its_own(tmp_path: Path) -> None:
    """RUN_DIR is the runner's: a link, a FIFO (which would block a reader) or a huge file is refused in one line."""
    secret = tmp_path / "secret"
    secret.write_text(json.dumps(SAMPLE.to_dict()))
    (tmp_path / "link.json").symlink_to(secret)
    with pytest.raises(HandshakeError, match=r"link\.json: cannot read the handshake: Too many levels of symbolic"):
        handshake.read(tmp_path / "link.json")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(HandshakeError, match=r"fifo\.json: not a regular file"):
        handshake.read(tmp_path / "fifo.json")
    (tmp_path / "big.json").write_bytes(b" " * (handshake.MAX_SIZE + 1))
    with pytest.raises(HandshakeError, match=r"big\.json: larger than 65536 bytes"):
        handshake.read(tmp_path / "big.json")


def _exit_of(command: Callable[[], int]) -> int:
    with pytest.raises(SystemExit) as caught:
        run_main(logging.getLogger("t"), command)
    assert isinstance(caught.value.code, int)
    return caught.value.code


def _raise(err: BaseException) -> Callable[[], int]:
    def command() -> int:
        raise err

    return command


def test_error_messages_are_one_line_whatever_the_input_holds() -> None:
    err = ConfigError("RUN_DIR=/a\nINFO forged line\r")
    assert str(err) == "RUN_DIR=/a\\nINFO forged line\\r"


@pytest.mark.parametrize(
    ("err", "line"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/image/b.qcow2.part"), "/image/b.qcow2.part: No space"),
        (OSError(errno.ENOLCK, "No locks available", "/image/.lock"), "/image/.lock: No locks available"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
        (PermissionError(errno.EACCES, "Permission denied", "/vm/x\ny"), "/vm/x\\ny: Permission denied"),
        (OSError("no errno at all"), "no errno at all"),
    ],
)
def test_unexpected_os_error_is_one_line_with_its_file_and_exit_1(
    err: OSError, line: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert _exit_of(_raise(err)) == 1
    [record] = caplog.records
    assert record.levelname == "ERROR" and record.getMessage().startswith(line) and record.exc_info is None
    assert "\n" not in record.getMessage()


def test_a_bug_is_one_line_and_its_traceback_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert _exit_of(_raise(KeyError("x"))) == 1
    [record] = caplog.records
    assert record.getMessage() == "internal error (a bug in podvm; LOG_LEVEL=DEBUG shows where): KeyError: 'x'"
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    assert _exit_of(_raise(KeyError("x"))) == 1
    assert [r.levelname for r in caplog.records] == ["DEBUG", "ERROR"] and caplog.records[0].exc_info is not None


def test_podvm_errors_keep_their_status_and_interrupts_are_130(caplog: pytest.LogCaptureFixture) -> None:
    assert _exit_of(_raise(HandshakeError("h"))) == 4
    assert _exit_of(_raise(KeyboardInterrupt())) == 130
    assert _exit_of(lambda: 0) == 0


# --- handshake 1.1 (IPv6) ---------------------------------------------------------------------------------------
DUAL = samples.handshake(
    families=("ipv4", "ipv6"),
    ipv6=handshake.Ipv6("fd70:6f64:766d::ff:fe00:aa", "fd70:6f64:766d::1", "fe80::1", 64, "fd00::5", ("fd00::10",)),
)
SCHEMA_1_0 = json.loads((Path(__file__).parent / "handshake-1.0.schema.json").read_text())


def test_a_dual_stack_1_1_handshake_is_still_a_valid_1_0_handshake() -> None:
    """A runner written for 1.0 (its schema kept as it was published) accepts what the sidecar writes on IPv4 and
    dual-stack pods; only an IPv6-only pod, which such a runner could not serve, is refused."""
    checker = jsonschema.FormatChecker()
    for sample in (SAMPLE, DUAL):
        jsonschema.validate(sample.to_dict(), SCHEMA_1_0, format_checker=checker)
        jsonschema.validate(sample.to_dict(), handshake.schema(), format_checker=checker)
    only6 = samples.handshake(vm_ip=None, gateway=None, pod_ip=None, dns=(), families=("ipv6",), ipv6=DUAL.ipv6)
    jsonschema.validate(only6.to_dict(), handshake.schema(), format_checker=checker)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(only6.to_dict(), SCHEMA_1_0, format_checker=checker)
    assert handshake.Handshake.from_dict(json.loads(json.dumps(only6.to_dict()))) == only6


def test_a_1_0_handshake_reads_as_ipv4_only() -> None:
    data = {k: v for k, v in SAMPLE.to_dict().items() if k not in ("families", "ipv6")} | {"version": "1.0"}
    read = handshake.Handshake.from_dict(data)
    assert (read.families, read.ipv6) == (("ipv4",), None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vm_ip": "fd00::1x"}, "h.ipv6.vm_ip: 'fd00::1x' is not an IPv6 address"),
        ({"prefix": 48}, "h.ipv6.prefix: 48 is out of range"),
        ({"dns": ["10.0.0.1"]}, "h.ipv6.dns[0]: '10.0.0.1' is not an IPv6 address"),
    ],
)
def test_the_ipv6_block_is_checked_like_the_rest(change: dict[str, object], message: str) -> None:
    data = DUAL.to_dict()
    data["ipv6"] = {**data["ipv6"], **change}
    with pytest.raises(HandshakeError, match="^" + re.escape(message)):
        handshake.Handshake.from_dict(data, "h")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, given back to pytest as it was after ``configure`` replaced its handlers and level."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("value", "level"), [("debug", logging.DEBUG), ("ERROR", logging.ERROR), (None, logging.INFO)])
def test_log_level_is_read_as_written(
    monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger, value: str | None, level: int
) -> None:
    if value is None:
        monkeypatch.delenv("LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("LOG_LEVEL", value)
    configure("podvm-test")
    assert root_logger.level == level


def test_an_unknown_log_level_is_said_not_silently_ignored(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    configure("podvm-test")
    assert logging.getLogger().level == logging.INFO
    assert (
        "LOG_LEVEL='VERBOSE': expected one of DEBUG, INFO, WARNING, ERROR; logging at INFO" in capsys.readouterr().err
    )


def test_a_handshake_before_1_4_is_a_single_queue_tap_and_1_4_carries_its_queues() -> None:
    """1.4 added tap_queues: absent means a single-queue tap; the schema bounds it."""
    old = {k: v for k, v in SAMPLE.to_dict().items() if k != "tap_queues"} | {"version": "1.3"}
    assert handshake.Handshake.from_dict(old).tap_queues == 1
    assert handshake.Handshake.from_dict({**SAMPLE.to_dict(), "tap_queues": 4}).tap_queues == 4
    for bad in (0, 17, "4"):
        with pytest.raises(HandshakeError, match="tap_queues"):
            handshake.Handshake.from_dict({**SAMPLE.to_dict(), "tap_queues": bad})
