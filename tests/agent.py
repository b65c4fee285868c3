"""A real snapagentd process for tests: its own config, journal, socket and NOTIFY_SOCKET.

The daemon runs as a child process (`python -m snapagentd`), exactly as systemd would start it,
and tests talk to it over its Unix socket with a plain HTTP client.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(
    socket_path: str | Path,
    method: str,
    path: str,
    body: Any = None,
    query: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """One request; returns (status, decoded JSON body)."""
    connection = UnixConnection(str(socket_path), timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        target = path + ("?" + urlencode(query) if query else "")
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        content_type = response.getheader("Content-Type", "")
        assert content_type.startswith("application/json"), (response.status, payload[:200])
        return response.status, json.loads(payload)
    finally:
        connection.close()


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    """TOML from nested dicts: a dict value becomes a sub-table (`[policy.projects."x"]`)."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        for key, value in values.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {json.dumps(value)}")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{json.dumps(key)}", value)

    for section, values in sections.items():
        table(section, values)
    path.write_text("\n".join(lines) + "\n")


class Agent:
    """One daemon under test. `start()` returns once it has sent READY=1."""

    def __init__(self, directory: Path, docker_url: str, notify: Any, **policy: Any) -> None:
        self.directory = directory
        self.socket_path = directory / "agent.sock"
        self.journal_path = directory / "state" / "journal.jsonl"
        self.config_path = directory / "snapagentd.toml"
        self.log_path = directory / "agent.log"
        self.notify = notify
        self.docker_url = docker_url
        # Disk watermarks off: the session engine's data root is on this machine's own disk,
        # whose fullness no test controls (tests/test_disk_pressure.py uses a loop device).
        self.policy: dict[str, Any] = {
            "ttl": "24h",
            "max_count": 100,
            "max_size": "10GiB",
            "disk_high": "off",
            "disk_low": "off",
        }
        self.policy.update(policy)
        self.extra: dict[str, dict[str, Any]] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config()

    def write_config(self) -> None:
        sections = {
            "api": {"socket": str(self.socket_path), "socket_mode": "0600"},
            "docker": {"url": self.docker_url},
            "policy": self.policy,
            "journal": {"path": str(self.journal_path)},
            **self.extra,
        }
        write_config(self.config_path, sections)

    def spawn(
        self, env: dict[str, str] | None = None, listen_fd: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start the process; `listen_fd` hands it a listening socket as systemd would."""
        inherited = ("NOTIFY_", "WATCHDOG_", "LISTEN_")
        environment = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        environment["PYTHONPATH"] = str(REPO)
        if self.notify is not None:
            environment["NOTIFY_SOCKET"] = self.notify.path
        environment.update(env or {})
        command = [sys.executable, "-m", "snapagentd", "--config", str(self.config_path)]
        if listen_fd is not None:
            # systemd's protocol: the socket as fd 3, LISTEN_FDS=1, LISTEN_PID = the daemon's pid
            # (exec keeps the pid).
            handover = (
                f"import os, sys; os.dup2({listen_fd}, 3); os.environ['LISTEN_FDS'] = '1'; "
                "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[1], sys.argv[1:])"
            )
            command = [sys.executable, "-c", handover, *command]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=log,
                env=environment,
                cwd=self.directory,
                pass_fds=() if listen_fd is None else (listen_fd,),
            )
        return self.process

    def start(
        self, env: dict[str, str] | None = None, timeout: float = 30.0, listen_fd: int | None = None
    ) -> str:
        """Start and wait for READY=1; returns the STATUS= line sent with it."""
        self.spawn(env, listen_fd)
        seen = len(self.notify.messages)
        try:
            self.notify.wait_for("READY=1", timeout=timeout)
        except AssertionError:
            raise AssertionError(f"agent never became ready; log:\n{self.log()}") from None
        # READY=1 and its STATUS= line arrive in one datagram, in that order.
        messages = self.notify.messages[seen:]
        return messages[messages.index("READY=1") + 1]

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        return call(self.socket_path, method, path, body, **kwargs)

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, answer = self.call(method, path, body, **kwargs)
        assert 200 <= status < 300, (status, answer)
        return answer

    def register(self, project: str, work_item: str, image: str, **extra: Any) -> dict[str, Any]:
        body = {"project": project, "work_item": work_item, "image": image, **extra}
        return self.ok("POST", "/v1/snapshots", body)["snapshot"]

    def status(self) -> dict[str, Any]:
        return self.ok("GET", "/v1/status")

    def snapshots(self) -> list[dict[str, Any]]:
        return self.ok("GET", "/v1/snapshots")["snapshots"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def instance_id(self) -> str | None:
        """The agent's instance id, from its journal (None before it made one)."""
        if not self.journal_path.exists():
            return None
        for line in self.journal_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("op") == "instance":
                    return str(record["id"])
        return None

    def marker(self) -> str | None:
        """The name of the agent's ownership marker volume (snapagentd/ownership.py)."""
        instance = self.instance_id()
        return None if instance is None else f"snapagentd-owner-{instance}"

    def remove_marker(self) -> None:
        """Take the agent's marker out of its engine, as an operator retiring it would: the
        next test's agent, with a journal of its own, would refuse to start beside it."""
        name = self.marker()
        if name is None:
            return
        import docker  # here: only the tests that ran an agent need it

        with contextlib.suppress(Exception):  # engine stopped or unreachable: nothing to do
            client = docker.APIClient(base_url=self.docker_url, version="auto", timeout=10)
            try:
                with contextlib.suppress(docker.errors.NotFound):
                    client.remove_volume(name)
            finally:
                client.close()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.remove_marker()
