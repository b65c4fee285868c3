"""A guard in front of aiohttp's per-connection protocol, so the socket cannot be exhausted.

aiohttp waits forever for a new connection's first request and has no cap on open
connections: a few hundred clients that connect and say nothing (or trickle a header byte by
byte) would use up the daemon's file descriptors, and then nobody could connect. The guard
caps open connections (the excess get a 503 `too-many-connections` and are closed) and
closes a connection whose first request has not arrived, headers complete, within a deadline.
Idle keep-alive connections after a request are aiohttp's own `keepalive_timeout`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

_BUSY_BODY = json.dumps(
    {"error": {"code": "too-many-connections", "message": "too many open connections; retry"}}
).encode()
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConnectionGuard:
    """Counts open connections and arms a first-request deadline on each."""

    def __init__(self, limit: int, first_request_seconds: float) -> None:
        self.limit = limit
        self.first_request_seconds = first_request_seconds
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
    """Forwards every event to aiohttp's protocol, unless the guard turned the peer away."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.admitted = False

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
        self.admitted = True
        self.transport = transport
        guard.open += 1
        loop = asyncio.get_running_loop()
        guard._deadlines[transport] = loop.call_later(guard.first_request_seconds, self._expire)
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
        if self.admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.guard.open -= 1
        if self.transport is not None:
            self.guard._disarm(self.transport)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()
