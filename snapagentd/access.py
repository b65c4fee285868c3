"""Who may talk to the agent: the peer's credentials, checked once per connection.

The socket file's mode and group are the first gate, but a wrong `SocketMode=` or a stray
`chmod` would open it to every local user. So the daemon also asks the kernel who is on the
other end (`SO_PEERCRED`, and `SO_PEERGROUPS` for the supplementary groups, both fixed at
`connect()` time) and lets in only root, its own user, and members of `[api] allowed_groups`.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import AccessDenied, Fault

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python has no constant
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_PEERGROUPS_BYTES = 1024  # Python's getsockopt limit: 256 groups; more falls back to NSS


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gids: frozenset[int]  # primary and supplementary


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process that connected `sock` (a Unix stream socket)."""
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Peer(pid, uid, frozenset({gid, *_peer_groups(sock, uid, gid)}))


def _peer_groups(sock: socket.socket, uid: int, gid: int) -> Iterable[int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_PEERGROUPS_BYTES)
    except OSError:  # ERANGE (over 256 groups) or an old kernel: ask NSS instead
        try:
            return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
        except KeyError:  # a uid with no name has no supplementary groups we can know
            return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def group_ids(names: Iterable[str]) -> frozenset[int]:
    """Resolve `[api] allowed_groups`; raises KeyError naming the first unknown group."""
    gids = set()
    for name in names:
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            raise KeyError(name) from None
    return frozenset(gids)


def is_allowed(peer: Peer, allowed_gids: frozenset[int], own_uid: int) -> bool:
    return peer.uid in (0, own_uid) or bool(peer.gids & allowed_gids)


def peer_screen(allowed_gids: frozenset[int]) -> Callable[[asyncio.BaseTransport], Fault | None]:
    """For connections.ConnectionGuard: None for a peer that may come in, else AccessDenied.

    The kernel fixes a Unix socket's peer credentials at connect(), so one look per
    connection covers every request on it (per request, two getsockopt calls and a set test
    were a fifth of a status request's cost on keep-alive connections).
    """
    own_uid = os.geteuid()

    def screen(transport: asyncio.BaseTransport) -> Fault | None:
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return None  # loopback TCP in tests: no peer credentials
        peer = peer_of(sock)
        if is_allowed(peer, allowed_gids, own_uid):
            return None
        log.warning("refused uid %d (pid %d): not in [api] allowed_groups", peer.uid, peer.pid)
        return AccessDenied(
            f"uid {peer.uid} may not use this agent: only root, the agent's own user and "
            "members of [api] allowed_groups may"
        )

    return screen
