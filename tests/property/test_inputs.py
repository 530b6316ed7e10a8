"""Generated hostile input at every parser and at both ``plan`` commands: each call succeeds, or fails with a
PodvmError whose message is one line. Any other exception (a traceback in a pod's log) fails the property.

The plan commands run in-process (``plan_command``, ``show_plan``) with the pod's facts given by POD_IFACE, POD_IP and
POD_MTU, so no kernel is asked; their files (resolv.conf, metadata, user data, the VNC Secret, the handshake) are
written into a sandbox the generated paths point at.
"""

import contextlib
import io
import ipaddress
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from netsidecar.cli import plan_command
from netsidecar.config import SEARCH_LIMIT, parse_resolv, read_resolv, read_settings, valid_domain
from shared import handshake
from shared.env import Env, pod_hostname
from shared.handshake import Handshake
from tests.harness import samples
from tests.harness.strategies import (
    ENV_CHARS,
    any_value,
    garbage,
    hostnames,
    ipv4s,
    one_line_or_nothing,
    value_for,
)
from vmrunner.config import load
from vmrunner.run import configdrive
from vmrunner.start import show_plan

SANDBOX = Path(tempfile.gettempdir()) / f"podvm-property-{os.getpid()}"  # the strategies need it before the tests
NET_VARS = (
    "VM_IP", "VM_GW", "NO_VNC", "POD_IFACE", "POD_IP", "POD_MTU", "VM_MAC", "GW_MAC", "TAP_OWNER", "RUN_DIR",
    "RESOLV_CONF", "POD_WAIT_TIMEOUT", "SHUTDOWN_TIMEOUT", "HOSTNAME", "METRICS_PORT", "CONSOLE_POD_PORT",
)  # fmt: skip
VM_VARS = (
    "IMG_SOURCE", "IMG_TARGET", "IMG_CHECKSUM", "IMG_FORMAT", "IMG_MAX_SIZE", "FETCH_RETRIES", "IMAGE_DIR", "VM_DIR",
    "VM_DISK_SIZE", "VM_CPUS", "VM_MEMORY", "ACCEL", "VM_MACHINE", "VM_DISK_BUS", "VM_NIC_MODEL", "NO_VNC",
    "VNC_PASSWORD_FILE", "SHUTDOWN_TIMEOUT", "HANDSHAKE_TIMEOUT", "METADATA", "USERDATA", "CONFIG_DRIVE", "RUN_DIR",
    "HOSTNAME", "QEMU", "VM_DIR_MIN_FREE", "METRICS_PORT", "CONSOLE_PORT", "CONSOLE_POD_PORT", "CONSOLE_PASSWORD_FILE",
    "CONSOLE_ASSETS",
)  # fmt: skip
POD_FACTS = ("POD_IFACE", "POD_IP", "POD_MTU")


@pytest.fixture(scope="module", autouse=True)
def sandbox() -> Iterator[Path]:
    shutil.rmtree(SANDBOX, ignore_errors=True)  # left by a killed run with the same pid
    (SANDBOX / "run").mkdir(parents=True)
    try:
        yield SANDBOX
    finally:
        shutil.rmtree(SANDBOX, ignore_errors=True)


def environments(names: tuple[str, ...], always: tuple[str, ...] = ()) -> st.SearchStrategy[dict[str, str]]:
    """Any subset of ``names`` set to values of their kind (``always`` set, non-blank), then at most two of them
    set to anything at all: one bad value among good ones reaches the code behind the first checks. (``always`` stays
    non-blank: unset pod facts would make ``netsidecar plan`` ask the kernel.)"""
    good = st.fixed_dictionaries(
        {name: value_for(name, SANDBOX).filter(str.strip) for name in always},
        optional={name: value_for(name, SANDBOX) for name in names if name not in always},
    )
    bad = st.dictionaries(st.sampled_from(names), any_value(SANDBOX), max_size=2).map(
        lambda values: {k: v for k, v in values.items() if k not in always or v.strip()}
    )
    return st.builds(lambda values, wrong: {**values, **wrong}, good, bad)


def quietly(command: Callable[[], int]) -> int:
    """Run a command that prints its plan, keeping the test's output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        return command()


# resolv.conf: what kubelet writes, what people write, and bytes.
resolv_lines = st.one_of(
    st.builds(lambda ip: f"nameserver {ip}", ipv4s),
    st.builds(lambda names: "search " + " ".join(names), st.lists(st.one_of(hostnames, garbage), max_size=8)),
    st.builds(lambda name: f"domain {name}", hostnames),
    st.sampled_from(["options ndots:5", "# comment", "; comment", "nameserver", "search", "", "   "]),
    garbage,
)
resolv_files = st.one_of(
    st.lists(resolv_lines, max_size=12).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogateescape")),
    st.binary(max_size=200),
)

# YAML: structures safe_dump can write (keys of every scalar type), hand-written odd documents, and bytes.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),  # a NaN key never equals itself: no document holds one twice
    st.text(ENV_CHARS, max_size=10),
    st.dates(),
    st.datetimes(),
)


def _yaml_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(scalars, inner, max_size=3)


structures = st.recursive(scalars, _yaml_containers, max_leaves=10)
yaml_files = st.one_of(
    structures.map(lambda doc: yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogateescape")),
    st.sampled_from(
        [
            b"2021-02-30",
            b"when: 2021-13-45\n",
            b"? [a, b]\n: c\n",
            b"a: &x [1]\nb: *x\n",
            b"!!python/object/apply:os.system ['true']\n",
            b"{",
            b"a:\n\t- b\n",
            b"#cloud-config\nusers: [",
            b"#cloud-config\n1: one\nname: x\n",
            b"on: true\nyes: no\n",
            b"[" * 600,  # deeper than Python's stack: RecursionError inside PyYAML
            b"- " * 2000 + b"x",
            b"\xff\xfe",
            b"x: 1e400\n",
        ]
    ),
    st.binary(max_size=100),
)

# Handshake documents: the valid one with fields replaced by any JSON value or removed, and any JSON at all.


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(ENV_CHARS, max_size=12),
    _json_containers,
    max_leaves=8,
)
VALID = samples.handshake().to_dict()
handshake_docs = st.one_of(
    st.builds(
        lambda changes, removed: {k: v for k, v in {**VALID, **changes}.items() if k not in removed},
        st.dictionaries(st.sampled_from(sorted(VALID)), json_values, max_size=3),
        st.sets(st.sampled_from(sorted(VALID)), max_size=2),
    ),
    st.builds(lambda version: {**VALID, "version": version}, st.sampled_from(["1." + "9" * 5000, "9" * 5000 + ".0"])),
    json_values,
)
handshake_files = st.one_of(
    handshake_docs.map(lambda doc: json.dumps(doc).encode()),
    st.sampled_from([b"[" * 100000, b"1" * 5000, b"\xff{}", b"", b"{", b'{"version": NaN}']),
    st.binary(max_size=100),
)


@given(environments(NET_VARS))
def test_sidecar_settings(values: dict[str, str]) -> None:
    one_line_or_nothing(lambda: read_settings(Env(values)))


@given(environments(VM_VARS, always=("IMG_SOURCE",)))
def test_runner_config(values: dict[str, str]) -> None:
    one_line_or_nothing(lambda: load(values))


@given(hostnames)
def test_pod_hostname(name: str) -> None:
    one_line_or_nothing(lambda: pod_hostname(Env({"HOSTNAME": name})))


@given(resolv_files)
@example(b"nameserver 10.0.0.1\nsearch \x80bad.example good.example\n")  # was a UnicodeDecodeError
def test_resolv_conf_keeps_only_what_dhcp_can_carry(content: bytes) -> None:
    """Never fails; keeps IPv4 nameservers once each, and valid search domains within option 119's 255 bytes."""
    path = SANDBOX / "resolv"
    path.write_bytes(content)
    resolv = read_resolv(path)
    assert resolv == parse_resolv(content.decode("utf-8", "replace"))
    assert all(str(ipaddress.IPv4Address(ns)) == ns for ns in resolv.nameservers)
    assert len(set(resolv.nameservers)) == len(resolv.nameservers)
    assert all(valid_domain(domain) for domain in resolv.search)
    assert sum(len(domain) + 2 for domain in resolv.search) <= SEARCH_LIMIT


@given(yaml_files, st.one_of(yaml_files, st.just(b"#!/bin/sh\necho hi\n")), st.sampled_from(["config-2", "nocloud"]))
@example(b"\x80", b"", "config-2")  # each was a traceback: UnicodeDecodeError, ValueError, TypeError
@example(b"2021-02-30", b"", "config-2")
@example(b"1: one\nname: x\n", b"", "config-2")
@example(b"{}", b"#cloud-config\nwhen: 2021-02-30\n", "nocloud")
def test_config_drive(metadata: bytes, userdata: bytes, kind: str) -> None:
    (SANDBOX / "meta").write_bytes(metadata)
    (SANDBOX / "user").write_bytes(userdata)
    cfg = load(
        {"IMG_SOURCE": "/x.qcow2", "HOSTNAME": "vm-0", "CONFIG_DRIVE": kind}
        | {"METADATA": str(SANDBOX / "meta"), "USERDATA": str(SANDBOX / "user")}
    )
    one_line_or_nothing(lambda: configdrive.plan_from_config(cfg))


@given(handshake_docs)
@example({**VALID, "version": "9" * 5000 + ".0"})  # was a ValueError from int()
def test_handshake_document(document: Any) -> None:
    one_line_or_nothing(lambda: Handshake.from_dict(document, "network.json"))


@given(handshake_files)
@example(b"\xff{}")  # each was a traceback: UnicodeDecodeError, ValueError from int(), RecursionError
@example(b'{"version": "1.0", "mtu": ' + b"1" * 5000 + b"}")
@example(b"[" * 100000)
def test_handshake_file(content: bytes) -> None:
    path = SANDBOX / "run" / handshake.FILE_NAME
    path.write_bytes(content)
    one_line_or_nothing(lambda: handshake.read(path))


@given(environments(NET_VARS, always=POD_FACTS), resolv_files)
def test_netsidecar_plan(values: dict[str, str], resolv: bytes) -> None:
    (SANDBOX / "resolv").write_bytes(resolv)
    one_line_or_nothing(lambda: quietly(lambda: plan_command(read_settings(Env(values)))))


@given(
    environments(VM_VARS, always=("IMG_SOURCE",)),
    yaml_files,
    yaml_files,
    st.binary(max_size=12),
    st.none() | handshake_files,
)
@example({"IMG_SOURCE": "http://[::1/x"}, b"", b"", b"", None)  # was a ValueError from urlsplit
@example({"IMG_SOURCE": "/x.qcow2", "IMAGE_DIR": "/" + "a" * 300}, b"", b"", b"", None)  # was ENAMETOOLONG
@example({"IMG_SOURCE": "/x.qcow2", "HOSTNAME": ".".join(["a" * 62] * 4)[:250]}, b"", b"", b"", None)  # idem
def test_vmrunner_plan(
    values: dict[str, str], metadata: bytes, userdata: bytes, secret: bytes, network: bytes | None
) -> None:
    for name, content in (("meta", metadata), ("user", userdata), ("vnc", secret)):
        (SANDBOX / name).write_bytes(content)
    published = SANDBOX / "run" / handshake.FILE_NAME
    published.unlink(missing_ok=True)
    if network is not None:
        published.write_bytes(network)
    one_line_or_nothing(lambda: quietly(lambda: show_plan(load(values))))
