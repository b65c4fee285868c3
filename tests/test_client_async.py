"""The asyncio Python client (snapagentd.client.AsyncClient): the shared examples replayed
through it, and the transport behaviour that differs from the blocking client's (aiohttp
errors, the session's life)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapagentd import client as sac

from .engine import make_image
from .test_client import (
    FAST_RETRY,
    CannedAgent,
    SignallingRetry,
    error_answer,
    following_events,
    http_answer,
)
from .test_contracts import (
    Scenario,
    bind_request,
    check_client_outcome,
    client_call,
    describe,
    scenarios,
    start_scenario,
)


@pytest.fixture
def canned_agent(short_tmp_path: Path) -> Iterator[Any]:
    servers: list[CannedAgent] = []

    def start(response: bytes) -> CannedAgent:
        server = CannedAgent(short_tmp_path / f"canned-{len(servers)}.sock", response)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@scenarios
async def test_async_client_replays_the_examples(
    scenario: Scenario, make_agent, docker_client
) -> None:
    agent, bindings = start_scenario(scenario, make_agent, docker_client)
    async with sac.AsyncClient(str(agent.socket_path), timeout=60) as client:
        for index, example in enumerate(scenario.exchanges):
            exchange = bind_request(example, bindings)
            name, kwargs = client_call(exchange)
            try:
                outcome = await getattr(client, name)(**kwargs)
            except sac.ClientError as error:
                outcome = error
            check_client_outcome(exchange, outcome, bindings, describe(scenario, index))


async def test_missing_socket_is_unreachable_after_the_retries(short_tmp_path: Path) -> None:
    path = str(short_tmp_path / "none.sock")
    async with sac.AsyncClient(path, retry=FAST_RETRY) as client:
        with pytest.raises(sac.AgentUnreachable) as caught:
            await client.status()
    assert str(caught.value) == f"cannot reach snapagentd at {path}: No such file or directory"


async def test_an_agent_that_never_answers_times_out(short_tmp_path: Path) -> None:
    import socket

    path = short_tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(str(path))
        hung.listen()  # the connection waits in the backlog; nobody ever answers
        async with sac.AsyncClient(str(path), timeout=0.2) as client:
            with pytest.raises(sac.AgentUnreachable, match="timed out"):
                await client.status()


async def test_the_retry_bridges_an_agent_restart(make_agent, clean_engine) -> None:
    agent = make_agent()
    agent.stop()
    SignallingRetry.waiting.clear()
    retry = SignallingRetry(attempts=100, initial_delay=0.05, max_delay=0.5)  # up to ~50 s
    async with sac.AsyncClient(str(agent.socket_path), retry=retry) as client:
        status = asyncio.ensure_future(client.status())
        waited = await asyncio.to_thread(SignallingRetry.waiting.wait, 30)
        assert waited, "the client never had to retry"
        await asyncio.to_thread(agent.start)
        assert (await asyncio.wait_for(status, 60)).docker.reachable is True


async def test_codes_of_a_broken_journal_raise_their_classes(canned_agent) -> None:
    agent = canned_agent(error_answer("503 Service Unavailable", "journal-unavailable", "full"))
    async with sac.AsyncClient(agent.path) as client:
        with pytest.raises(sac.JournalUnavailableError) as caught:
            await client.delete("p", "w")
    assert (caught.value.status, caught.value.message) == (503, "full")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (http_answer("200 OK", b"not json", "text/plain"), "not JSON"),
        (http_answer("502 Bad Gateway", b"<html>proxy</html>", "text/html"), "HTTP 502"),
        (b"SMTP ready\r\n\r\n", "malformed HTTP answer"),
    ],
)
async def test_answers_that_break_the_contract_raise_protocol_error(
    canned_agent, answer: bytes, message: str
) -> None:
    agent = canned_agent(answer)
    async with sac.AsyncClient(agent.path) as client:
        with pytest.raises(sac.ProtocolError, match=message):
            await client.list()


async def test_the_query_is_percent_encoded_as_utf8(canned_agent) -> None:
    agent = canned_agent(http_answer("200 OK", b'{"snapshots": []}'))
    async with sac.AsyncClient(agent.path) as client:
        assert await client.list("a+b c/é") == []
    assert agent.requests[0].startswith(b"GET /v1/snapshots?project=a%2Bb%20c%2F%C3%A9 HTTP/1.1")


async def test_concurrent_calls_on_one_client(agent, docker_client) -> None:
    tag = sac.snapshot_tag("Proj", "parallel")
    make_image(docker_client, tag)
    async with sac.AsyncClient(str(agent.socket_path)) as client:
        await client.register("Proj", "parallel", tag)
        found = await asyncio.gather(*(client.lookup("Proj", "parallel") for _ in range(20)))
        assert {snapshot.image for snapshot in found if snapshot is not None} == {tag}
        assert len([s for s in found if s is not None]) == 20
        assert [s.work_item for s in await client.list("Proj")] == ["parallel"]


async def test_close_ends_the_session_and_a_later_call_opens_a_new_one(agent) -> None:
    client = sac.AsyncClient(str(agent.socket_path))
    assert (await client.status()).docker.reachable
    await client.close()
    await client.close()  # twice is harmless
    assert (await client.status()).snapshots.count == 0
    await client.close()


async def test_lease_release_and_a_dry_run_explanation(make_agent, docker_client) -> None:
    """The asyncio flavour of leases: lookup with a lease, the dry run's `skipped`, release."""
    agent = make_agent(max_count=0)
    tag = sac.snapshot_tag("Proj", "async-lease")
    image_id = make_image(docker_client, tag)
    async with sac.AsyncClient(str(agent.socket_path)) as client:
        await client.register("Proj", "async-lease", tag)
        found = await client.lookup("Proj", "async-lease", lease_seconds=120)
        assert isinstance(found, sac.FoundSnapshot) and found.lease is not None
        assert found.lease.image_id == image_id
        explained = await client.evict(dry_run=True)
        assert explained.evicted == [] and explained.disk_bytes_to_free == 0
        assert [(s.image_id, s.protected_by) for s in explained.skipped] == [(image_id, "leased")]
        second = await client.lease("Proj", "async-lease", 60)
        assert second.id != found.lease.id
        assert (await client.status()).snapshots.leases == 2
        assert await client.release(found.lease.id) == found.lease
        assert await client.release(second.id) == second
        with pytest.raises(sac.LeaseNotFoundError):
            await client.release(second.id)
        (outcome,) = (await client.evict()).evicted
        assert (outcome.image_id, outcome.result, outcome.age_seconds) == (
            image_id,
            "removed",
            None,
        )
        with pytest.raises(sac.SnapshotNotFoundError):
            await client.lease("Proj", "async-lease", 60)


async def test_async_status_round_trips_the_new_fields(agent) -> None:
    await asyncio.to_thread(following_events, agent)
    async with sac.AsyncClient(str(agent.socket_path)) as client:
        status = await client.status()
    assert status.disk is None and status.snapshots.leases == 0
    assert status.policy.disk_interval_seconds == 30
    assert sac.to_json(status) == agent.status()
