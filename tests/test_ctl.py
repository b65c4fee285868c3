"""snapagentctl against a real agent: the commands a newcomer types, and their exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .agent import REPO
from .engine import image_exists, make_image

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
    assert done.returncode == 0 and "planned" in done.stdout and "w1" in done.stdout
    assert image_exists(docker_client, old)
    done = ctl(agent, "evict")
    assert done.returncode == 0 and "removed" in done.stdout
    assert not image_exists(docker_client, old)

    done = ctl(agent, "remove", "Proj", "w2")
    assert done.returncode == 0 and "removed" in done.stdout
    done = ctl(agent, "status")
    assert done.returncode == 0 and "reachable" in done.stdout


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
