"""Removal failures Docker cannot be made to produce on demand, via a forwarding proxy."""

from __future__ import annotations

import socket

import pytest

from .engine import image_exists, make_image, wait_until
from .faults import FaultyDockerProxy, SentryReceiver

pytestmark = pytest.mark.usefixtures("clean_engine")


@pytest.fixture
def proxy(docker_engine, short_tmp_path):
    proxy = FaultyDockerProxy(short_tmp_path / "proxy.sock", docker_engine.socket_path)
    yield proxy
    proxy.close()


@pytest.fixture
def sentry():
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = SentryReceiver(port)
    yield receiver
    receiver.close()


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
