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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from snapagentd import client as sac
from snapagentd import errors, models

from .agent import REPO
from .engine import create_stopped_container, image_exists, make_image, wait_until
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
                connection.settimeout(30)  # a client that never sends must not stop the server
                try:
                    self.requests.append(read_request(connection))
                    connection.sendall(self.response)
                except OSError:  # timed out, or the client went away: serve the next one
                    continue

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=10)


def read_request(connection: socket.socket) -> bytes:
    """One whole HTTP request (head and Content-Length body), so closing never resets it."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _received(connection)
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        body += _received(connection)
    return head + b"\r\n\r\n" + body


def _received(connection: socket.socket) -> bytes:
    chunk = connection.recv(65536)
    if not chunk:  # closed before its request was whole (else this would spin forever)
        raise ConnectionResetError("the client closed mid-request")
    return chunk


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


def following_events(agent: Any) -> None:
    """Wait until the agent follows Docker's events (it connects just after READY), so that two
    reads of its status agree on `docker.events`."""

    def connected() -> bool:
        events = agent.status()["docker"]["events"]
        return events is None or events["connected"]

    wait_until(connected, timeout=30, message="the agent to follow Docker's events")


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
        ("408 Request Timeout", "body-timeout", sac.BodyTimeoutError),
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


def test_lease_requests_on_the_wire(canned) -> None:
    agent = canned(http_answer("200 OK", b"{}"))
    client = sac.Client(agent.path)
    for call in (
        lambda: client.lease("P", "w", 30),
        lambda: client.release("a b+c"),
        lambda: client.lookup("P", "w", lease_seconds=60),
    ):
        with pytest.raises(sac.ProtocolError):  # {} answers none of them
            call()
    lease, release, lookup = agent.requests
    assert lease.startswith(b"POST /v1/snapshots/lease HTTP/1.1\r\n")
    assert lease.endswith(b'\r\n\r\n{"project": "P", "work_item": "w", "seconds": 30}')
    assert release.startswith(b"DELETE /v1/snapshots/lease?id=a%20b%2Bc HTTP/1.1\r\n")
    assert lookup.endswith(b'{"project": "P", "work_item": "w", "lease_seconds": 60}')


# --- agents of other versions ------------------------------------------------------------------

OLD_STATUS = {  # what an agent before leases, unique bytes and disk watermarks answered
    "version": "0.0.9",
    "docker": {"reachable": True, "error": None, "url": "unix:///run/docker.sock"},
    "snapshots": {"count": 1, "total_size_bytes": 10, "pending_removal": 0},
    "policy": {
        "ttl_seconds": 60,
        "max_count": 5,
        "max_size_bytes": 100,
        "interval_seconds": 300,
        "min_age_seconds": 0,
    },
    "last_eviction": {
        "started_at": "2024-05-01T12:00:00.000000Z",
        "finished_at": "2024-05-01T12:00:01.000000Z",
        "trigger": "timer",
        "removed": 0,
        "in_use": 0,
        "already_gone": 0,
        "failed": 0,
        "error": None,
    },
    "journal": {"path": "/j", "records": 3},
}
OLD_ENTRY = {
    "project": "p",
    "work_item": "w",
    "image": "cascade-snapshot-p-w:latest",
    "image_id": "sha256:" + "ab" * 32,
    "size_bytes": 10,
    "created_at": "2024-05-01T12:00:00.000000Z",
    "last_used_at": None,
    "source": "registered",
}


def test_an_older_agents_answers_read_with_the_new_fields_as_none(canned) -> None:
    """Fields an agent does not send yet read as None (or empty), so a newer client still
    talks to an older agent."""
    status = sac.Client(canned(http_answer("200 OK", json.dumps(OLD_STATUS).encode())).path)
    read = status.status()
    assert read.disk is None and read.docker.events is None
    assert (read.snapshots.unique_bytes, read.snapshots.leases) == (None, None)
    assert (read.policy.disk_high, read.policy.size_accounting, read.policy.projects) == (
        None,
        None,
        {},
    )
    assert read.policy.limits_for("p") == sac.Limits(60, 5, 100)
    assert (read.last_eviction.leased, read.last_eviction.reclaimed_bytes) == (None, None)
    assert (read.last_eviction.untagged, read.last_eviction.wrong_removals) == (None, None)
    lookup = canned(http_answer("200 OK", json.dumps({"snapshot": OLD_ENTRY}).encode()))
    found = sac.Client(lookup.path).lookup("p", "w", lease_seconds=30)
    assert found is not None and found.unique_bytes is None and found.lease is None
    assert found.confirmed is None
    eviction = {"dry_run": True, "evicted": [{**OLD_ENTRY, "reason": "ttl", "result": "planned"}]}
    dry = sac.Client(canned(http_answer("200 OK", json.dumps(eviction).encode())).path)
    explained = dry.evict(dry_run=True)
    assert explained.skipped is None and explained.disk_bytes_to_free is None
    assert explained.evicted[0].age_seconds is None
    assert sac.to_json(explained) == {
        "dry_run": True,
        "evicted": [{**OLD_ENTRY, "unique_bytes": None, "reason": "ttl", "result": "planned"}],
    }


def test_a_newer_agents_unknown_fields_are_ignored(canned) -> None:
    newer = {
        "snapshot": {**OLD_ENTRY, "unique_bytes": 7, "labels": {"x": "y"}},
        "lease": {
            "id": "l1",
            "project": "p",
            "work_item": "w",
            "image_id": OLD_ENTRY["image_id"],
            "expires_at": "2024-05-01T12:05:00.000000Z",
            "holder": "router-3",
        },
        "hint": "new",
    }
    agent = canned(http_answer("200 OK", json.dumps(newer).encode()))
    found = sac.Client(agent.path).lookup("p", "w", lease_seconds=300)
    assert found is not None and found.unique_bytes == 7
    assert found.lease == sac.Lease(
        "l1", "p", "w", OLD_ENTRY["image_id"], datetime(2024, 5, 1, 12, 5, tzinfo=UTC)
    )


def test_detail_and_confirmed_are_read_and_written_back_as_sent(canned) -> None:
    """A DELETE answer's and a real run's `detail` (null included) and a lookup's `confirmed`
    round-trip through to_json; a dry run's items, which carry no `detail`, stay without."""
    entry = {**OLD_ENTRY, "unique_bytes": None}
    refused = {"snapshot": entry, "result": "in-use", "detail": "running container 1d0b2ff5c018"}
    deletion = sac.Client(canned(http_answer("200 OK", json.dumps(refused).encode())).path)
    assert deletion.delete("p", "w").detail == "running container 1d0b2ff5c018"
    assert sac.to_json(deletion.delete("p", "w")) == refused
    outcomes = [
        {**entry, "reason": "ttl", "result": "untagged", "detail": None},
        {**entry, "reason": "count", "result": "has-children", "detail": "dependent child images"},
    ]
    run = {"dry_run": False, "evicted": outcomes}
    ran = sac.Client(canned(http_answer("200 OK", json.dumps(run).encode())).path).evict()
    assert [item.detail for item in ran.evicted] == [None, "dependent child images"]
    assert sac.to_json(ran) == run
    plan = {
        "dry_run": True,
        "evicted": [
            {**entry, "age_seconds": 5, "idle_seconds": 5, "reason": "ttl", "result": "planned"}
        ],
        "skipped": [],
        "disk_bytes_to_free": 0,
    }
    dry = sac.Client(canned(http_answer("200 OK", json.dumps(plan).encode())).path)
    assert sac.to_json(dry.evict(dry_run=True)) == plan
    unconfirmed = {"snapshot": entry, "confirmed": False}
    lookup = sac.Client(canned(http_answer("200 OK", json.dumps(unconfirmed).encode())).path)
    found = lookup.lookup("p", "w")
    assert found is not None and found.confirmed is False
    assert sac.to_json(found) == {**entry, "confirmed": False}


def test_a_release_answer_that_does_not_say_released_is_a_protocol_error(canned) -> None:
    lease = {"id": "l", "project": "p", "work_item": "w", "image_id": "sha256:x"}
    body = {"lease": {**lease, "expires_at": "2024-05-01T12:05:00.000000Z"}, "released": False}
    agent = canned(http_answer("200 OK", json.dumps(body).encode()))
    with pytest.raises(sac.ProtocolError, match="released"):
        sac.Client(agent.path).release("l")


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
    following_events(agent)
    status = sac.Client(str(agent.socket_path)).status()
    assert status.docker.reachable and status.docker.error is None
    assert status.policy.max_count == 100 and status.snapshots.count == 0
    assert status.snapshots.leases == 0 and status.snapshots.unique_bytes == 0
    assert (status.policy.disk_high, status.policy.disk_low) == ("off", "off")
    assert status.policy.size_accounting == "unique" and status.policy.projects == {}
    assert status.disk is None  # the test agents run with the watermarks off
    assert status.last_eviction is not None and status.last_eviction.trigger == "start"
    assert status.last_eviction.started_at.tzinfo is not None
    assert (status.last_eviction.leased, status.last_eviction.reclaimed_bytes) == (0, 0)
    assert sac.to_json(status) == agent.status()


def test_status_reads_a_measured_disk_and_project_limits(make_agent) -> None:
    """Watermarks no disk reaches (100% used), so nothing is evicted for the disk."""
    agent = make_agent(disk_high="100%", disk_low="99%", projects={"Big": {"max_count": 7}})
    following_events(agent)
    status = sac.Client(str(agent.socket_path)).status()
    disk = status.disk
    assert disk is not None and disk.error is None and disk.path
    assert disk.total_bytes and 0 <= disk.free_bytes <= disk.total_bytes
    assert disk.high_free_bytes == 0 and disk.above_high is False
    assert 0.0 <= disk.used_ratio <= 1.0
    assert (status.policy.disk_high, status.policy.disk_low) == ("100%", "99%")
    assert status.policy.limits_for("Big") == sac.Limits(86400, 7, 10 * 1024**3)
    assert status.policy.limits_for("other").max_count == 100
    assert sac.to_json(status) == agent.status()


def test_status_reads_a_disk_that_cannot_be_measured(make_agent) -> None:
    """Only `path` and `error` then; the typed result turns back into exactly that."""
    agent = make_agent(start=False, disk_high="90%", disk_low="80%")
    agent.extra["docker"] = {"url": agent.docker_url, "data_root": "/nonexistent/docker"}
    agent.write_config()
    agent.start()
    following_events(agent)
    status = sac.Client(str(agent.socket_path)).status()
    assert status.disk is not None and status.disk.path == "/nonexistent/docker"
    assert status.disk.error and status.disk.total_bytes is None
    assert sac.to_json(status) == agent.status()


# --- leases and the dry run's explanation, on a real agent -------------------------------------


def test_a_lookup_with_a_lease_protects_the_image_until_it_is_released(
    make_agent, docker_client
) -> None:
    agent = make_agent(max_count=0)  # evicts every snapshot it may
    tag = sac.snapshot_tag("Proj", "leased")
    image_id = make_image(docker_client, tag)
    client = sac.Client(str(agent.socket_path))
    client.register("Proj", "leased", tag)
    before = datetime.now(UTC)
    found = client.lookup("Proj", "leased", lease_seconds=300)
    assert isinstance(found, sac.FoundSnapshot) and isinstance(found, sac.Snapshot)
    lease = found.lease
    assert lease is not None and (lease.project, lease.work_item) == ("Proj", "leased")
    assert lease.image_id == image_id == found.image_id
    assert (
        before + timedelta(seconds=299)
        <= lease.expires_at
        <= datetime.now(UTC) + timedelta(seconds=300)
    )
    assert client.evict().evicted == []  # a real run leaves it
    assert image_exists(docker_client, image_id)
    explained = client.evict(dry_run=True)
    assert explained.evicted == [] and explained.disk_bytes_to_free == 0
    (skipped,) = explained.skipped
    assert (skipped.image, skipped.reason, skipped.protected_by) == (tag, "count", "leased")
    assert skipped.unique_bytes and skipped.age_seconds >= 0 and skipped.idle_seconds >= 0
    assert client.status().snapshots.leases == 1
    assert client.release(lease.id) == lease
    with pytest.raises(sac.LeaseNotFoundError) as caught:
        client.release(lease.id)
    assert (caught.value.code, caught.value.status) == ("lease-not-found", 404)
    (outcome,) = client.evict().evicted
    assert (outcome.image_id, outcome.reason, outcome.result) == (image_id, "count", "removed")
    assert not image_exists(docker_client, image_id)


def test_a_lease_holds_back_an_invalidated_images_removal(agent, docker_client) -> None:
    """DELETE answers `leased`; a dry run shows the pending removal and what holds it."""
    tag = sac.snapshot_tag("Proj", "held")
    image_id = make_image(docker_client, tag)
    client = sac.Client(str(agent.socket_path))
    client.register("Proj", "held", tag)
    lease = client.lease("Proj", "held", 600)
    assert client.delete("Proj", "held").result == "leased"
    assert client.lookup("Proj", "held") is None  # invalidated at once all the same
    (pending,) = client.evict(dry_run=True).evicted
    assert (pending.image_id, pending.reason, pending.result) == (image_id, "invalidated", "leased")
    assert image_exists(docker_client, image_id)
    client.release(lease.id)
    assert [(o.image_id, o.result) for o in client.evict().evicted] == [(image_id, "removed")]


def test_a_lease_holds_back_a_superseded_images_removal(agent, docker_client) -> None:
    """A lease protects the image, not the key: registering a newer image for the key leaves
    the leased one pending (`leased`) until the lease ends."""
    old_tag, new_tag = "cascade-snapshot-sup-old:latest", "cascade-snapshot-sup-new:latest"
    old_id = make_image(docker_client, old_tag)
    make_image(docker_client, new_tag)
    client = sac.Client(str(agent.socket_path))
    client.register("Proj", "sup", old_tag)
    lease = client.lease("Proj", "sup", 600)
    client.register("Proj", "sup", new_tag)  # supersedes the leased image
    wait_until(lambda: client.status().snapshots.pending_removal == 1, message="pending removal")
    (pending,) = client.evict(dry_run=True).evicted
    assert (pending.image_id, pending.reason, pending.result) == (old_id, "superseded", "leased")
    assert [(o.image_id, o.result) for o in client.evict().evicted] == [(old_id, "leased")]
    assert image_exists(docker_client, old_id)
    client.release(lease.id)
    assert [(o.image_id, o.result) for o in client.evict().evicted] == [(old_id, "removed")]


def test_leases_survive_a_restart(make_agent, docker_client) -> None:
    agent = make_agent(max_count=0)
    tag = sac.snapshot_tag("Proj", "durable")
    image_id = make_image(docker_client, tag)
    client = sac.Client(str(agent.socket_path))
    client.register("Proj", "durable", tag)
    lease = client.lease("Proj", "durable", 600)
    agent.stop()
    agent.start()  # its start-up run would evict the snapshot but for the lease
    assert client.status().snapshots.leases == 1
    assert client.evict().evicted == [] and image_exists(docker_client, image_id)
    assert client.release(lease.id) == lease


def test_a_dry_run_explains_what_goes_and_what_protects_the_rest(make_agent, docker_client):
    """max_count 0: the count rule wants all three; one is in use, one leased, one goes."""
    agent = make_agent(max_count=0)
    tags = {name: sac.snapshot_tag("Proj", name) for name in ("used", "leased", "free")}
    ids = {name: make_image(docker_client, tag) for name, tag in tags.items()}
    client = sac.Client(str(agent.socket_path))
    for name, tag in tags.items():
        client.register("Proj", name, tag)
    create_stopped_container(docker_client, tags["used"])
    client.lease("Proj", "leased", 600)
    explained = client.evict(dry_run=True)
    assert explained.dry_run and explained.disk_bytes_to_free == 0
    (planned,) = explained.evicted
    assert (planned.work_item, planned.reason, planned.result) == ("free", "count", "planned")
    assert planned.unique_bytes and planned.age_seconds is not None
    assert planned.idle_seconds is not None and planned.idle_seconds <= planned.age_seconds
    assert {(s.work_item, s.reason, s.protected_by) for s in explained.skipped} == {
        ("used", "count", "in-use"),
        ("leased", "count", "leased"),
    }
    assert all(image_exists(docker_client, image_id) for image_id in ids.values())
    wire = sac.to_json(explained)
    assert sorted(wire) == ["disk_bytes_to_free", "dry_run", "evicted", "skipped"]
    assert sorted(wire["skipped"][0]) == sorted(
        [*OLD_ENTRY, "unique_bytes", "age_seconds", "idle_seconds", "reason", "protected_by"]
    )


def test_lease_errors_on_a_real_agent(agent, docker_client) -> None:
    client = sac.Client(str(agent.socket_path))
    with pytest.raises(sac.SnapshotNotFoundError):
        client.lease("Proj", "nothing", 60)
    tag = sac.snapshot_tag("Proj", "x")
    make_image(docker_client, tag)
    client.register("Proj", "x", tag)
    for seconds in (0, 86401):
        with pytest.raises(sac.InvalidFieldError, match="seconds"):
            client.lease("Proj", "x", seconds)
        with pytest.raises(sac.InvalidFieldError, match="lease_seconds"):
            client.lookup("Proj", "x", lease_seconds=seconds)
    with pytest.raises(sac.LeaseNotFoundError):
        client.release("0123456789abcdef01234567")
    assert client.lookup("Proj", "missing", lease_seconds=60) is None  # a miss leases nothing
    assert client.status().snapshots.leases == 0
