"""Slow and vanishing clients, against a real agent process over its Unix socket.

A body has BODY_SECONDS to arrive after its headers, else 408 `body-timeout` and the
connection is closed. With every place under the connection cap taken, a newcomer takes the
place of the connection stuck longest (more than SHED_AFTER_SECONDS) in reading a request,
which is answered 503 `too-many-connections` and closed; only when none qualifies is the
newcomer itself answered so. A client that hangs up in the middle of its body is one INFO
line in the log: no traceback, no Sentry event.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapagentd import api, daemon

from .engine import wait_until
from .faults import SentryReceiver
from .test_limits import RawClient, error_of, unix_connector

pytestmark = pytest.mark.usefixtures("clean_engine")

BODY_SECONDS = float(api.BODY_SECONDS)
SHED_AFTER = float(daemon.SHED_AFTER_SECONDS)
PLACES = daemon.MAX_CONNECTIONS
BYTE_EVERY = 2.0  # seconds between a trickling client's body bytes
MARGIN = 3.0  # for a 2-core machine shared with other tests; far below aiohttp's 10 s linger
DISCONNECTED = "client disconnected before sending its whole body"


def connect(path: str | Path, timeout: float = 10.0) -> socket.socket:
    """A Unix socket connected to `path`, with `timeout` on every step. The connect blocks
    while the listen backlog is full, bounded by SO_SNDTIMEO: with settimeout() it would be
    non-blocking underneath, and a full backlog fails it at once (EAGAIN)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(timeout), 0))
        sock.connect(str(path))
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def parse_answer(received: bytes) -> tuple[int | None, str | None]:
    """(status, error code) of the one answer in `received`; (None, None) for no answer."""
    if not received:
        return None, None
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return status, code


@dataclass
class Trickler:
    """One client: the headers at once, then its body one byte at a time."""

    sock: socket.socket
    headers_sent: float = 0.0
    received: bytes = b""
    ended: float | None = None  # when the agent closed the connection

    @property
    def answer(self) -> tuple[int | None, str | None]:
        return parse_answer(self.received)


class Tricklers:
    """`count` clients on one thread: each sends a POST's headers with Content-Length 100, then
    one body byte every BYTE_EVERY seconds, and records what the agent answers and when it
    closes the connection. Every socket has a timeout; the thread gives up at `give_up`."""

    def __init__(self, socket_path: str, count: int, give_up: float) -> None:
        self.socket_path = socket_path
        self.count = count
        self.give_up = give_up
        self.clients: list[Trickler] = []
        self.all_sent = threading.Event()  # every client's headers are out
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Tricklers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=self.give_up + 10)
        for client in self.clients:
            client.sock.close()

    def _run(self) -> None:
        try:
            self._trickle()
        except BaseException as error:  # reported by the test, not lost in a thread
            self.error = error
            self.all_sent.set()

    def _trickle(self) -> None:
        headers = (
            b"POST /v1/snapshots/lookup HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        selector = selectors.DefaultSelector()
        for _ in range(self.count):
            sock = connect(self.socket_path)
            with contextlib.suppress(OSError):  # refused: its answer waits to be read
                sock.sendall(headers)
            client = Trickler(sock, headers_sent=time.monotonic())
            self.clients.append(client)
            selector.register(sock, selectors.EVENT_READ, client)
        self.all_sent.set()
        started = time.monotonic()
        next_byte = started + BYTE_EVERY
        while selector.get_map() and time.monotonic() < started + self.give_up:
            for key, _ in selector.select(timeout=max(0.0, next_byte - time.monotonic())):
                client = key.data
                try:
                    chunk = client.sock.recv(65536)
                except OSError:  # ECONNRESET: closed with our bytes unread; we read its answer
                    chunk = b""
                if chunk:
                    client.received += chunk
                else:
                    client.ended = time.monotonic()
                    selector.unregister(client.sock)
            if time.monotonic() >= next_byte:
                for key in list(selector.get_map().values()):
                    with contextlib.suppress(OSError):  # closed: its answer is being read
                        key.data.sock.send(b" ")
                next_byte += BYTE_EVERY
        selector.close()


def timed(client: RawClient, method: str, path: str, data: Any = None) -> tuple[Any, float]:
    started = time.monotonic()
    reply = client.call(method, path, data)
    return reply, time.monotonic() - started


def test_a_client_is_served_within_2_s_while_260_others_trickle_their_bodies(
    agent: Any, image_factory: Any
) -> None:
    image_factory("cascade-snapshot-slow:latest")
    key = {"project": "p", "work_item": "w"}
    register = key | {"image": "cascade-snapshot-slow:latest"}
    good = RawClient(unix_connector(agent.socket_path), timeout=2.0)  # a hang fails the test
    refused_first = 0

    def registered() -> Any:
        """Register, on one keep-alive connection; False on the 503 a newcomer gets while
        no trickling connection has been stuck for SHED_AFTER yet."""
        nonlocal refused_first
        reply, took = timed(good, "POST", "/v1/snapshots", register)
        if reply.status == 503:
            assert error_of(reply)[1] == "too-many-connections", reply
            refused_first += 1
            return False
        return reply, took

    try:
        with Tricklers(str(agent.socket_path), PLACES + 4, BODY_SECONDS + 20) as tricklers:
            assert tricklers.all_sent.wait(timeout=30), "the clients never got their headers out"
            assert tricklers.error is None, tricklers.error
            sent = max(client.headers_sent for client in tricklers.clients)
            reply, took = wait_until(registered, timeout=SHED_AFTER + 5, interval=0.1)
            assert reply.status == 201 and took <= 2.0, (reply, took)
            for method, path, data in [
                ("POST", "/v1/snapshots/lookup", key),
                ("GET", "/v1/status", None),
            ]:
                reply, took = timed(good, method, path, data)
                assert reply.status == 200 and took <= 2.0, (method, path, reply, took)
            served = time.monotonic()
            assert served - sent < BODY_SECONDS, "served only once the tricklers were gone"
            assert good.sock is not None, "the good client's connection was closed"
            wait_until(
                lambda: all(client.ended for client in tricklers.clients),
                timeout=BODY_SECONDS + MARGIN + 5,
                message="every trickling client answered and closed",
            )
        assert tricklers.error is None, tricklers.error
    finally:
        good.close()

    answers: dict[tuple[int | None, str | None], int] = {}
    for client in tricklers.clients:
        answers[client.answer] = answers.get(client.answer, 0) + 1
    # The 4 over the cap were refused at once (or, on a slow machine, each took the place of
    # an earlier one), and the good client's one connection took one trickler's place.
    assert answers == {(408, "body-timeout"): PLACES - 1, (503, "too-many-connections"): 5}
    for client in tricklers.clients:
        assert client.ended is not None
        if client.answer[0] == 408:  # at the body deadline, then closed at once
            held = client.ended - client.headers_sent
            assert BODY_SECONDS - 0.5 <= held <= BODY_SECONDS + MARGIN, held
            message = error_of_bytes(client.received)[2]
            assert f"did not arrive within {api.BODY_SECONDS} s" in message, message
            assert b"connection: close" in client.received.lower()
        else:
            assert client.ended - client.headers_sent <= SHED_AFTER + 5 + MARGIN
    log = agent.log()
    assert "shed a connection stuck" in log, log[-3000:]
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert DISCONNECTED not in log, "a shed client was logged as one that hung up"
    assert agent.process.poll() is None


def error_of_bytes(received: bytes) -> tuple[int, str, str]:
    head, _, body = received.partition(b"\r\n\r\n")
    error = json.loads(body)["error"]
    return int(head.split(b" ", 2)[1]), error["code"], error["message"]


def test_a_newcomer_takes_the_place_of_a_silent_connection_before_its_deadline(
    agent: Any,
) -> None:
    """Every place held by connections that say nothing: the newcomer is served after
    SHED_AFTER, long before the first-request deadline would free a place, and exactly one
    silent connection was answered 503 to make room for it."""
    assert daemon.FIRST_REQUEST_SECONDS >= SHED_AFTER + 5
    silent = [connect(agent.socket_path) for _ in range(PLACES)]
    try:
        fresh = RawClient(unix_connector(agent.socket_path), timeout=10)

        def served() -> bool:
            reply = fresh.call("GET", "/v1/status")
            if reply.status == 503:
                assert error_of(reply)[1] == "too-many-connections", reply
                return False
            assert reply.status == 200, reply
            return True

        started = time.monotonic()
        try:
            wait_until(served, timeout=SHED_AFTER + 5, interval=0.1, message="served")
        finally:
            fresh.close()
        assert time.monotonic() - started < daemon.FIRST_REQUEST_SECONDS
        # The shed one's answer was written before the newcomer's request was even read.
        selector = selectors.DefaultSelector()
        for sock in silent:
            selector.register(sock, selectors.EVENT_READ)
        answered = [key.fileobj for key, _ in selector.select(timeout=0)]
        selector.close()
        assert len(answered) == 1, len(answered)
        shed = answered[0]
        assert isinstance(shed, socket.socket)
        status, code = parse_answer(shed.recv(65536))
        assert (status, code) == (503, "too-many-connections")
    finally:
        for sock in silent:
            sock.close()
    assert "shed a connection stuck" in agent.log()


BODIES = {
    "content-length": (b"Content-Length: 1000\r\n\r\n", b"0123456789"),
    "chunked": (b"Transfer-Encoding: chunked\r\n\r\n", b"a\r\n0123456789\r\n"),
}


@pytest.mark.parametrize("framing", list(BODIES))
def test_a_client_that_hangs_up_mid_body_is_one_info_line_and_no_sentry_event(
    make_agent: Any, sentry: SentryReceiver, framing: str
) -> None:
    agent = make_agent(start=False)
    agent.extra["sentry"] = {"dsn": sentry.dsn, "environment": "test"}
    agent.write_config()
    agent.start()
    headers, partial = BODIES[framing]
    sock = connect(agent.socket_path)
    try:
        sock.sendall(b"POST /v1/snapshots HTTP/1.1\r\nHost: localhost\r\n" + headers + partial)
    finally:
        sock.close()
    line = f"INFO snapagentd.api: POST /v1/snapshots: {DISCONNECTED}"
    wait_until(lambda: line in agent.log(), timeout=10, message="the INFO line")
    assert agent.stop() == 0  # and Sentry's queue flushed on the way out
    log = agent.log()
    assert "sentry: reporting to" in log, "Sentry was never switched on"
    assert log.count(DISCONNECTED) == 1, log
    assert "Traceback" not in log and "unexpected error" not in log, log
    assert "ERROR" not in log, log
    assert sentry.events == []
