"""Client sockets for the tests, each with a timeout on every step, connecting included."""

from __future__ import annotations

import os
import socket
import struct


def connect_unix(path: str | os.PathLike[str], timeout: float) -> socket.socket:
    """An AF_UNIX stream socket connected to ``path``; every later step times out after
    ``timeout`` seconds (TimeoutError).

    A Unix socket's connect() does not wait in non-blocking mode, which is what a Python
    timeout puts it in: with the listener's backlog full it fails at once (EAGAIN) where a
    blocking connect waits for room. So connect in blocking mode, the wait bounded by
    SO_SNDTIMEO (the kernel applies it to that wait), then switch to the timeout.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            raise TimeoutError(
                f"connect to {os.fspath(path)}: its backlog stayed full for {timeout:g} s"
            ) from None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
