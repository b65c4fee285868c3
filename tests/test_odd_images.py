"""Images whose creation time is odd never stop eviction (issue 15, items 5 and 6).

`Created` is whatever an image's config says: `docker load` of a crafted or reproducible tarball
gives year 0, year 1 or 1970, clock skew or a crafted config a time in the future. Such images
are made here with `docker load` of a tarball written in the test (a real engine, real images).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from datetime import UTC, datetime

import docker
import pytest

from .agent import Agent
from .engine import image_exists, wait_until

pytestmark = pytest.mark.usefixtures("clean_engine")


def load_image(client: docker.APIClient, reference: str, created: str) -> str:
    """`docker load` a one-layer image whose config says it was created at `created`."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        data = uuid.uuid4().bytes * 64
        info = tarfile.TarInfo("payload")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": created}],
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [reference], "Layers": ["layer.tar"]}]
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, blob in (
            (config_name, config),
            ("layer.tar", layer_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    list(client.load_image(archive.getvalue()))
    return str(client.inspect_image(reference)["Id"])


ODD_TIMES = {
    "year0": "0000-01-01T00:00:00Z",
    "year1": "0001-01-01T00:00:00Z",
    "epoch": "1970-01-01T00:00:00Z",
    "year2200": "2200-01-01T00:00:00Z",
}


def test_odd_images_anywhere_never_stop_a_run_and_are_reported(
    agent: Agent, docker_client: docker.APIClient
) -> None:
    for name, created in ODD_TIMES.items():
        load_image(docker_client, f"foreign-{name}:1", created)
    report = agent.ok("POST", "/v1/evict", {})
    assert report["dry_run"] is False
    assert agent.ok("POST", "/v1/evict", {"dry_run": True})["dry_run"] is True
    last = agent.status()["last_eviction"]
    assert (last["error"], last["odd_images"]) == (None, len(ODD_TIMES))
    for name in ODD_TIMES:  # foreign: never touched
        assert image_exists(docker_client, f"foreign-{name}:1")
    log = agent.log()
    assert "Created is out of range" in log and "Created is in the future" in log


@pytest.mark.parametrize("name", sorted(ODD_TIMES))
def test_a_snapshot_with_an_odd_creation_time_ages_from_its_registration(
    name: str, make_agent, docker_client: docker.APIClient
) -> None:
    """Registered, its age starts at zero (no year-0 snapshot expires at once, no year-2200 one
    lives forever); min_age protects it only while it is young; then TTL and count take it."""
    tag = f"cascade-snapshot-odd-{name}:latest"
    image_id = load_image(docker_client, tag, ODD_TIMES[name])
    agent = make_agent(ttl="2s", min_age="1s")
    before = datetime.now(UTC)
    entry = agent.register("p", name, tag)
    created = datetime.fromisoformat(entry["created_at"].replace("Z", "+00:00"))
    assert before <= created <= datetime.now(UTC)
    agent.ok("POST", "/v1/evict", {})
    assert image_exists(docker_client, image_id)  # younger than the TTL: kept

    def evicted() -> bool:
        agent.ok("POST", "/v1/evict", {})
        return not image_exists(docker_client, image_id)

    wait_until(evicted, timeout=30, interval=0.5, message="the snapshot expired and went")
    assert agent.snapshots() == []


def test_a_discovered_snapshot_from_the_future_ages_from_when_it_was_found(
    make_agent, docker_client: docker.APIClient
) -> None:
    image_id = load_image(docker_client, "cascade-snapshot-odd-found:latest", ODD_TIMES["year2200"])
    agent = make_agent(max_count=0, min_age="1s")
    # The start-up run found it and, younger than min_age, kept it.
    [found] = [s for s in agent.snapshots() if s["image_id"] == image_id]
    assert found["source"] == "discovered"
    assert found["created_at"] < "2100"

    def evicted() -> bool:
        agent.ok("POST", "/v1/evict", {})
        return not image_exists(docker_client, image_id)

    wait_until(evicted, timeout=30, interval=0.5, message="max_count took it once past min_age")
