"""A frozen engine stalls only what needs it (issue 15, items 9 and 10).

dockerd is stopped with SIGSTOP: it accepts connections and never answers, the worst a sick
engine does. Twelve registrations wait on it (each must inspect its image); leases, releases,
status and lookups need no answer from Docker, or only a short one, and must not queue behind
them: Docker calls have threads of their own and deadlines, the journal a thread of its own,
and a lookup Docker cannot confirm in time is answered from the registry, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .agent import Agent, UnixConnection, call
from .engine import DockerEngine, make_image, wait_until

REGISTRATIONS = 12
INSPECT_TIMEOUT = 20  # long, so that the registrations are surely still waiting meanwhile


@contextlib.contextmanager
def frozen(engine: DockerEngine) -> Iterator[None]:
    pid = engine.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class Registration(threading.Thread):
    """One POST /v1/snapshots sent now and answered whenever the agent answers."""

    def __init__(self, agent: Agent, number: int) -> None:
        super().__init__(daemon=True)
        self.agent, self.number = agent, number
        self.sent = threading.Event()
        self.answer: tuple[int, Any] | None = None

    def run(self) -> None:
        connection = UnixConnection(str(self.agent.socket_path), timeout=120)
        body = {"project": "frozen", "work_item": f"r{self.number}", "image": tag(self.number)}
        try:
            connection.request("POST", "/v1/snapshots", body=json.dumps(body))
            self.sent.set()
            response = connection.getresponse()
            self.answer = (response.status, json.loads(response.read()))
        finally:
            self.sent.set()
            connection.close()


def tag(number: int) -> str:
    return f"cascade-snapshot-frozen-r{number}:latest"


@pytest.fixture
def engine(fresh_docker_engine: DockerEngine) -> DockerEngine:
    return fresh_docker_engine


def timed(agent: Agent, method: str, path: str, body: Any = None, **query: Any) -> Any:
    """One call with a short socket timeout; (seconds, status, answer)."""
    started = time.monotonic()
    status, answer = call(agent.socket_path, method, path, body, timeout=10, **query)
    return time.monotonic() - started, status, answer


def test_a_frozen_engine_stalls_only_the_calls_that_need_it(
    engine: DockerEngine, make_agent
) -> None:
    client = engine.client()
    try:
        for number in range(REGISTRATIONS):
            make_image(client, tag(number))
        make_image(client, "cascade-snapshot-frozen-a:latest")
        make_image(client, "cascade-snapshot-frozen-b:latest")
    finally:
        client.close()
    agent = make_agent(start=False, docker_url=engine.url)
    agent.extra["docker"] = {"url": engine.url, "inspect_timeout": f"{INSPECT_TIMEOUT}s"}
    agent.write_config()
    agent.start()
    agent.register("frozen", "a", "cascade-snapshot-frozen-a:latest")
    agent.register("frozen", "b", "cascade-snapshot-frozen-b:latest")
    # A restart forgets what Docker confirmed; a lookup of "a" confirms it again, "b" stays
    # unconfirmed: its next lookup must ask Docker.
    agent.stop()
    agent.start()
    wait_until(lambda: agent.status()["docker"]["events"]["connected"], message="events followed")
    assert agent.ok("POST", "/v1/snapshots/lookup", {"project": "frozen", "work_item": "a"})[
        "confirmed"
    ]

    with frozen(engine):
        waiting = [Registration(agent, number) for number in range(REGISTRATIONS)]
        for registration in waiting:
            registration.start()
        for registration in waiting:
            assert registration.sent.wait(timeout=30)
        seconds: dict[str, float] = {}

        lease_body = {"project": "frozen", "work_item": "a", "seconds": 60}
        took, status, lease = timed(agent, "POST", "/v1/snapshots/lease", lease_body)
        assert status == 201, lease
        seconds["lease"] = took
        took, status, released = timed(
            agent, "DELETE", "/v1/snapshots/lease", query={"id": lease["lease"]["id"]}
        )
        assert (status, released["released"]) == (200, True)
        seconds["release"] = took
        took, status, found = timed(
            agent, "POST", "/v1/snapshots/lookup", {"project": "frozen", "work_item": "a"}
        )
        assert (status, found["confirmed"]) == (200, True)
        seconds["confirmed lookup"] = took
        took, status, found = timed(
            agent, "POST", "/v1/snapshots/lookup", {"project": "frozen", "work_item": "b"}
        )
        assert (status, found["confirmed"]) == (200, False)  # Docker did not answer in time
        assert found["snapshot"]["image"] == "cascade-snapshot-frozen-b:latest"
        seconds["unconfirmed lookup"] = took
        took, status, _ = timed(agent, "GET", "/v1/status")
        assert status == 200
        seconds["status"] = took

        # None of that waited for the engine: every registration is still waiting on it.
        assert [r.number for r in waiting if r.answer is not None] == []
        print("\nwhile frozen, seconds:", {k: round(v, 3) for k, v in seconds.items()})

    for registration in waiting:
        registration.join(timeout=INSPECT_TIMEOUT + 60)
        assert registration.answer is not None
        status, answer = registration.answer
        assert status in (201, 503), answer  # thawed in time, or past its inspect deadline
        if status == 503:
            assert answer["error"]["code"] == "docker-unavailable"
