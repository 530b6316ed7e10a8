"""vmrunner's pure parts: config validation, checksum parsing, vetting verdicts, pet, drive and qemu plans."""

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from shared.errors import ConfigError, ImageRejected, escape_controls
from shared.handshake import Ipv6
from tests.harness import samples
from vmrunner.config import Checksum, Config, load, parse_checksum
from vmrunner.images.download import Progress
from vmrunner.images.vet import judge
from vmrunner.pet.disk import plan_create, plan_flatten, plan_grow, plan_rebase, plan_repoint
from vmrunner.run import configdrive
from vmrunner.run.agent import AgentError
from vmrunner.run.argv import choose_accel, choose_vhost, plan_qemu, vhost_problem, vnc_enabled
from vmrunner.run.supervisor import Supervisor
from vmrunner.run.suspend import hardware_digest
from vmrunner.run.vnc import read_password

BASE = {"IMG_SOURCE": "https://example.org/images/debian-12.qcow2", "HOSTNAME": "vm-0"}
HS = samples.handshake(dns=("10.96.0.10",), search=("svc.cluster.local",))


def cfg(**values: str) -> Config:
    return load({**BASE, **values})


def test_defaults() -> None:
    c = cfg()
    assert c.img_target == "debian-12.qcow2"
    assert re.fullmatch(r"debian-12\.qcow2@[0-9a-f]{16}", c.img_name)
    assert (c.vm_disk_mode, c.verify_base) == ("overlay", "changed")
    assert c.pet_path == Path("/vm/vm-0.qcow2")
    assert (c.img_format, c.accel, c.machine, c.disk_bus, c.nic_model) == (
        "qcow2",
        "auto",
        "pc",
        "virtio",
        "virtio-net-pci",
    )
    assert (c.cpus, c.memory, c.shutdown_timeout, c.handshake_timeout) == (1, 1 << 30, 60.0, 120.0)
    assert c.img_max_size == 256 << 30 and c.img_checksum is None and c.vm_disk_size is None
    assert c.is_url


def test_local_source_names_the_target_after_the_file() -> None:
    c = cfg(IMG_SOURCE="/images/base.img", IMG_FORMAT="RAW")
    assert (c.img_target, c.img_format, c.is_url) == ("base.img", "raw", False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"IMG_SOURCE": ""}, "IMG_SOURCE is required"),
        (
            {"IMG_SOURCE": "ftp://x/y.qcow2"},
            "IMG_SOURCE='ftp://x/y.qcow2': expected an http(s) URL or an absolute path",
        ),
        ({"IMG_SOURCE": "images/x.qcow2"}, "IMG_SOURCE='images/x.qcow2': expected"),
        ({"IMG_SOURCE": "http:///x.qcow2"}, "IMG_SOURCE='http:///x.qcow2': the URL has no host"),
        ({"IMG_SOURCE": "https://u:secret@/x.qcow2"}, "IMG_SOURCE='https:///x.qcow2': the URL has no host"),
        ({"IMG_TARGET": "../etc/passwd"}, "IMG_TARGET='../etc/passwd': expected a plain name"),
        ({"IMG_TARGET": ".hidden"}, "IMG_TARGET='.hidden'"),
        ({"IMG_TARGET": "a@b"}, "IMG_TARGET='a@b'"),
        ({"IMG_TARGET": "a" * 201}, "IMG_TARGET='aaaa"),
        ({"VM_DISK_MODE": "thin"}, "VM_DISK_MODE='thin': expected one of overlay, standalone"),
        ({"VERIFY_BASE": "never"}, "VERIFY_BASE='never': expected one of changed, always"),
        ({"IMG_CHECKSUM": "md5:abc"}, "IMG_CHECKSUM='md5:abc': expected sha256:<64 hex digits>"),
        ({"IMG_CHECKSUM": "sha256:" + "0" * 63}, "IMG_CHECKSUM='sha256:"),
        ({"IMG_CHECKSUM": "sha512:" + "g" * 128}, "IMG_CHECKSUM='sha512:"),
        ({"IMG_FORMAT": "vhd"}, "IMG_FORMAT='vhd': expected one of qcow2, raw, vmdk, vhdx, vdi, vpc, ova"),
        ({"IMG_MAX_SIZE": "huge"}, "IMG_MAX_SIZE='huge': expected a size"),
        ({"IMG_MAX_SIZE": "1K"}, "IMG_MAX_SIZE='1K': must be at least"),
        ({"VM_DISK_SIZE": "-1"}, "VM_DISK_SIZE='-1': expected a size"),
        ({"VM_CPUS": "0"}, "VM_CPUS=0: expected a number from 1 to 255"),
        ({"VM_MEMORY": "1M"}, "VM_MEMORY='1M': must be at least"),
        ({"ACCEL": "xen"}, "ACCEL='xen': expected one of auto, kvm, tcg"),
        ({"VM_DISK_BUS": "sata"}, "VM_DISK_BUS='sata': expected one of virtio, ide, scsi"),
        ({"VM_NIC_MODEL": "ne2k"}, "VM_NIC_MODEL='ne2k': expected one of"),
        ({"NO_VNC": "perhaps"}, "NO_VNC='perhaps': expected true or false"),
        ({"VNC_PASSWORD_FILE": "secret"}, "VNC_PASSWORD_FILE='secret': expected an absolute path"),
        ({"SHUTDOWN_TIMEOUT": "soon"}, "SHUTDOWN_TIMEOUT='soon': expected a duration"),
        ({"HANDSHAKE_TIMEOUT": "x"}, "HANDSHAKE_TIMEOUT='x'"),
        ({"CONFIG_DRIVE": "vfat"}, "CONFIG_DRIVE='vfat': expected one of config-2, nocloud"),
        ({"IMAGE_DIR": "image"}, "IMAGE_DIR='image': expected an absolute path"),
        ({"VM_DIR": "vm"}, "VM_DIR='vm'"),
        ({"RUN_DIR": "run"}, "RUN_DIR='run'"),
        ({"METADATA": "m"}, "METADATA='m'"),
        ({"USERDATA": "u"}, "USERDATA='u'"),
        ({"FETCH_RETRIES": "-1"}, "FETCH_RETRIES=-1"),
        ({"HOSTNAME": "Bad_Host"}, "HOSTNAME='bad_host'"),
        # found by the property tier: each was a traceback
        ({"IMG_SOURCE": "http://[::1/x.qcow2"}, "IMG_SOURCE='http://[::1/x.qcow2': not a valid URL"),
        ({"IMG_SOURCE": "http://h:99999/x.qcow2"}, "IMG_SOURCE='http://h:99999/x.qcow2': not a valid URL"),
        ({"IMAGE_DIR": "/" + "a" * 256}, "IMAGE_DIR='/aaa"),
        ({"VM_DIR": "/a" * 2000}, "VM_DIR='/a/a"),
        ({"RUN_DIR": "/run/" + "p" * 90}, "RUN_DIR='/run/ppp"),  # qemu's sockets would not fit a Unix socket path
    ],
)
def test_every_bad_value_is_one_line_naming_it(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({**BASE, **values})
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_checksum_parsing_and_hashing() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    parsed = parse_checksum("C", f"SHA256:{digest.upper()}")
    assert parsed == Checksum("sha256", digest)
    assert str(parsed) == f"sha256:{digest}"
    hasher = parsed.hasher()
    hasher.update(b"x")
    assert hasher.hexdigest() == digest
    assert parse_checksum("C", "sha512:" + "a" * 128).algorithm == "sha512"


GOOD: dict[str, Any] = {"format": "qcow2", "virtual-size": 1 << 30, "format-specific": {"data": {"corrupt": False}}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "raw"}, "img: qemu-img reads it as 'raw', not qcow2"),
        ({"backing-filename": "/etc/hostname"}, "img: has a backing file ('/etc/hostname'); refused"),
        ({"full-backing-filename": "/etc/passwd"}, "img: has a backing file"),
        ({"format-specific": {"data": {"data-file": "/etc/shadow"}}}, "img: has an external data file ('/etc/shadow')"),
        ({"format-specific": {"data": {"data-file-raw": True}}}, "img: has an external data file"),
        ({"format-specific": {"data": {"corrupt": True}}}, "img: is marked corrupt; refused"),
        ({"virtual-size": 2 << 30}, "img: virtual size 2147483648 bytes exceeds IMG_MAX_SIZE (1073741824 bytes)"),
        ({"virtual-size": None}, "img: no valid virtual size"),
    ],
)
def test_vetting_refuses_each_unsafe_trait(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ImageRejected, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        judge({**GOOD, **change}, "qcow2", 1 << 30, "img")


def test_vetting_accepts_a_plain_image() -> None:
    verdict = judge(GOOD, "qcow2", 1 << 30, "img")
    assert (verdict.format, verdict.virtual_size) == ("qcow2", 1 << 30)


BASE_FILE = Path("/image/sha256/" + "ab" * 32)


def test_pet_is_created_once_with_explicit_backing_format() -> None:
    plan = plan_create(cfg(), BASE_FILE, "raw", 1 << 30)
    assert plan.create == (
        ("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(BASE_FILE), "/vm/.vm-0.qcow2.tmp"),
    )
    assert plan.staging == Path("/vm/.vm-0.qcow2.tmp") and plan.resize is None


def test_pet_created_larger_when_asked() -> None:
    plan = plan_create(cfg(VM_DISK_SIZE="20G"), BASE_FILE, "qcow2", 1 << 30)
    assert plan.create[0][-1] == str(20 << 30)
    assert plan_create(cfg(VM_DISK_SIZE="512M"), BASE_FILE, "qcow2", 1 << 30).create[0][-1] == "/vm/.vm-0.qcow2.tmp"


def test_standalone_pet_is_a_converted_copy_without_backing_file() -> None:
    plan = plan_create(cfg(VM_DISK_MODE="standalone", VM_DISK_SIZE="2G"), BASE_FILE, "raw", 1 << 30)
    assert plan.create == (
        ("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(BASE_FILE), "/vm/.vm-0.qcow2.tmp"),
        ("qemu-img", "resize", "-q", "-f", "qcow2", "/vm/.vm-0.qcow2.tmp", str(2 << 30)),
    )
    assert "-b" not in plan.create[0]


def test_existing_pet_is_only_ever_grown() -> None:
    assert plan_grow(cfg(), 1 << 30) == plan_grow(cfg(VM_DISK_SIZE="1G"), 2 << 30)
    unchanged = plan_grow(cfg(VM_DISK_SIZE="2G"), 2 << 30)
    assert unchanged.create == () and unchanged.resize is None
    grow = plan_grow(cfg(VM_DISK_SIZE="3G"), 2 << 30)
    assert grow.create == ()
    assert grow.resize == ("qemu-img", "resize", "-q", "-f", "qcow2", "/vm/vm-0.qcow2", str(3 << 30))


def test_rebase_plans_name_every_format_and_only_repoint_is_unsafe() -> None:
    pet = Path("/vm/vm-0.qcow2")
    assert plan_rebase(pet, BASE_FILE, "qcow2") == (
        "qemu-img", "rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(BASE_FILE), str(pet)
    )  # fmt: skip
    assert plan_repoint(pet, BASE_FILE, "raw")[:5] == ("qemu-img", "rebase", "-q", "-u", "-f")
    assert plan_flatten(pet) == ("qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(pet))


def test_metadata_merges_over_stable_defaults() -> None:
    meta = configdrive.meta_data("vm-0", {"name": "db", "meta": {"role": "db"}})
    assert meta["uuid"] == configdrive.instance_uuid("vm-0") == configdrive.meta_data("vm-0", {})["uuid"]
    assert meta["uuid"] != configdrive.instance_uuid("vm-1")
    assert (meta["hostname"], meta["name"], meta["meta"]) == ("vm-0", "db", {"role": "db"})
    assert configdrive.merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}
    assert configdrive.meta_data("vm-0", {"uuid": "fixed"})["uuid"] == "fixed"


def test_config2_plan_has_latest_and_a_dated_folder() -> None:
    plan = configdrive.plan_drive("config-2", "vm-0", {"name": "db"}, b"#!/bin/sh\necho hi\n")
    assert plan is not None and plan.label == "config-2"
    assert sorted(plan.files) == [
        "/openstack/2012-08-10/meta_data.json",
        "/openstack/2012-08-10/user_data",
        "/openstack/latest/meta_data.json",
        "/openstack/latest/user_data",
    ]
    assert json.loads(plan.files["/openstack/latest/meta_data.json"])["name"] == "db"
    assert plan.files["/openstack/latest/user_data"] == b"#!/bin/sh\necho hi\n"


def test_nocloud_plan_and_no_files_no_drive() -> None:
    plan = configdrive.plan_drive("nocloud", "vm-0", None, None)
    assert plan is None
    plan = configdrive.plan_drive("nocloud", "vm-0", {"local-hostname": "db"}, None)
    assert plan is not None and plan.label == "cidata"
    assert plan.files["/user-data"] == b""
    assert b"instance-id: " + configdrive.instance_uuid("vm-0").encode() in plan.files["/meta-data"]
    assert b"local-hostname: db" in plan.files["/meta-data"]


def test_metadata_that_would_expand_exponentially_is_refused(tmp_path: Path) -> None:
    """'Billion laughs': nine levels of ten aliases are 10**9 strings once written out as meta_data.json."""
    lines = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "metadata"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^METADATA={bomb}: over 100000 values once its YAML aliases are expanded$"):
        configdrive.read_yaml(bomb, "METADATA")
    bomb.write_text("loop: &self [1, *self]\n")
    with pytest.raises(ConfigError, match="over 100000 values"):
        configdrive.read_yaml(bomb, "METADATA")
    bomb.write_text("base: &b {zone: a}\nvm: *b\n")
    assert configdrive.read_yaml(bomb, "METADATA") == {"base": {"zone": "a"}, "vm": {"zone": "a"}}, "a few are fine"


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "metadata"
    bad.write_text("name: ok\nmeta: [unclosed\nother: 1\n")
    with pytest.raises(ConfigError, match=rf"^METADATA={bad}: invalid YAML at line \d+: "):
        configdrive.read_yaml(bad, "METADATA")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping, got list"):
        configdrive.read_yaml(bad, "METADATA")
    assert configdrive.read_yaml(tmp_path / "absent", "METADATA") is None
    user = tmp_path / "userdata"
    user.write_text("#cloud-config\nusers: [\n")
    with pytest.raises(ConfigError, match=rf"^USERDATA={user}: invalid YAML at line 3"):
        configdrive.read_userdata(user)
    user.write_text("#!/bin/sh\n: [\n")
    assert configdrive.read_userdata(user) == b"#!/bin/sh\n: [\n"


def test_iso_keeps_names_label_and_bytes() -> None:
    plan = configdrive.plan_drive("config-2", "vm-0", {}, b"data")
    assert plan is not None
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(configdrive.render(plan)))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "config-2"
        for path, content in plan.files.items():
            for kind in ("rr_path", "joliet_path"):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{kind: path})
                assert out.getvalue() == content
    finally:
        iso.close()


def runs_in(argv: list[str], *run: str) -> bool:
    """True when ``run`` stands in ``argv`` as consecutive arguments (a flag and its value, or several flags)."""
    return any(argv[i : i + len(run)] == list(run) for i in range(len(argv) - len(run) + 1))


def values(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (the argument right after each occurrence)."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_qemu_plan_tcg_virtio_vnc_and_extra_args_last() -> None:
    c = load({**BASE, "ACCEL": "tcg", "VM_CPUS": "2", "VM_MEMORY": "512M", "RUN_DIR": "/r"}, ("-usb", "-S"))
    plan = plan_qemu(c, HS, "tcg", True, Path("/r/config-drive.iso"))
    argv = list(plan.argv)
    assert argv[:2] == ["qemu-system-x86_64", "-name"]
    assert argv[-2:] == ["-usb", "-S"]
    assert runs_in(argv, "-nodefaults", "-no-user-config", "-machine", "pc", "-accel", "tcg", "-smp", "2", "-m", "512M")
    assert runs_in(argv, "-m", "512M", "-display", "none")
    assert "-cpu" not in argv
    pet = "file=/vm/vm-0.qcow2,if=none,id=disk0,node-name=pet0,format=qcow2"
    pet += ",discard=unmap,cache=writeback,werror=enospc,rerror=report"
    assert runs_in(argv, "-drive", pet, "-device", "virtio-blk-pci,drive=disk0,bootindex=1")
    assert runs_in(argv, "-drive", "file=/r/config-drive.iso,if=none,id=cd0,format=raw,readonly=on,media=cdrom")
    assert runs_in(argv, "-netdev", "tap,id=net0,ifname=podvm-tap0,script=no,downscript=no")
    assert runs_in(argv, "-device", "virtio-net-pci,netdev=net0,mac=0a:58:c0:a8:fe:02")
    assert runs_in(argv, "-vnc", ":0")
    assert "socket,id=qmp,path=/r/qmp.sock,server=on,wait=off" in values(argv, "-chardev")
    assert runs_in(argv, "-vnc", "unix:/r/display.sock,id=web")  # the browser console's screen, only on a Unix socket
    assert values(argv, "-vnc") == [":0", "unix:/r/display.sock,id=web"]
    # qemu's serial port has one client, the console broker; vmrunner console attaches to the broker's console.sock
    assert "socket,id=console,path=/r/serial.sock,server=on,wait=off,logfile=/r/console.fifo" in values(
        argv, "-chardev"
    )
    # the guest agent's channel, for the freeze around a backup
    assert runs_in(argv, "-chardev", "socket,id=agent,path=/r/agent.sock,server=on,wait=off")
    assert runs_in(argv, "-device", "virtserialport,bus=serial0.0,chardev=agent,name=org.qemu.guest_agent.0")


def test_qemu_plan_kvm_legacy_buses_password_and_no_vnc() -> None:
    c = cfg(VM_DISK_BUS="ide", VM_NIC_MODEL="e1000", VNC_PASSWORD_FILE="/secret/vnc")  # noqa: S106 a path, not a password
    argv = list(plan_qemu(c, HS, "kvm", True, None).argv)
    assert runs_in(argv, "-accel", "kvm", "-cpu", "host")
    assert runs_in(argv, "-device", "ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=1")
    assert runs_in(argv, "-device", "e1000,netdev=net0,mac=0a:58:c0:a8:fe:02")
    assert runs_in(
        argv, "-object", "secret,id=vncpass,file=/dev/stdin,format=raw", "-vnc", ":0,password-secret=vncpass"
    )
    assert runs_in(argv, "-vnc", "unix:/run/podvm/display.sock,id=web,password-secret=vncpass")  # the same password
    # qemu gets the cleaned password on its stdin, not the raw Secret
    assert not any("/secret/vnc" in arg for arg in argv)
    assert not any("cd0" in arg for arg in argv)
    scsi = list(plan_qemu(cfg(VM_DISK_BUS="scsi", CONSOLE_PORT="off"), HS, "tcg", False, None).argv)
    assert runs_in(
        scsi, "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1"
    )
    assert "-vnc" not in scsi


def test_accel_choice() -> None:
    refused = "the container may not open /dev/kvm: request the device through a device plugin (see deploy/README.md)"
    assert choose_accel("auto", None) == "kvm"
    assert choose_accel("auto", refused) == "tcg"
    assert choose_accel("tcg", None) == "tcg"
    assert choose_accel("kvm", None) == "kvm"
    with pytest.raises(ConfigError, match=f"^ACCEL=kvm: {re.escape(refused)}$"):
        choose_accel("kvm", refused)


def test_vnc_follows_the_handshake(caplog: pytest.LogCaptureFixture) -> None:
    assert vnc_enabled(cfg(VNC_PASSWORD_FILE="/secret/vnc"), HS) is True  # noqa: S106 a path, not a password
    assert not caplog.records
    assert vnc_enabled(cfg(NO_VNC="true", VNC_PASSWORD_FILE="/secret/vnc"), HS) is True  # noqa: S106
    assert "following the handshake" in caplog.text
    off = samples.handshake(vnc_in_pod=False)
    caplog.clear()
    assert vnc_enabled(cfg(NO_VNC="true"), off) is False
    assert not caplog.records  # no VNC server: nothing to warn about


def test_vnc_without_a_password_is_warned_about_with_the_way_out(caplog: pytest.LogCaptureFixture) -> None:
    assert vnc_enabled(cfg(), HS) is True
    [record] = caplog.records
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert "VNC on TCP 5900 has no password" in message
    assert "VNC_PASSWORD_FILE" in message and "NO_VNC=true" in message and "\n" not in message


@pytest.mark.parametrize(
    ("written", "password"),
    [
        (b"s3cret\n", b"s3cret"),  # kubectl create secret --from-file of a file saved by an editor
        (b"s3cret\r\n", b"s3cret"),
        (b"s3cret\n\n", b"s3cret"),
        (b"s3cret", b"s3cret"),
        (b"exactly8", b"exactly8"),
        (b" pa ss ", b" pa ss "),  # spaces are part of a VNC password; only line ends are dropped
    ],
)
def test_vnc_password_is_read_as_written(tmp_path: Path, written: bytes, password: bytes) -> None:
    secret = tmp_path / "vnc"
    secret.write_bytes(written)
    assert read_password(secret) == password
    assert read_password(None) is None


@pytest.mark.parametrize(
    ("written", "error"),
    [
        (b"", "the VNC password is empty"),
        (b"\n", "the VNC password is empty"),
        (b"ninechars", "is 9 characters long; VNC uses at most 8 and would silently ignore the rest"),
        (b"a-much-longer-password\n", "is 22 characters long"),
        (b"p\xc3\xa4ss", "control or non-ASCII characters"),
        (b"pa\tss", "control or non-ASCII characters"),
        (b"pa\nss", "control or non-ASCII characters"),
        (b"x" * 5000, "larger than 4096 bytes"),
    ],
)
def test_unusable_vnc_password_is_one_line_that_never_shows_it(tmp_path: Path, written: bytes, error: str) -> None:
    secret = tmp_path / "vnc"
    secret.write_bytes(written)
    with pytest.raises(ConfigError) as caught:
        read_password(secret)
    message = str(caught.value)
    assert message.startswith(f"VNC_PASSWORD_FILE={secret}: ") and error in message
    assert "\n" not in message
    if len(written.strip()) > 2:
        assert written.strip().decode(errors="replace") not in message


def test_unreadable_vnc_password_file_is_named(tmp_path: Path) -> None:
    for path, reason in ((tmp_path / "absent", "No such file or directory"), (tmp_path, "Is a directory")):
        with pytest.raises(ConfigError, match=f"VNC_PASSWORD_FILE={path}: cannot read: {reason}$"):
            read_password(path)


def test_progress_lines_give_percent_rate_and_time_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="vmrunner.image")
    progress = Progress("base.qcow2", every=0.0)
    progress.start(0)
    progress.tick(512 << 20, 1 << 30)
    progress.tick(1 << 20, None)
    lines = [r.getMessage() for r in caplog.records]
    assert re.match(r"^fetching base.qcow2: 50% of 1.0 GiB, [\d.]+ [KMGT]?i?B/s, \d+s left$", lines[0]), lines
    assert re.match(r"^fetching base.qcow2: 1.0 MiB, [\d.]+ [KMGT]?i?B/s$", lines[1]), lines
    quiet = Progress("x", every=3600.0)
    quiet.tick(1, 2)
    assert len(caplog.records) == 2


def test_guest_console_lines_cannot_drive_a_terminal_or_split_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A hostile guest's escape sequences and odd line breaks reach ``kubectl logs`` as visible text."""
    assert escape_controls("\x1b]0;owned\x07\x1b[2J plain\ttab ü") == "\\x1b]0;owned\\x07\\x1b[2J plain\ttab ü"
    assert escape_controls("a\x85b\u2028c\x7f\x00") == "a\\x85b\\u2028c\\x7f\\x00"
    caplog.set_level(logging.INFO, logger="guest")
    supervisor = Supervisor(plan_qemu(cfg(), HS, "tcg", False, None), 1.0)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"login: \x1b[8mhidden\r\n2026 ERROR vmrunner: forged\rpart\n")
        supervisor._console_readable(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert [r.getMessage() for r in caplog.records] == ["login: \\x1b[8mhidden", "2026 ERROR vmrunner: forged\\rpart"]


# ------------------------------------------------------------------------------ network configuration (IPv6)
IPV6 = Ipv6("fd70:6f64:766d::ff:fe00:aa", "fd70:6f64:766d::1", "fe80::1", 64, "fd00::5", ("fd00::10",))
DUAL = samples.handshake(families=("ipv4", "ipv6"), ipv6=IPV6)
ONLY6 = samples.handshake(vm_ip=None, gateway=None, pod_ip=None, dns=(), families=("ipv6",), ipv6=IPV6)


def test_drive_gains_network_config_only_where_the_vm_has_ipv6() -> None:
    plan = configdrive.plan_drive("config-2", "vm-0", {}, None)
    assert plan is not None
    assert configdrive.with_network(plan, samples.handshake()) == plan, "IPv4 only: as before (DHCP)"
    dual = configdrive.with_network(plan, DUAL)
    added = {f"/openstack/{v}/network_data.json" for v in configdrive.OPENSTACK_VERSIONS}
    assert set(dual.files) - set(plan.files) == added
    data = json.loads(dual.files["/openstack/latest/network_data.json"])
    assert data["links"] == [{"id": "podvm", "type": "phy", "ethernet_mac_address": DUAL.mac, "mtu": 1440}]
    v4, v6 = data["networks"]
    assert v4["type"] == "ipv4_dhcp", "IPv4 stays on DHCP (hostname, search list, MTU as before)"
    assert (v6["type"], v6["ip_address"], v6["routes"][0]["gateway"]) == ("ipv6", IPV6.vm_ip, IPV6.gateway)
    assert [s["address"] for s in data["services"]] == ["fd00::10", "10.96.0.10", "10.96.0.11"]


def test_nocloud_network_config_v2() -> None:
    nocloud = configdrive.plan_drive("nocloud", "vm-0", {}, None)
    assert nocloud is not None
    plan = configdrive.with_network(nocloud, ONLY6)
    nic = yaml.safe_load(plan.files["/network-config"])["ethernets"]["eth0"]
    assert nic["match"] == {"macaddress": ONLY6.mac} and nic["set-name"] == "eth0"
    assert (nic["dhcp4"], nic["dhcp6"], nic["accept-ra"]) == (False, False, True), "an IPv6-only pod: no DHCPv4"
    assert (nic["addresses"], nic["gateway6"], nic["mtu"]) == ([f"{IPV6.vm_ip}/64"], IPV6.gateway, 1440)
    assert nic["nameservers"] == {"addresses": ["fd00::10"], "search": list(ONLY6.search)}


def test_duties_run_while_the_vm_runs_and_a_failing_one_does_not_stop_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A duty starts once qemu runs, is cancelled when qemu exits, and a duty that fails is one ERROR line."""
    plan = plan_qemu(cfg(RUN_DIR=str(tmp_path)), HS, "tcg", False, None)
    plan = dataclasses.replace(plan, argv=("/bin/sh", "-c", "sleep 0.5"))  # stands in for qemu: runs, then exits 0
    seen: list[str] = []

    async def lasting() -> None:
        seen.append("started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def failing() -> None:
        raise RuntimeError("broken duty")

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # ignores the first cancel; only the loop's final cancel ends it

    started = time.monotonic()
    assert asyncio.run(Supervisor(plan, 1.0, duties=(lasting, failing, stubborn)).run()) == 0
    assert time.monotonic() - started < 30, "a duty that ignores its cancel held the supervisor"
    assert seen == ["started", "cancelled"]
    assert any("broken duty" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert any(r.getMessage().endswith("stubborn did not stop within 2s; going on without it") for r in caplog.records)


def test_the_drive_holds_repeated_files_once_and_reads_them_back_everywhere() -> None:
    """User data and meta data sit in both OpenStack version folders as hard links to one copy of their bytes."""
    userdata = bytes(range(256)) * 1024  # 256 KiB that no other file holds
    plan = configdrive.plan_drive("config-2", "vm-0", {"role": "db"}, userdata)
    assert plan is not None
    image = configdrive.render(plan)
    assert len(userdata) < len(image) < 2 * len(userdata)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        for path, content in plan.files.items():
            for kind in ("rr_path", "joliet_path"):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{kind: path})
                assert out.getvalue() == content, (path, kind)
    finally:
        iso.close()


@pytest.mark.parametrize("variable", ["METADATA", "USERDATA"])
def test_an_endless_input_is_read_no_further_than_its_maximum(variable: str) -> None:
    """A ConfigMap key mounted over a device that never ends (or a huge file) costs one bounded read and one line."""
    with pytest.raises(
        ConfigError, match=f"^{variable}=/dev/zero: larger than {configdrive.MAX_SIZES[variable] >> 10} KiB"
    ):
        configdrive.read_input(Path("/dev/zero"), variable)
    assert configdrive.read_input(Path("/nonexistent"), variable) is None


def test_a_whole_console_line_of_60000_bytes_is_logged_in_pieces_of_4_kib(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="guest")
    supervisor = Supervisor(plan_qemu(cfg(), HS, "tcg", False, None), 1.0)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x" * 60000 + b"\n")
        supervisor._console_readable(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    sizes = [len(r.getMessage()) for r in caplog.records]
    assert sum(sizes) == 60000 and max(sizes) == 4096, sizes


def test_a_hostile_agents_error_cannot_forge_a_runner_line_nor_reach_a_terminal() -> None:
    forged = "no\n2026-12-06 13:00:00 INFO vmrunner.backup: backup 1 done\x1b[2J"
    message = str(AgentError(f"the guest agent refused: {forged}"))
    assert "\n" not in message and "\x1b" not in message
    assert message.endswith("no\\n2026-12-06 13:00:00 INFO vmrunner.backup: backup 1 done\\x1b[2J")


@pytest.mark.parametrize(
    ("queues", "model", "netdev", "device"),
    [
        (1, "virtio-net-pci", "", ""),
        (4, "virtio-net-pci", ",queues=4", ",mq=on,vectors=10"),
        (4, "e1000", ",queues=4", ""),  # the kernel refuses a single-queue open of a multiqueue tap
    ],
)
def test_the_nic_takes_the_handshakes_queues_and_vhost_only_on_its_netdev(
    queues: int, model: str, netdev: str, device: str
) -> None:
    hs = dataclasses.replace(HS, tap_queues=queues)
    for vhost in (False, True):
        plan = plan_qemu(cfg(VM_NIC_MODEL=model), hs, "kvm", False, None, vhost=vhost)
        argv = list(plan.argv)
        wanted = f"tap,id=net0,ifname={HS.tap},script=no,downscript=no{netdev}{',vhost=on' if vhost else ''}"
        assert argv[argv.index("-netdev") + 1] == wanted
        assert f"{model},netdev=net0,mac={HS.mac}{device}" in argv
        assert (plan.vhost, plan.queues) == (vhost, queues)


def test_vhost_is_used_under_kvm_when_the_device_opens_and_on_refuses_anything_else(tmp_path: Path) -> None:
    missing = vhost_problem(str(tmp_path / "vhost-net"))
    assert missing is not None and "is missing" in missing
    unopenable = tmp_path / "vhost-ro"
    unopenable.mkdir()
    assert vhost_problem(str(unopenable)) is not None, "a folder cannot be opened read-write"
    assert choose_vhost("auto", "kvm", None) is True
    assert choose_vhost("auto", "kvm", missing) is False
    assert choose_vhost("auto", "tcg", None) is False
    assert choose_vhost("off", "kvm", None) is False
    with pytest.raises(ConfigError, match=r"^VM_VHOST=on: .*vhost-net is missing"):
        choose_vhost("on", "kvm", missing)
    with pytest.raises(ConfigError, match=r"^VM_VHOST=on: ACCEL is tcg"):
        choose_vhost("on", "tcg", None)
    with pytest.raises(ConfigError, match="VM_VHOST"):
        cfg(VM_VHOST="yes")


def test_a_state_saved_with_vhost_resumes_without_it_but_not_on_other_queues() -> None:
    """vhost-net is how the host moves packets, not a device the guest sees; the queue pairs are."""
    one = plan_qemu(cfg(), HS, "kvm", False, None, vhost=True).argv
    assert hardware_digest(one) == hardware_digest(plan_qemu(cfg(), HS, "kvm", False, None).argv)
    four = dataclasses.replace(HS, tap_queues=4)
    assert hardware_digest(one) != hardware_digest(plan_qemu(cfg(), four, "kvm", False, None).argv)
