"""The load generator: a separate process that drives a Unix socket with HTTP/1.1 keep-alive.

It is deliberately lean (pre-encoded requests, asyncio streams, a Content-Length parse) so that
it can send requests faster than an aiohttp server answers them: the floor server must be the
bottleneck of the floor run, which the harness checks by measuring the server's CPU use.

Run as `python -m bench.loadgen` with a JSON job on stdin; prints a JSON result on stdout:
  job:    {"socket", "requests": [[method, path, body-or-null], ...], "concurrency",
           "duration", "warmup", "server_pid"}   (duration null: send every request once)
  result: {"completed", "seconds", "throughput", "latencies_ms": [...], "errors": {...},
           "server_cpu"}
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def encode_request(method: str, path: str, body: Any) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
    if body is None:
        return (head + "\r\n").encode()
    data = json.dumps(body).encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    """Send one request and read its whole answer; returns the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()  # dockerd's longer answers
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def run(job: dict[str, Any]) -> dict[str, Any]:
    requests = [encode_request(*item) for item in job["requests"]]
    concurrency = int(job["concurrency"])
    duration = job.get("duration")
    warmup = float(job.get("warmup") or 0.0)
    once = duration is None
    latencies: list[float] = []
    errors: dict[str, int] = {}
    completed = 0
    order = iter(requests) if once else itertools.cycle(requests)
    start = time.perf_counter()
    measure_from = start + (0.0 if once else warmup)
    stop_at = None if once else measure_from + float(duration)

    async def worker() -> None:
        nonlocal completed
        reader, writer = await asyncio.open_unix_connection(job["socket"], limit=1 << 22)
        try:
            for request in order:
                began = time.perf_counter()
                if stop_at is not None and began >= stop_at:
                    return
                status = await _exchange(reader, writer, request)
                ended = time.perf_counter()
                if status >= 300:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                if began >= measure_from and (stop_at is None or ended <= stop_at):
                    latencies.append(ended - began)
                    completed += 1
        finally:
            writer.close()

    server_pid = job.get("server_pid")
    cpu: list[float] = []

    async def sample_cpu() -> None:
        """The server's CPU time at the start and end of the measured window."""
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        cpu.append(cpu_seconds(server_pid))
        if stop_at is not None:
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            cpu.append(cpu_seconds(server_pid))

    sampler = asyncio.ensure_future(sample_cpu()) if server_pid else None
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = (time.perf_counter() - start) if once else float(duration)
    if sampler is not None:
        await sampler
        if once:
            cpu.append(cpu_seconds(server_pid))
    return {
        "completed": completed,
        "seconds": seconds,
        "throughput": completed / seconds if seconds else 0.0,
        "latencies_ms": [round(value * 1000, 4) for value in latencies],
        "errors": errors,
        # Share of one core the server used while measured (1.0: saturated).
        "server_cpu": (cpu[-1] - cpu[0]) / seconds if len(cpu) == 2 and seconds else None,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    job = json.load(sys.stdin)
    json.dump(asyncio.run(run(job)), sys.stdout)


if __name__ == "__main__":
    main()
