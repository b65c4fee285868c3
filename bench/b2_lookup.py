"""B2: `lookup` and `GET /v1/status` with 10,000 entries registered.

`populate` registers the entries (10,000 keys over the shared managed tags, as a router
fleet's history would leave them) through the API; B5 then measures the same agent.
Throughput is measured with 16 clients, p50 with one. A lookup records the use in the journal
(fsynced before the answer), so the no-op server whose lookup appends and fsyncs one line
first (group commit, see floors.py) is reported as the nearest floor. (While the engine's
image events are followed, a lookup no longer asks Docker: see snapagentd/confirmations.py.)
"""

from __future__ import annotations

from typing import Any

from tests.agent import Agent

from .harness import Bench, Row, drive, floor_server, median_of

CLIENTS = 16


def agent_tag(bench: Bench, number: int) -> str:
    tags = bench.shared_tags()
    return tags[number % len(tags)]


def populate(bench: Bench) -> Agent:
    agent = bench.new_agent()
    bench.start_agent(agent)
    requests = [
        (
            "POST",
            "/v1/snapshots",
            {
                "project": "fleet",
                "work_item": f"item-{number}",
                "image": agent_tag(bench, number),
                "size_bytes": 10_000 + number,
            },
        )
        for number in range(bench.sizes.entries)
    ]
    result = drive(agent.socket_path, requests, CLIENTS, None)
    if result["errors"] or result["completed"] != len(requests):
        raise RuntimeError(f"populating failed: {result}")
    return agent


def lookups(entries: int) -> list[tuple[str, str, Any]]:
    return [
        ("POST", "/v1/snapshots/lookup", {"project": "fleet", "work_item": f"item-{number}"})
        for number in range(entries)
    ]


STATUS = [("GET", "/v1/status", None)]


def run(bench: Bench, agent: Agent) -> list[Row]:
    sizes = bench.sizes
    assert agent.process is not None
    rows = []
    with floor_server(bench.directory) as (floor_socket, floor_pid):
        for name, requests in (("lookup", lookups(sizes.entries)), ("status", STATUS)):
            results: dict[str, list[dict[str, Any]]] = {
                k: [] for k in ("floor", "agent", "f1", "a1")
            }
            for _ in range(sizes.repetitions):
                for label, socket, pid, clients in (
                    ("floor", floor_socket, floor_pid, CLIENTS),
                    ("agent", agent.socket_path, agent.process.pid, CLIENTS),
                    ("f1", floor_socket, floor_pid, 1),
                    ("a1", agent.socket_path, agent.process.pid, 1),
                ):
                    result = drive(socket, requests, clients, sizes.seconds, sizes.warmup, pid)
                    if result["errors"]:
                        raise RuntimeError(f"{name} answered errors: {result['errors']}")
                    results[label].append(result)
            rows.append(
                Row(
                    "B2",
                    f"{name} throughput, {CLIENTS} clients",
                    median_of(results["agent"], "throughput"),
                    median_of(results["floor"], "throughput"),
                    "req/s",
                    ">= 0.8 x floor",
                    ("min_ratio", 0.8),
                    detail={
                        "floor_server_cpu": median_of(results["floor"], "server_cpu"),
                        "agent_server_cpu": median_of(results["agent"], "server_cpu"),
                        "agent_p99_ms": median_of(results["agent"], "p99_ms"),
                    },
                )
            )
            if name == "lookup":
                rows.append(journalled_floor_row(bench, requests, results["agent"]))
            rows.append(
                Row(
                    "B2",
                    f"{name} p50, 1 client",
                    median_of(results["a1"], "p50_ms"),
                    median_of(results["f1"], "p50_ms"),
                    "ms",
                    "< 5 ms" if name == "status" else "(reported)",
                    ("max", 5.0) if name == "status" else None,
                )
            )
    return rows


def journalled_floor_row(
    bench: Bench, requests: list[tuple[str, str, Any]], agent: list[dict[str, Any]]
) -> Row:
    """The agent's lookups against the no-op server that appends and fsyncs before answering."""
    sizes = bench.sizes
    with floor_server(bench.directory, journalled=True) as (socket, pid):
        floor = [
            drive(socket, requests, CLIENTS, sizes.seconds, sizes.warmup, pid)
            for _ in range(sizes.repetitions)
        ]
    if any(result["errors"] for result in floor):
        raise RuntimeError(f"the journalled floor answered errors: {floor}")
    return Row(
        "B2",
        f"lookup throughput vs no-op + fsynced append, {CLIENTS} clients",
        median_of(agent, "throughput"),
        median_of(floor, "throughput"),
        "req/s",
        "(nearest floor)",
        detail={"floor_p99_ms": median_of(floor, "p99_ms")},
    )
