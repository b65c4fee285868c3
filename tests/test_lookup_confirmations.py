"""Lookups answered without asking Docker, kept honest by Docker's image events.

Against a real agent and a private dockerd started with `--debug`, whose log names every API
call it serves ("Calling GET /v1.41/images/<tag>/json"): that log is how these tests see
whether a lookup asked Docker. Proven here: once a registration (or a lookup) has had Docker
confirm a tag while the agent follows the event stream, lookups of it do not ask Docker again;
an image event that may change the tag (a tag anywhere, an untag or delete of its image) makes
the next lookup ask; a removal behind the agent's back is a 404 once its event is read; and a
lost stream (dockerd restarted) drops every confirmation.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest

from .agent import Agent
from .engine import (
    DockerEngine,
    create_stopped_container,
    make_image,
    make_short_tmpdir,
    require_dockerd,
    wait_until,
)

MakeAgent = Callable[..., Agent]
KEY = {"project": "p", "work_item": "w"}
TAG = "cascade-snapshot-conf:latest"


@pytest.fixture
def debug_engine() -> Iterator[DockerEngine]:
    """A private dockerd of this test's own whose log lists every API call."""
    dockerd = require_dockerd()
    base = make_short_tmpdir("sa-d-")
    try:
        engine = DockerEngine.start(base, dockerd=dockerd, debug=True)
    except Exception as error:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a private dockerd: {error}", pytrace=False)
    try:
        yield engine
    finally:
        engine.stop()


def inspects(engine: DockerEngine, tag: str) -> int:
    """How many times the engine has been asked to inspect `tag` so far."""
    log = engine.log_path.read_text(errors="replace")
    return sum(
        1 for line in log.splitlines() if "Calling GET" in line and f"/images/{tag}/json" in line
    )


def lookup(agent: Agent) -> tuple[int, Any]:
    return agent.call("POST", "/v1/snapshots/lookup", KEY)


def following(agent: Agent, reconnects: int = 0) -> bool:
    events = agent.status()["docker"]["events"]
    return bool(events and events["connected"] and events["reconnects"] >= reconnects)


def lookups_ask_docker_again(agent: Agent, engine: DockerEngine) -> None:
    """Poll lookups (each answered 200) until one asks Docker: the agent has read the event."""
    before = inspects(engine, TAG)

    def asked() -> bool:
        assert lookup(agent)[0] == 200
        return inspects(engine, TAG) > before

    wait_until(asked, message="a lookup that asks Docker")


def test_a_confirmed_tag_is_looked_up_without_docker_until_an_event_may_change_it(
    make_agent: MakeAgent, debug_engine: DockerEngine
) -> None:
    with docker.APIClient(base_url=debug_engine.url, timeout=60) as client:
        image_id = make_image(client, TAG)
        other_id = make_image(client, "foreign-conf-other:latest")
        agent = make_agent(docker_url=debug_engine.url)
        wait_until(lambda: following(agent), message="the agent following Docker's events")

        agent.register("p", "w", TAG)  # Docker confirms the tag (one inspect)
        before = inspects(debug_engine, TAG)
        assert before >= 1
        for _ in range(5):
            assert lookup(agent)[0] == 200
        assert inspects(debug_engine, TAG) == before, "a confirmed lookup asked Docker"

        # A tag event anywhere may have moved any tag: the next lookups ask, once.
        client.tag(other_id, "foreign-conf-another", "latest")
        lookups_ask_docker_again(agent, debug_engine)
        settled = inspects(debug_engine, TAG)
        for _ in range(3):
            assert lookup(agent)[0] == 200
        assert inspects(debug_engine, TAG) == settled

        # Untag and delete of an unrelated image keep the confirmation.
        client.remove_image("foreign-conf-another:latest")
        client.remove_image("foreign-conf-other:latest")  # untag, then delete
        assert not _exists(client, other_id)
        # The stream is read in order: once a later container's use of TAG shows, the agent
        # has read the untag and delete events too.
        used_before = last_used_at(agent)
        container = create_stopped_container(client, TAG)
        wait_until(lambda: last_used_at(agent) != used_before, message="the use read")
        client.remove_container(container)
        for _ in range(3):
            assert lookup(agent)[0] == 200
        assert inspects(debug_engine, TAG) == settled

        # Removed behind the agent's back: a 404 once the agent has read the event.
        client.remove_image(TAG)
        assert not _exists(client, image_id)

        def not_found() -> Any:
            status, answer = lookup(agent)
            return answer if status == 404 else None

        answer = wait_until(not_found, message="a lookup answering 404")
        assert "gone" in answer["error"]["message"]
        assert agent.snapshots() == []


def test_a_lost_event_stream_drops_every_confirmation(
    make_agent: MakeAgent, debug_engine: DockerEngine
) -> None:
    with docker.APIClient(base_url=debug_engine.url, timeout=60) as client:
        make_image(client, TAG)
    agent = make_agent(docker_url=debug_engine.url)
    wait_until(lambda: following(agent), message="the agent following Docker's events")
    agent.register("p", "w", TAG)
    assert lookup(agent)[0] == 200
    before = inspects(debug_engine, TAG)

    debug_engine.restart()  # the stream ends; the follower reconnects
    wait_until(lambda: following(agent, reconnects=1), timeout=30, message="the stream back")
    assert lookup(agent)[0] == 200
    after_first = inspects(debug_engine, TAG)
    assert after_first == before + 1, "the first lookup after the outage did not ask Docker"
    assert lookup(agent)[0] == 200
    assert inspects(debug_engine, TAG) == after_first  # confirmed again


def last_used_at(agent: Agent) -> str | None:
    (entry,) = [s for s in agent.snapshots() if s["work_item"] == "w"]
    return entry["last_used_at"]


def _exists(client: docker.APIClient, reference: str) -> bool:
    try:
        client.inspect_image(reference)
    except docker.errors.NotFound:
        return False
    return True
