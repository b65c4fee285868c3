"""B1: `register` throughput and latency at 1, 16 and 64 concurrent clients.

The images are already in Docker and every request gives `size_bytes`, as a router's commit
path does. The bodies cycle over 2,000 keys spread over the shared managed tags, so most
requests re-register a key (200) and the journal grows and compacts as it would in service.
Floor and agent runs alternate, repetition by repetition, so machine noise hits both alike.

A second floor is measured too: dockerd answering the same image inspections with no agent in
front (register must ask Docker which image the tag names now; see docs/benchmarks.md). It is
reported as the nearest achievable figure, not judged.
"""

from __future__ import annotations

from typing import Any

from .harness import Bench, Row, drive, floor_server, median_of

KEYS = 2000


def bodies(tags: list[str], keys: int = KEYS) -> list[tuple[str, str, Any]]:
    return [
        (
            "POST",
            "/v1/snapshots",
            {
                "project": "bench",
                "work_item": f"b1-{number}",
                "image": tags[number % len(tags)],
                "size_bytes": 1000 + number,
            },
        )
        for number in range(keys)
    ]


def run(bench: Bench) -> list[Row]:
    sizes = bench.sizes
    requests = bodies(bench.shared_tags(), min(KEYS, sizes.entries))
    agent = bench.new_agent()
    bench.start_agent(agent)
    rows: list[Row] = []
    try:
        with floor_server(bench.directory) as (floor_socket, floor_pid):
            assert agent.process is not None
            for clients in sizes.concurrency:
                floor, mine, engine = [], [], []
                tags = [body["image"] for _, _, body in requests]
                for _ in range(sizes.repetitions):
                    floor.append(
                        drive(
                            floor_socket, requests, clients, sizes.seconds, sizes.warmup, floor_pid
                        )
                    )
                    mine.append(
                        drive(
                            agent.socket_path,
                            requests,
                            clients,
                            sizes.seconds,
                            sizes.warmup,
                            agent.process.pid,
                        )
                    )
                    engine.append(bench.drive_dockerd(tags, clients, sizes.seconds, sizes.warmup))
                _check(mine)
                detail = {
                    "floor_server_cpu": median_of(floor, "server_cpu"),
                    "agent_server_cpu": median_of(mine, "server_cpu"),
                    "agent_p50_ms": median_of(mine, "p50_ms"),
                    "floor_p50_ms": median_of(floor, "p50_ms"),
                }
                rows.append(
                    Row(
                        "B1",
                        f"register throughput, {clients} client(s)",
                        median_of(mine, "throughput"),
                        median_of(floor, "throughput"),
                        "req/s",
                        ">= 0.8 x floor" if clients >= 16 else "(reported)",
                        ("min_ratio", 0.8) if clients >= 16 else None,
                        detail=detail,
                    )
                )
                rows.append(
                    Row(
                        "B1",
                        f"register throughput vs dockerd inspect alone, {clients} client(s)",
                        median_of(mine, "throughput"),
                        median_of(engine, "throughput"),
                        "req/s",
                        "(nearest floor)",
                    )
                )
                rows.append(
                    Row(
                        "B1",
                        f"register p50, {clients} client(s)",
                        median_of(mine, "p50_ms"),
                        median_of(floor, "p50_ms"),
                        "ms",
                        "(reported)",
                    )
                )
                rows.append(
                    Row(
                        "B1",
                        f"register p99, {clients} client(s)",
                        median_of(mine, "p99_ms"),
                        median_of(floor, "p99_ms"),
                        "ms",
                        "<= 2 x floor p99",
                        ("max_ratio", 2.0),
                    )
                )
    finally:
        bench.stop_agent(agent)
    return rows


def _check(results: list[dict[str, Any]]) -> None:
    for result in results:
        if result["errors"]:
            raise RuntimeError(f"the agent answered errors: {result['errors']}")
