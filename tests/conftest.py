"""Shared pytest fixtures.

Section 1 is the real-Docker test infrastructure (tests/engine.py); section 2 runs real
agent processes (tests/agent.py).
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from .agent import Agent
from .engine import (
    DockerEngine,
    NotifySocket,
    make_image,
    make_short_tmpdir,
    remove_test_artifacts,
    require_dockerd,
)
from .faults import FaultyDockerProxy, SentryReceiver
from .loopfs import small_disk_engine  # noqa: F401 - a fixture, used by name

DOCKER_FIXTURES = {"docker_engine", "fresh_docker_engine", "small_disk_engine"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a real dockerd, so builds without one (the Debian
    package's dh_auto_test) can run the rest with ``-m "not needs_docker"``."""
    for item in items:
        if DOCKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_docker)


# ======================================================================================
# 1. Private Docker engine, images, sd_notify socket
# ======================================================================================


def _start_engine(prefix: str) -> DockerEngine:
    dockerd = require_dockerd()  # skip outside CI, fail under CI=true
    base = make_short_tmpdir(prefix)
    try:
        return DockerEngine.start(base, dockerd=dockerd)
    except Exception as error:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a private dockerd: {error}", pytrace=False)
        raise  # pragma: no cover - fail() raises


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """One private dockerd for the whole session (in /tmp/sa-XXXX), stopped at the end."""
    engine = _start_engine("sa-")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def fresh_docker_engine() -> Iterator[DockerEngine]:
    """A private dockerd of this test's own (about 1 s to start), for tests that stop and
    restart Docker (``engine.halt()``, ``engine.start_again()``, ``engine.restart()``)."""
    engine = _start_engine("sa-f-")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def clean_engine(docker_engine: DockerEngine) -> Iterator[DockerEngine]:
    """The session engine, with all containers, every ``cascade-snapshot-*``/``foreign-*``
    tag and all dangling images removed before and after the test."""
    _clean(docker_engine)
    yield docker_engine
    _clean(docker_engine)


def _clean(engine: DockerEngine) -> None:
    if not engine.ping():  # a test halted the shared engine: bring it back
        if engine.is_running():
            engine.halt()
        engine.start_again()
    client = engine.client()
    try:
        remove_test_artifacts(client)
    finally:
        client.close()


@pytest.fixture
def docker_client(clean_engine: DockerEngine) -> Iterator[docker.APIClient]:
    """A ``docker.APIClient`` (version="auto") to the clean session engine."""
    client = clean_engine.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def docker_url(clean_engine: DockerEngine) -> str:
    """``unix://...`` URL of the clean session engine (for the agent's ``[docker] url``)."""
    return clean_engine.url


@pytest.fixture
def image_factory(docker_client: docker.APIClient) -> Callable[..., str]:
    """``image_factory(reference, size=1024, content=None) -> "sha256:..."``: import a
    one-file image with unique content as ``reference`` on the clean session engine."""

    def factory(reference: str, size: int = 1024, content: bytes | None = None) -> str:
        return make_image(docker_client, reference, size=size, content=content)

    return factory


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A private directory directly under /tmp, for Unix socket paths (max 107 bytes);
    pytest's ``tmp_path`` can be too long for them."""
    path = make_short_tmpdir("sa-t-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify_socket(short_tmp_path: Path) -> Iterator[NotifySocket]:
    """A real AF_UNIX/SOCK_DGRAM socket standing in for systemd's NOTIFY_SOCKET.

    ``.path``, ``.messages``, ``.env()``, ``.wait_for(prefix_or_predicate, timeout=10.0)``.
    Set ``monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)`` (in-process) or pass
    ``notify_socket.env()`` to a child process.
    """
    with NotifySocket(short_tmp_path / "notify.sock") as sock:
        yield sock


@pytest.fixture
def proxy(docker_engine: DockerEngine, short_tmp_path: Path) -> Iterator[FaultyDockerProxy]:
    """The fault-injection proxy (tests/faults.py) in front of the session engine."""
    proxy = FaultyDockerProxy(short_tmp_path / "proxy.sock", docker_engine.socket_path)
    yield proxy
    proxy.release_removals()  # never leave a DELETE held past its test
    proxy.close()


@pytest.fixture
def sentry() -> Iterator[SentryReceiver]:
    """A loopback Sentry (tests/faults.py): `.dsn` for the agent, `.events` it received."""
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = SentryReceiver(port)
    yield receiver
    receiver.close()


# ======================================================================================
# 2. Real snapagentd processes
# ======================================================================================


_NO_NOTIFY = object()


@pytest.fixture
def make_agent(docker_engine: DockerEngine) -> Iterator[Callable[..., Agent]]:
    """``make_agent(start=True, notify=<own socket>, docker_url=None, directory=None,
    **policy)``: a real snapagentd process with its own config, journal, socket and
    NOTIFY_SOCKET (``notify=None`` runs it without one). Killed at the end of the test."""
    agents: list[Agent] = []
    sockets: list[NotifySocket] = []
    directories: list[Path] = []

    def factory(
        start: bool = True,
        notify: Any = _NO_NOTIFY,
        docker_url: str | None = None,
        directory: Path | None = None,
        **policy: Any,
    ) -> Agent:
        if directory is None:
            directory = make_short_tmpdir("sa-a-")
            directories.append(directory)
        if notify is _NO_NOTIFY:
            notify = NotifySocket(directory / f"notify-{len(sockets)}.sock")
            sockets.append(notify)
        agent = Agent(directory, docker_url or docker_engine.url, notify, **policy)
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield factory
    for agent in agents:
        agent.close()
    for sock in sockets:
        sock.close()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    """A started agent on the clean session engine, with a permissive default policy."""
    return make_agent()
