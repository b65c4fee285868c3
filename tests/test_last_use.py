"""Last use from the engine, against a real agent and a real dockerd.

Proven here: a container created and started from a registered snapshot's image (named by
tag, by id or by short id) marks that entry used at the container's time, with no lookup, so
least-recently-used eviction spares it and takes an unused older one; uses made while the
agent was down are recovered from the containers at the next run; containers of images no
entry holds (foreign, or managed but unregistered) change nothing and break nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import docker
import pytest

from .agent import Agent
from .engine import create_stopped_container, image_exists, make_image, wait_until
from .images import NO_NETWORK, make_busybox_image

pytestmark = pytest.mark.usefixtures("clean_engine")

MakeAgent = Callable[..., Agent]


def parse_time(text: str) -> datetime:
    """RFC 3339 from the agent or from Docker (nanoseconds cut to microseconds)."""
    main, dot, rest = text.rstrip("Z").partition(".")
    fraction = f".{rest[:6]}" if dot else ""
    return datetime.fromisoformat(f"{main}{fraction}+00:00")


def entry(agent: Agent, work_item: str) -> dict[str, Any]:
    (found,) = [s for s in agent.snapshots() if s["work_item"] == work_item]
    return found


def last_used(agent: Agent, work_item: str) -> datetime | None:
    moment = entry(agent, work_item)["last_used_at"]
    return None if moment is None else parse_time(moment)


def wait_for_events(agent: Agent) -> None:
    """The agent follows the engine's events (it subscribes just after READY=1)."""
    wait_until(
        lambda: agent.status()["docker"]["events"]["connected"],
        message="the agent to follow the engine's events",
    )


def run_container(client: docker.APIClient, image: str) -> tuple[str, datetime]:
    """Create and start a container of `image` (as named), wait for it to exit; returns its
    id and Docker's creation time."""
    container = client.create_container(
        image, command=["/bin/busybox", "true"], host_config=client.create_host_config(**NO_NETWORK)
    )["Id"]
    client.start(container)
    assert client.wait(container, timeout=60)["StatusCode"] == 0
    return container, parse_time(client.inspect_container(container)["Created"])


def journal_records(agent: Agent) -> list[dict[str, Any]]:
    return [json.loads(line) for line in agent.journal_path.read_text().splitlines()]


def evicted(agent: Agent, dry_run: bool) -> list[tuple[str, str, str]]:
    answer = agent.ok("POST", "/v1/evict", {"dry_run": dry_run})
    return [(e["work_item"], e["reason"], e["result"]) for e in answer["evicted"]]


@pytest.mark.parametrize("named_by", ["tag", "id", "short-id"])
def test_a_container_marks_its_snapshot_used_and_lru_spares_it(
    make_agent: MakeAgent, docker_client: docker.APIClient, named_by: str
) -> None:
    agent = make_agent(max_count=1)
    used_tag, idle_tag = "cascade-snapshot-used:latest", "cascade-snapshot-idle:latest"
    used_id = make_busybox_image(docker_client, used_tag)
    agent.register("p", "used", used_tag)
    idle_id = make_image(docker_client, idle_tag)  # committed after: the younger one
    agent.register("p", "idle", idle_tag)
    assert used_id != idle_id
    # Neither used yet: the older one is the least recently used.
    assert evicted(agent, dry_run=True) == [("used", "count", "planned")]
    assert last_used(agent, "used") is None

    wait_for_events(agent)
    reference = {"tag": used_tag, "id": used_id, "short-id": used_id[7:19]}[named_by]
    container, created = run_container(docker_client, reference)
    # Gone before the agent is asked: only the event stream can have told it.
    docker_client.remove_container(container)
    moment = wait_until(
        lambda: last_used(agent, "used"), message="the container's use to reach the entry"
    )
    # The create and start events' times: the container's creation, or its start just after.
    assert created - timedelta(seconds=1) <= moment <= created + timedelta(seconds=10)
    assert last_used(agent, "idle") is None
    assert agent.status()["last_eviction"]["trigger"] == "start"  # no run in between

    assert evicted(agent, dry_run=False) == [("idle", "count", "removed")]
    assert image_exists(docker_client, used_id)
    assert not image_exists(docker_client, idle_id)


def use_while_down(
    make_agent: MakeAgent, client: docker.APIClient
) -> tuple[Agent, datetime | None, datetime]:
    """Register a snapshot, stop the agent, create a container of it, start the agent and
    run an eviction: the agent, the entry's last use, and the container's creation time."""
    agent = make_agent()
    tag = "cascade-snapshot-missed:latest"
    make_image(client, tag)
    agent.register("p", "w", tag)
    assert agent.stop() == 0
    container = create_stopped_container(client, tag)
    created = parse_time(client.inspect_container(container)["Created"])
    agent.start()
    evicted(agent, dry_run=False)
    assert last_used(agent, "w") is not None  # the start-up run saw it already
    return agent, last_used(agent, "w"), created


def test_uses_missed_while_the_agent_was_down_are_recovered_at_the_next_run(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent, moment, created = use_while_down(make_agent, docker_client)
    assert moment is not None
    # The container's creation (Docker lists it in whole seconds), not when the agent learnt
    # of it, and nothing older than the second it was created in.
    assert created.replace(microsecond=0) <= moment <= created + timedelta(seconds=1)
    assert [s["work_item"] for s in agent.snapshots()] == ["w"]  # in use: it stays


def test_a_recovered_use_is_no_earlier_than_the_containers_creation(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    _agent, moment, created = use_while_down(make_agent, docker_client)
    assert moment is not None
    assert created <= moment <= created + timedelta(seconds=1)


def test_containers_of_images_no_entry_holds_touch_nothing(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent()
    registered_tag = "cascade-snapshot-sentinel:latest"
    registered_id = make_busybox_image(docker_client, registered_tag)
    agent.register("p", "sentinel", registered_tag)
    make_image(docker_client, "cascade-snapshot-other:latest")
    agent.register("p", "other", "cascade-snapshot-other:latest")
    before = agent.snapshots()
    foreign_id = make_busybox_image(docker_client, "foreign-tool:latest")
    unregistered_id = make_busybox_image(docker_client, "cascade-snapshot-nobody:latest")
    wait_for_events(agent)

    for reference in (
        "foreign-tool:latest",
        "foreign-tool",
        foreign_id,
        foreign_id[7:19],
        "cascade-snapshot-nobody:latest",  # managed, but no entry holds it
        unregistered_id,
        unregistered_id[7:19],
    ):
        container, _created = run_container(docker_client, reference)
        docker_client.remove_container(container)
    # Events are handled in order: once this use shows, every one before it was handled.
    container, _created = run_container(docker_client, registered_id)
    docker_client.remove_container(container)
    wait_until(lambda: last_used(agent, "sentinel"), message="the sentinel's use")

    after = {s["work_item"]: s for s in agent.snapshots()}
    assert after["other"] == next(s for s in before if s["work_item"] == "other")
    assert sorted(after) == ["other", "sentinel"]  # nothing discovered or dropped
    touched = {(r["project"], r["work_item"]) for r in journal_records(agent) if r["op"] == "touch"}
    assert touched == {("p", "sentinel")}
    assert agent.status()["docker"]["reachable"] is True
    log = agent.log()
    assert "Traceback" not in log
    assert "could not record" not in log and "on_use failed" not in log
