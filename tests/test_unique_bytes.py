"""Unique bytes against a real dockerd and a real agent: snapshots committed on a shared base.

Proven here: each snapshot's `unique_bytes` is the layer its commit wrote, while `size_bytes`
(Docker's Size) also counts the base; `status.snapshots.unique_bytes` counts every image once and
the base only when no unmanaged image keeps it; the size cap counts unique bytes by default and
Docker's Size with `size_accounting = "virtual"`; and, on a small loop file system, the bytes
`unique` accounting predicts are the bytes removing the snapshots frees, which `virtual`
accounting overstates (the `FIGURES:` line, shown with `pytest -s`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import docker

from snapagentd.disk import disk_usage

from .agent import Agent
from .engine import DockerEngine, image_exists
from .images import commit, make_busybox_image, write

KiB, MiB = 1024, 1024**2
SLACK = 4 * KiB  # what a commit may add besides the file it wrote (nothing, on overlay2)
FILES = {"two": 2 * MiB, "three": 3 * MiB, "five": 5 * MiB}  # each snapshot's own file


def tag(name: str) -> str:
    return f"cascade-snapshot-ub-{name}:latest"


def commit_snapshots(client: docker.APIClient, base: str, files: dict[str, int]) -> dict[str, str]:
    """One snapshot per file, each committed on `base` with a random file of that size."""
    return {
        name: commit(client, base, write("/f", size), tag(name)) for name, size in files.items()
    }


def by_work_item(agent: Agent) -> dict[str, dict[str, Any]]:
    return {entry["work_item"]: entry for entry in agent.snapshots()}


def evict(agent: Agent) -> list[tuple[str, str, str]]:
    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    return [(e["work_item"], e["reason"], e["result"]) for e in evicted]


def reload_policy(agent: Agent, **policy: Any) -> None:
    """Change [policy] keys and SIGHUP the agent; returns once it has re-read them."""
    agent.policy.update(policy)
    agent.write_config()
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    agent.notify.wait_for("RELOADING=1")
    agent.notify.wait_for("READY=1")


def near(value: int, expected: int, slack: int = SLACK) -> bool:
    return expected <= value <= expected + slack


def test_unique_bytes_are_each_snapshots_own_layer_and_count_an_image_once(
    docker_client: docker.APIClient, make_agent: Callable[..., Agent]
) -> None:
    c = docker_client
    agent = make_agent()
    base = make_busybox_image(c, "foreign-ub-base:latest")  # unmanaged: the agent never owns it
    base_size = c.inspect_image(base)["Size"]
    ids = commit_snapshots(c, base, FILES)
    for name in FILES:
        agent.register("ub", name, tag(name))
    # The "two" image twice more: under a second key with the same tag, and under a second tag.
    agent.register("ub", "two-same-tag", tag("two"))
    c.tag(ids["two"], "cascade-snapshot-ub-two-again", "latest")
    agent.register("ub", "two-again", tag("two-again"))
    assert evict(agent) == []  # a run: it measures every image's layers

    entries = by_work_item(agent)
    assert set(entries) == {*FILES, "two-same-tag", "two-again"}
    own = {**FILES, "two-same-tag": FILES["two"], "two-again": FILES["two"]}
    for work_item, entry in entries.items():
        image = entry["image_id"]
        assert near(entry["unique_bytes"], own[work_item]), entry
        assert entry["size_bytes"] == c.inspect_image(image)["Size"], entry
        assert entry["size_bytes"] >= own[work_item] + base_size, entry  # Size counts the base
    # What `docker system df -v` says (cheap on this small engine): Size - SharedSize.
    df = {row["Id"]: row["Size"] - row["SharedSize"] for row in c.df()["Images"]}
    for entry in entries.values():
        assert entry["unique_bytes"] == df[entry["image_id"]], entry

    # Three images, whichever their tags and keys: "two" counts once, and the base not at all,
    # since foreign-ub-base (which the agent never removes) keeps it on disk.
    files_total = sum(FILES.values())
    snapshots = agent.status()["snapshots"]
    assert snapshots["count"] == 5
    assert near(snapshots["unique_bytes"], files_total, 3 * SLACK), snapshots
    assert snapshots["total_size_bytes"] == sum(c.inspect_image(i)["Size"] for i in ids.values())
    assert snapshots["total_size_bytes"] >= files_total + 3 * base_size

    # Untagged, the base is a hidden parent of the snapshots: it goes with the last of them,
    # so it counts for all of them together (and still for none alone).
    c.remove_image("foreign-ub-base:latest")
    assert image_exists(c, base)
    assert evict(agent) == []
    snapshots = agent.status()["snapshots"]
    assert near(snapshots["unique_bytes"], files_total + base_size, 3 * SLACK), snapshots
    for work_item, entry in by_work_item(agent).items():
        assert near(entry["unique_bytes"], own[work_item]), entry


def test_size_cap_counts_unique_bytes_unless_accounting_is_virtual(
    docker_client: docker.APIClient, make_agent: Callable[..., Agent]
) -> None:
    c = docker_client
    agent = make_agent()
    assert agent.status()["policy"]["size_accounting"] == "unique"  # the default
    base = make_busybox_image(c, "foreign-ub-base:latest")
    base_size = c.inspect_image(base)["Size"]
    ids = commit_snapshots(c, base, FILES)
    for name in FILES:
        agent.register("ub", name, tag(name))
    for name in ("three", "five"):  # least recently used first: two, three, five
        agent.ok("POST", "/v1/snapshots/lookup", {"project": "ub", "work_item": name})

    unique_total = sum(FILES.values())  # the base stays (foreign-ub-base holds it)
    virtual_total = sum(c.inspect_image(i)["Size"] for i in ids.values())
    assert virtual_total >= unique_total + 3 * base_size
    # Between the two totals: over it for Docker's Size, within it for unique bytes. Without
    # "two" (the least recently used), Size is within it too.
    cap = (unique_total + virtual_total) // 2
    assert virtual_total - c.inspect_image(ids["two"])["Size"] <= cap
    reload_policy(agent, max_size=cap)

    assert evict(agent) == []
    assert near(agent.status()["snapshots"]["unique_bytes"], unique_total, 3 * SLACK)
    assert all(image_exists(c, image) for image in ids.values())

    reload_policy(agent, size_accounting="virtual")
    policy = agent.status()["policy"]
    assert (policy["size_accounting"], policy["max_size_bytes"]) == ("virtual", cap)
    assert evict(agent) == [("two", "size", "removed")]
    assert not image_exists(c, ids["two"])
    assert image_exists(c, ids["three"]) and image_exists(c, ids["five"])
    assert set(by_work_item(agent)) == {"three", "five"}
    assert agent.status()["snapshots"]["total_size_bytes"] <= cap
    assert evict(agent) == []


def free_after_sync(engine: DockerEngine) -> int:
    os.sync()  # delayed allocation and the journal settle; the count is then what df shows
    return disk_usage(engine.data_root).free_bytes


def test_unique_bytes_are_what_evicting_frees_on_disk_and_virtual_bytes_are_not(
    small_disk_engine: DockerEngine, make_agent: Callable[..., Agent]
) -> None:
    """The figures the issue asks for: one set of snapshots committed on a shared base (which
    stays, as a router's base image does), evicted all at once (max_count 0)."""
    files = {"four": 4 * MiB, "six": 6 * MiB, "ten": 10 * MiB}
    agent = make_agent(docker_url=small_disk_engine.url, max_count=0)  # evicts on POST only
    with small_disk_engine.client() as c:
        busybox = make_busybox_image(c, "foreign-ub-busybox:latest")
        base = commit(c, busybox, write("/toolchain", 24 * MiB), "foreign-ub-base:latest")
        ids = commit_snapshots(c, base, files)
        for name in files:
            agent.register("ub", name, tag(name))
        plan = agent.ok("POST", "/v1/evict", {"dry_run": True})  # measures, removes nothing
        assert sorted(e["work_item"] for e in plan["evicted"]) == sorted(files)

        snapshots = agent.status()["snapshots"]
        virtual = snapshots["total_size_bytes"]
        assert virtual == sum(e["size_bytes"] for e in agent.snapshots())
        unique = snapshots["unique_bytes"]
        before = free_after_sync(small_disk_engine)
        assert sorted(evict(agent)) == sorted((name, "count", "removed") for name in files)
        assert not any(image_exists(c, image) for image in ids.values())
        assert image_exists(c, "foreign-ub-base:latest")
        freed = free_after_sync(small_disk_engine) - before

        print(
            f"\nFIGURES: virtual={virtual} unique={unique} freed={freed} bytes "
            f"(virtual {virtual / MiB:.2f} MiB, unique {unique / MiB:.2f} MiB, "
            f"freed on disk {freed / MiB:.2f} MiB; files committed {sum(files.values()) / MiB:.0f}"
            f" MiB on a shared base of {c.inspect_image(base)['Size'] / MiB:.2f} MiB)"
        )
        assert near(unique, sum(files.values()), 3 * SLACK)
        assert abs(unique - freed) <= MiB, (unique, freed)
        assert virtual > freed + 2 * 24 * MiB  # the base, counted in each of the three
        assert agent.status()["snapshots"]["unique_bytes"] == 0
