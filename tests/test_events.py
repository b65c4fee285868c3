"""Last use from Docker events (snapagentd.events): the parser on a table of real, modern and
malformed events, and the follower against the real private dockerd (uses, other events, an
engine restart with backlog replay, prompt cancellation)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from snapagentd import events
from snapagentd.events import ContainerUse, EventFollower, parse_container_use

from .engine import DockerEngine, create_stopped_container, in_ci, make_image, wait_until
from .sockets import connect_unix

# --- the parser -------------------------------------------------------------------------------

# Captured from the test dockerd (Debian 12's docker.io 20.10, API 1.41), unchanged.
REAL_CREATE_BY_TAG = {
    "status": "create",
    "id": "5aae88f597927103ed4048345c88daa79b8458c2eaa8cd0da31da451fc48d4e6",
    "from": "cascade-snapshot-explore:latest",
    "Type": "container",
    "Action": "create",
    "Actor": {
        "ID": "5aae88f597927103ed4048345c88daa79b8458c2eaa8cd0da31da451fc48d4e6",
        "Attributes": {"image": "cascade-snapshot-explore:latest", "name": "competent_maxwell"},
    },
    "scope": "local",
    "time": 1795826463,
    "timeNano": 1795826463086146940,
}
REAL_START = {
    "status": "start",
    "id": "5aae88f597927103ed4048345c88daa79b8458c2eaa8cd0da31da451fc48d4e6",
    "from": "cascade-snapshot-explore:latest",
    "Type": "container",
    "Action": "start",
    "Actor": {
        "ID": "5aae88f597927103ed4048345c88daa79b8458c2eaa8cd0da31da451fc48d4e6",
        "Attributes": {"image": "cascade-snapshot-explore:latest", "name": "competent_maxwell"},
    },
    "scope": "local",
    "time": 1795826463,
    "timeNano": 1795826463298036750,
}
REAL_CREATE_BY_SHORT_ID = {
    "status": "create",
    "id": "80453b6a3b469f8baf9304c79b7be663d987262c738908baa844f59f017beee3",
    "from": "107d47ed8bf8",
    "Type": "container",
    "Action": "create",
    "Actor": {
        "ID": "80453b6a3b469f8baf9304c79b7be663d987262c738908baa844f59f017beee3",
        "Attributes": {"image": "107d47ed8bf8", "name": "sweet_joliot"},
    },
    "scope": "local",
    "time": 1795826463,
    "timeNano": 1795826463102584517,
}
REAL_DIE = {
    "status": "die",
    "id": "5aae88f597927103ed4048345c88daa79b8458c2eaa8cd0da31da451fc48d4e6",
    "from": "cascade-snapshot-explore:latest",
    "Type": "container",
    "Action": "die",
    "Actor": {
        "ID": "5aae88f597927103ed4048345c88daa79b8458c2eaa8cd0da31da451fc48d4e6",
        "Attributes": {
            "exitCode": "1",
            "image": "cascade-snapshot-explore:latest",
            "name": "competent_maxwell",
        },
    },
    "scope": "local",
    "time": 1795826463,
    "timeNano": 1795826463321493599,
}
REAL_IMAGE_TAG = {
    "status": "tag",
    "id": "sha256:107d47ed8bf8b96462530ee103333f1b5c4e29989fb0091af4a23c912a150bbb",
    "Type": "image",
    "Action": "tag",
    "Actor": {
        "ID": "sha256:107d47ed8bf8b96462530ee103333f1b5c4e29989fb0091af4a23c912a150bbb",
        "Attributes": {"name": "cascade-snapshot-explore:other"},
    },
    "scope": "local",
    "time": 1795826463,
    "timeNano": 1795826463069861668,
}
REAL_NETWORK_CREATE = {
    "Type": "network",
    "Action": "create",
    "Actor": {
        "ID": "2d57c064c9b22bc658feb781e4940153785e25a829b5b7ed9b63bf396977f01f",
        "Attributes": {"name": "explore-net", "type": "bridge"},
    },
    "scope": "local",
    "time": 1795826463,
    "timeNano": 1795826463075001076,
}
# Docker 29 (API 1.52) no longer sends the legacy top-level id/status/from.
MODERN_CREATE_BY_ID = {
    "Type": "container",
    "Action": "create",
    "Actor": {
        "ID": "c0ffee" * 10 + "abcd",
        "Attributes": {"image": "sha256:" + "ab" * 32, "name": "router-worker"},
    },
    "scope": "local",
    "time": 1795826463,
    "timeNano": 1795826463500000000,
}
# What engines before API 1.22 sent: the legacy fields only.
LEGACY_ONLY_START = {"status": "start", "id": "abc123", "from": "cascade-snapshot-x:latest"}

ID = REAL_CREATE_BY_TAG["id"]
AT_NANO = datetime(2026, 11, 28, 0, 41, 3, 86146, tzinfo=UTC)  # 1795826463086146940 ns
AT_SECONDS = datetime(2026, 11, 28, 0, 41, 3, tzinfo=UTC)  # 1795826463


def with_fields(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `event` with top-level fields replaced (a value of DROP removes the field)."""
    copy = {**event, **changes}
    return {key: value for key, value in copy.items() if value is not DROP}


def with_actor(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    actor = {**event["Actor"], **changes}
    return {**event, "Actor": {key: value for key, value in actor.items() if value is not DROP}}


def with_image(event: dict[str, Any], image: Any) -> dict[str, Any]:
    attributes = {**event["Actor"]["Attributes"], "image": image}
    if image is DROP:
        del attributes["image"]
    return with_actor(event, Attributes=attributes)


DROP = object()

PARSE_CASES: list[tuple[str, Any, ContainerUse | None]] = [
    # real engine events
    ("real create by tag", REAL_CREATE_BY_TAG,
     ContainerUse(ID, "cascade-snapshot-explore:latest", AT_NANO)),
    ("real start", REAL_START,
     ContainerUse(ID, "cascade-snapshot-explore:latest",
                  datetime(2026, 11, 28, 0, 41, 3, 298036, tzinfo=UTC))),
    ("real create by short id", REAL_CREATE_BY_SHORT_ID,
     ContainerUse(REAL_CREATE_BY_SHORT_ID["id"], "107d47ed8bf8",
                  datetime(2026, 11, 28, 0, 41, 3, 102584, tzinfo=UTC))),
    ("real die", REAL_DIE, None),
    ("real image tag", REAL_IMAGE_TAG, None),
    ("real network create", REAL_NETWORK_CREATE, None),
    # newer and older engines
    ("API 1.52, no legacy fields", MODERN_CREATE_BY_ID,
     ContainerUse("c0ffee" * 10 + "abcd", "sha256:" + "ab" * 32,
                  datetime(2026, 11, 28, 0, 41, 3, 500000, tzinfo=UTC))),
    ("legacy fields only, with time", with_fields(LEGACY_ONLY_START, time=1795826463),
     ContainerUse("abc123", "cascade-snapshot-x:latest", AT_SECONDS)),
    ("legacy image event", {"status": "untag", "id": "sha256:" + "ab" * 32, "time": 1},
     None),
    ("legacy fields ignored when Type/Action exist",
     with_fields(REAL_DIE, status="create"), None),
    ("legacy 'from' ignored when Actor has no image",
     with_image(REAL_CREATE_BY_TAG, DROP), None),
    # other actions
    ("exec_start", with_fields(REAL_START, Action="exec_start: sh -c true"), None),
    ("exec_create", with_fields(REAL_START, Action="exec_create: sh"), None),
    ("Action in other case", with_fields(REAL_START, Action="START"), None),
    # time
    ("time only", with_fields(MODERN_CREATE_BY_ID, timeNano=DROP),
     ContainerUse("c0ffee" * 10 + "abcd", "sha256:" + "ab" * 32, AT_SECONDS)),
    ("timeNano preferred over time", with_fields(REAL_CREATE_BY_TAG, time=1),
     ContainerUse(ID, "cascade-snapshot-explore:latest", AT_NANO)),
    ("timeNano not a number", with_fields(REAL_CREATE_BY_TAG, timeNano="soon"),
     ContainerUse(ID, "cascade-snapshot-explore:latest", AT_SECONDS)),
    ("timeNano too large", with_fields(REAL_CREATE_BY_TAG, timeNano=10**40),
     ContainerUse(ID, "cascade-snapshot-explore:latest", AT_SECONDS)),
    ("no time at all", with_fields(REAL_CREATE_BY_TAG, time=DROP, timeNano=DROP), None),
    ("legacy fields only, no time", LEGACY_ONLY_START, None),
    ("time negative", with_fields(REAL_CREATE_BY_TAG, time=-5, timeNano=DROP), None),
    ("time a boolean", with_fields(REAL_CREATE_BY_TAG, time=True, timeNano=False), None),
    ("time NaN", with_fields(REAL_CREATE_BY_TAG, time=float("nan"), timeNano=DROP), None),
    ("time infinite", with_fields(REAL_CREATE_BY_TAG, time=float("inf"), timeNano=DROP), None),
    ("time too large", with_fields(REAL_CREATE_BY_TAG, time=10**30, timeNano=DROP), None),
    ("time beyond floats", with_fields(REAL_CREATE_BY_TAG, time=10**400, timeNano=DROP), None),
    ("time a string", with_fields(REAL_CREATE_BY_TAG, time="1795826463", timeNano=DROP), None),
    # malformed
    ("None", None, None),
    ("a list", [REAL_CREATE_BY_TAG], None),
    ("a string", "create", None),
    ("empty dict", {}, None),
    ("Type missing", with_fields(MODERN_CREATE_BY_ID, Type=DROP), None),
    ("Action missing", with_fields(MODERN_CREATE_BY_ID, Action=DROP), None),
    ("Type a list", with_fields(REAL_CREATE_BY_TAG, Type=["container"]), None),
    ("Action a list (unhashable)", with_fields(REAL_CREATE_BY_TAG, Action=["create"]), None),
    ("Action a dict", with_fields(REAL_CREATE_BY_TAG, Action={"create": 1}), None),
    ("Actor missing", with_fields(MODERN_CREATE_BY_ID, Actor=DROP), None),
    ("Actor a string", with_fields(MODERN_CREATE_BY_ID, Actor="c0ffee"), None),
    ("Actor.ID missing", with_actor(MODERN_CREATE_BY_ID, ID=DROP), None),
    ("Actor.ID empty", with_actor(MODERN_CREATE_BY_ID, ID=""), None),
    ("Actor.ID a number", with_actor(MODERN_CREATE_BY_ID, ID=12), None),
    ("Attributes missing", with_actor(MODERN_CREATE_BY_ID, Attributes=DROP), None),
    ("Attributes a list", with_actor(MODERN_CREATE_BY_ID, Attributes=["image"]), None),
    ("image empty", with_image(MODERN_CREATE_BY_ID, ""), None),
    ("image not a string", with_image(MODERN_CREATE_BY_ID, {"name": "x"}), None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("event", "expected"),
    [pytest.param(event, expected, id=name) for name, event, expected in PARSE_CASES],
)
def test_parse_container_use(event: Any, expected: ContainerUse | None) -> None:
    assert parse_container_use(event) == expected


def test_container_use_is_frozen_and_slotted() -> None:
    use = ContainerUse("c", "i", AT_SECONDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        use.image = "other"  # type: ignore[misc]
    assert not hasattr(use, "__dict__")


# --- the follower against the real engine ----------------------------------------------------

BUSYBOX = Path("/bin/busybox")
RUNNABLE = "cascade-snapshot-events-busybox:latest"


def static_busybox() -> bytes:
    """Debian's static busybox (package busybox-static), or skip (fail under CI)."""
    data = BUSYBOX.read_bytes() if BUSYBOX.is_file() else b""
    if data and b"/ld-linux" not in data:
        return data
    problem = f"no static busybox at {BUSYBOX} (apt-get install busybox-static)"
    if in_ci():
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)
    raise AssertionError("unreachable")  # pragma: no cover - skip() raises


@pytest.fixture
def runnable_image(docker_client: docker.APIClient) -> str:
    """A tag of an image that can really run (`/bin/busybox true`); clean_engine removes it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = static_busybox()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    repository, tag = RUNNABLE.split(":")
    docker_client.import_image_from_data(buffer.getvalue(), repository=repository, tag=tag)
    return RUNNABLE


def create_container(client: docker.APIClient, image: str) -> str:
    host_config = client.create_host_config(network_mode="none")
    return client.create_container(
        image, command=["/bin/busybox", "true"], host_config=host_config
    )["Id"]


class Recorder:
    """The agent's side of the follower: what it was told, in order."""

    def __init__(self) -> None:
        self.uses: list[ContainerUse] = []
        self.connects: list[bool] = []

    def on_use(self, use: ContainerUse) -> None:
        self.uses.append(use)

    async def on_connected(self, first: bool) -> None:
        self.connects.append(first)

    def uses_of(self, container_id: str) -> list[ContainerUse]:
        return [use for use in self.uses if use.container_id == container_id]


async def eventually(predicate: Callable[[], Any], timeout: float = 10, message: str = "") -> Any:
    """`wait_until` in a thread, so that the event loop keeps delivering meanwhile."""
    return await asyncio.to_thread(wait_until, predicate, timeout, message=message)


@contextlib.asynccontextmanager
async def following(url: str, **options: Any) -> AsyncIterator[tuple[EventFollower, Recorder]]:
    """A running follower and its recorder, connected once; cancelled on exit."""
    recorder = Recorder()
    follower = EventFollower(url, recorder.on_use, recorder.on_connected, **options)
    task = asyncio.ensure_future(follower.run())
    try:
        await eventually(lambda: recorder.connects == [True], message="the first connection")
        assert follower.connected
        yield follower, recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "snapagentd-events"]


@pytest.fixture(autouse=True)
def no_reader_left_behind() -> Iterator[None]:
    yield
    wait_until(lambda: not reader_threads(), timeout=3, message="the reader threads to end")


def near_now(at: datetime) -> bool:
    return abs(datetime.now(UTC) - at) < timedelta(seconds=5)


async def test_create_and_start_report_the_image_as_named(
    docker_url: str, docker_client: docker.APIClient, runnable_image: str
) -> None:
    image_id = docker_client.inspect_image(runnable_image)["Id"]
    async with following(docker_url) as (follower, recorder):
        by_tag = create_container(docker_client, runnable_image)
        [created] = await eventually(lambda: recorder.uses_of(by_tag), message="the create")
        assert created.image == runnable_image
        assert near_now(created.at)

        docker_client.start(by_tag)
        uses = await eventually(
            lambda: len(recorder.uses_of(by_tag)) == 2 and recorder.uses_of(by_tag),
            message="the start",
        )
        assert uses[1].image == runnable_image
        assert created.at <= uses[1].at and near_now(uses[1].at)

        by_id = create_container(docker_client, image_id)
        [use] = await eventually(lambda: recorder.uses_of(by_id), message="the create by id")
        assert use.image == image_id

        by_short_id = create_container(docker_client, image_id.removeprefix("sha256:")[:12])
        [use] = await eventually(lambda: recorder.uses_of(by_short_id), message="short id")
        assert use.image == image_id.removeprefix("sha256:")[:12]

        assert [use.container_id for use in recorder.uses] == [by_tag, by_tag, by_id, by_short_id]
        assert follower.events_seen == 4
        assert (follower.connected, follower.reconnects, recorder.connects) == (True, 0, [True])


async def test_other_events_are_ignored(
    docker_url: str, docker_client: docker.APIClient, runnable_image: str
) -> None:
    since = int(time.time())
    async with following(docker_url) as (_, recorder):
        docker_client.tag(runnable_image, "cascade-snapshot-events-other", "v2")  # image tag
        network = docker_client.create_network(f"snapagentd-events-{uuid.uuid4().hex[:8]}")
        docker_client.remove_network(network["Id"])  # network create, destroy
        ran = create_container(docker_client, runnable_image)
        docker_client.start(ran)
        assert docker_client.wait(ran, timeout=30)["StatusCode"] == 0  # container die
        docker_client.remove_container(ran)  # container destroy
        sentinel = create_container(docker_client, runnable_image)
        await eventually(lambda: recorder.uses_of(sentinel), message="the sentinel's create")
        assert [use.container_id for use in recorder.uses] == [ran, ran, sentinel]

    # The same stretch of the engine's unfiltered stream, through the parser: only container
    # create and start events are uses, and they are the uses the follower reported.
    until = int(time.time()) + 1
    raw = list(docker_client.events(since=since, until=until, decode=True))
    kinds = {(event.get("Type"), event.get("Action")) for event in raw}
    assert {("image", "tag"), ("network", "create"), ("container", "die")} <= kinds
    parsed = [(event, parse_container_use(event)) for event in raw]
    assert {(event["Type"], event["Action"]) for event, use in parsed if use} == {
        ("container", "create"),
        ("container", "start"),
    }
    assert all(
        use is None
        for event, use in parsed
        if event.get("Type") != "container" or event.get("Action") not in {"create", "start"}
    )
    ours = [use for _, use in parsed if use and use.container_id in {ran, sentinel}]
    assert ours == recorder.uses


async def test_reconnects_after_the_engine_restarts(
    fresh_docker_engine: DockerEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="snapagentd.events")
    engine = fresh_docker_engine
    image = "cascade-snapshot-events-restart:latest"
    client = engine.client()
    make_image(client, image)
    # A first retry 5 s after the stream ends: the engine is back (about 2 s) well before it,
    # so `missed` is normally created while the follower is disconnected and comes through
    # the since= replay of the restarted engine's backlog (live, should the restart be slow;
    # test_events_missed_while_disconnected_are_replayed checks the replay deterministically).
    async with following(engine.url, backoff_initial=5.0) as (follower, recorder):
        before = create_stopped_container(client, image)
        await eventually(lambda: recorder.uses_of(before), message="the use before the restart")

        client.close()
        await asyncio.to_thread(engine.halt)
        await eventually(lambda: not follower.connected, message="the follower to notice")
        await asyncio.to_thread(engine.start_again)
        client = engine.client()
        missed = create_stopped_container(client, image)

        await eventually(
            lambda: recorder.connects == [True, False], timeout=30, message="the reconnection"
        )
        assert follower.reconnects == 1
        after = create_stopped_container(client, image)
        await eventually(lambda: recorder.uses_of(after), message="the use after the restart")
        assert [use.container_id for use in recorder.uses] == [before, missed, after]
    client.close()

    records = [r for r in caplog.records if r.name == "snapagentd.events"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the engine closed the stream" in warnings[0]
    assert any("is back after" in r.getMessage() for r in records if r.levelno == logging.INFO)


class SpliceProxy:
    """A byte-for-byte Unix socket proxy to the engine that can cut its connections and refuse
    new ones: the stream breaks while the engine, and its backlog, stay up."""

    def __init__(self, path: Path, upstream: str) -> None:
        self.url = f"unix://{path}"
        self.upstream = upstream
        self.refusing = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._listener.settimeout(0.1)  # the accept loop looks at _closed this often
        threading.Thread(target=self._accept, name="splice-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            server = connect_unix(self.upstream, timeout=10)
            # The pumps wait as long as an idle /events stream does: cut() and close() end them.
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(source, target), name="splice-pump", daemon=True
                ).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Break every open connection."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()


@pytest.fixture
def splice_proxy(clean_engine: DockerEngine, short_tmp_path: Path) -> Iterator[SpliceProxy]:
    proxy = SpliceProxy(short_tmp_path / "splice.sock", clean_engine.socket_path)
    yield proxy
    proxy.close()


async def test_events_missed_while_disconnected_are_replayed(
    splice_proxy: SpliceProxy, docker_client: docker.APIClient
) -> None:
    image = "cascade-snapshot-events-replay:latest"
    make_image(docker_client, image)
    async with following(splice_proxy.url, backoff_initial=0.05) as (follower, recorder):
        before = create_stopped_container(docker_client, image)
        await eventually(lambda: recorder.uses_of(before), message="the use before the cut")

        splice_proxy.refusing = True
        splice_proxy.cut()
        await eventually(lambda: not follower.connected, message="the follower to notice")
        missed = create_stopped_container(docker_client, image)  # the engine keeps it
        assert not follower.connected  # refused: it cannot have seen `missed` live
        splice_proxy.refusing = False

        await eventually(lambda: recorder.connects == [True, False], message="the reconnection")
        [replayed] = await eventually(lambda: recorder.uses_of(missed), message="the replay")
        assert replayed.image == image and near_now(replayed.at)
        # since= has whole seconds: `before` may come again (a repeated use changes nothing).
        others = [use.container_id for use in recorder.uses if use.container_id != before]
        assert others == [missed]
        assert follower.reconnects == 1


async def test_cancel_returns_promptly_while_the_stream_is_idle(docker_url: str) -> None:
    recorder = Recorder()
    follower = EventFollower(docker_url, recorder.on_use, recorder.on_connected)
    task = asyncio.ensure_future(follower.run())
    await eventually(lambda: recorder.connects == [True], message="the connection")
    assert reader_threads()  # blocked reading a stream that carries nothing

    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2
    assert not follower.connected
    await eventually(lambda: not reader_threads(), timeout=2, message="the reader to end")


async def test_an_engine_error_ends_the_attempt_without_connecting(docker_url: str) -> None:
    loop = asyncio.get_running_loop()
    bad_since: Any = "not-a-time"  # the engine answers an error instead of a stream
    reader = events._Reader(docker_url, bad_since, loop, lambda event: None)
    reader.start()
    error = await asyncio.wait_for(asyncio.shield(reader.finished), 10)
    assert isinstance(error, docker.errors.APIError) and error.status_code >= 400
    assert not reader.connected.done()


async def test_unreachable_engine_warns_once_and_backs_off(
    short_tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="snapagentd.events")
    recorder = Recorder()
    url = f"unix://{short_tmp_path}/no-engine.sock"
    follower = EventFollower(
        url, recorder.on_use, recorder.on_connected, backoff_initial=0.01, backoff_cap=0.05
    )
    task = asyncio.ensure_future(follower.run())

    def retries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "snapagentd.events"]

    await eventually(lambda: len(retries()) >= 6, message="six failed attempts")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    levels = [r.levelno for r in retries()[:6]]
    assert levels == [logging.WARNING] + [logging.DEBUG] * 5
    assert [r.args[-1] for r in retries()[:6]] == [0.01, 0.02, 0.04, 0.05, 0.05, 0.05]
    assert (recorder.connects, follower.connected, follower.reconnects) == ([], False, 0)


def scripted_reader(script: list[float | None], sinces: list[int | None]) -> type:
    """A stand-in for the reader thread: each connection follows the next step of `script`
    (None: it fails; a number: it connects and lasts that many seconds; then: it stays)."""

    class ScriptedReader:
        def __init__(self, url: str, since: int | None, loop: Any, on_event: Any) -> None:
            self.loop = loop
            self.connected = loop.create_future()
            self.finished = loop.create_future()
            self.ended_at = 0.0
            sinces.append(since)

        def start(self) -> None:
            step = script.pop(0) if script else -1.0
            if step is None:
                self.finished.set_result(ConnectionRefusedError("refused"))
                return
            self.connected.set_result(None)
            if step >= 0:
                self.loop.call_later(step, self.close)

        def close(self) -> None:
            if not self.finished.done():
                self.ended_at = time.time()
                self.finished.set_result(None)

    return ScriptedReader


async def test_backoff_doubles_to_the_cap_resets_after_a_long_connection_and_replays(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="snapagentd.events")
    sinces: list[int | None] = []
    script: list[float | None] = [None, None, None, 0.0, None, 0.15, None]
    monkeypatch.setattr(events, "_Reader", scripted_reader(script, sinces))
    recorder = Recorder()

    async def on_connected(first: bool) -> None:
        await recorder.on_connected(first)
        if first:
            raise RuntimeError("a failing reconcile does not stop the follower")

    follower = EventFollower(
        "unix:///nowhere", recorder.on_use, on_connected, backoff_initial=0.01, backoff_cap=0.1
    )
    task = asyncio.ensure_future(follower.run())
    await eventually(lambda: len(recorder.connects) == 3, message="the third connection")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    retries = [r for r in caplog.records if r.levelno in (logging.WARNING, logging.DEBUG)]
    assert [r.args[-1] for r in retries] == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.1, 0.01, 0.02])
    W, D = logging.WARNING, logging.DEBUG
    assert [r.levelno for r in retries] == [W, D, D, W, D, W, D]  # once per outage
    assert any("on_connected failed" in r.getMessage() for r in caplog.records)
    assert (recorder.connects, follower.reconnects) == ([True, False, False], 2)
    # since= is the time the last stream ended: none before the first one ended.
    assert sinces[:4] == [None] * 4
    first_end, second_end = sinces[4], sinces[6]
    assert sinces[4:] == [first_end, first_end, second_end, second_end]
    assert first_end is not None and second_end is not None
    assert first_end <= second_end and abs(time.time() - second_end) < 5
