"""The blocking Python client (snapagentd.client.Client) beyond the shared examples, which
test_contracts.py replays: its error map, the naming rule, retries, timeouts, broken answers.

A real agent where one can show the behaviour; `CannedAgent`, a stand-in that answers every
request with one fixed HTTP response, only for what a healthy agent never sends (a failed
journal, a broken engine, malformed answers).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapagentd import client as sac
from snapagentd import errors, models

from .agent import REPO
from .engine import make_image
from .test_contracts import OPENAPI, match

TAGS = json.loads((REPO / "contracts" / "snapshot-tags.json").read_text(encoding="utf-8"))
FAST_RETRY = sac.Retry(attempts=3, initial_delay=0.01, max_delay=0.01)


# --- a stand-in for answers only a broken agent gives -----------------------------------------


class CannedAgent:
    """A Unix-socket server answering every request with `response` (raw HTTP bytes)."""

    def __init__(self, path: Path, response: bytes) -> None:
        self.path = str(path)
        self.response = response
        self.requests: list[bytes] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:  # closed
                return
            with connection:
                self.requests.append(read_request(connection))
                connection.sendall(self.response)

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=10)


def read_request(connection: socket.socket) -> bytes:
    """One whole HTTP request (head and Content-Length body), so closing never resets it."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def http_answer(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\nConnection: close\r\n\r\n" + body


def error_answer(status: str, code: str, message: str) -> bytes:
    return http_answer(status, json.dumps({"error": {"code": code, "message": message}}).encode())


@pytest.fixture
def canned(short_tmp_path: Path) -> Iterator[object]:
    """`canned(response) -> CannedAgent` on a socket of its own; all closed at the end."""
    servers: list[CannedAgent] = []

    def start(response: bytes) -> CannedAgent:
        server = CannedAgent(short_tmp_path / f"canned-{len(servers)}.sock", response)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# --- the error map and the naming rule ---------------------------------------------------------


def agent_faults() -> dict[str, int]:
    """Every stable code the agent's errors.py defines, with its status."""
    faults: dict[str, int] = {}
    pending: list[type[errors.Fault]] = [errors.Fault]
    while pending:
        cls = pending.pop()
        faults[cls.code] = cls.status
        pending += cls.__subclasses__()
    return faults


def test_one_exception_class_per_error_code_of_the_agent() -> None:
    assert {code: cls.status for code, cls in sac.ERRORS.items()} == agent_faults()
    assert set(sac.ERRORS) == set(OPENAPI["components"]["schemas"]["ErrorCode"]["enum"])
    for cls in sac.ERRORS.values():
        assert issubclass(cls, sac.SnapagentdError) and issubclass(cls, sac.ClientError)


def test_class_names_follow_the_codes_as_in_the_typescript_client() -> None:
    """PascalCase of the code, with `Error` appended unless it already ends so."""
    for code, cls in sac.ERRORS.items():
        name = "".join(part.capitalize() for part in code.split("-"))
        assert cls.__name__ == (name if name.endswith("Error") else name + "Error")


@pytest.mark.parametrize("case", TAGS["cases"], ids=lambda case: case["tag"])
def test_snapshot_tag_follows_the_shared_table(case: dict[str, str]) -> None:
    prefix = {"prefix": case["prefix"]} if "prefix" in case else {}
    assert sac.snapshot_tag(case["project"], case["work_item"], **prefix) == case["tag"]
    assert models.snapshot_tag(case["project"], case["work_item"], **prefix) == case["tag"]


def test_contract_matching_is_strict() -> None:
    """The replay's matcher must reject what it claims to reject, or the replays prove nothing."""
    bad = [
        ({"a": 1}, {"a": 1, "b": 2}),  # an extra field
        ({"a": 1}, {"a": True}),  # a boolean is not an integer
        ("<integer>", "5"),
        ("<timestamp>", "2024-05-01T12:00:00Z"),  # no microseconds
        ("<image-id>", "sha256:abc"),
        ([1, 2], [2, 1]),
        (None, "x"),
    ]
    for expected, actual in bad:
        with pytest.raises(AssertionError):
            match(expected, actual, {})
    bindings: dict[str, object] = {}
    match(["<string:x>", "<string:x>"], ["same", "same"], bindings)
    with pytest.raises(AssertionError):
        match("<string:x>", "other", bindings)


# --- no agent, a refusing one, a hung one, a restarting one -----------------------------------


def test_missing_socket_is_unreachable_after_the_retries(short_tmp_path: Path) -> None:
    path = str(short_tmp_path / "none.sock")
    with pytest.raises(sac.AgentUnreachable) as caught:
        sac.Client(path, retry=FAST_RETRY).status()
    assert caught.value.socket_path == path
    assert str(caught.value) == f"cannot reach snapagentd at {path}: No such file or directory"
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_refused_connection_is_unreachable(short_tmp_path: Path) -> None:
    path = short_tmp_path / "refusing.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))  # bound, never listening: connections are refused
        with pytest.raises(sac.AgentUnreachable, match="Connection refused"):
            sac.Client(str(path), retry=sac.NO_RETRY).lookup("p", "w")


def test_an_agent_that_never_answers_times_out(short_tmp_path: Path) -> None:
    path = short_tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(str(path))
        hung.listen()  # the connection waits in the backlog; nobody ever reads or answers
        with pytest.raises(sac.AgentUnreachable, match="timed out"):
            sac.Client(str(path), timeout=0.2).status()


class SignallingRetry(sac.Retry):
    """A Retry that also tells the test when the client is waiting to try again."""

    waiting = threading.Event()

    def delays(self) -> Iterator[float | None]:
        for delay in super().delays():
            if delay is not None:
                SignallingRetry.waiting.set()
            yield delay


def test_the_retry_bridges_an_agent_restart(make_agent, clean_engine) -> None:
    agent = make_agent()
    agent.stop()
    SignallingRetry.waiting.clear()
    retry = SignallingRetry(attempts=100, initial_delay=0.05, max_delay=0.5)  # up to ~50 s
    client = sac.Client(str(agent.socket_path), retry=retry)
    with ThreadPoolExecutor(max_workers=1) as pool:
        status = pool.submit(client.status)
        assert SignallingRetry.waiting.wait(timeout=30), "the client never had to retry"
        agent.start()
        assert status.result(timeout=60).docker.reachable is True


# --- answers only a broken agent gives --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        ("503 Service Unavailable", "journal-unavailable", sac.JournalUnavailableError),
        ("502 Bad Gateway", "docker-error", sac.DockerError),
        ("500 Internal Server Error", "internal-error", sac.InternalError),
        ("403 Forbidden", "access-denied", sac.AccessDeniedError),
        ("503 Service Unavailable", "too-many-connections", sac.TooManyConnectionsError),
    ],
)
def test_codes_a_healthy_agent_does_not_send_here_raise_their_classes(canned, status, code, cls):
    agent = canned(error_answer(status, code, "journal write failed: No space left on device"))
    with pytest.raises(cls) as caught:
        sac.Client(agent.path).register("p", "w", "cascade-snapshot-x:latest")
    assert (caught.value.code, caught.value.status) == (code, int(status.split()[0]))
    assert caught.value.message == "journal write failed: No space left on device"


def test_a_code_this_client_does_not_know_raises_the_base_class(canned) -> None:
    agent = canned(error_answer("429 Too Many Requests", "slow-down", "later"))
    with pytest.raises(sac.SnapagentdError) as caught:
        sac.Client(agent.path).status()
    assert type(caught.value) is sac.SnapagentdError
    assert (caught.value.code, caught.value.status, caught.value.message) == (
        "slow-down",
        429,
        "later",
    )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (http_answer("200 OK", b"<html>hi</html>", "text/html"), "not JSON"),
        (http_answer("200 OK", b"[1, 2]"), "expected a JSON object, got list"),
        (http_answer("200 OK", b'{"snapshots": {}}'), "snapshots is not a list"),
        (http_answer("200 OK", b'{"snapshots": [{"project": "p"}]}'), "missing field 'work_item'"),
        (http_answer("502 Bad Gateway", b"<html>proxy</html>", "text/html"), "HTTP 502"),
        (error_answer("500 Internal Server Error", 5, "x"), "HTTP 500"),
        (b"SMTP ready\r\n\r\n", "malformed HTTP answer"),
    ],
)
def test_answers_that_break_the_contract_raise_protocol_error(canned, answer, message) -> None:
    agent = canned(answer)
    with pytest.raises(sac.ProtocolError, match=message):
        sac.Client(agent.path).list()


def test_the_request_on_the_wire(canned) -> None:
    """What a proxy or a log sees: JSON with its Content-Type, the query as %-encoded UTF-8."""
    agent = canned(http_answer("200 OK", b'{"snapshots": []}'))
    client = sac.Client(agent.path)
    assert client.list("a+b c/é") == []
    with pytest.raises(sac.ProtocolError):
        client.evict(dry_run=True)  # {"snapshots": []} is no eviction answer
    listing, eviction = agent.requests
    assert listing.startswith(b"GET /v1/snapshots?project=a%2Bb%20c%2F%C3%A9 HTTP/1.1\r\n")
    assert b"\r\nAccept: application/json\r\n" in listing
    assert eviction.startswith(b"POST /v1/evict HTTP/1.1\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in eviction
    assert eviction.endswith(b'\r\n\r\n{"dry_run": true}')


# --- a real agent -----------------------------------------------------------------------------


def test_keys_with_plus_slash_and_unicode_round_trip(agent, docker_client) -> None:
    project, work_item = "a+b c/é", "w&x=y %2B"
    tag = sac.snapshot_tag(project, work_item)
    image_id = make_image(docker_client, tag)
    client = sac.Client(str(agent.socket_path))
    registration = client.register(project, work_item, tag)
    assert registration.created and registration.snapshot.image_id == image_id
    assert [s.work_item for s in client.list(project)] == [work_item]
    assert client.list("a b c/é") == []  # a literal + is not a space
    found = client.lookup(project, work_item)
    assert found is not None and found.last_used_at is not None
    assert client.delete(project, work_item).result == "removed"
    assert client.lookup(project, work_item) is None
    with pytest.raises(sac.SnapshotNotFoundError):
        client.delete(project, work_item)


def test_typed_results_are_read_from_a_real_status(agent) -> None:
    status = sac.Client(str(agent.socket_path)).status()
    assert status.docker.reachable and status.docker.error is None
    assert status.policy.max_count == 100 and status.snapshots.count == 0
    assert status.last_eviction is not None and status.last_eviction.trigger == "start"
    assert status.last_eviction.started_at.tzinfo is not None
    assert sac.to_json(status) == agent.status()
