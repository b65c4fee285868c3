"""The floors: what the same work costs without the agent, measured in the same run.

- `python -m bench.floors SOCKET` is the no-op server of B1/B2: aiohttp on a Unix socket, the
  agent's routes, each handler parsing the same JSON body and answering it back, no journal,
  no Docker. Same interpreter, same aiohttp, same access-log setting as the agent.
- `LIST_IMAGES` is the B3 floor: a Python process that imports `docker` and lists the images.
- B4's floor is one `docker rmi` CLI call (see b4_evict.py); B5's is the live state serialised
  once (see b5_memory.py).
"""

from __future__ import annotations

import asyncio
import json
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


def noop_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post("/v1/snapshots", _echo)
    app.router.add_post("/v1/snapshots/lookup", _echo)
    app.router.add_get("/v1/status", _status)
    return app


async def serve(path: Path) -> None:
    runner = web.AppRunner(noop_app(), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()  # until killed
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
