"""Leases against a real agent and a real dockerd.

Proven here: a leased snapshot's image survives every eviction reason while the lease holds
(TTL, count, size, a superseding registration, an invalidation), and goes once the lease is
released or has expired (an expired lease is pruned by the next run); leases are journalled,
so they survive a restart; `lookup` with `lease_seconds` answers the lease with the entry; bad
lease requests are refused with a code and a message naming the field.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import pytest

from .agent import Agent
from .engine import image_exists, make_image, wait_until

pytestmark = pytest.mark.usefixtures("clean_engine")

MakeAgent = Callable[..., Agent]
TAG = "cascade-snapshot-leased:latest"


def lease(agent: Agent, project: str, work_item: str, seconds: int = 600) -> dict[str, Any]:
    status, answer = agent.call(
        "POST",
        "/v1/snapshots/lease",
        {"project": project, "work_item": work_item, "seconds": seconds},
    )
    assert status == 201, (status, answer)
    return answer["lease"]


def release(agent: Agent, lease_id: str) -> dict[str, Any]:
    return agent.ok("DELETE", "/v1/snapshots/lease", query={"id": lease_id})


def evict(agent: Agent) -> list[tuple[str, str, str]]:
    """A real run: (image id, reason, result) of each outcome."""
    evicted = agent.ok("POST", "/v1/evict", {"dry_run": False})["evicted"]
    return [(e["image_id"], e["reason"], e["result"]) for e in evicted]


def dry_run(agent: Agent) -> dict[str, Any]:
    return agent.ok("POST", "/v1/evict", {"dry_run": True})


def skipped(agent: Agent) -> list[tuple[str, str, str]]:
    """What the dry run passed over: (image id, reason, protected_by)."""
    return [(s["image_id"], s["reason"], s["protected_by"]) for s in dry_run(agent)["skipped"]]


def leases_in_status(agent: Agent) -> int:
    return agent.status()["snapshots"]["leases"]


def release_records(agent: Agent, lease_id: str) -> int:
    """How many journal records end the lease `lease_id`."""
    records = [json.loads(line) for line in agent.journal_path.read_text().splitlines()]
    return sum(1 for r in records if r["op"] == "release" and r["id"] == lease_id)


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- every eviction reason ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        pytest.param({"ttl": "1s"}, "ttl", id="ttl"),
        pytest.param({"max_count": 0}, "count", id="count"),
        pytest.param({"max_size": 0}, "size", id="size"),
    ],
)
def test_a_leased_snapshot_survives_the_rule_until_released(
    make_agent: MakeAgent,
    docker_client: docker.APIClient,
    policy: dict[str, Any],
    reason: str,
) -> None:
    agent = make_agent(**policy)
    image_id = make_image(docker_client, TAG)
    agent.register("p", "w", TAG)
    held = lease(agent, "p", "w")
    assert held["image_id"] == image_id
    # The rule wants it (for the TTL, once the snapshot is older than a second) and the lease
    # is what stops it.
    wait_until(
        lambda: skipped(agent) == [(image_id, reason, "leased")],
        timeout=15,
        interval=0.2,
        message=f"the dry run to pass over the snapshot for {reason}, protected by the lease",
    )
    assert evict(agent) == []
    assert image_exists(docker_client, image_id)
    assert [s["image_id"] for s in agent.snapshots()] == [image_id]

    assert release(agent, held["id"]) == {"lease": held, "released": True}
    assert evict(agent) == [(image_id, reason, "removed")]
    assert not image_exists(docker_client, image_id)
    assert leases_in_status(agent) == 0


def test_a_superseded_leased_image_stays_until_the_lease_is_released(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent()
    old = make_image(docker_client, TAG)
    agent.register("p", "w", TAG)
    held = lease(agent, "p", "w")
    new = make_image(docker_client, TAG)  # the router commits the same tag again
    assert agent.register("p", "w", TAG)["image_id"] == new

    assert evict(agent) == [(old, "superseded", "leased")]
    assert image_exists(docker_client, old)
    (pending,) = dry_run(agent)["evicted"]
    assert (pending["image_id"], pending["reason"], pending["result"]) == (
        old,
        "superseded",
        "leased",
    )

    release(agent, held["id"])
    assert evict(agent) == [(old, "superseded", "removed")]
    assert not image_exists(docker_client, old)
    assert docker_client.inspect_image(TAG)["Id"] == new  # the new snapshot is untouched
    assert [s["image_id"] for s in agent.snapshots()] == [new]


def test_an_invalidated_leased_snapshot_keeps_its_image_until_released(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent()
    image_id = make_image(docker_client, TAG)
    agent.register("p", "w", TAG)
    held = lease(agent, "p", "w")

    answer = agent.ok("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "w"})
    assert answer["result"] == "leased"
    assert agent.snapshots() == []  # invalidated at once
    assert evict(agent) == [(image_id, "invalidated", "leased")]
    assert image_exists(docker_client, image_id)

    release(agent, held["id"])
    assert evict(agent) == [(image_id, "invalidated", "removed")]
    assert not image_exists(docker_client, image_id)


# --- the lease API -----------------------------------------------------------------------------


def test_release_of_an_unknown_or_released_lease_is_404(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent()
    make_image(docker_client, TAG)
    agent.register("p", "w", TAG)
    held = lease(agent, "p", "w")
    release(agent, held["id"])
    for lease_id in (held["id"], "no-such-lease"):
        status, answer = agent.call("DELETE", "/v1/snapshots/lease", query={"id": lease_id})
        assert (status, answer["error"]["code"]) == (404, "lease-not-found")
        assert lease_id in answer["error"]["message"]


def test_a_lease_on_a_missing_snapshot_is_404(make_agent: MakeAgent) -> None:
    agent = make_agent()
    body = {"project": "p", "work_item": "nothing", "seconds": 60}
    status, answer = agent.call("POST", "/v1/snapshots/lease", body)
    assert (status, answer["error"]["code"]) == (404, "snapshot-not-found")
    assert leases_in_status(agent) == 0


KEY = {"project": "p", "work_item": "w"}
LEASE, LOOKUP = "/v1/snapshots/lease", "/v1/snapshots/lookup"


def key_with(**fields: Any) -> dict[str, Any]:
    return {**KEY, **fields}


BAD_INPUT: list[tuple[str, str, dict[str, Any] | None, dict[str, str] | None, str]] = [
    ("POST", LEASE, KEY, None, "seconds"),
    ("POST", LEASE, key_with(seconds=None), None, "seconds"),
    ("POST", LEASE, key_with(seconds=0), None, "seconds"),
    ("POST", LEASE, key_with(seconds=-5), None, "seconds"),
    ("POST", LEASE, key_with(seconds=86401), None, "seconds"),
    ("POST", LEASE, key_with(seconds="60"), None, "seconds"),
    ("POST", LEASE, key_with(seconds=1.5), None, "seconds"),
    ("POST", LEASE, key_with(seconds=True), None, "seconds"),
    ("POST", LEASE, key_with(seconds=60, ttl=5), None, "ttl"),
    ("POST", LEASE, {"work_item": "w", "seconds": 60}, None, "project"),
    ("POST", LOOKUP, key_with(lease_seconds=0), None, "lease_seconds"),
    ("POST", LOOKUP, key_with(lease_seconds=86401), None, "lease_seconds"),
    ("POST", LOOKUP, key_with(lease_seconds="60"), None, "lease_seconds"),
    ("DELETE", LEASE, None, None, "id"),
    ("DELETE", LEASE, None, {"id": ""}, "id"),
]


def test_bad_lease_input_is_400_naming_the_field(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent()
    make_image(docker_client, TAG)
    before = agent.register("p", "w", TAG)
    for method, path, body, query, field in BAD_INPUT:
        case = (method, path, body, query)
        status, answer = agent.call(method, path, body, query=query)
        assert (status, answer["error"]["code"]) == (400, "invalid-field"), (case, answer)
        assert f"'{field}'" in answer["error"]["message"], (case, answer)
    # Refused before anything happened: no lease, and the entry not even marked used.
    assert leases_in_status(agent) == 0
    assert agent.snapshots() == [before]


# --- durability and expiry ---------------------------------------------------------------------


def test_a_lease_survives_a_restart(make_agent: MakeAgent, docker_client: docker.APIClient) -> None:
    agent = make_agent(max_count=0)
    image_id = make_image(docker_client, TAG)
    agent.register("p", "w", TAG)
    held = lease(agent, "p", "w")
    assert agent.stop() == 0

    agent.start()  # the start-up run applies max_count 0 with the replayed lease
    assert agent.status()["last_eviction"]["trigger"] == "start"
    assert image_exists(docker_client, image_id)
    assert leases_in_status(agent) == 1
    assert skipped(agent) == [(image_id, "count", "leased")]
    assert evict(agent) == []

    assert release(agent, held["id"])["lease"] == held  # the same lease, by its id
    assert evict(agent) == [(image_id, "count", "removed")]


def test_an_expired_lease_protects_nothing_and_is_pruned(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent(max_count=0)
    image_id = make_image(docker_client, TAG)
    agent.register("p", "w", TAG)
    held = lease(agent, "p", "w", seconds=1)
    assert leases_in_status(agent) == 1

    wait_until(
        lambda: (
            [(e["image_id"], e["result"]) for e in dry_run(agent)["evicted"]]
            == [(image_id, "planned")]
        ),
        timeout=15,
        interval=0.2,
        message="the dry run to plan the snapshot once its lease has expired",
    )
    assert datetime.now(UTC) >= parse_time(held["expires_at"])
    assert leases_in_status(agent) == 0  # status counts the leases that still hold
    assert release_records(agent, held["id"]) == 0  # a dry run prunes nothing

    assert evict(agent) == [(image_id, "count", "removed")]
    assert not image_exists(docker_client, image_id)
    assert release_records(agent, held["id"]) == 1  # pruned by the run, durably
    status, answer = agent.call("DELETE", "/v1/snapshots/lease", query={"id": held["id"]})
    assert (status, answer["error"]["code"]) == (404, "lease-not-found")


# --- lookup with a lease -----------------------------------------------------------------------


def test_a_lookup_with_lease_seconds_returns_a_lease_that_protects(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent(max_count=0)
    image_id = make_image(docker_client, TAG)
    agent.register("p", "w", TAG)
    before = datetime.now(UTC)
    answer = agent.ok("POST", "/v1/snapshots/lookup", {**KEY, "lease_seconds": 300})
    after = datetime.now(UTC)
    held = answer["lease"]
    assert answer["snapshot"]["image_id"] == held["image_id"] == image_id
    assert (held["project"], held["work_item"]) == ("p", "w")
    expires = parse_time(held["expires_at"])
    assert before + timedelta(seconds=300) <= expires <= after + timedelta(seconds=300)
    assert answer["snapshot"]["last_used_at"] is not None  # a lookup all the same
    assert leases_in_status(agent) == 1

    assert evict(agent) == []
    assert skipped(agent) == [(image_id, "count", "leased")]
    assert image_exists(docker_client, image_id)

    # A lookup that misses leases nothing: no entry, or one older than the TTL asked for.
    status, missed = agent.call(
        "POST", "/v1/snapshots/lookup", {"project": "p", "work_item": "x", "lease_seconds": 60}
    )
    assert (status, missed["error"]["code"]) == (404, "snapshot-not-found")
    status, missed = agent.call(
        "POST", "/v1/snapshots/lookup", {**KEY, "ttl_seconds": 0, "lease_seconds": 60}
    )
    assert (status, missed["error"]["code"]) == (404, "snapshot-not-found")
    assert "older than" in missed["error"]["message"]
    assert leases_in_status(agent) == 1
    assert image_exists(docker_client, image_id)  # retired by the TTL, still leased

    release(agent, held["id"])
    assert evict(agent) == [(image_id, "ttl", "removed")]


def test_a_lease_answered_under_concurrent_evictions_always_protects_the_image(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    """Lookups with a lease while runs with max_count 0 remove everything they may: every
    lookup the agent answers with a lease must leave the image in Docker."""
    agent = make_agent(max_count=0)
    stop = threading.Event()
    runs = [0]

    def keep_evicting() -> None:
        while not stop.is_set():
            agent.call("POST", "/v1/evict", {})
            runs[0] += 1

    evictor = threading.Thread(target=keep_evicting)
    evictor.start()
    answered: list[str] = []
    lost: list[dict[str, Any]] = []
    try:
        for n in range(80):
            if len(answered) >= 8:
                break
            tag = f"cascade-snapshot-race-{n}:latest"
            try:
                image_id = make_image(docker_client, tag)
            except docker.errors.ImageNotFound:
                continue  # a run discovered and removed the new tag before it was inspected
            body = {"project": "p", "work_item": f"w{n}", "image": tag}
            if agent.call("POST", "/v1/snapshots", body)[0] not in (200, 201):
                continue  # removed before the registration: nothing was promised
            status, answer = agent.call(
                "POST",
                "/v1/snapshots/lookup",
                {"project": "p", "work_item": f"w{n}", "lease_seconds": 600},
            )
            if status != 200:
                continue  # evicted before the lease: a miss, as promised
            answered.append(image_id)
            seen = runs[0]
            wait_until(lambda seen=seen: runs[0] >= seen + 3, message="three more runs")
            if not image_exists(docker_client, image_id):
                lost.append(answer)
                break
    finally:
        stop.set()
        evictor.join()
    assert lost == []
    assert len(answered) >= 8  # the race was run often enough to mean something
