"""Only managed images are ever removed, whatever the input. Register, delete and evict
everything under adversarial names, then check that every foreign image and every foreign tag
survived."""

from __future__ import annotations

from collections.abc import Callable

import docker

from .agent import Agent
from .engine import image_exists, image_tags, make_image

FOREIGN_TAGS = [
    "foreign-base:latest",
    "foreign-app:v1",
    "registry.local:5000/cascade-snapshot-x:latest",  # another registry's repository
    "cascade-snapshot:latest",  # the prefix is "cascade-snapshot-", with the dash
    "cascade-snapshotx:latest",
    "foreign-shared:latest",  # also tagged with a managed tag below
]


def adversarial_images(foreign: dict[str, str], digest: str) -> list[str]:
    base_id = foreign["foreign-base:latest"]
    return [
        "foreign-base:latest",
        "foreign-base",
        base_id,  # a full image id
        base_id.removeprefix("sha256:"),
        base_id.removeprefix("sha256:")[:12],  # a short id
        f"cascade-snapshot-x@{digest}",
        f"cascade-snapshot-x:latest@{digest}",
        "../foreign-base:latest",
        "cascade-snapshot-../../foreign-base:latest",
        "cascade-snapshot-a/../../foreign-base:latest",
        "registry.local:5000/cascade-snapshot-x:latest",
        "cascade-snapshot:latest",
        "cascade-snapshotx:latest",
        "CASCADE-SNAPSHOT-UPPER:latest",
        "cascade-snapshot-x:latest\x00foreign-base:latest",
        " cascade-snapshot-shared:latest",
        "cascade-snapshot-shared:latest",  # managed tag on an image with a foreign tag: allowed
        "cascade-snapshot-repointed:latest",  # re-pointed at a foreign image below
        "cascade-snapshot-own:latest",  # an ordinary managed snapshot
    ]


def test_nothing_foreign_is_removed_whatever_is_registered_deleted_or_evicted(
    make_agent: Callable[..., Agent], docker_client: docker.APIClient
) -> None:
    foreign = {tag: make_image(docker_client, tag) for tag in FOREIGN_TAGS}
    docker_client.tag(foreign["foreign-shared:latest"], "cascade-snapshot-shared", "latest")
    own_id = make_image(docker_client, "cascade-snapshot-own:latest")
    old_repointed_id = make_image(docker_client, "cascade-snapshot-repointed:latest")
    digest = "sha256:" + "ab" * 32

    agent = make_agent(max_count=100, min_age="0s")
    answers = {}
    for number, image in enumerate(adversarial_images(foreign, digest)):
        for project, work_item in (("p", f"w{number}"), ("../..", f"../w{number}")):
            body = {"project": project, "work_item": work_item, "image": image}
            answers[(project, work_item, image)] = agent.call("POST", "/v1/snapshots", body)

    accepted = sorted({image for (_, _, image), (code, _) in answers.items() if code == 201})
    assert accepted == [
        "cascade-snapshot-own:latest",
        "cascade-snapshot-repointed:latest",
        "cascade-snapshot-shared:latest",
    ], {key[2]: answer for key, answer in answers.items()}
    for (_, _, image), (code, answer) in answers.items():
        if code != 201:
            assert code in (400, 403, 404), (image, code, answer)
            assert answer["error"]["code"] in {
                "invalid-field",
                "image-not-managed",
                "image-not-found",
            }, (image, answer)

    # A managed tag re-pointed at a foreign image after registration.
    docker_client.tag(foreign["foreign-base:latest"], "cascade-snapshot-repointed", "latest")

    for project, work_item, _ in answers:
        agent.call("DELETE", "/v1/snapshots", query={"project": project, "work_item": work_item})
    agent.ok("POST", "/v1/evict", {})
    agent.stop()  # settle: reload policy max_count=0 and evict everything that is left
    agent.policy["max_count"] = 0
    agent.write_config()
    agent.start()
    agent.ok("POST", "/v1/evict", {})

    removed_foreign = [
        tag for tag, image_id in foreign.items() if not image_exists(docker_client, image_id)
    ]
    assert removed_foreign == [], "foreign images removed"
    tags = image_tags(docker_client)
    assert {tag: tags.get(tag) for tag in FOREIGN_TAGS} == foreign  # every foreign tag intact
    assert not image_exists(docker_client, own_id)  # our own snapshot did go
    assert not image_exists(docker_client, old_repointed_id)  # and the image the tag left
    assert agent.snapshots() == []
