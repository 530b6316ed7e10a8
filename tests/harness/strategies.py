"""What a hostile or careless user can put in podvm's inputs, as Hypothesis strategies.

Environment values are text without NUL (the kernel cannot pass one) but with the lone surrogates Python uses for
bytes that are not UTF-8. Each variable draws from values that are nearly right (so parsing goes deep), values
meant for other variables, and garbage.
"""

import string
from collections.abc import Callable
from pathlib import Path

from hypothesis import event
from hypothesis import strategies as st

from shared.errors import PodvmError

UNDECODABLE = [chr(c) for c in range(0xDC80, 0xDD00)]  # os.environ's surrogateescape for non-UTF-8 bytes
ENV_CHARS = st.characters(codec="utf-8", exclude_characters="\x00") | st.sampled_from(UNDECODABLE)
garbage = st.text(ENV_CHARS, max_size=30)
near_ascii = st.text(string.printable + " \t\n.:/-_", max_size=30)
numbers = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.just("9" * 5000),  # past Python's limit on int() of a string
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)
sizes = st.builds(lambda n, unit: f"{n}{unit}", st.integers(0, 2**64), st.sampled_from(["", "K", "M", "G", "T", "GiB"]))
durations = st.builds(lambda n, unit: f"{n}{unit}", st.floats(0, 1e30), st.sampled_from(["", "s", "ms", "m", "h"]))
flags = st.sampled_from(["true", "false", "yes", "no", "on", "off", "1", "0", "", " TRUE ", "maybe"])
ipv4s = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.just("192.168.254.2 "))
hostnames = st.one_of(
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?){0,4}\Z"),
    st.just(".".join(["a" * 62] * 4)[:250]),
    st.sampled_from(["ignore", "123", "-x", "x-", "a..b", "VM-0", "vm_0", "ünï", "a" * 64]),
    garbage,
)


def paths(sandbox: Path) -> st.SearchStrategy[str]:
    """Absolute paths inside ``sandbox`` (which the tests fill), too-long paths, relative paths and garbage."""
    inside = st.sampled_from(["", "/meta", "/user", "/resolv", "/vnc", "/run", "/image", "/vm", "/absent"])
    return st.one_of(
        inside.map(lambda name: f"{sandbox}{name}"),
        st.text(ENV_CHARS, max_size=20).map(lambda rest: f"{sandbox}/{rest}"),
        st.just("/" + "a" * 300),
        st.just("/a" * 2100),
        garbage,
    )


def value_for(name: str, sandbox: Path) -> st.SearchStrategy[str]:
    """Values of the kind ``name`` takes, right or nearly right, so a parse goes deep before it fails."""

    def within(low: int, high: int) -> st.SearchStrategy[str]:
        return st.integers(low, high).map(str) | numbers

    own: dict[str, st.SearchStrategy[str]] = {
        "VM_IP": st.sampled_from(["192.168.254.2", "10.0.0.1", "10.0.0.2"]) | ipv4s,
        "VM_GW": st.sampled_from(["192.168.254.1", "10.0.0.1", "10.0.0.2"]) | ipv4s,
        "POD_IP": st.sampled_from(["10.1.2.3", "192.168.254.1"]) | ipv4s,
        "NO_VNC": flags,
        "POD_MTU": within(576, 65535),
        "METRICS_PORT": st.sampled_from(["9100", "5900", "6080"]) | within(0, 65536),
        "CONSOLE_POD_PORT": st.sampled_from(["6080", "5900", "9100"]) | within(0, 65536),
        "CONSOLE_PORT": st.sampled_from(["6080", "off", "OFF", "5900", "9100"]) | within(0, 65536),
        "VM_CPUS": within(1, 255),
        "FETCH_RETRIES": within(0, 100),
        "TAP_OWNER": st.one_of(within(0, 2**32 - 2), st.just("root")),
        "VM_MAC": st.one_of(st.from_regex(r"\A([0-9a-fA-F]{2}[:-]){5}[0-9a-fA-F]{2}\Z"), garbage),
        "GW_MAC": st.one_of(st.sampled_from(["02:00:00:00:00:aa", "02-00-00-00-00-AA"]), garbage),
        "HOSTNAME": hostnames,
        "VM_MEMORY": sizes,
        "VM_DISK_SIZE": sizes,
        "VM_DIR_MIN_FREE": sizes,
        "IMG_MAX_SIZE": sizes,
        "SHUTDOWN_TIMEOUT": durations,
        "HANDSHAKE_TIMEOUT": durations,
        "POD_WAIT_TIMEOUT": durations,
        "IMG_SOURCE": st.one_of(
            st.just("https://images.example.org/debian-12.qcow2"),
            st.just(f"{sandbox}/image/base.qcow2"),
            st.builds(lambda host, path: f"https://{host}/{path}", near_ascii, near_ascii),
            st.sampled_from(["http://", "https://:80/x.qcow2", "http://[::1/x", "https://h/", "/", "ftp://h/x"]),
            paths(sandbox),
        ),
        "IMG_TARGET": st.one_of(st.from_regex(r"\A[A-Za-z0-9._+-]{1,40}\Z"), st.just("x" * 300), garbage),
        "IMG_CHECKSUM": st.one_of(
            st.builds(
                lambda a, h: f"{a}:{h}",
                st.sampled_from(["sha256", "SHA512", "md5", ""]),
                st.text("0123456789abcdefABCDEFx", max_size=130),
            ),
            garbage,
        ),
        "ACCEL": st.sampled_from(["auto", "kvm", "tcg", "KVM", "xen", ""]),
        "IMG_FORMAT": st.sampled_from(["qcow2", "raw", "vmdk", "QCOW2", "ova", "vhd"]),
        "IMG_OVA_DISK": st.one_of(st.sampled_from(["vmdisk1", "disk.vmdk", "..", ""]), garbage),
        "VM_DISK_BUS": st.sampled_from(["virtio", "ide", "scsi", "sata"]),
        "VM_NIC_MODEL": st.sampled_from(["virtio-net-pci", "e1000", "rtl8139", "ne2k"]),
        "CONFIG_DRIVE": st.sampled_from(["config-2", "nocloud", "NoCloud", "cidata"]),
        "VM_MACHINE": st.one_of(st.sampled_from(["pc", "q35", "pc,accel=kvm", "none"]), garbage),
        "QEMU": st.one_of(st.sampled_from(["qemu-system-x86_64", "/usr/bin/qemu-system-x86_64"]), garbage),
        "POD_IFACE": st.one_of(st.sampled_from(["eth0", "net1", "a" * 16, "eth 0"]), garbage),
    }
    return own.get(name, paths(sandbox))


def any_value(sandbox: Path) -> st.SearchStrategy[str]:
    """A value of any variable's kind, or garbage: what a variable gets when it is set wrong."""
    return st.one_of(garbage, numbers, sizes, durations, flags, ipv4s, hostnames, paths(sandbox))


def one_line_or_nothing(call: Callable[[], object]) -> None:
    """The property: ``call()`` succeeds, or raises a PodvmError whose message is one non-empty line."""
    try:
        call()
    except PodvmError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        event(f"refused: {type(err).__name__}")
    else:
        event("accepted")
