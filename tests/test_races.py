"""The removal promise under real timing: the engine changes between the agent's calls.

Docker has no compare-and-delete, so between the agent's last look at an image and its DELETE
a router may commit to the same tag, a user may tag the image, another agent may remove it,
or the engine may restart. Two kinds of test:
- loops of at least 300 rounds against the real engine, racing the agent's removal with a
  router's re-commit (the hazard of the by-tag DELETE) and with a user's `docker tag` of a
  dangling image (the window that remains, which must be reported every time it is hit);
- each interleaving made deterministic by `FaultyDockerProxy.hold_removals()` (tests/faults.py,
  a hand-written fault: a real engine cannot be made to hold a DELETE on demand), which keeps
  the agent's DELETE waiting while the test changes the engine.
docs/operations.md (Safety) lists the same interleavings and what each one does.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import docker
import pytest

from .agent import Agent, UnixConnection, call
from .engine import image_exists, make_image, wait_until
from .faults import FaultyDockerProxy, SentryReceiver
from .images import commit, make_busybox_image

pytestmark = pytest.mark.usefixtures("clean_engine")

TAG = "cascade-snapshot-race-w:latest"
ROUNDS = 300
KEY = {"project": "race", "work_item": "w"}


def wrong_removals(agent: Agent) -> float:
    """The agent's snapagentd_wrong_removals_total, scraped from its socket."""
    connection = UnixConnection(str(agent.socket_path), timeout=30)
    try:
        connection.request("GET", "/metrics")
        body = connection.getresponse().read().decode()
    finally:
        connection.close()
    match = re.search(r"^snapagentd_wrong_removals_total (\S+)$", body, re.MULTILINE)
    assert match, body[:500]
    return float(match[1])


def tag_of(client: docker.APIClient, tag: str) -> str | None:
    """The id `tag` names now, or None."""
    try:
        return str(client.inspect_image(tag)["Id"])
    except docker.errors.NotFound:
        return None


def tags_on(client: docker.APIClient, image_id: str) -> list[str] | None:
    """The tags of `image_id` now, or None when it is gone."""
    try:
        return sorted(client.inspect_image(image_id).get("RepoTags") or [])
    except docker.errors.NotFound:
        return None


def tag_unless_gone(client: docker.APIClient, image_id: str, reference: str) -> bool:
    """`docker tag`; False when the image was already gone (404), or going: dockerd 20.10
    answers a tag racing the deletion of its image with a 500 "... no such file or directory"."""
    try:
        client.tag(image_id, *reference.split(":"))
    except docker.errors.APIError as error:
        if error.status_code == 404 or "no such file" in str(error.explanation):
            return False
        raise
    return True


def together(*actions: Callable[[], Any]) -> list[Any]:
    """Run the actions at the same moment, each in a thread; their results, in order."""
    results: list[Any] = [None] * len(actions)
    errors: list[BaseException] = []
    start = threading.Barrier(len(actions))

    def run(index: int, action: Callable[[], Any]) -> None:
        start.wait(timeout=30)
        try:
            results[index] = action()
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(actions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a racing action hung"
    if errors:
        raise errors[0]
    return results


def invalidate(agent: Agent) -> dict[str, Any]:
    return agent.ok("DELETE", "/v1/snapshots", query=KEY)


# --- loops against the real engine, no proxy ---------------------------------------------------


def test_an_invalidation_racing_a_recommit_never_touches_the_new_image(
    agent: Agent, docker_client: docker.APIClient
) -> None:
    """Issue 15, item 1: the router's normal cycle. Each round registers image I under TAG, then
    invalidates it while the router moves TAG to its next image J. Whatever the order, J keeps
    TAG and I is gone (by-tag DELETEs untagged J in 16-31 of 300 rounds)."""
    nexts = [make_image(docker_client, f"foreign-next:{n}") for n in range(ROUNDS)]
    hits, results = [], set()
    for number, next_id in enumerate(nexts):
        old_id = make_image(docker_client, TAG)
        agent.register(KEY["project"], KEY["work_item"], TAG)
        answer, _ = together(
            lambda: invalidate(agent),
            lambda next_id=next_id: docker_client.tag(next_id, TAG.split(":")[0], "latest"),
        )
        results.add(answer["result"])
        if tag_of(docker_client, TAG) != next_id:
            hits.append(number)
        assert not image_exists(docker_client, old_id), f"round {number}: the old image stayed"
    assert hits == [], f"the new image lost its tag in rounds {hits}"
    assert results == {"removed"}
    assert wrong_removals(agent) == 0


def test_a_dangling_image_tagged_during_its_removal_is_reported_whenever_it_goes(
    agent: Agent, docker_client: docker.APIClient
) -> None:
    """Issue 15, item 2: a superseded image left dangling is removed by id; a user who tags it
    at that moment either keeps it (the tag landed before the agent looked) or loses the new tag
    with it (it landed in the milliseconds between the look and the DELETE, a window Docker's
    API cannot close). Every such loss is a wrong removal the agent reports."""
    nexts = [make_image(docker_client, f"foreign-next:{n}") for n in range(ROUNDS)]
    lost: list[int] = []
    kept: list[int] = []
    too_late: list[int] = []
    for number, next_id in enumerate(nexts):
        old_id = make_image(docker_client, TAG)
        agent.register(KEY["project"], KEY["work_item"], TAG)
        docker_client.tag(next_id, TAG.split(":")[0], "latest")  # the router re-commits
        rescue = f"foreign-rescued:{number}"
        _, tagged = together(
            lambda: agent.register(KEY["project"], KEY["work_item"], TAG),  # starts the removal
            lambda old_id=old_id, rescue=rescue: tag_unless_gone(docker_client, old_id, rescue),
        )
        wait_until(
            lambda: agent.status()["snapshots"]["pending_removal"] == 0,
            timeout=30,
            message=f"round {number}: the superseded image's removal settled",
        )
        if not tagged:
            too_late.append(number)  # the image was gone before the user's tag: nothing lost
        elif image_exists(docker_client, old_id):
            assert tags_on(docker_client, old_id) == [rescue]
            kept.append(number)
        else:
            lost.append(number)
    assert wrong_removals(agent) == len(lost), (lost, wrong_removals(agent))
    print(
        f"\ndangling image tagged during its removal, {ROUNDS} rounds: kept {len(kept)}, "
        f"tag too late {len(too_late)}, lost with the image (reported) {len(lost)}"
    )


# --- each interleaving, made deterministic ------------------------------------------------------


@pytest.fixture
def slow_agent(make_agent, proxy: FaultyDockerProxy, sentry: SentryReceiver) -> Agent:
    """An agent whose Docker is the holding proxy, reporting to a Sentry receiver."""
    agent = make_agent(start=False, docker_url=proxy.url)
    agent.extra["sentry"] = {"dsn": sentry.dsn, "environment": "test"}
    agent.write_config()
    agent.start()
    return agent


def held(proxy: FaultyDockerProxy, request: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    """Start `request` (a call to the agent) in a thread with the proxy holding DELETEs; return
    once the agent's DELETE waits at the proxy."""
    before = proxy.held_removals
    answer: dict[str, Any] = {}

    def send() -> None:
        answer["value"] = request()

    proxy.hold_removals()
    thread = threading.Thread(target=send)
    thread.start()
    wait_until(lambda: proxy.held_removals > before, message="the agent's DELETE is held")
    return thread, answer


def invalidating(agent: Agent) -> Callable[[], Any]:
    return lambda: call(agent.socket_path, "DELETE", "/v1/snapshots", query=KEY, timeout=60)


def finish(thread: threading.Thread, answer: dict[str, Any], proxy: FaultyDockerProxy) -> Any:
    proxy.release_removals()
    thread.join(timeout=60)
    assert not thread.is_alive()
    status, body = answer["value"]
    assert status == 200, body
    return body


def test_held_a_recommit_in_the_window_keeps_the_new_image(
    slow_agent: Agent, proxy: FaultyDockerProxy, docker_client: docker.APIClient
) -> None:
    """By id: the router's commit lands between the agent's look and its DELETE."""
    old_id = make_image(docker_client, TAG)
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)
    thread, answer = held(proxy, invalidating(slow_agent))
    new_id = make_image(docker_client, TAG)  # the commit, in the window
    body = finish(thread, answer, proxy)
    assert body["result"] == "removed"
    assert not image_exists(docker_client, old_id)
    assert tag_of(docker_client, TAG) == new_id
    assert wrong_removals(slow_agent) == 0


def test_held_a_tag_added_in_the_window_makes_docker_refuse(
    slow_agent: Agent, proxy: FaultyDockerProxy, docker_client: docker.APIClient
) -> None:
    """By id: a user tags our image in the window; Docker refuses an id with two references,
    so nothing goes; the next run takes only our tag off, and the image stays the user's."""
    image_id = make_image(docker_client, TAG)
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)
    thread, answer = held(proxy, invalidating(slow_agent))
    docker_client.tag(image_id, "foreign-kept", "1")
    body = finish(thread, answer, proxy)
    assert (body["result"], body["detail"]) == (
        "referenced",
        "referenced in multiple repositories",
    )
    assert tags_on(docker_client, image_id) == ["cascade-snapshot-race-w:latest", "foreign-kept:1"]
    evicted = slow_agent.ok("POST", "/v1/evict", {})["evicted"]
    assert [(e["reason"], e["result"]) for e in evicted] == [("invalidated", "untagged")]
    assert tags_on(docker_client, image_id) == ["foreign-kept:1"]
    assert slow_agent.status()["snapshots"]["pending_removal"] == 0
    assert wrong_removals(slow_agent) == 0


def test_held_a_moved_tag_and_a_new_one_in_the_window_is_a_reported_wrong_removal(
    slow_agent: Agent,
    proxy: FaultyDockerProxy,
    sentry: SentryReceiver,
    docker_client: docker.APIClient,
) -> None:
    """By id, the residual window: the router moves our tag away AND a user tags our image,
    both between the agent's look and its DELETE. Docker sees one reference and deletes it with
    the image: the agent cannot prevent it, so it reports it (ERROR, metric, Sentry)."""
    image_id = make_image(docker_client, TAG)
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)
    thread, answer = held(proxy, invalidating(slow_agent))
    new_id = make_image(docker_client, TAG)
    docker_client.tag(image_id, "foreign-late", "1")
    body = finish(thread, answer, proxy)
    assert body["result"] == "removed"
    assert not image_exists(docker_client, image_id)
    assert tag_of(docker_client, TAG) == new_id  # the router's image is untouched
    assert wrong_removals(slow_agent) == 1
    assert "ERROR" in slow_agent.log() and "wrong removal: foreign-late:1" in slow_agent.log()
    event = wait_until(lambda: sentry.events, timeout=15, message="a Sentry event")[0]
    assert event["tags"]["reason"] == "wrong-removal"
    assert event["tags"]["reference"] == "foreign-late:1"


def test_held_a_superseded_dangling_image_tagged_in_the_window_is_reported(
    slow_agent: Agent, proxy: FaultyDockerProxy, docker_client: docker.APIClient
) -> None:
    """By id, item 2's window made wide: the superseded image is dangling when the agent looks;
    a tag added before the DELETE goes with it, and is reported."""
    old_id = make_image(docker_client, TAG)
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)
    make_image(docker_client, TAG)  # the router's re-commit
    proxy.hold_removals()
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)  # supersedes: removal starts
    wait_until(lambda: proxy.held_removals == 1, message="the agent's DELETE is held")
    docker_client.tag(old_id, "foreign-rescued", "1")
    proxy.release_removals()
    wait_until(lambda: wrong_removals(slow_agent) == 1, message="the wrong removal reported")
    assert not image_exists(docker_client, old_id)
    assert "wrong removal: foreign-rescued:1" in slow_agent.log()


def test_held_a_recommit_while_untagging_is_the_reported_untag_window(
    slow_agent: Agent, proxy: FaultyDockerProxy, docker_client: docker.APIClient
) -> None:
    """By name, the one window left when other references keep the image: the agent checks
    that our tag names our image, then DELETEs the tag; a commit to that tag in between loses
    it (and the new image, when the tag was its only reference). Docker's answer says so."""
    image_id = make_image(docker_client, TAG)
    docker_client.tag(image_id, "foreign-keep", "1")  # a user keeps this snapshot
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)
    thread, answer = held(proxy, invalidating(slow_agent))
    new_id = make_image(docker_client, TAG)
    body = finish(thread, answer, proxy)
    assert body["result"] == "untagged"
    assert tags_on(docker_client, image_id) == ["foreign-keep:1"]
    assert not image_exists(docker_client, new_id)  # Docker resolved the tag at the DELETE
    assert wrong_removals(slow_agent) == 1
    assert f"wrong removal: {TAG} (image {new_id[:19]})" in slow_agent.log()


def test_held_a_retag_while_untagging_is_told_by_the_engines_events(
    slow_agent: Agent, proxy: FaultyDockerProxy, docker_client: docker.APIClient
) -> None:
    """The same window, when the image our tag moved to has another reference: Docker only
    untags it, and its answer cannot say which image; the `tag` event of the window does."""
    image_id = make_image(docker_client, TAG)
    docker_client.tag(image_id, "foreign-keep", "1")
    other_id = make_image(docker_client, "foreign-other:1")
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)
    thread, answer = held(proxy, invalidating(slow_agent))
    docker_client.tag(other_id, TAG.split(":")[0], "latest")
    body = finish(thread, answer, proxy)
    assert body["result"] == "untagged"
    assert tags_on(docker_client, other_id) == ["foreign-other:1"]  # it lost our tag
    assert tags_on(docker_client, image_id) == ["foreign-keep:1"]  # the tag had moved off
    assert wrong_removals(slow_agent) == 1
    assert f"wrong removal: {TAG} (image {other_id[:19]})" in slow_agent.log()


def test_held_a_second_remover_in_the_window_is_already_gone(
    slow_agent: Agent, proxy: FaultyDockerProxy, docker_client: docker.APIClient
) -> None:
    """Another agent or a user removes our image between the look and the DELETE: 404."""
    image_id = make_image(docker_client, TAG)
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)
    thread, answer = held(proxy, invalidating(slow_agent))
    docker_client.remove_image(image_id)
    body = finish(thread, answer, proxy)
    assert body["result"] == "already-gone"
    assert slow_agent.status()["snapshots"]["pending_removal"] == 0
    assert wrong_removals(slow_agent) == 0


def test_held_a_container_created_in_the_window_keeps_the_image(
    slow_agent: Agent, proxy: FaultyDockerProxy, docker_client: docker.APIClient
) -> None:
    """A router starts a worker from the image in the window: Docker refuses (in use), the
    removal stays pending and is retried once the container is gone."""
    image_id = make_image(docker_client, TAG)
    slow_agent.register(KEY["project"], KEY["work_item"], TAG)
    thread, answer = held(proxy, invalidating(slow_agent))
    container = docker_client.create_container(image_id, command=["/payload"])["Id"]
    body = finish(thread, answer, proxy)
    assert body["result"] == "in-use"
    assert "stopped container" in body["detail"]
    assert tags_on(docker_client, image_id) == [TAG]
    docker_client.remove_container(container)
    evicted = slow_agent.ok("POST", "/v1/evict", {})["evicted"]
    assert [(e["reason"], e["result"]) for e in evicted] == [("invalidated", "removed")]
    assert not image_exists(docker_client, image_id)


def test_a_parent_of_other_images_is_told_apart_and_never_taken_for_gone(
    agent: Agent, docker_client: docker.APIClient
) -> None:
    """Issue 15, item 8: a snapshot a child image was committed from is refused by Docker with
    "dependent child images", not "in use"; the removal stays pending (a listing no longer shows
    the untagged parent, which proves nothing) and goes once the child does."""
    base_id = make_busybox_image(docker_client, TAG)
    agent.register(KEY["project"], KEY["work_item"], TAG)
    child_id = commit(docker_client, TAG, "true", "foreign-child:1")
    body = invalidate(agent)
    assert (body["result"], body["detail"]) == ("has-children", "dependent child images")
    assert tags_on(docker_client, base_id) == [TAG]
    docker_client.tag(child_id, TAG.split(":")[0], "latest")  # the tag moves: base is hidden
    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    assert ("invalidated", "has-children") in [(e["reason"], e["result"]) for e in evicted]
    assert agent.status()["snapshots"]["pending_removal"] == 1
    docker_client.remove_image("foreign-child:1")  # the child keeps our moved tag
    docker_client.remove_image(TAG)  # the child goes, and Docker takes its parent with it
    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    assert [(e["reason"], e["result"]) for e in evicted if e["image_id"] == base_id] == [
        ("invalidated", "already-gone")
    ]
    assert agent.status()["snapshots"]["pending_removal"] == 0


def test_an_image_with_two_snapshot_tags_goes_in_one_removal(
    make_agent, docker_client: docker.APIClient
) -> None:
    """Both tags retired in one run: the first comes off by name, the image goes by id with
    the last (an id with two references would be refused); both entries say removed."""
    image_id = make_image(docker_client, "cascade-snapshot-two-a:latest")
    docker_client.tag(image_id, "cascade-snapshot-two-b", "latest")
    agent = make_agent()
    agent.register("p", "a", "cascade-snapshot-two-a:latest")
    agent.register("p", "b", "cascade-snapshot-two-b:latest")
    agent.stop()
    agent.policy["max_count"] = 0
    agent.write_config()
    agent.start()  # the start-up run evicts both
    wait_until(lambda: not image_exists(docker_client, image_id), message="the image removed")
    last = agent.status()["last_eviction"]
    assert (last["removed"], last["untagged"], last["wrong_removals"]) == (2, 0, 0)
    assert agent.snapshots() == []


def test_held_an_engine_restart_in_the_window_fails_safe_and_is_retried(
    make_agent, fresh_docker_engine, short_tmp_path
) -> None:
    """The engine stops while the agent's DELETE is held and comes back before it is let go:
    the removal lands on the restarted engine (or fails and is retried); only our image goes."""
    engine = fresh_docker_engine
    proxy = FaultyDockerProxy(short_tmp_path / "restart-proxy.sock", engine.socket_path)
    client = engine.client()
    try:
        image_id = make_image(client, TAG)
        other_id = make_image(client, "foreign-stays:1")
        agent = make_agent(docker_url=proxy.url)
        agent.register(KEY["project"], KEY["work_item"], TAG)
        thread, answer = held(proxy, invalidating(agent))
        client.close()
        engine.restart()
        client = engine.client()
        body = finish(thread, answer, proxy)
        assert body["result"] in ("removed", "failed"), body
        if body["result"] == "failed":  # the DELETE met the engine while it was down
            evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
            assert [e["result"] for e in evicted] == ["removed"]
        assert not image_exists(client, image_id)
        assert image_exists(client, other_id)
        assert wrong_removals(agent) == 0
    finally:
        client.close()
        proxy.release_removals()
        proxy.close()
