"""A guard in front of aiohttp's per-connection protocol: who may connect, and how many.

aiohttp waits forever for a new connection's first request and has no cap on open
connections: a few hundred clients that connect and say nothing (or trickle a header byte by
byte) would use up the daemon's file descriptors, and then nobody could connect. The guard
caps open connections (the excess get a 503 `too-many-connections` and are closed) and
closes a connection whose first request has not arrived, headers complete, within a deadline.
Idle keep-alive connections after a request are aiohttp's own `keepalive_timeout`.

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


class ConnectionGuard:
    """Counts open connections and arms a first-request deadline on each."""

    def __init__(
        self, limit: int, first_request_seconds: float, screen: Screen = _let_everyone_in
    ) -> None:
        self.limit = limit
        self.first_request_seconds = first_request_seconds
        self.screen = screen
        self.open = 0
        self.refused = 0
        self.expired = 0
        self._deadlines: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for `loop.create_server` that guards `factory`'s protocols."""
        return lambda: _GuardedProtocol(factory(), self)

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        """Disarms the deadline once a request's headers are in (aiohttp parsed them)."""

        @web.middleware
        async def first_request_arrived(request: web.Request, handler: Handler) -> Any:
            if request.transport is not None:
                self._disarm(request.transport)
            return await handler(request)

        return first_request_arrived

    def _disarm(self, transport: asyncio.BaseTransport) -> None:
        deadline = self._deadlines.pop(transport, None)
        if deadline is not None:
            deadline.cancel()


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every event to aiohttp's protocol, unless the guard turned the peer away.

    `counted`: the connection holds one of the guard's places (and a deadline) until it is
    lost. `forwarding`: aiohttp's protocol has it. `refusal`: the canned answer a screened-out
    peer gets when it first writes.
    """

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.counted = False
        self.forwarding = False
        self.refusal: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        guard = self.guard
        if guard.open >= guard.limit:
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
        loop = asyncio.get_running_loop()
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
        if not self.counted:
            return
        self.guard.open -= 1
        if self.transport is not None:
            self.guard._disarm(self.transport)
        if self.forwarding:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.forwarding:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.forwarding:
            self.inner.resume_writing()
