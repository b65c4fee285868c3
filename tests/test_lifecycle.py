"""Start, restart, crash and stop of a real agent process: journal, reconcile and sd_notify."""

from __future__ import annotations

import os
import signal

import pytest

from .agent import call
from .engine import image_exists, make_image, wait_until
from .sockets import connect_unix

pytestmark = pytest.mark.usefixtures("clean_engine")


def test_ready_only_when_serving_with_status(make_agent, docker_client):
    make_image(docker_client, "cascade-snapshot-on-disk:latest", size=500)
    agent = make_agent(start=False)
    status_line = agent.start()
    # READY=1 came after the socket was listening and the reconcile was done.
    assert agent.status()["snapshots"]["count"] == 1
    assert status_line.startswith("STATUS=1 snapshots")
    assert "docker ok" in status_line


def test_restart_keeps_entries(agent, docker_client):
    make_image(docker_client, "cascade-snapshot-keep:latest")
    entry = agent.register("p", "w", "cascade-snapshot-keep:latest")
    assert agent.stop() == 0
    agent.start()
    assert agent.snapshots() == [entry]


def test_kill_9_right_after_acknowledged_registration_loses_nothing(agent, docker_client):
    registered = []
    for index in range(5):
        make_image(docker_client, f"cascade-snapshot-k{index}:latest")
        registered.append(agent.register("p", f"w{index}", f"cascade-snapshot-k{index}:latest"))
    agent.stop(signal.SIGKILL)
    agent.start()
    assert sorted(agent.snapshots(), key=lambda e: e["work_item"]) == registered


def test_torn_journal_tail_is_cut_and_the_rest_kept(agent, docker_client):
    make_image(docker_client, "cascade-snapshot-torn:latest")
    entry = agent.register("p", "w", "cascade-snapshot-torn:latest")
    agent.stop()
    with agent.journal_path.open("ab") as journal:
        journal.write(b'{"op":"put","snapshot":{"project":"p","work_it')  # a crash mid-write
    agent.start()
    assert agent.snapshots() == [entry]
    assert "cutting off a torn last line" in agent.log()
    assert agent.journal_path.read_bytes().endswith(b"}\n")


def test_corrupt_journal_line_in_the_middle_stops_the_start(make_agent):
    agent = make_agent(start=False)
    agent.journal_path.parent.mkdir(parents=True)
    agent.journal_path.write_bytes(
        b"garbage\n" + b'{"op":"gone","image":"x","image_id":"y","v":1}\n'
    )
    process = agent.spawn()
    assert process.wait(timeout=30) == 1
    agent.process = None
    assert f"{agent.journal_path}:1" in agent.log()
    assert agent.journal_path.read_bytes().startswith(b"garbage\n")  # left for the operator


def test_start_reconciles_with_docker(make_agent, docker_client):
    agent = make_agent(start=False)
    agent.start()
    make_image(docker_client, "cascade-snapshot-reg:latest")
    agent.register("p", "registered", "cascade-snapshot-reg:latest")
    agent.stop()
    # While the agent is down, its image disappears and an unknown managed one appears.
    docker_client.remove_image("cascade-snapshot-reg:latest")
    found_id = make_image(docker_client, "cascade-snapshot-found:latest", size=777)
    make_image(docker_client, "foreign-other:latest")
    agent.start()
    entries = agent.snapshots()
    assert [(e["project"], e["work_item"], e["source"]) for e in entries] == [
        ("", "cascade-snapshot-found:latest", "discovered")
    ]
    assert entries[0]["image_id"] == found_id
    assert entries[0]["size_bytes"] == docker_client.inspect_image(found_id)["Size"]


def test_docker_down_at_start_then_up(make_agent, docker_engine, docker_client, tmp_path_factory):
    # The agent's Docker URL names a path that does not exist yet; a symlink makes it appear.
    link_dir = tmp_path_factory.mktemp("dl")
    link = link_dir / "docker.sock"
    make_image(docker_client, "cascade-snapshot-late:latest")
    agent = make_agent(start=False, docker_url=f"unix://{link}")
    status_line = agent.start()
    assert "docker unreachable" in status_line
    status = agent.status()
    assert status["docker"]["reachable"] is False and status["docker"]["error"]
    code, answer = agent.call(
        "POST",
        "/v1/snapshots",
        {"project": "p", "work_item": "w", "image": "cascade-snapshot-late:latest"},
    )
    assert (code, answer["error"]["code"]) == (503, "docker-unavailable")
    code, answer = agent.call("POST", "/v1/evict", {})
    assert (code, answer["error"]["code"]) == (503, "docker-unavailable")

    os.symlink(docker_engine.socket_path, link)
    # The run reconciles (count 1) before it records its report, so wait for both.
    wait_until(
        lambda: (
            (status := agent.status())["snapshots"]["count"] == 1
            and (status["last_eviction"] or {}).get("trigger") == "docker-returned"
        ),
        timeout=20,
        message="agent reconciled and evicted once Docker answered",
    )
    status = agent.status()
    assert status["docker"]["reachable"] is True
    assert status["last_eviction"]["error"] is None
    agent.notify.wait_for(lambda line: line.startswith("STATUS=") and "docker ok" in line)


def test_sigterm_notifies_stopping_and_exits_0(agent):
    assert agent.stop(signal.SIGTERM) == 0
    agent.notify.wait_for("STOPPING=1")
    assert not agent.socket_path.exists() or not _accepts(agent.socket_path)


def test_sighup_reloads_the_policy(agent):
    assert agent.status()["policy"]["max_count"] == 100
    agent.policy["max_count"] = 7
    agent.write_config()
    agent.process.send_signal(signal.SIGHUP)
    agent.notify.wait_for("RELOADING=1")
    agent.notify.wait_for("READY=1")
    assert agent.status()["policy"]["max_count"] == 7


def test_sighup_with_a_bad_config_keeps_the_old_policy(agent):
    agent.policy["max_count"] = "lots"
    agent.write_config()
    agent.process.send_signal(signal.SIGHUP)
    agent.notify.wait_for("RELOADING=1")
    agent.notify.wait_for("READY=1")
    assert agent.status()["policy"]["max_count"] == 100
    assert "policy.max_count" in agent.log()


def test_watchdog_pings_when_asked(make_agent):
    agent = make_agent(start=False)
    agent.start(env={"WATCHDOG_USEC": "200000"})
    for _ in range(3):
        agent.notify.wait_for("WATCHDOG=1", timeout=5)


def test_no_watchdog_pings_for_another_pid(make_agent):
    agent = make_agent(start=False)
    agent.start(env={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    agent.status()
    agent.stop()
    agent.notify.wait_for("STOPPING=1")
    assert "WATCHDOG=1" not in agent.notify.messages


def test_runs_without_notify_socket(make_agent, docker_client):
    agent = make_agent(start=False, notify=None)
    agent.spawn()
    wait_until(lambda: _accepts(agent.socket_path), timeout=30, message="socket accepts")
    assert agent.status()["docker"]["reachable"] is True
    assert agent.stop() == 0


def test_refuses_to_steal_a_live_socket(agent, make_agent):
    second = make_agent(start=False, directory=agent.directory)
    process = second.spawn()
    assert process.wait(timeout=30) == 1
    second.process = None
    assert "already serving" in second.log()
    assert call(agent.socket_path, "GET", "/v1/status")[0] == 200


def test_journal_and_socket_permissions(agent):
    assert agent.journal_path.stat().st_mode & 0o777 == 0o600
    assert agent.journal_path.parent.stat().st_mode & 0o777 == 0o700
    assert agent.socket_path.stat().st_mode & 0o777 == 0o600


def test_removal_not_confirmed_stays_pending_across_restart(make_agent, fresh_docker_engine):
    # Docker stops between the decision and the removal: nothing may be forgotten.
    engine = fresh_docker_engine
    image_id = make_image(engine.client(), "cascade-snapshot-pend:latest")
    agent = make_agent(docker_url=engine.url)
    agent.register("p", "w", "cascade-snapshot-pend:latest")
    engine.halt()
    code, body = agent.call("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "w"})
    assert (code, body["result"]) == (200, "failed")
    assert agent.status()["snapshots"]["pending_removal"] == 1
    assert agent.stop(signal.SIGKILL) != 0
    engine.start_again()
    agent.start()  # replays the pending removal; the start-up run retries it
    assert not image_exists(engine.client(), image_id)
    assert agent.status()["snapshots"]["pending_removal"] == 0
    assert agent.snapshots() == []


def _accepts(path) -> bool:
    try:
        probe = connect_unix(path, timeout=10)
    except TimeoutError:
        raise  # something listens but its backlog stays full: not a "no"
    except OSError:
        return False
    probe.close()
    return True
