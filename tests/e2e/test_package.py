"""The Debian package, installed with apt and driven through a real systemd as PID 1.

One container per module: boot systemd, install the .deb, then walk the operator's path in
order (the last test purges the package). The agent inside manages the test dockerd's
images through the bind-mounted socket, so every removal is checked on that engine.

The .deb is $SNAPAGENTD_DEB when set (scripts/test.sh builds it once, with lintian), else
this module builds it with scripts/build-deb.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from ..engine import DockerEngine, image_exists, make_image, wait_until
from .systemd_host import SystemdHost, import_root

REPO_ROOT = Path(__file__).resolve().parents[2]
SOCKET = "/run/snapagentd/snapagentd.sock"
CONFIG = "/etc/snapagentd/snapagentd.toml"
SERVICE = "snapagentd.service"
WATCHDOG_TIMEOUT = 120  # WatchdogSec=30s, the abort, and the restart, with room to spare

# The suite's 300 s per test (pyproject.toml) is too short for the first test here, whose set-up
# may build the .deb, debootstrap the root (up to 600 s), boot systemd and apt-get install.
pytestmark = pytest.mark.timeout(1800)


class Stopwatch:
    """Prints how long each step took (shown by pytest -rA), for the closing note."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        print(f"e2e step: {step}: {now - self.start:.1f} s", flush=True)
        self.start = now


def build_deb() -> Path:
    given = os.environ.get("SNAPAGENTD_DEB")
    if given:
        return Path(given)
    result = subprocess.run(
        [str(REPO_ROOT / "scripts/build-deb.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"scripts/build-deb.sh failed:\n{result.stderr[-4000:]}"
    return max((REPO_ROOT / "dist").glob("snapagentd_*_all.deb"), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def host(docker_engine: DockerEngine) -> Iterator[SystemdHost]:
    """systemd booted in a container, with the package installed by apt and two users:
    ``router`` (in group snapagent) and ``stranger`` (not)."""
    watch = Stopwatch()
    deb = build_deb()
    watch.lap(f"package {deb.name}")
    image = import_root(docker_engine)
    watch.lap("debootstrapped root (cached after the first run) imported")
    machine = SystemdHost.boot(docker_engine, image)
    try:
        watch.lap("systemd booted to 'running'")
        # A Docker host's docker group owns the engine's socket; give the one bind-mounted
        # in the same gid, as installing docker.io would.
        gid = machine.check("stat -c %g /run/docker.sock").strip()
        assert gid != "0", "the test dockerd's socket must belong to a docker group, not root"
        machine.check(f"groupadd --system --gid {gid} docker")
        path = machine.copy_in(deb, "/var/tmp")
        machine.check(
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive "
            f"apt-get install -y -q --no-install-recommends {path}"
        )
        watch.lap("apt-get install of the .deb and its Debian dependencies")
        machine.check("useradd --create-home --groups snapagent router")
        machine.check("useradd --create-home stranger")
        yield machine
    finally:
        machine.remove()


@pytest.fixture
def engine_client(docker_engine: DockerEngine) -> Iterator[docker.APIClient]:
    client = docker_engine.client()
    try:
        yield client
    finally:
        client.close()


def ctl(host: SystemdHost, arguments: str, user: str = "router") -> Any:
    """Run ``snapagentctl --json`` inside as ``user``; return its parsed answer."""
    output = host.check(f"snapagentctl --json --socket {SOCKET} {arguments}", user=user)
    return json.loads(output)


def main_pid(host: SystemdHost) -> int:
    return int(host.unit(SERVICE, "MainPID")["MainPID"])


def restarts(host: SystemdHost) -> int:
    return int(host.unit(SERVICE, "NRestarts")["NRestarts"])


def test_service_reached_ready_and_only_the_group_may_connect(host: SystemdHost) -> None:
    unit = host.unit(SERVICE, "Type", "ActiveState", "SubState", "StatusText", "Result")
    # A Type=notify unit turns active only after READY=1; STATUS= came with it.
    assert unit["Type"] == "notify"
    assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), unit
    assert "docker ok" in unit["StatusText"], unit
    socket_unit = host.unit("snapagentd.socket", "ActiveState")
    assert socket_unit["ActiveState"] == "active"
    assert host.check(f"stat -c '%a %G' {SOCKET}").split() == ["660", "snapagent"]

    status = ctl(host, "status", user="router")
    assert status["docker"]["reachable"] is True
    assert status["policy"]["max_count"] == 5  # the shipped default configuration

    refused = host.run(f"snapagentctl --socket {SOCKET} status", user="stranger")
    assert refused.exit_code == 3, refused  # 3: the agent cannot be reached
    assert "Permission denied" in refused.output


def test_register_lookup_and_evict_reach_the_hosts_docker(
    host: SystemdHost, engine_client: docker.APIClient
) -> None:
    reference = "cascade-snapshot-e2e-item-1:latest"
    image_id = make_image(engine_client, reference)

    registered = ctl(host, f"register e2e item-1 {reference}")
    assert registered["snapshot"]["image_id"] == image_id
    found = ctl(host, "lookup e2e item-1")
    assert found["snapshot"]["image"] == reference

    ctl(host, "remove e2e item-1")
    assert not image_exists(engine_client, image_id)
    missing = host.run(f"snapagentctl --socket {SOCKET} lookup e2e item-1", user="router")
    assert missing.exit_code == 1, missing  # 1: the agent answered with an error (404)


def test_reload_applies_a_new_max_count_without_a_restart(
    host: SystemdHost, engine_client: docker.APIClient
) -> None:
    pid, restarted = main_pid(host), restarts(host)
    ids = []
    for number in range(3):
        reference = f"cascade-snapshot-e2e-reload-{number}:latest"
        ids.append(make_image(engine_client, reference))
        ctl(host, f"register e2e reload-{number} {reference}")
    try:
        host.check(f"sed -i 's/^max_count = .*/max_count = 1/' {CONFIG}")
        host.check(f"systemctl reload {SERVICE}")
        wait_until(
            lambda: ctl(host, "status")["policy"]["max_count"] == 1,
            timeout=30,
            message="the reloaded max_count to show in /v1/status",
        )
        report = ctl(host, "evict")
        evicted = sorted((i["work_item"], i["reason"], i["result"]) for i in report["evicted"])
        assert evicted == [
            ("reload-0", "count", "removed"),
            ("reload-1", "count", "removed"),
        ], report
        assert [image_exists(engine_client, image_id) for image_id in ids] == [
            False,
            False,
            True,
        ]  # least recently used first
        assert (main_pid(host), restarts(host)) == (pid, restarted)
    finally:
        host.check(f"sed -i 's/^max_count = .*/max_count = 5/' {CONFIG}")
        host.check(f"systemctl reload {SERVICE}")
        wait_until(lambda: ctl(host, "status")["policy"]["max_count"] == 5, timeout=30)


def test_a_stopped_main_process_is_restarted_by_the_watchdog_and_keeps_its_state(
    host: SystemdHost, engine_client: docker.APIClient
) -> None:
    reference = "cascade-snapshot-e2e-watchdog:latest"
    image_id = make_image(engine_client, reference)
    ctl(host, f"register e2e watchdog {reference}")
    pid, restarted = main_pid(host), restarts(host)

    host.check(f"systemctl kill --signal=SIGSTOP --kill-who=main {SERVICE}")
    # A router that connects now waits in the socket's backlog (systemd holds the socket)
    # and is answered by the restarted daemon.
    host.spawn(
        f"snapagentctl --json --timeout {WATCHDOG_TIMEOUT} --socket {SOCKET} "
        "lookup e2e watchdog >/tmp/waiting.json 2>&1; echo $? >/tmp/waiting.status",
        user="router",
    )
    wait_until(
        lambda: (
            restarts(host) > restarted
            and host.unit(SERVICE, "ActiveState")["ActiveState"] == "active"
        ),
        timeout=WATCHDOG_TIMEOUT,
        interval=0.5,
        message="systemd to restart the stopped daemon on its watchdog",
    )
    assert main_pid(host) != pid
    verdict = host.check(
        f"journalctl --no-pager -o cat UNIT={SERVICE} UNIT_RESULT=watchdog"
    )  # Result= is back to success after the restart; the journal keeps the verdict
    assert "watchdog" in verdict.lower(), verdict
    assert ctl(host, "lookup e2e watchdog")["snapshot"]["image_id"] == image_id
    wait_until(lambda: host.run("test -s /tmp/waiting.status").ok, timeout=30)
    assert host.check("cat /tmp/waiting.status").strip() == "0", host.check("cat /tmp/waiting.json")
    waited = json.loads(host.check("cat /tmp/waiting.json"))
    assert waited["snapshot"]["image_id"] == image_id


def test_a_request_to_the_stopped_service_starts_it(host: SystemdHost) -> None:
    host.check(f"systemctl stop {SERVICE}")
    assert host.unit(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    assert host.unit("snapagentd.socket", "ActiveState")["ActiveState"] == "active"

    found = ctl(host, "lookup e2e watchdog")  # connects to systemd's socket, waits for start
    assert found["snapshot"]["project"] == "e2e"
    assert host.unit(SERVICE, "ActiveState")["ActiveState"] == "active"


def test_stop_exits_cleanly_and_purge_leaves_nothing(host: SystemdHost) -> None:
    host.check(f"systemctl stop {SERVICE} snapagentd.socket")
    unit = host.unit(SERVICE, "ActiveState", "Result", "ExecMainStatus")
    assert unit == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}

    host.check(f"systemctl start snapagentd.socket {SERVICE}")  # as after a reboot
    host.check("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q snapagentd")
    for name in (SERVICE, "snapagentd.socket"):
        assert host.run(f"systemctl is-active {name}").output.strip() == "inactive", name
    assert host.run("test -s /var/lib/snapagentd/journal.jsonl").ok  # remove keeps state

    host.check("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q snapagentd")
    units = host.check("systemctl list-units --all --no-legend --plain 'snapagentd*'")
    assert not [line for line in units.splitlines() if " active " in f" {line} "], units
    assert not host.run("getent passwd snapagentd").ok
    assert not host.run("getent group snapagent").ok
    for path in ("/var/lib/snapagentd", "/etc/snapagentd", "/run/snapagentd"):
        assert not host.run(f"test -e {path}").ok, f"{path} survived the purge"
