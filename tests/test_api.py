"""The wire contract, through a real agent process on a real Unix socket and a real dockerd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .engine import create_stopped_container, image_exists, make_image, wait_until

pytestmark = pytest.mark.usefixtures("clean_engine")


def test_register_then_lookup_marks_use(agent, docker_client):
    image_id = make_image(docker_client, "cascade-snapshot-proj-w1:latest", size=3000)
    status, body = agent.call(
        "POST",
        "/v1/snapshots",
        {
            "project": "Proj Snap",
            "work_item": "MNG_652/Worker Snapshot!",
            "image": "cascade-snapshot-proj-w1",
        },
    )
    assert status == 201
    entry = body["snapshot"]
    assert entry["image"] == "cascade-snapshot-proj-w1:latest"
    assert entry["image_id"] == image_id
    assert entry["size_bytes"] == docker_client.inspect_image(image_id)["Size"]
    assert entry["source"] == "registered"
    assert entry["last_used_at"] is None
    assert entry["created_at"].endswith("Z")

    found = agent.ok(
        "POST",
        "/v1/snapshots/lookup",
        {"project": "Proj Snap", "work_item": "MNG_652/Worker Snapshot!"},
    )
    assert found["snapshot"]["image_id"] == image_id
    assert found["snapshot"]["last_used_at"] is not None


def test_register_same_key_again_is_200_and_keeps_given_size(agent, docker_client):
    make_image(docker_client, "cascade-snapshot-a:latest")
    first = agent.call(
        "POST",
        "/v1/snapshots",
        {"project": "p", "work_item": "w", "image": "cascade-snapshot-a:latest", "size_bytes": 42},
    )
    again = agent.call(
        "POST",
        "/v1/snapshots",
        {"project": "p", "work_item": "w", "image": "cascade-snapshot-a:latest", "size_bytes": 43},
    )
    assert (first[0], again[0]) == (201, 200)
    assert again[1]["snapshot"]["size_bytes"] == 43


def test_unicode_and_slashes_in_keys_round_trip(agent, docker_client):
    make_image(docker_client, "cascade-snapshot-u:latest")
    project, work_item = "Проект ✓", "a/b c/../d"
    agent.register(project, work_item, "cascade-snapshot-u:latest")
    listed = agent.ok("GET", "/v1/snapshots", query={"project": project})["snapshots"]
    assert [(e["project"], e["work_item"]) for e in listed] == [(project, work_item)]
    assert agent.ok("GET", "/v1/snapshots", query={"project": "other"})["snapshots"] == []
    status, body = agent.call(
        "DELETE", "/v1/snapshots", query={"project": project, "work_item": work_item}
    )
    assert status == 200 and body["result"] == "removed"
    assert not image_exists(docker_client, "cascade-snapshot-u:latest")


@pytest.mark.parametrize(
    ("body", "status", "code", "mentions"),
    [
        ({"work_item": "w", "image": "cascade-snapshot-a:latest"}, 400, "invalid-field", "project"),
        (
            {"project": 5, "work_item": "w", "image": "cascade-snapshot-a"},
            400,
            "invalid-field",
            "project",
        ),
        (
            {"project": "", "work_item": "w", "image": "cascade-snapshot-a"},
            400,
            "invalid-field",
            "project",
        ),
        (
            {"project": "p", "work_item": "w\x00", "image": "cascade-snapshot-a"},
            400,
            "invalid-field",
            "work_item",
        ),
        (
            {"project": "p" * 1025, "work_item": "w", "image": "cascade-snapshot-a"},
            400,
            "invalid-field",
            "project",
        ),
        (
            {"project": "p", "work_item": "w", "image": "cascade-snapshot-a", "size_bytes": -1},
            400,
            "invalid-field",
            "size_bytes",
        ),
        (
            {"project": "p", "work_item": "w", "image": "cascade-snapshot-a", "size_bytes": True},
            400,
            "invalid-field",
            "size_bytes",
        ),
        (
            {"project": "p", "work_item": "w", "image": "cascade-snapshot-a", "extra": 1},
            400,
            "invalid-field",
            "extra",
        ),
        (
            {"project": "p", "work_item": "w", "image": "Cascade-Snapshot-A"},
            400,
            "invalid-field",
            "image",
        ),
        (
            {"project": "p", "work_item": "w", "image": "../cascade-snapshot-a"},
            400,
            "invalid-field",
            "image",
        ),
        (
            {"project": "p", "work_item": "w", "image": "foreign:latest"},
            403,
            "image-not-managed",
            "foreign",
        ),
        (
            {"project": "p", "work_item": "w", "image": "sha256:" + "a" * 64},
            403,
            "image-not-managed",
            "sha256",
        ),
        (
            {"project": "p", "work_item": "w", "image": "cascade-snapshot-a@sha256:" + "a" * 64},
            403,
            "image-not-managed",
            "digest",
        ),
        (
            {"project": "p", "work_item": "w", "image": "cascade-snapshot-absent:latest"},
            404,
            "image-not-found",
            "cascade-snapshot-absent",
        ),
    ],
)
def test_register_rejects_bad_input(agent, body, status, code, mentions):
    got_status, answer = agent.call("POST", "/v1/snapshots", body)
    assert got_status == status
    assert answer["error"]["code"] == code
    assert mentions in answer["error"]["message"]
    assert agent.snapshots() == []


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "code"),
    [
        ("POST", "/v1/snapshots", b"{not json", 400, "invalid-json"),
        ("POST", "/v1/snapshots", b"[1, 2]", 400, "invalid-json"),
        ("POST", "/v1/snapshots", b"\xff\xfe", 400, "invalid-json"),
        ("POST", "/v1/snapshots", b'{"project": "' + b"x" * 70_000 + b'"}', 413, "body-too-large"),
        ("GET", "/nowhere", None, 404, "not-found"),
        ("PUT", "/v1/status", None, 405, "method-not-allowed"),
        ("POST", "/v1/evict", b'{"dry_run": "yes"}', 400, "invalid-field"),
        ("DELETE", "/v1/snapshots", None, 400, "invalid-field"),
    ],
)
def test_protocol_errors_are_json(agent, method, path, raw, status, code):
    got_status, answer = agent.call(method, path, raw=raw)
    assert got_status == status
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]


def test_foreign_image_is_refused_and_untouched(agent, docker_client):
    foreign_id = make_image(docker_client, "foreign-app:latest")
    status, answer = agent.call(
        "POST", "/v1/snapshots", {"project": "p", "work_item": "w", "image": "foreign-app:latest"}
    )
    assert (status, answer["error"]["code"]) == (403, "image-not-managed")
    agent.ok("POST", "/v1/evict", {})
    assert image_exists(docker_client, foreign_id)


def test_lookup_unknown_is_404(agent):
    status, answer = agent.call("POST", "/v1/snapshots/lookup", {"project": "p", "work_item": "w"})
    assert (status, answer["error"]["code"]) == (404, "snapshot-not-found")


def test_lookup_of_expired_entry_removes_its_image(agent, docker_client):
    image_id = make_image(docker_client, "cascade-snapshot-old:latest")
    agent.register("p", "w", "cascade-snapshot-old:latest")
    status, answer = agent.call(
        "POST", "/v1/snapshots/lookup", {"project": "p", "work_item": "w", "ttl_seconds": 0}
    )
    assert (status, answer["error"]["code"]) == (404, "snapshot-not-found")
    assert "older than" in answer["error"]["message"]
    wait_until(lambda: not image_exists(docker_client, image_id), message="expired image removed")
    assert agent.snapshots() == []


def lookup_once_the_agent_has_read_the_event(agent):
    """The first 404 of a lookup of p/w, polled: the agent learns of a change made behind its
    back from Docker's image events, and answers from Docker's last confirmation until it has
    read them (docs/api.md, "lookup")."""

    def not_found():
        status, answer = agent.call(
            "POST", "/v1/snapshots/lookup", {"project": "p", "work_item": "w"}
        )
        return (status, answer) if status == 404 else None

    return wait_until(not_found, message="a lookup answering 404")


def test_lookup_of_entry_whose_image_is_gone_is_404_and_drops_it(agent, docker_client):
    make_image(docker_client, "cascade-snapshot-gone:latest")
    agent.register("p", "w", "cascade-snapshot-gone:latest")
    docker_client.remove_image("cascade-snapshot-gone:latest")
    status, answer = lookup_once_the_agent_has_read_the_event(agent)
    assert (status, answer["error"]["code"]) == (404, "snapshot-not-found")
    assert "gone" in answer["error"]["message"]
    assert agent.snapshots() == []


def test_recommit_to_same_tag_removes_the_dangling_old_image(agent, docker_client):
    old_id = make_image(docker_client, "cascade-snapshot-re:latest")
    agent.register("p", "w", "cascade-snapshot-re:latest")
    new_id = make_image(docker_client, "cascade-snapshot-re:latest")  # the tag moves on
    entry = agent.register("p", "w", "cascade-snapshot-re:latest")
    assert entry["image_id"] == new_id
    # The removal runs in the background; the agent journals it once Docker confirmed it, a
    # moment after the image is gone: wait for the journalled end, then check Docker.
    wait_until(
        lambda: agent.status()["snapshots"]["pending_removal"] == 0,
        message="the agent to record the old image's removal",
    )
    assert not image_exists(docker_client, old_id)
    assert image_exists(docker_client, new_id)


def test_lookup_after_tag_moved_is_404_and_removes_our_dangling_image(agent, docker_client):
    old_id = make_image(docker_client, "cascade-snapshot-mv:latest")
    agent.register("p", "w", "cascade-snapshot-mv:latest")
    new_id = make_image(docker_client, "cascade-snapshot-mv:latest")
    _, answer = lookup_once_the_agent_has_read_the_event(agent)
    assert "now names another image" in answer["error"]["message"]
    wait_until(lambda: not image_exists(docker_client, old_id), message="dangling image removed")
    assert image_exists(docker_client, new_id)


def test_superseded_image_still_used_by_another_entry_is_kept(agent, docker_client):
    shared_id = make_image(docker_client, "cascade-snapshot-shared:latest")
    make_image(docker_client, "cascade-snapshot-next:latest")
    agent.register("p", "one", "cascade-snapshot-shared:latest")
    agent.register("p", "two", "cascade-snapshot-shared:latest")
    agent.register("p", "one", "cascade-snapshot-next:latest")
    assert image_exists(docker_client, shared_id)
    assert agent.status()["snapshots"]["pending_removal"] == 0
    status, body = agent.call("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "two"})
    assert (status, body["result"]) == (200, "removed")
    assert not image_exists(docker_client, shared_id)


def test_delete_unknown_is_404(agent):
    status, body = agent.call("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "w"})
    assert (status, body["error"]["code"]) == (404, "snapshot-not-found")


def test_delete_of_image_in_use_stays_pending_and_is_retried(agent, docker_client):
    image_id = make_image(docker_client, "cascade-snapshot-busy:latest")
    agent.register("p", "w", "cascade-snapshot-busy:latest")
    container = create_stopped_container(docker_client, image_id)
    status, body = agent.call("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "w"})
    assert (status, body["result"]) == (200, "in-use")
    assert image_exists(docker_client, image_id)
    assert agent.status()["snapshots"]["pending_removal"] == 1
    docker_client.remove_container(container)
    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    assert [(e["image"], e["reason"], e["result"]) for e in evicted] == [
        ("cascade-snapshot-busy:latest", "invalidated", "removed")
    ]
    assert not image_exists(docker_client, image_id)
    assert agent.status()["snapshots"]["pending_removal"] == 0


def test_status_document(agent, docker_client):
    make_image(docker_client, "cascade-snapshot-s1:latest", size=1000)
    agent.register("p", "w", "cascade-snapshot-s1:latest", size_bytes=1234)
    status = agent.status()
    assert status["version"]
    docker = status["docker"]
    assert {k: docker[k] for k in ("reachable", "error", "url")} == {
        "reachable": True,
        "error": None,
        "url": agent.docker_url,
    }
    assert set(docker["events"]) == {"connected", "reconnects"}
    snapshots = status["snapshots"]
    unique = snapshots.pop("unique_bytes")
    assert unique is None or isinstance(unique, int)  # measured after start-up, off the hot path
    assert snapshots == {"count": 1, "total_size_bytes": 1234, "pending_removal": 0, "leases": 0}
    assert status["disk"] is None  # the test agent's watermarks are off
    assert status["policy"]["max_count"] == 100
    assert status["policy"]["disk_high"] == "off"
    assert status["last_eviction"]["trigger"] == "start"
    # The agent's own instance id and the engine it works on come first, then the entry.
    assert status["journal"] == {"path": str(agent.journal_path), "records": 3}
    instance = agent.instance_id()
    engine_id = docker_client.info()["ID"]
    marker = f"snapagentd-owner-{instance}"
    assert status["engine"] == {"id": engine_id, "instance": instance, "marker": marker}


def test_openapi_document_covers_every_route(agent):
    from snapagentd.config import Settings
    from snapagentd.daemon import build_app
    from snapagentd.notify import Notifier

    document = json.loads((Path(__file__).parent.parent / "docs" / "openapi.json").read_text())
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
        if method in {"get", "post", "delete", "put", "patch"}
    }
    served = {
        (route.method, route.resource.canonical)
        for route in build_app(Settings(), Notifier()).router.routes()  # as the daemon serves
        if route.method != "HEAD"
    }
    assert served == documented
