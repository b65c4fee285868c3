"""Disk-pressure eviction, end to end: a real agent process against a real dockerd whose data root
is a small ext4 loop file system (tests/loopfs.py) that the tests fill with ballast.

Proven here: above the high watermark the agent evicts least recently used snapshots (reason
"disk") until the low watermark is met and no further, whether the disk timer or a registration
noticed it; `/v1/status` reports the file system as statvfs sees it and follows it across the
watermark; images in use, leased or younger than min_age survive (and the dry run says why);
watermarks "off" and a data root the agent cannot see mean no disk eviction, and the agent keeps
serving.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest

from snapagentd.disk import disk_usage

from .agent import Agent
from .engine import (
    DockerEngine,
    create_stopped_container,
    image_exists,
    make_image,
    wait_until,
)
from .loopfs import fill_to, mount_source

MiB = 1024**2
SNAPSHOT_BYTES = 20 * MiB  # random, so each snapshot holds this much of the disk on its own
HIGH, LOW = 100 * MiB, 130 * MiB  # free-space watermarks: start below 100 MiB, stop at 130
WATERMARKS = {"disk_high": "100MiB", "disk_low": "130MiB"}
ARCHITECTURE = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")


# --- helpers ---------------------------------------------------------------------------------


def free_bytes(root: Path) -> int:
    return disk_usage(root).free_bytes


def fill_to_free(root: Path, free: int) -> Path:
    """Ballast leaving at most `free` bytes (and not much less) available under `root`."""
    usage = disk_usage(root)
    assert usage.free_bytes > free, (usage, free)
    return fill_to(root, 1 - free / usage.total_bytes)


def tag(name: str) -> str:
    return f"cascade-snapshot-dp-{name}:latest"


def register_all(agent: Agent, names: list[str]) -> None:
    for name in names:
        agent.register("dp", name, tag(name))


def lookup(agent: Agent, name: str) -> None:
    agent.ok("POST", "/v1/snapshots/lookup", {"project": "dp", "work_item": name})


def name_of(image: str) -> str:
    """`tag(name)` -> name (registered and discovered entries alike are named by their tag)."""
    return image.removeprefix("cascade-snapshot-dp-").removesuffix(":latest")


def listed(agent: Agent) -> set[str]:
    return {name_of(entry["image"]) for entry in agent.snapshots()}


def retirements(agent: Agent) -> list[tuple[str, str]]:
    """(name, reason) of every entry the journal retired, in the order it did."""
    lines = agent.journal_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [(name_of(r["snapshot"]["image"]), r["reason"]) for r in records if r["op"] == "retire"]


def dry_run(agent: Agent) -> dict[str, Any]:
    return agent.ok("POST", "/v1/evict", {"dry_run": True})


def evict(agent: Agent) -> list[tuple[str, str, str]]:
    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    return [(e["work_item"], e["reason"], e["result"]) for e in evicted]


def load_image(client: docker.APIClient, reference: str, size: int, created: datetime) -> str:
    """`docker load` a one-layer image of `size` random bytes whose Created is `created`
    (a commit or an import is always created now); returns its id."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("payload")
        info.size, info.mode = size, 0o755
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    layer_bytes = layer.getvalue()
    when = created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    config = json.dumps(
        {
            "architecture": ARCHITECTURE,
            "os": "linux",
            "created": when,
            "config": {"Cmd": ["/payload"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()],
            },
            "history": [{"created": when, "created_by": "tests/test_disk_pressure.py"}],
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [reference], "Layers": ["layer/layer.tar"]}]
    ).encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in (
            ("manifest.json", manifest),
            (config_name, config),
            ("layer/layer.tar", layer_bytes),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for message in client.load_image(archive.getvalue()) or ():
        assert "error" not in message, message
    return client.inspect_image(reference)["Id"]


@pytest.fixture
def disk_agent(
    small_disk_engine: DockerEngine, make_agent: Callable[..., Agent]
) -> Callable[..., Agent]:
    """`disk_agent(**policy)`: a started agent on the small-disk engine."""

    def factory(**policy: Any) -> Agent:
        return make_agent(docker_url=small_disk_engine.url, **policy)

    return factory


# --- eviction under pressure -----------------------------------------------------------------


def test_disk_timer_evicts_lru_snapshots_until_the_low_watermark_and_stops(
    small_disk_engine: DockerEngine, disk_agent: Callable[..., Agent]
) -> None:
    root = small_disk_engine.data_root
    agent = disk_agent(disk_interval="1s", **WATERMARKS)
    names = ["a", "b", "c", "d", "e"]  # created (so, unused, ranked) in this order
    with small_disk_engine.client() as client:
        ids = {name: make_image(client, tag(name), size=SNAPSHOT_BYTES) for name in names}
        register_all(agent, names)
        lookup(agent, "a")
        lookup(agent, "b")  # least recently used first: c, d, e, a, b
        assert retirements(agent) == []

        # 95 MiB free: 35 MiB short of the low watermark, so two snapshots must go, not three.
        fill_to_free(root, 95 * MiB)
        wait_until(
            lambda: len(agent.snapshots()) < len(names),
            timeout=20,
            message="the disk timer's eviction",
        )
        # The timer's next reading is below the high watermark again, so nothing more goes.
        # (A check that measured just before the removals may start one more "disk" run; that
        # run measures again itself and finds nothing to do.)
        disk = wait_until(
            lambda: (d := agent.status()["disk"])["above_high"] is False and d,
            timeout=10,
            message="a disk reading below the high watermark",
        )
        assert disk["free_bytes"] >= disk["low_free_bytes"] == LOW, disk
        assert free_bytes(root) >= LOW
        last = agent.status()["last_eviction"]
        assert (last["trigger"], last["failed"], last["error"]) == ("disk", 0, None), last
        assert retirements(agent) == [("c", "disk"), ("d", "disk")]  # LRU order, and no more
        assert listed(agent) == {"a", "b", "e"}
        assert [n for n in names if image_exists(client, ids[n])] == ["a", "b", "e"]


def commit_unnoticed(client: docker.APIClient, name: str) -> str:
    """A snapshot's image under a tag the agent does not manage, so that no run discovers it
    before `publish` gives it its managed tag (as a router's commit does, in one step)."""
    return make_image(client, f"foreign-dp-{name}:latest", size=SNAPSHOT_BYTES)


def publish(client: docker.APIClient, image_id: str, name: str) -> None:
    client.tag(image_id, f"cascade-snapshot-dp-{name}", "latest")


def test_a_registration_starts_the_disk_check(
    small_disk_engine: DockerEngine, make_agent: Callable[..., Agent]
) -> None:
    """With disk_interval 1h, only a registration can start a disk run here. (The snapshots
    already there are discovered at start, so no earlier registration has a check pending.)"""
    root = small_disk_engine.data_root
    names = ["a", "b", "c"]  # least recently used first: a, b, c (creation), then x
    with small_disk_engine.client() as client:
        ids = {name: make_image(client, tag(name), size=SNAPSHOT_BYTES) for name in names}
        ids["x"] = commit_unnoticed(client, "x")
        agent = make_agent(docker_url=small_disk_engine.url, disk_interval="1h", **WATERMARKS)
        wait_until(
            lambda: (agent.status()["snapshots"]["unique_bytes"] or 0) >= 3 * SNAPSHOT_BYTES,
            timeout=10,
            message="the measurement that follows start-up",
        )
        assert listed(agent) == set(names)
        fill_to_free(root, 95 * MiB)  # x's commit, as far as the disk can tell

        # The agent sees it (a dry run measures and plans the disk rule, and removes nothing)...
        plan = dry_run(agent)
        assert plan["disk_bytes_to_free"] > SNAPSHOT_BYTES, plan
        planned = [(name_of(e["image"]), e["reason"]) for e in plan["evicted"]]
        assert planned == [("a", "disk"), ("b", "disk")], plan
        # ... but nothing acts on it until x is registered.
        assert agent.status()["last_eviction"]["trigger"] == "start"
        publish(client, ids["x"], "x")
        agent.register("dp", "x", tag("x"))
        wait_until(
            lambda: agent.status()["last_eviction"]["trigger"] == "disk",
            timeout=10,
            message="an eviction started by the registration",
        )
        assert retirements(agent) == [("a", "disk"), ("b", "disk")]
        assert listed(agent) == {"c", "x"}
        assert [n for n in [*names, "x"] if image_exists(client, ids[n])] == ["c", "x"]


def test_a_registration_right_after_a_quiet_reading_starts_the_disk_check(
    small_disk_engine: DockerEngine, disk_agent: Callable[..., Agent]
) -> None:
    """Registrations come in bursts, and the disk is read at most once a second: the
    registration that comes less than a second after a reading that found the disk fine must
    still lead to a reading, and to a run."""
    root = small_disk_engine.data_root
    agent = disk_agent(disk_interval="1h", **WATERMARKS)  # the timer never fires here
    names = ["a", "b", "c"]
    with small_disk_engine.client() as client:
        ids = {name: make_image(client, tag(name), size=SNAPSHOT_BYTES) for name in names}
        ids["x"] = commit_unnoticed(client, "x")
        register_all(agent, names)
        lookup(agent, "a")  # least recently used first: b, c, a, then x
        fill_to_free(root, 115 * MiB)
        assert dry_run(agent)["disk_bytes_to_free"] == 0  # a reading: the disk is fine
        fill_to_free(root, 95 * MiB)  # the next commit, as far as the disk can tell
        publish(client, ids["x"], "x")
        agent.register("dp", "x", tag("x"))  # the registration that tells the agent
        wait_until(
            lambda: agent.status()["last_eviction"]["trigger"] == "disk",
            timeout=6,
            message="an eviction started by the registration",
        )
        assert retirements(agent) == [("b", "disk"), ("c", "disk")]
        assert listed(agent) == {"a", "x"}
        assert [n for n in [*names, "x"] if image_exists(client, ids[n])] == ["a", "x"]


# --- what the agent reports ------------------------------------------------------------------


def test_status_reports_the_data_roots_file_system_across_the_watermark(
    small_disk_engine: DockerEngine, disk_agent: Callable[..., Agent]
) -> None:
    root = small_disk_engine.data_root
    agent = disk_agent(disk_interval="1s", disk_high="85%", disk_low="70%")

    def matches_statvfs(disk: dict[str, Any]) -> bool:
        usage = disk_usage(root)
        return disk["total_bytes"] == usage.total_bytes and (
            abs(disk["free_bytes"] - usage.free_bytes) <= MiB
        )

    disk = agent.status()["disk"]
    assert os.path.realpath(disk["path"]) == os.path.realpath(root), disk
    assert (mount_source(disk["path"]) or "").startswith("/dev/loop"), disk
    assert matches_statvfs(disk), (disk, disk_usage(root))
    total = disk["total_bytes"]
    assert disk["high_free_bytes"] == -(-total * 15 // 100)  # 85% used: 15% free, rounded up
    assert disk["low_free_bytes"] == -(-total * 30 // 100)
    assert disk["used_ratio"] == pytest.approx(1 - disk["free_bytes"] / total, abs=1e-4)
    assert (disk["above_high"], disk["error"]) == (False, None)

    ballast = fill_to(root, 0.9)
    disk = wait_until(
        lambda: (d := agent.status()["disk"])["above_high"] and d,
        timeout=10,
        message="the disk timer to see the disk above the high watermark",
    )
    assert matches_statvfs(disk), (disk, disk_usage(root))
    assert disk["free_bytes"] < disk["high_free_bytes"]
    assert disk["used_ratio"] >= 0.9

    ballast.unlink()
    disk = wait_until(
        lambda: (d := agent.status()["disk"])["above_high"] is False and d,
        timeout=10,
        message="the disk timer to see the disk below the high watermark again",
    )
    assert matches_statvfs(disk), (disk, disk_usage(root))
    assert agent.status()["docker"]["reachable"] is True


# --- what survives ---------------------------------------------------------------------------


def test_in_use_leased_and_young_snapshots_survive_disk_pressure(
    small_disk_engine: DockerEngine, disk_agent: Callable[..., Agent]
) -> None:
    root = small_disk_engine.data_root
    size = 8 * MiB
    # Everything needs to go (300 MiB short of the low watermark): only protection saves one.
    agent = disk_agent(disk_interval="1h", min_age="1h", disk_high="100MiB", disk_low="400MiB")
    old = datetime.now(UTC) - timedelta(hours=2)
    names = ["old1", "busy", "leased", "old2"]
    with small_disk_engine.client() as client:
        ids = {
            name: load_image(client, tag(name), size, old + timedelta(seconds=n))
            for n, name in enumerate(names)
        }
        ids["young"] = make_image(client, tag("young"), size=size)  # created now
        register_all(agent, [*names, "young"])
        container = create_stopped_container(client, ids["busy"])
        try:
            lease = agent.ok(
                "POST",
                "/v1/snapshots/lease",
                {"project": "dp", "work_item": "leased", "seconds": 600},
            )["lease"]
            assert lease["image_id"] == ids["leased"]
            fill_to_free(root, 60 * MiB)  # still above the high watermark once old1, old2 go

            evict(agent)
            # Retired for the disk in LRU order (by this run, or by a check a registration
            # started), and nothing else.
            assert retirements(agent) == [("old1", "disk"), ("old2", "disk")]
            assert listed(agent) == {"busy", "leased", "young"}
            survivors = [n for n in [*names, "young"] if image_exists(client, ids[n])]
            assert survivors == ["busy", "leased", "young"]

            # Still above the high watermark: the rule wants them all, and says why it can't.
            plan = dry_run(agent)
            assert plan["disk_bytes_to_free"] > 300 * MiB, plan
            assert plan["evicted"] == []
            skipped = {e["work_item"]: (e["reason"], e["protected_by"]) for e in plan["skipped"]}
            assert skipped == {
                "busy": ("disk", "in-use"),
                "leased": ("disk", "leased"),
                "young": ("disk", "min-age"),
            }
            for entry in plan["skipped"]:
                assert size <= entry["unique_bytes"] <= size + 64 * 1024, entry
            assert evict(agent) == []
            assert agent.status()["disk"]["above_high"] is True
            assert listed(agent) == {"busy", "leased", "young"}
        finally:
            client.remove_container(container)


# --- disk pressure eviction off --------------------------------------------------------------


def test_watermarks_off_never_evict_for_disk_and_report_no_disk(
    small_disk_engine: DockerEngine, disk_agent: Callable[..., Agent]
) -> None:
    root = small_disk_engine.data_root
    agent = disk_agent(disk_high="off", disk_low="off", disk_interval="1s")
    names = ["a", "b"]
    with small_disk_engine.client() as client:
        ids = {name: make_image(client, tag(name), size=4 * MiB) for name in names}
        register_all(agent, names)
        fill_to(root, 0.99)
        assert agent.status()["disk"] is None
        assert agent.status()["policy"]["disk_high"] == "off"
        plan = dry_run(agent)
        assert (plan["evicted"], plan["skipped"], plan["disk_bytes_to_free"]) == ([], [], 0)
        assert evict(agent) == []  # a full run: every rule applied, none for the disk
        status = agent.status()
        assert status["disk"] is None
        assert (status["last_eviction"]["trigger"], status["last_eviction"]["removed"]) == (
            "api",
            0,
        )
        assert listed(agent) == set(names)
        assert all(image_exists(client, image) for image in ids.values())


def test_a_data_root_the_agent_cannot_see_is_reported_and_evicts_nothing(
    small_disk_engine: DockerEngine, make_agent: Callable[..., Agent]
) -> None:
    root = small_disk_engine.data_root
    agent = make_agent(
        start=False,
        docker_url=small_disk_engine.url,
        disk_high="85%",
        disk_low="70%",
        disk_interval="1s",
    )
    agent.extra["docker"] = {"url": agent.docker_url, "data_root": "/nonexistent"}
    agent.write_config()
    agent.start()
    names = ["a", "b"]
    with small_disk_engine.client() as client:
        ids = {name: make_image(client, tag(name), size=4 * MiB) for name in names}
        register_all(agent, names)
        fill_to(root, 0.99)  # the real data root is full; the agent cannot know

        disk = agent.status()["disk"]
        assert disk["path"] == "/nonexistent", disk
        assert "cannot measure /nonexistent" in disk["error"], disk
        assert "data_root" in disk["error"], disk
        assert "free_bytes" not in disk
        plan = dry_run(agent)
        assert (plan["evicted"], plan["disk_bytes_to_free"]) == ([], 0)
        assert evict(agent) == []
        assert listed(agent) == set(names)
        assert all(image_exists(client, image) for image in ids.values())

        # ... and it keeps serving.
        make_image(client, tag("c"), size=1024)
        agent.register("dp", "c", tag("c"))
        lookup(agent, "c")
        status = agent.status()
        assert status["docker"]["reachable"] is True
        assert status["snapshots"]["count"] == 3
        assert "cannot measure /nonexistent" in status["disk"]["error"]
        assert agent.process is not None and agent.process.poll() is None
