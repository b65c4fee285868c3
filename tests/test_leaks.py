"""Leaked layers against a real agent and a real dockerd.

Proven here: a registered image whose tag a re-commit moved away is left dangling and the
next run removes it; an image the journal knows an entry once referenced (a `gone` record,
written out as `known` by compaction, replayed at start) is removed as `leaked` once it is
dangling and no container uses it, and forgotten (`forget`) once Docker no longer has it;
with `[docker] dangling_label`, dangling images carrying that label are removed too; dangling
images neither known nor labelled, and every image that still has a tag, are never removed.
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import pytest

from .agent import Agent
from .engine import create_stopped_container, image_exists, image_tags, make_image, wait_until

pytestmark = pytest.mark.usefixtures("clean_engine")

MakeAgent = Callable[..., Agent]
LABEL = "cascade.managed=true"
TAG = "cascade-snapshot-x:latest"
FOREIGN = "foreign-keep:v1"


def labelled_agent(make_agent: MakeAgent, **policy: Any) -> Agent:
    agent = make_agent(start=False, **policy)
    agent.extra["docker"] = {"url": agent.docker_url, "dangling_label": LABEL}
    agent.write_config()
    agent.start()
    return agent


def dangling_image(client: docker.APIClient, label: str | None = None) -> str:
    """`docker import` an image (with `label` if given) under a tag, then move the tag to
    another image: the first is left dangling, as a re-commit leaves one. Returns its id."""
    content = uuid.uuid4().bytes * 64
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("payload")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    tag = f"foreign-dangling-{uuid.uuid4().hex[:12]}"
    changes = [f"LABEL {label}"] if label else None
    client.import_image_from_data(buffer.getvalue(), repository=tag, tag="latest", changes=changes)
    image_id = client.inspect_image(f"{tag}:latest")["Id"]
    make_image(client, f"{tag}:latest")  # the tag moves on
    assert client.inspect_image(image_id)["RepoTags"] in ([], None)
    return image_id


def evict(agent: Agent) -> list[tuple[str, str, str]]:
    """A real run: (image id, reason, result) of each outcome."""
    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    return [(e["image_id"], e["reason"], e["result"]) for e in evicted]


def journal(agent: Agent) -> list[dict[str, Any]]:
    return [json.loads(line) for line in agent.journal_path.read_text().splitlines()]


def ops_about(agent: Agent, image_id: str) -> list[str]:
    """The ops of the journal records naming `image_id`, in order."""
    return [r["op"] for r in journal(agent) if image_id in json.dumps(r)]


def leave_known_dangling(agent: Agent, client: docker.APIClient) -> str:
    """An image an entry referenced and no longer does, still in Docker, now dangling.

    It carries a foreign tag besides ours, so invalidating the entry only takes our tag away
    (`gone`: the journal knows the id); then the foreign tag moves to another image.
    """
    image_id = make_image(client, TAG)
    client.tag(image_id, *FOREIGN.split(":"))
    agent.register("p", "x", TAG)
    answer = agent.ok("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "x"})
    assert answer["result"] == "untagged"  # the image stays: nothing was freed
    assert client.inspect_image(image_id)["RepoTags"] == [FOREIGN]  # only our tag went
    assert ops_about(agent, image_id) == ["put", "retire", "gone"]
    make_image(client, FOREIGN)  # the foreign tag moves on: ours is dangling now
    return image_id


def test_a_recommitted_tags_old_image_is_removed_and_no_tagged_image_is(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent()
    old = make_image(docker_client, TAG)
    agent.register("p", "x", TAG)
    kept = make_image(docker_client, "cascade-snapshot-kept:latest")
    agent.register("p", "kept", "cascade-snapshot-kept:latest")
    make_image(docker_client, "foreign-base:latest")
    # Dangling and never referenced; its label means nothing without [docker] dangling_label.
    stranger = dangling_image(docker_client, LABEL)
    new = make_image(docker_client, TAG)  # the router re-tags without registering
    assert docker_client.inspect_image(old)["RepoTags"] in ([], None)
    tags = image_tags(docker_client)

    ((image_id, reason, result),) = evict(agent)
    assert (image_id, result) == (old, "removed")
    assert reason in ("repointed", "leaked")
    assert not image_exists(docker_client, old)
    assert image_tags(docker_client) == tags  # every tag still names the same image
    assert image_exists(docker_client, stranger)
    entries = {s["work_item"]: (s["image_id"], s["source"]) for s in agent.snapshots()}
    assert entries == {"kept": (kept, "registered"), TAG: (new, "discovered")}
    assert evict(agent) == []


def test_a_known_image_left_dangling_is_removed_as_leaked_and_forgotten(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent()
    make_image(docker_client, "cascade-snapshot-churn:latest")
    agent.register("p", "churn", "cascade-snapshot-churn:latest")
    image_id = make_image(docker_client, TAG)
    docker_client.tag(image_id, *FOREIGN.split(":"))
    agent.register("p", "x", TAG)
    agent.ok("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "x"})
    assert ops_about(agent, image_id) == ["put", "retire", "gone"]  # gone: known from now on

    # Enough journal churn for a compaction, which writes what `gone` implied as `known`.
    def lease_and_release(_: int) -> None:
        body = {"project": "p", "work_item": "churn", "seconds": 60}
        lease = agent.ok("POST", "/v1/snapshots/lease", body)["lease"]
        agent.ok("DELETE", "/v1/snapshots/lease", query={"id": lease["id"]})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lease_and_release, range(520)))
    wait_until(lambda: "compacted" in agent.log(), message="the journal to compact")
    assert ops_about(agent, image_id) == ["known"]
    assert {"v": 1, "op": "known", "image": TAG, "image_id": image_id} in journal(agent)

    # Untagged outside the agent while a stopped container uses it; the agent restarts.
    container = create_stopped_container(docker_client, image_id)
    make_image(docker_client, FOREIGN)
    assert agent.stop() == 0
    agent.start()  # replays `known`; its start-up run leaves the image to the container
    assert image_exists(docker_client, image_id)
    assert ops_about(agent, image_id) == ["known"]

    docker_client.remove_container(container)
    tags = image_tags(docker_client)
    assert evict(agent) == [(image_id, "leaked", "removed")]
    assert not image_exists(docker_client, image_id)
    assert image_tags(docker_client) == tags
    assert ops_about(agent, image_id) == ["known", "forget"]
    assert evict(agent) == []


def test_dangling_images_carrying_the_label_are_removed_and_no_others(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = labelled_agent(make_agent)
    marked = dangling_image(docker_client, LABEL)
    other_value = dangling_image(docker_client, "cascade.managed=false")
    unlabelled = dangling_image(docker_client)
    tagged = dangling_image(docker_client, LABEL)
    docker_client.tag(tagged, "foreign-labelled", "v1")  # a tag again: someone's image
    registered = make_image(docker_client, TAG)
    agent.register("p", "x", TAG)
    tags = image_tags(docker_client)

    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    assert [(e["image_id"], e["reason"], e["result"]) for e in evicted] == [
        (marked, "leaked", "removed")
    ]
    assert evicted[0]["image"] == "<none>:<none>"
    assert not image_exists(docker_client, marked)
    for kept in (other_value, unlabelled, tagged, registered):
        assert image_exists(docker_client, kept)
    assert image_tags(docker_client) == tags
    assert evict(agent) == []


@pytest.mark.parametrize("leak", ["known", "labelled"])
def test_a_leaked_image_in_use_stays_until_its_container_goes(
    make_agent: MakeAgent, docker_client: docker.APIClient, leak: str
) -> None:
    agent = labelled_agent(make_agent)
    if leak == "known":
        image_id = leave_known_dangling(agent, docker_client)
    else:
        image_id = dangling_image(docker_client, LABEL)
    container = create_stopped_container(docker_client, image_id)

    assert all(outcome[2] != "removed" for outcome in evict(agent))
    assert image_exists(docker_client, image_id)

    docker_client.remove_container(container)
    assert evict(agent) == [(image_id, "leaked", "removed")]
    assert not image_exists(docker_client, image_id)


@pytest.mark.parametrize("leak", ["known", "labelled"])
def test_a_leaked_image_in_use_is_reported_in_use(
    make_agent: MakeAgent, docker_client: docker.APIClient, leak: str
) -> None:
    agent = labelled_agent(make_agent)
    if leak == "known":
        image_id = leave_known_dangling(agent, docker_client)
    else:
        image_id = dangling_image(docker_client, LABEL)
    create_stopped_container(docker_client, image_id)  # clean_engine removes it

    assert evict(agent) == [(image_id, "leaked", "in-use")]
    assert agent.status()["last_eviction"]["in_use"] == 1
