"""The API socket: its mode and group, a socket handed over by systemd, and clean stops."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import subprocess
import threading

import pytest

from .agent import call
from .engine import make_image, wait_until
from .faults import FaultyDockerProxy

pytestmark = pytest.mark.usefixtures("clean_engine")

TEST_GROUP = "snapagentd-test"


@pytest.fixture
def test_group() -> str:
    if os.geteuid() != 0:
        pytest.skip("creating a group needs root (scripts/test.sh runs as root)")
    subprocess.run(["groupadd", "-f", "--system", TEST_GROUP], check=True)
    return TEST_GROUP


def test_socket_gets_the_configured_mode_and_group(make_agent, test_group):
    agent = make_agent(start=False)
    agent.extra["api"] = {
        "socket": str(agent.socket_path),
        "socket_mode": "0660",
        "socket_group": test_group,
    }
    agent.write_config()
    agent.start()
    info = agent.socket_path.stat()
    assert info.st_mode & 0o777 == 0o660
    assert info.st_gid == grp.getgrnam(test_group).gr_gid


def test_unknown_socket_group_stops_the_start_naming_it(make_agent):
    agent = make_agent(start=False)
    agent.extra["api"] = {"socket": str(agent.socket_path), "socket_group": "no-such-group-x"}
    agent.write_config()
    assert agent.spawn().wait(timeout=30) == 1
    agent.process = None
    assert "api.socket_group" in agent.log() and "no-such-group-x" in agent.log()


def test_socket_from_systemd_is_used_and_early_clients_wait(make_agent, short_tmp_path):
    # What systemd's .socket unit does: bind and listen before the daemon exists.
    path = short_tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    answers: list[tuple[int, object]] = []
    early = threading.Thread(target=lambda: answers.append(call(path, "GET", "/v1/status")))
    early.start()  # connects now, is answered once the daemon serves

    agent = make_agent(start=False)
    agent.start(listen_fd=listener.fileno())
    early.join(timeout=30)
    assert answers and answers[0][0] == 200
    assert not agent.socket_path.exists()  # the configured path is not bound meanwhile
    assert agent.stop() == 0
    assert path.exists()  # systemd's socket, not ours to delete
    listener.close()


def test_sigterm_lets_in_flight_requests_finish(make_agent, docker_engine, short_tmp_path):
    proxy = FaultyDockerProxy(short_tmp_path / "slow.sock", docker_engine.socket_path)
    try:
        make_image(docker_engine.client(), "cascade-snapshot-slow:latest")
        agent = make_agent(docker_url=proxy.url)
        proxy.slow_image = "cascade-snapshot-slow:latest"
        proxy.slow_inspect = 2.0
        answers: list[tuple[int, object]] = []
        body = {"project": "p", "work_item": "w", "image": "cascade-snapshot-slow:latest"}
        request = threading.Thread(
            target=lambda: answers.append(call(agent.socket_path, "POST", "/v1/snapshots", body))
        )
        request.start()
        wait_until(lambda: proxy.held_inspections > 0, message="registration reached Docker")
        agent.process.send_signal(signal.SIGTERM)
        agent.notify.wait_for("STOPPING=1")
        request.join(timeout=30)
        assert answers and answers[0][0] == 201
        assert agent.stop() == 0
        last = json.loads(agent.journal_path.read_text().splitlines()[-1])
        assert (last["op"], last["snapshot"]["source"]) == ("put", "registered")
    finally:
        proxy.close()
