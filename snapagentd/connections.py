"""A guard in front of aiohttp's per-connection protocol: who may connect, and how many.

aiohttp waits forever for a new connection's first request and has no cap on open
connections: a few hundred clients that connect and say nothing (or trickle a header byte by
byte) would use up the daemon's file descriptors, and then nobody could connect. The guard
caps open connections and closes a connection whose first request has not arrived, headers
complete, within a deadline. Idle keep-alive connections after a request are aiohttp's own
`keepalive_timeout`; a body's deadline is the API's (api.read_object).

At the cap, a newcomer takes the place of the connection stuck longest in reading a request
(its first request's headers, or a body, still incomplete) if that one has been stuck for more
than `shed_after` seconds: that one is answered 503 `too-many-connections` and closed. Only
when no connection qualifies is the newcomer itself answered so. So a few hundred clients
trickling their requests cannot lock out a client that sends its request at once. The
bookkeeping is two insertion-ordered dicts (oldest first), so a request costs one dict update
at most and finding the oldest costs nothing.

It also screens each peer once, at connect (access.py reads its credentials): a peer that is
not allowed in never reaches aiohttp; its first bytes are answered with a canned 403
`access-denied` and the connection is closed. Answering on connect would race the client's
own write (a write to a closed Unix socket fails with EPIPE before the client reads).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader

from .errors import Fault, TooManyConnections

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Screen = Callable[[asyncio.BaseTransport], Fault | None]
"""Decides on a new connection: None lets it in, a Fault is the answer it gets instead."""


def canned_response(fault: Fault) -> bytes:
    """A whole HTTP response for `fault`, written without aiohttp (which never sees the peer)."""
    body = json.dumps({"error": {"code": fault.code, "message": fault.message}}).encode()
    head = (
        f"HTTP/1.1 {fault.status} {HTTPStatus(fault.status).phrase}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


BUSY_RESPONSE = canned_response(TooManyConnections("too many open connections; retry"))


def _let_everyone_in(transport: asyncio.BaseTransport) -> None:
    return None


class ConnectionShed(ConnectionResetError):
    """Why aiohttp lost a connection the guard shed: its request's unfinished body read
    raises this, so the API knows the client was already answered (503)."""


class ConnectionGuard:
    """Counts open connections, arms a first-request deadline on each and, at the cap, sheds
    the connection stuck longest in reading a request to make room for a newcomer."""

    def __init__(
        self,
        limit: int,
        first_request_seconds: float,
        screen: Screen = _let_everyone_in,
        shed_after: float = 1.0,
    ) -> None:
        self.limit = limit
        self.first_request_seconds = first_request_seconds
        self.screen = screen
        self.shed_after = shed_after
        self.open = 0
        self.refused = 0
        self.expired = 0
        self.shed = 0
        # Waiting for their first request's headers, oldest first (a deadline each).
        self._deadlines: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        # Waiting for the rest of a request's body: since when (loop time), oldest first.
        self._bodies: dict[asyncio.BaseTransport, float] = {}

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for `loop.create_server` that guards `factory`'s protocols."""
        return lambda: _GuardedProtocol(factory(), self)

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        """Disarms the deadline once a request's headers are in (aiohttp parsed them), and
        notes a body still on its way until aiohttp has all of it."""

        @web.middleware
        async def request_arrived(request: web.Request, handler: Handler) -> Any:
            transport = request.transport
            if transport is not None:
                self._disarm(transport)
                body = request.content
                if not body.is_eof():  # rare: nearly every body came with its headers
                    self._await_body(transport, body)
            return await handler(request)

        return request_arrived

    def _disarm(self, transport: asyncio.BaseTransport) -> None:
        deadline = self._deadlines.pop(transport, None)
        if deadline is not None:
            deadline.cancel()

    def _await_body(self, transport: asyncio.BaseTransport, body: StreamReader) -> None:
        self._bodies[transport] = asyncio.get_running_loop().time()
        body.on_eof(lambda: self._bodies.pop(transport, None))

    def _forget(self, transport: asyncio.BaseTransport) -> None:
        self._disarm(transport)
        self._bodies.pop(transport, None)

    def _shed_one(self, now: float) -> bool:
        """Shed the connection stuck longest in reading a request, if it has been stuck for
        more than `shed_after` seconds; True when a place was freed."""
        victim: asyncio.BaseTransport | None = None
        since = now - self.shed_after  # only those stuck since before this qualify
        if self._deadlines:
            transport, deadline = next(iter(self._deadlines.items()))
            connected = deadline.when() - self.first_request_seconds
            if connected < since:
                victim, since = transport, connected
        if self._bodies:
            transport, started = next(iter(self._bodies.items()))
            if started < since:
                victim, since = transport, started
        if victim is None:
            return False
        protocol = victim.get_protocol()
        assert isinstance(protocol, _GuardedProtocol)
        protocol.shed()
        self.shed += 1
        if self.shed == 1 or self.shed % 1000 == 0:
            log.info(
                "shed a connection stuck %.1f s in reading its request: all %d places were "
                "taken (%d so far)",
                now - since,
                self.limit,
                self.shed,
            )
        return True


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every event to aiohttp's protocol, unless the guard turned the peer away.

    `counted`: the connection holds one of the guard's places (and a deadline) until it is
    lost or shed. `forwarding`: aiohttp's protocol has it. `refusal`: the canned answer a
    screened-out peer gets when it first writes. `was_shed`: the guard gave its place away.
    """

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.counted = False
        self.forwarding = False
        self.refusal: bytes | None = None
        self.was_shed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        guard = self.guard
        loop = asyncio.get_running_loop()
        if guard.open >= guard.limit and not guard._shed_one(loop.time()):
            guard.refused += 1
            if guard.refused == 1 or guard.refused % 1000 == 0:
                log.warning(
                    "refused a connection: %d already open (%d so far)", guard.open, guard.refused
                )
            transport.write(BUSY_RESPONSE)
            transport.close()
            return
        self.counted = True
        self.transport = transport
        guard.open += 1
        guard._deadlines[transport] = loop.call_later(guard.first_request_seconds, self._expire)
        refused = guard.screen(transport)
        if refused is not None:
            self.refusal = canned_response(refused)
            return
        self.forwarding = True
        self.inner.connection_made(transport)

    def _expire(self) -> None:
        self.guard.expired += 1
        self.guard._deadlines.pop(self.transport, None)
        log.info(
            "closed a connection that sent no request in %.0f s", self.guard.first_request_seconds
        )
        if self.transport is not None:
            self.transport.abort()

    def shed(self) -> None:
        """Give this connection's place up at once: answer 503 (or its refusal) and close."""
        self._release()
        self.was_shed = True
        transport = self.transport
        assert transport is not None
        transport.write(self.refusal or BUSY_RESPONSE)
        self.refusal = None
        if transport.get_write_buffer_size():  # the peer reads nothing: no answer gets out
            transport.abort()
        else:
            transport.close()

    def _release(self) -> None:
        if self.counted:
            self.counted = False
            self.guard.open -= 1
            if self.transport is not None:
                self.guard._forget(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.forwarding:
            self.inner.data_received(data)
        elif self.refusal is not None and self.transport is not None:
            self.transport.write(self.refusal)
            self.refusal = None
            self.transport.close()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.forwarding else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self.forwarding:
            if self.was_shed:
                exc = ConnectionShed("shed to make room: answered 503 too-many-connections")
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.forwarding:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.forwarding:
            self.inner.resume_writing()
