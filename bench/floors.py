"""The floors: what the same work costs without the agent, measured in the same run.

- `python -m bench.floors SOCKET` is the no-op server of B1/B2: aiohttp on a Unix socket, the
  agent's routes, each handler parsing the same JSON body and answering it back, no journal,
  no Docker. Same interpreter, same aiohttp, same access-log setting as the agent.
- `python -m bench.floors SOCKET JOURNAL` is the same server whose lookup first appends one
  line to JOURNAL and fsyncs it (concurrent requests share one write and fsync): the least a
  lookup that records the use durably before answering can cost (B2's nearest floor).
- `LIST_IMAGES` is the B3 floor: a Python process that imports `docker` and lists the images.
- B4's floor is one `docker rmi` CLI call (see b4_evict.py); B5's is the live state serialised
  once (see b5_memory.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from aiohttp import web

LIST_IMAGES = (
    "import sys, docker; "
    "docker.APIClient(base_url=sys.argv[1], version='auto').images(); "
    "print('listed', flush=True)"
)


async def _echo(request: web.Request) -> web.Response:
    data = json.loads(await request.read())
    return web.json_response({"snapshot": data})


async def _status(request: web.Request) -> web.Response:
    return web.json_response({"version": "floor", "snapshots": {"count": 0}})


class GroupCommit:
    """Appends to a file, each caller answered after an fsync that concurrent callers share."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def append(self, line: bytes) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((line, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        await done

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
            for _, done in batch:
                done.set_result(None)

    def _write(self, data: bytes) -> None:
        os.write(self._fd, data)
        os.fsync(self._fd)


def noop_app(journal: Path | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post("/v1/snapshots", _echo)
    app.router.add_get("/v1/status", _status)
    if journal is None:
        app.router.add_post("/v1/snapshots/lookup", _echo)
        return app
    commit = GroupCommit(journal)

    async def journalled_echo(request: web.Request) -> web.Response:
        data = json.loads(await request.read())
        await commit.append(json.dumps({"op": "touch", **data}).encode() + b"\n")
        return web.json_response({"snapshot": data})

    app.router.add_post("/v1/snapshots/lookup", journalled_echo)
    return app


async def serve(path: Path, journal: Path | None) -> None:
    runner = web.AppRunner(noop_app(journal), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()  # until killed
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
