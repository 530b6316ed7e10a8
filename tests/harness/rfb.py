"""A VNC client that does what a viewer does to log in: RFB 3.8 with VNC authentication (security type 2).

The server sends a 16-byte challenge; the client answers with it encrypted by DES, keyed with the password padded to
8 bytes and each key byte's bits reversed (RFB's own quirk). DES is ``cryptography``'s TripleDES with the key given
three times, which is single DES. Run as a script (``python -m tests.harness.rfb PORT`` with the password on stdin) it
prints ``OK`` or ``refused: <server's reason>``, so a test can log in from inside a network namespace (``HOST`` after
the port: another address than 127.0.0.1).
"""

import socket
import sys
import time

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

VNC_AUTH = 2


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"server closed the connection after {len(data)} of {size} bytes")
        data += chunk
    return data


def des_key(password: bytes) -> bytes:
    """RFB's DES key: the password cut or padded to 8 bytes, each byte's bits in reverse order."""
    return bytes(int(f"{byte:08b}"[::-1], 2) for byte in password[:8].ljust(8, b"\0"))


def answer(challenge: bytes, password: bytes) -> bytes:
    """The 16-byte response to a VNC authentication challenge."""
    encryptor = Cipher(TripleDES(des_key(password) * 3), modes.ECB()).encryptor()  # noqa: S305 RFB fixes ECB
    return encryptor.update(challenge) + encryptor.finalize()


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """Connect, retrying while nothing listens yet (qemu opens its QMP socket before its VNC server)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def login(host: str, port: int, password: bytes, timeout: float = 15.0) -> str:
    """``OK`` when the server accepts ``password``, else ``refused: <reason>``."""
    with connect(host, port, timeout) as conn:
        version = _exactly(conn, 12)
        if version != b"RFB 003.008\n":
            return f"unexpected server version {version!r}"
        conn.sendall(b"RFB 003.008\n")
        offered = list(_exactly(conn, _exactly(conn, 1)[0]))
        if offered != [VNC_AUTH]:
            return f"offered security types {offered}, not only VNC authentication"
        conn.sendall(bytes([VNC_AUTH]))
        conn.sendall(answer(_exactly(conn, 16), password))
        if int.from_bytes(_exactly(conn, 4), "big") == 0:
            return "OK"
        reason = _exactly(conn, int.from_bytes(_exactly(conn, 4), "big"))
        return f"refused: {reason.decode(errors='replace')}"


if __name__ == "__main__":
    print(login(sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1]), sys.stdin.buffer.read()))
