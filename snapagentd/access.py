"""Who may talk to the agent: the peer's credentials, checked on every connection.

The socket file's mode and group are the first gate, but a wrong `SocketMode=` or a stray
`chmod` would open it to every local user. So the daemon also asks the kernel who is on the
other end (`SO_PEERCRED`, and `SO_PEERGROUPS` for the supplementary groups, both fixed at
`connect()` time) and lets in only root, its own user, and members of `[api] allowed_groups`.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from .errors import AccessDenied

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python has no constant
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_PEERGROUPS_BYTES = 1024  # Python's getsockopt limit: 256 groups; more falls back to NSS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


def peer_check(allowed_gids: frozenset[int]) -> Callable[[web.Request, Handler], Awaitable]:
    """Middleware answering 403 `access-denied` to peers that are not allowed in.

    The kernel fixes a Unix socket's peer credentials at connect(), so they are read once per
    connection and remembered with its transport (two getsockopt calls and a set test per
    request were a fifth of a status request's cost on keep-alive connections).
    """
    own_uid = os.geteuid()
    verdicts: weakref.WeakKeyDictionary[object, tuple[Peer, bool]] = weakref.WeakKeyDictionary()

    @web.middleware
    async def check_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family != socket.AF_UNIX:
            return await handler(request)  # loopback TCP in tests: no peer credentials
        verdict = verdicts.get(transport)
        if verdict is None:
            peer = peer_of(sock)
            verdict = verdicts[transport] = (peer, is_allowed(peer, allowed_gids, own_uid))
        peer, allowed = verdict
        if not allowed:
            log.warning("refused uid %d (pid %d): not in [api] allowed_groups", peer.uid, peer.pid)
            raise AccessDenied(
                f"uid {peer.uid} may not use this agent: only root, the agent's own user and "
                "members of [api] allowed_groups may"
            )
        return await handler(request)

    return check_peer
