"""Removal failures Docker cannot be made to produce on demand, via a forwarding proxy."""

from __future__ import annotations

import threading

import pytest

from .engine import image_exists, make_image, wait_until

pytestmark = pytest.mark.usefixtures("clean_engine")


def test_failed_removal_is_kept_reported_and_retried(make_agent, proxy, sentry, docker_client):
    image_id = make_image(docker_client, "cascade-snapshot-fail:latest")
    agent = make_agent(start=False, docker_url=proxy.url)
    agent.extra["sentry"] = {"dsn": sentry.dsn, "environment": "test"}
    agent.write_config()
    agent.start()
    agent.register("p", "w", "cascade-snapshot-fail:latest")

    proxy.fail_removals = True
    code, body = agent.call("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "w"})
    assert (code, body["result"]) == (200, "failed")
    assert proxy.failed_removals == 1
    assert image_exists(docker_client, image_id)
    assert agent.status()["snapshots"]["pending_removal"] == 1
    assert "cascade-snapshot-fail:latest" in agent.log()

    wait_until(lambda: sentry.events, timeout=15, message="Sentry event received")
    event = sentry.events[0]
    assert event["environment"] == "test"
    assert event["tags"]["image"] == "cascade-snapshot-fail:latest"
    assert event["contexts"]["snapshot"]["image_id"] == image_id

    proxy.fail_removals = False
    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    assert [(e["reason"], e["result"]) for e in evicted] == [("invalidated", "removed")]
    assert not image_exists(docker_client, image_id)
    assert agent.status()["snapshots"]["pending_removal"] == 0


def test_without_dsn_failures_are_only_logged(make_agent, proxy, docker_client):
    make_image(docker_client, "cascade-snapshot-nodsn:latest")
    agent = make_agent(docker_url=proxy.url, max_count=0, min_age="1h")
    agent.register("p", "w", "cascade-snapshot-nodsn:latest")
    proxy.fail_removals = True
    code, body = agent.call("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "w"})
    assert (code, body["result"]) == (200, "failed")
    assert "will retry" in agent.log()
    assert "sentry" not in agent.log().lower()


# --- the engine stopped, or slow: the agent keeps serving and its event loop keeps ticking ---

WATCHDOG = {"WATCHDOG_USEC": "400000"}  # a ping every 0.2 s


def pings_keep_coming(agent, count: int = 3) -> None:
    """`count` WATCHDOG=1 pings sent from now on: the event loop is not blocked."""
    notify = agent.notify
    notify.drain()  # what was sent before now
    start = len(notify.messages)
    wait_until(
        lambda: (
            notify.drain(0.1) is not None and notify.messages[start:].count("WATCHDOG=1") >= count
        ),
        timeout=5,
        message=f"{count} fresh watchdog pings",
    )


def test_engine_stopped_mid_run_then_started_again(make_agent, fresh_docker_engine):
    client = fresh_docker_engine.client()
    make_image(client, "cascade-snapshot-outage:latest")
    agent = make_agent(start=False, docker_url=fresh_docker_engine.url)
    agent.start(env=WATCHDOG)
    agent.register("p", "w", "cascade-snapshot-outage:latest")

    fresh_docker_engine.halt()
    code, answer = agent.call("POST", "/v1/evict", {})
    assert (code, answer["error"]["code"]) == (503, "docker-unavailable")
    body = {"project": "p", "work_item": "w2", "image": "cascade-snapshot-outage:latest"}
    code, answer = agent.call("POST", "/v1/snapshots", body)
    assert (code, answer["error"]["code"]) == (503, "docker-unavailable")
    status = agent.status()
    assert status["docker"]["reachable"] is False
    assert status["snapshots"]["count"] == 1  # an outage forgets nothing
    agent.notify.wait_for(lambda line: line.startswith("STATUS=") and "unreachable" in line)
    pings_keep_coming(agent)

    fresh_docker_engine.start_again()
    wait_until(
        lambda: agent.status()["docker"]["reachable"],
        timeout=30,
        message="the agent to notice Docker is back (it retries every 5 s)",
    )
    # Whichever notices first reconciles: the Docker watch, or the event stream's reconnect.
    returned = ("docker-returned", "events-reconnected")
    wait_until(lambda: agent.status()["last_eviction"]["trigger"] in returned, 15)
    assert agent.status()["last_eviction"]["error"] is None
    assert agent.ok("POST", "/v1/snapshots/lookup", {"project": "p", "work_item": "w"})
    assert agent.call("POST", "/v1/snapshots", body)[0] == 201


def test_slow_engine_does_not_block_other_requests_or_the_watchdog(
    make_agent, proxy, docker_client
):
    make_image(docker_client, "cascade-snapshot-slow:latest")
    agent = make_agent(start=False, docker_url=proxy.url)
    agent.start(env=WATCHDOG)
    proxy.slow_image = "cascade-snapshot-slow:latest"
    proxy.slow_inspect = 4.0  # under the agent's 5 s inspect deadline
    answers: list[tuple[int, dict]] = []
    body = {"project": "p", "work_item": "w", "image": "cascade-snapshot-slow:latest"}
    register = threading.Thread(
        target=lambda: answers.append(agent.call("POST", "/v1/snapshots", body))
    )
    register.start()
    wait_until(lambda: proxy.held_inspections, timeout=10, message="the inspect to be held")

    assert agent.status()["docker"]["reachable"] is True  # answered while Docker stalls
    pings_keep_coming(agent)
    assert register.is_alive()  # all of the above happened while the engine held the inspect

    register.join(timeout=30)
    assert [code for code, _ in answers] == [201]
