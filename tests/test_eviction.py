"""Eviction against a real dockerd: what goes, what survives, and that nothing foreign goes."""

from __future__ import annotations

import pytest

from .engine import create_stopped_container, image_exists, make_image

pytestmark = pytest.mark.usefixtures("clean_engine")


def evict(agent, dry_run: bool = False) -> list[tuple[str, str, str]]:
    evicted = agent.ok("POST", "/v1/evict", {"dry_run": dry_run})["evicted"]
    return [(e["work_item"], e["reason"], e["result"]) for e in evicted]


def test_count_limit_evicts_least_recently_used(make_agent, docker_client):
    agent = make_agent(max_count=2)
    ids = {}
    for name in ("a", "b", "c"):
        ids[name] = make_image(docker_client, f"cascade-snapshot-{name}:latest")
        agent.register("p", name, f"cascade-snapshot-{name}:latest")
    agent.ok("POST", "/v1/snapshots/lookup", {"project": "p", "work_item": "a"})  # a is fresh now

    assert evict(agent, dry_run=True) == [("b", "count", "planned")]
    assert image_exists(docker_client, ids["b"])  # a dry run changes nothing

    assert evict(agent) == [("b", "count", "removed")]
    assert not image_exists(docker_client, ids["b"])
    assert sorted(e["work_item"] for e in agent.snapshots()) == ["a", "c"]
    assert agent.status()["last_eviction"]["removed"] == 1


def test_size_limit_counts_unique_bytes(make_agent, docker_client):
    agent = make_agent(max_size=2500)
    for name in ("a", "b", "c"):
        make_image(docker_client, f"cascade-snapshot-{name}:latest")
        agent.register("p", name, f"cascade-snapshot-{name}:latest", size_bytes=1000)
    assert evict(agent) == [("a", "size", "removed")]
    assert agent.status()["snapshots"]["total_size_bytes"] == 2000


def test_image_in_use_survives_and_the_next_one_goes(make_agent, docker_client):
    agent = make_agent(max_count=2)
    busy = make_image(docker_client, "cascade-snapshot-busy:latest")
    agent.register("p", "busy", "cascade-snapshot-busy:latest")
    for name in ("idle", "new"):
        make_image(docker_client, f"cascade-snapshot-{name}:latest")
        agent.register("p", name, f"cascade-snapshot-{name}:latest")
    container = create_stopped_container(docker_client, busy)

    # busy is the least recently used, but a (stopped) container uses it: idle goes instead.
    assert evict(agent) == [("idle", "count", "removed")]
    assert image_exists(docker_client, busy)
    # The container was a use of busy (its creation counts as busy's last use), so once the
    # container is gone, "new" (registered before it) is the least recently used.
    docker_client.remove_container(container)
    make_image(docker_client, "cascade-snapshot-newer:latest")
    agent.register("p", "newer", "cascade-snapshot-newer:latest")
    assert evict(agent) == [("new", "count", "removed")]
    assert image_exists(docker_client, busy)


def test_ttl_evicts_old_snapshots(make_agent, docker_client):
    agent = make_agent(ttl="0s")
    image_id = make_image(docker_client, "cascade-snapshot-t:latest")
    agent.register("p", "t", "cascade-snapshot-t:latest")
    assert evict(agent) == [("t", "ttl", "removed")]
    assert not image_exists(docker_client, image_id)


def test_min_age_protects_young_snapshots_from_count(make_agent, docker_client):
    agent = make_agent(max_count=0, min_age="1h")
    image_id = make_image(docker_client, "cascade-snapshot-young:latest")
    agent.register("p", "young", "cascade-snapshot-young:latest")
    assert evict(agent) == []
    assert image_exists(docker_client, image_id)


def test_foreign_images_and_tags_survive_evicting_everything(make_agent, docker_client):
    agent = make_agent(max_count=0)
    foreign = make_image(docker_client, "foreign-base:latest")
    # A managed image that also carries a foreign tag: only our tag may go.
    shared = make_image(docker_client, "cascade-snapshot-dual:latest")
    docker_client.tag(shared, "foreign-keep", "v1")
    # A managed tag re-pointed at a foreign image after registration.
    ours = make_image(docker_client, "cascade-snapshot-moved:latest")
    agent.register("p", "moved", "cascade-snapshot-moved:latest")
    agent.register("p", "dual", "cascade-snapshot-dual:latest")
    docker_client.tag(foreign, "cascade-snapshot-moved", "latest")

    evict(agent)

    assert image_exists(docker_client, "foreign-base:latest")
    assert image_exists(docker_client, "foreign-keep:v1")
    assert docker_client.inspect_image("foreign-keep:v1")["Id"] == shared
    assert docker_client.inspect_image("foreign-base:latest")["Id"] == foreign
    assert not image_exists(docker_client, "cascade-snapshot-dual:latest")
    assert not image_exists(docker_client, ours)  # our dangling image went, by id


def test_discovered_images_count_towards_limits(make_agent, docker_client):
    make_image(docker_client, "cascade-snapshot-d1:latest")
    agent = make_agent(max_count=0, start=False)
    agent.start()  # reconcile discovers d1, the start-up eviction removes it at once
    assert not image_exists(docker_client, "cascade-snapshot-d1:latest")
    last = agent.status()["last_eviction"]
    assert (last["trigger"], last["removed"]) == ("start", 1)
