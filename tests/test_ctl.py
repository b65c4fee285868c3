"""snapagentctl against a real agent: the commands a newcomer types, and their exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .agent import REPO
from .engine import create_stopped_container, image_exists, make_image

pytestmark = pytest.mark.usefixtures("clean_engine")


def ctl(agent_or_socket, *args: str) -> subprocess.CompletedProcess[str]:
    socket_path = getattr(agent_or_socket, "socket_path", agent_or_socket)
    return subprocess.run(
        [sys.executable, "-m", "snapagentd.ctl", "--socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_register_lookup_list_evict_remove(make_agent, docker_client):
    agent = make_agent(max_count=1)
    old = make_image(docker_client, "cascade-snapshot-c1:latest")
    make_image(docker_client, "cascade-snapshot-c2:latest")

    done = ctl(agent, "register", "Proj", "w1", "cascade-snapshot-c1:latest", "--size", "2048")
    assert done.returncode == 0, done.stderr
    assert "cascade-snapshot-c1:latest" in done.stdout
    assert ctl(agent, "register", "Proj", "w2", "cascade-snapshot-c2:latest").returncode == 0

    done = ctl(agent, "--json", "lookup", "Proj", "w2")
    assert done.returncode == 0
    assert json.loads(done.stdout)["snapshot"]["work_item"] == "w2"

    done = ctl(agent, "list", "--project", "Proj")
    assert done.returncode == 0
    assert done.stdout.splitlines()[0].split()[:2] == ["PROJECT", "WORK"]
    assert len(done.stdout.splitlines()) == 3

    done = ctl(agent, "evict", "--dry-run")
    assert done.returncode == 0, done.stderr
    header, planned = done.stdout.splitlines()[:2]
    assert header.split() == ["REASON", "IMAGE", "AGE", "LAST", "USE", "UNIQUE", "RESULT"]
    assert planned.split()[:2] == ["count", "cascade-snapshot-c1:latest"]
    assert planned.split()[-1] == "planned"
    assert image_exists(docker_client, old)
    done = ctl(agent, "evict")
    assert done.returncode == 0 and "removed" in done.stdout
    assert not image_exists(docker_client, old)

    done = ctl(agent, "remove", "Proj", "w2")
    assert done.returncode == 0 and "removed" in done.stdout
    done = ctl(agent, "status")
    assert done.returncode == 0 and "reachable" in done.stdout


def test_lease_lookup_with_a_lease_and_release(make_agent, docker_client):
    """max_count 0: the count rule wants every snapshot; leases and a container keep them."""
    agent = make_agent(max_count=0)
    for name in ("leased", "looked-up", "used"):
        make_image(docker_client, f"cascade-snapshot-l-{name}:latest")
        done = ctl(agent, "register", "Proj", name, f"cascade-snapshot-l-{name}:latest")
        assert done.returncode == 0, done.stderr
    create_stopped_container(docker_client, "cascade-snapshot-l-used:latest")

    done = ctl(agent, "--json", "lease", "Proj", "leased", "600")
    assert done.returncode == 0, done.stderr
    lease_id = json.loads(done.stdout)["lease"]["id"]
    done = ctl(agent, "lookup", "Proj", "looked-up", "--lease", "60")
    assert done.returncode == 0, done.stderr
    pairs = dict(line.split(":", 1) for line in done.stdout.splitlines())
    assert pairs["lease"].strip() and "(in " in pairs["expires"]  # 1m, or 59s by now
    assert pairs["unique"].strip() == "-"  # no eviction run has measured it yet

    done = ctl(agent, "evict", "--dry-run")
    assert done.returncode == 0, done.stderr
    nothing, blank, title, header, *rows = done.stdout.splitlines()
    assert (nothing, blank, title) == ("nothing to evict", "", "skipped:")
    assert header.split()[-2:] == ["PROTECTED", "BY"]
    protected = {row.split()[1]: row.split()[-1] for row in rows}
    assert protected == {
        "cascade-snapshot-l-leased:latest": "leased",
        "cascade-snapshot-l-looked-up:latest": "leased",
        "cascade-snapshot-l-used:latest": "in-use",
    }
    assert all(row.split()[0] == "count" for row in rows)

    done = ctl(agent, "status")
    assert done.returncode == 0, done.stderr
    status = dict(line.split(":", 1) for line in done.stdout.splitlines())
    assert status["snapshots"].strip().endswith(", 0 pending removal, 2 leases")
    assert " virtual, " in status["snapshots"] and " unique, " in status["snapshots"]
    assert status["disk"].strip() == "watermarks off"

    done = ctl(agent, "release", lease_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["lease:", lease_id]
    assert done.stdout.splitlines()[-1] == "released:  yes"
    done = ctl(agent, "release", lease_id)
    assert done.returncode == 1 and "lease-not-found" in done.stderr
    done = ctl(agent, "evict")
    assert done.returncode == 0 and "cascade-snapshot-l-leased:latest" in done.stdout
    assert "removed" in done.stdout
    done = ctl(agent, "lease", "Proj", "leased", "60")  # its entry is gone now
    assert done.returncode == 1 and "snapshot-not-found" in done.stderr
    done = ctl(agent, "lease", "Proj", "used", "0")
    assert done.returncode == 2 and "from 1 to 86400" in done.stderr


def test_server_error_is_exit_1_with_its_message(agent):
    done = ctl(agent, "register", "p", "w", "foreign:latest")
    assert done.returncode == 1
    assert "image-not-managed" in done.stderr and "foreign:latest" in done.stderr
    done = ctl(agent, "lookup", "p", "nothing")
    assert done.returncode == 1 and "snapshot-not-found" in done.stderr


def test_unreachable_agent_is_exit_3(tmp_path):
    done = ctl(tmp_path / "none.sock", "status")
    assert done.returncode == 3
    assert "cannot reach snapagentd" in done.stderr
