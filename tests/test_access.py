"""Who may use the agent: peer credentials checked once per connection, and the directories
the daemon agrees to put its socket in. Real unprivileged users, made by the test."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapagentd.access import Peer, is_allowed

from .agent import Agent
from .engine import in_ci, make_short_tmpdir

OWN_UID = 4242
ALLOWED = frozenset({500, 501})


@pytest.mark.parametrize(
    ("uid", "gids", "allowed"),
    [
        (0, {0}, True),  # root
        (OWN_UID, {9999}, True),  # the daemon's own user
        (1000, {1000}, False),  # anybody else
        (1000, {1000, 500}, True),  # ... in an allowed group (supplementary)
        (1000, {501}, True),  # ... or with an allowed primary group
        (1000, {0}, False),  # group root is not root
    ],
)
def test_who_is_allowed(uid: int, gids: set[int], allowed: bool) -> None:
    assert is_allowed(Peer(1, uid, frozenset(gids)), ALLOWED, OWN_UID) is allowed


# --- real users ----------------------------------------------------------------------------

# Runs as the test user under Debian's python (readable by everyone, unlike root's pyenv).
CLIENT = """
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(sys.argv[1])
c = C("localhost", timeout=30)
c.request("GET", "/v1/status")
r = c.getresponse()
print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
"""

# Sends argv[2] as it is and prints everything the agent answers, until it closes.
RAW_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode())
answer = b""
while chunk := s.recv(65536):
    answer += chunk
print(json.dumps(answer.decode()))  # JSON keeps the CRLFs intact
"""


@dataclass(frozen=True)
class Users:
    group: str
    member: str
    stranger: str

    def call_status(self, user: str, socket_path: Path) -> dict:
        """GET /v1/status as `user` (runuser sets its groups as a login would)."""
        return json.loads(_run_as(user, CLIENT, str(socket_path)))

    def send_raw(self, user: str, socket_path: Path, data: str) -> str:
        """Everything the agent answers to `data` sent as `user`, up to its closing."""
        return json.loads(_run_as(user, RAW_CLIENT, str(socket_path), data))


def _run_as(user: str, script: str, *args: str) -> str:
    """The output of `script` run as `user` by Debian's python (readable by every user)."""
    command = ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", script, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    """A group and two system users, one in it and one not; deleted afterwards."""
    if os.geteuid() != 0:
        reason = "making test users needs root (run scripts/test.sh as root)"
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    made = Users(f"sa-ok-{tag}", f"sa-in-{tag}", f"sa-out-{tag}")
    subprocess.run(["groupadd", "--system", made.group], check=True)
    try:
        for user, groups in ((made.member, [made.group]), (made.stranger, [])):
            extra = ["--groups", ",".join(groups)] if groups else []
            subprocess.run(["useradd", "--system", "--no-create-home", *extra, user], check=True)
        yield made
    finally:
        for user in (made.member, made.stranger):
            subprocess.run(["userdel", user], check=False, capture_output=True)
        subprocess.run(["groupdel", made.group], check=False, capture_output=True)


def test_a_world_writable_socket_still_serves_only_allowed_peers(
    make_agent: Callable[..., Agent], users: Users
) -> None:
    agent = make_agent(start=False)
    agent.directory.chmod(0o755)  # let the test users reach the socket file
    # A wrong SocketMode: every local user can connect(); the credentials check still holds.
    agent.extra = {
        "api": {
            "socket": str(agent.socket_path),
            "socket_mode": "0666",
            "allowed_groups": [users.group],
        }
    }
    agent.write_config()
    agent.start()

    member = users.call_status(users.member, agent.socket_path)
    assert member["status"] == 200, member
    refused = users.call_status(users.stranger, agent.socket_path)
    assert refused["status"] == 403, refused
    assert refused["body"]["error"]["code"] == "access-denied"
    assert "allowed_groups" in refused["body"]["error"]["message"]
    assert agent.call("GET", "/v1/status")[0] == 200  # root


@pytest.mark.parametrize(
    "first_bytes",
    [
        "GET /no/such/route HTTP/1.1\r\nHost: x\r\n\r\n",  # would be a 404 when allowed in
        "DELETE /v1/snapshots?project=p&work_item=w HTTP/1.1\r\nHost: x\r\n\r\n",
        "not http at all\r\n\r\n",  # would be a 400 when allowed in
    ],
)
def test_a_refused_peer_gets_403_before_its_request_is_read(
    make_agent: Callable[..., Agent], users: Users, first_bytes: str
) -> None:
    """The check is made at connect: whatever a refused peer sends, it gets the same 403 and
    the connection is closed (the client reads to EOF)."""
    agent = make_agent(start=False)
    agent.directory.chmod(0o755)
    agent.extra = {"api": {"socket": str(agent.socket_path), "socket_mode": "0666"}}
    agent.write_config()
    agent.start()

    answer = users.send_raw(users.stranger, agent.socket_path, first_bytes)
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 403 Forbidden\r\n"), answer
    assert "Connection: close" in head.split("\r\n"), answer
    assert json.loads(body)["error"]["code"] == "access-denied", answer
    assert agent.call("GET", "/v1/status")[0] == 200  # the agent itself is unharmed
    assert "refused uid" in agent.log()


def test_an_unknown_allowed_group_stops_the_start(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(start=False)
    agent.extra = {"api": {"socket": str(agent.socket_path), "allowed_groups": ["sa-no-such"]}}
    agent.write_config()
    process = agent.spawn()
    assert process.wait(timeout=30) == 1
    assert "api.allowed_groups: no such group 'sa-no-such'" in agent.log()


@pytest.mark.parametrize("planted", ["symlink", "foreign-owner", "world-writable"])
def test_a_socket_directory_another_user_controls_is_refused(
    make_agent: Callable[..., Agent], users: Users, planted: str
) -> None:
    agent = make_agent(start=False)
    scratch = make_short_tmpdir("sa-p-")
    try:
        directory = scratch / "run"
        if planted == "symlink":
            (scratch / "elsewhere").mkdir()
            directory.symlink_to(scratch / "elsewhere")
        else:
            directory.mkdir()
        if planted == "foreign-owner":
            os.chown(directory, int(_id("-u", users.stranger)), -1)
        if planted == "world-writable":
            directory.chmod(0o777)
        agent.extra = {"api": {"socket": str(directory / "agent.sock")}}
        agent.write_config()
        process = agent.spawn()
        assert process.wait(timeout=30) == 1
        assert "refusing to put the socket there" in agent.log(), agent.log()
        assert not (directory / "agent.sock").exists()
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=True)


def _id(flag: str, user: str) -> str:
    return subprocess.run(["id", flag, user], capture_output=True, text=True, check=True).stdout
