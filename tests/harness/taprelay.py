"""Relay Ethernet frames between the sidecar's tap and a tap of the VM stand-in, so the stand-in takes qemu's path.

Run inside the pod namespace (``ip netns exec POD python tests/harness/taprelay.py POD_TAP VM_NETNS VM_TAP``): it
attaches to the sidecar's persistent tap there, enters VM_NETNS and creates VM_TAP in it, prints ``ready``, then copies
frames both ways until it is killed (one process per direction; the child dies with its parent).

Both taps use virtio-net headers with checksum and TSO offloads, as qemu's virtio-net does: a frame whose checksum
the sender left to the hardware crosses with that fact in its header instead of arriving unfinished, and large
TCP segments cross whole. Standalone on purpose (only the standard library): it runs as its own process.
"""

import ctypes
import fcntl
import os
import struct
import sys

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
FRAME_MAX = 65536 + 64  # a TSO frame plus its virtio-net header


def attach(name: str) -> int:
    """Open (or create) tap ``name`` in the current network namespace, with virtio-net headers and offloads."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    return fd


def enter_netns(name: str) -> None:
    """setns(2) into a named network namespace (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def copy(src: int, dst: int) -> None:
    """Frames from ``src`` to ``dst`` forever; a frame the other side cannot take (its link down) is dropped."""
    while True:
        frame = os.read(src, FRAME_MAX)
        try:
            os.write(dst, frame)
        except OSError:
            continue


def main() -> None:
    """Attach both taps, say ready, relay."""
    pod_tap, vm_netns, vm_tap = sys.argv[1:4]
    pod_fd = attach(pod_tap)
    enter_netns(vm_netns)
    vm_fd = attach(vm_tap)
    print("ready", flush=True)
    parent = os.getpid()
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 9)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(0)
        copy(pod_fd, vm_fd)
    copy(vm_fd, pod_fd)


if __name__ == "__main__":
    main()
