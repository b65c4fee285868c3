"""Per-project limits ([policy.projects."<name>"]) against a real agent and a real dockerd.

Proven here: the eviction timer applies each project's own TTL (a short one evicts that
project's snapshot while another project's equally old one stays); a project's max_count is a
pool of its own, apart from the global one every other project shares; lookup without
ttl_seconds uses the project's TTL; /v1/status shows the project limits, and a SIGHUP reload
that changes them takes effect.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import docker
import pytest

from .agent import Agent
from .engine import image_exists, make_image, wait_until

pytestmark = pytest.mark.usefixtures("clean_engine")

MakeAgent = Callable[..., Agent]
GIB = 1024**3


def snapshot(agent: Agent, docker_client: docker.APIClient, project: str, work_item: str) -> str:
    """Import and register a snapshot of `project`/`work_item`; returns its image id."""
    tag = f"cascade-snapshot-{project}-{work_item}:latest"
    image_id = make_image(docker_client, tag)
    agent.register(project, work_item, tag)
    return image_id


def keys(agent: Agent) -> list[tuple[str, str]]:
    return [(s["project"], s["work_item"]) for s in agent.snapshots()]


def evict(agent: Agent, dry_run: bool = False) -> list[tuple[str, str, str, str]]:
    answer = agent.ok("POST", "/v1/evict", {"dry_run": dry_run})
    return [(e["project"], e["work_item"], e["reason"], e["result"]) for e in answer["evicted"]]


def retirements(agent: Agent) -> list[tuple[str, str, str]]:
    """(project, work item, reason) of every retire record in the journal."""
    records = [json.loads(line) for line in agent.journal_path.read_text().splitlines()]
    return [
        (r["snapshot"]["project"], r["snapshot"]["work_item"], r["reason"])
        for r in records
        if r["op"] == "retire"
    ]


def lookup(agent: Agent, project: str, work_item: str, **extra: Any) -> tuple[int, Any]:
    body = {"project": project, "work_item": work_item, **extra}
    return agent.call("POST", "/v1/snapshots/lookup", body)


def test_the_timer_applies_each_projects_ttl(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent(ttl="24h", interval="1s", projects={"fast": {"ttl": "2s"}})
    slow_id = snapshot(agent, docker_client, "slow", "w")  # committed first: the older one
    fast_id = snapshot(agent, docker_client, "fast", "w")

    wait_until(
        lambda: not image_exists(docker_client, fast_id),
        timeout=20,
        interval=0.2,
        message="the timer to evict fast's snapshot past its 2s TTL",
    )
    # No evict request and no lookup was made: the timer's runs are what retired it.
    assert retirements(agent) == [("fast", "w", "ttl")]
    assert keys(agent) == [("slow", "w")]
    assert image_exists(docker_client, slow_id)


def test_a_projects_max_count_is_a_pool_of_its_own(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent(max_count=1, projects={"big": {"max_count": 3}})
    ids = {}
    for project, work_item in [
        ("big", "b1"),
        ("big", "b2"),
        ("big", "b3"),
        ("big", "b4"),
        ("a", "a1"),
        ("a", "a2"),
        ("c", "c1"),
    ]:
        ids[work_item] = snapshot(agent, docker_client, project, work_item)

    # Least recently used first in each pool: big keeps its three newest; "a" and "c" share
    # the global pool of one, so only the newest of the three of them stays.
    removed = sorted(evict(agent))
    assert removed == [
        ("a", "a1", "count", "removed"),
        ("a", "a2", "count", "removed"),
        ("big", "b1", "count", "removed"),
    ]
    assert keys(agent) == [("big", "b2"), ("big", "b3"), ("big", "b4"), ("c", "c1")]
    for work_item, image_id in ids.items():
        assert image_exists(docker_client, image_id) == (work_item not in {"a1", "a2", "b1"})
    assert evict(agent) == []  # the limits hold now


def test_lookup_without_ttl_seconds_uses_the_projects_ttl(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent(ttl="24h", projects={"fast": {"ttl": "1s"}})
    snapshot(agent, docker_client, "slow", "w")  # committed first: the older one
    snapshot(agent, docker_client, "fast", "w")
    wait_until(
        lambda: evict(agent, dry_run=True) == [("fast", "w", "ttl", "planned")],
        timeout=15,
        interval=0.2,
        message="fast's snapshot to be older than its 1s TTL",
    )

    status, answer = lookup(agent, "fast", "w", ttl_seconds=3600)  # asked for: it decides
    assert status == 200, answer
    status, answer = lookup(agent, "fast", "w")
    assert (status, answer["error"]["code"]) == (404, "snapshot-not-found")
    assert "older than 1s" in answer["error"]["message"]
    status, answer = lookup(agent, "slow", "w")  # older, but under the global 24h
    assert status == 200, answer
    assert keys(agent) == [("slow", "w")]


def test_status_shows_project_limits_and_sighup_applies_new_ones(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent(ttl="24h", max_count=100, max_size="10GiB", projects={"fast": {"ttl": "2s"}})
    assert agent.status()["policy"]["projects"] == {
        # Keys a project leaves out are the global ones.
        "fast": {"ttl_seconds": 2, "max_count": 100, "max_size_bytes": 10 * GIB},
    }
    new_id = snapshot(agent, docker_client, "new", "w")
    assert evict(agent) == []  # the global pool allows 100

    agent.policy["projects"] = {
        "fast": {"ttl": "1h", "max_size": "1GiB"},
        "new": {"max_count": 0},
    }
    agent.write_config()
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    agent.notify.wait_for("RELOADING=1")
    agent.notify.wait_for("READY=1")

    assert agent.status()["policy"]["projects"] == {
        "fast": {"ttl_seconds": 3600, "max_count": 100, "max_size_bytes": GIB},
        "new": {"ttl_seconds": 24 * 3600, "max_count": 0, "max_size_bytes": 10 * GIB},
    }
    assert evict(agent) == [("new", "w", "count", "removed")]
    assert not image_exists(docker_client, new_id)
