"""The journal's file system fills up: clients get a clear 503, memory never runs ahead of
the disk, the agent stays up, and it recovers once space returns. The file system is a small
tmpfs the test mounts itself."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from .agent import Agent
from .engine import in_ci, make_image, make_short_tmpdir

FS_BYTES = 256 * 1024


@pytest.fixture
def small_filesystem() -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards."""
    mountpoint = make_short_tmpdir("sa-fs-")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES},mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)
        mountpoint.rmdir()


def fill(directory: Path) -> Path:
    """Take every free byte of the file system holding `directory`."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC ends the loop
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def registered(agent: Agent) -> list[str]:
    """Work items of project p (the start-up reconcile also discovers the unregistered
    images made for this test, under project "")."""
    return sorted(s["work_item"] for s in agent.snapshots() if s["project"] == "p")


def test_full_disk_gives_503_keeps_memory_behind_the_disk_and_recovers(
    make_agent: Callable[..., Agent], docker_client: docker.APIClient, small_filesystem: Path
) -> None:
    references = [f"cascade-snapshot-full-{n}:latest" for n in range(3)]
    for reference in references:
        make_image(docker_client, reference)
    agent = make_agent(start=False)
    agent.journal_path = small_filesystem / "journal" / "journal.jsonl"
    agent.write_config()
    agent.start()
    agent.register("p", "before", references[0])

    filler = fill(small_filesystem)
    # The journal's last page may still have room for a few records: write until refused.
    acknowledged = ["before"]
    for number in range(200):
        body = {"project": "p", "work_item": f"during-{number}", "image": references[1]}
        code, answer = agent.call("POST", "/v1/snapshots", body)
        if code != 201:
            break
        acknowledged.append(body["work_item"])
    assert (code, answer["error"]["code"]) == (503, "journal-unavailable"), answer
    assert "No space left on device" in answer["error"]["message"], answer
    refused = body["work_item"]
    # Not applied in memory either: the agent holds nothing the disk does not.
    assert registered(agent) == sorted(acknowledged)
    code, answer = agent.call(
        "POST", "/v1/snapshots/lookup", {"project": "p", "work_item": refused}
    )
    assert code == 404
    assert agent.status()["docker"]["reachable"]  # still serving

    filler.unlink()
    agent.register("p", "after", references[2])
    expected = sorted([*acknowledged, "after"])
    assert registered(agent) == expected
    agent.stop()
    agent.start()  # the journal on disk holds exactly what was acknowledged
    assert registered(agent) == expected
