"""Hand-written fakes for faults a real engine cannot produce on demand.

`FaultyDockerProxy` forwards every request to a real dockerd over its Unix socket, except image
deletions while `fail_removals` is set, which it answers with a 500 as a broken engine would,
and inspections of `slow_image` while `slow_inspect` is set, which it holds for that many
seconds (a slow engine; only that image's, so the agent's own listings never trip it).
`hold_removals()` holds every image DELETE until `release_removals()`: it widens the window
between the agent's last look at an image and its DELETE (which on a real engine lasts
milliseconds) so that a test can change the engine inside it, deterministically.
`SentryReceiver` is a loopback HTTP server that accepts Sentry's envelopes and keeps them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web


class _LoopThread:
    """An aiohttp server on an event loop of its own thread, so sync tests can use it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._streams: set[aiohttp.ClientResponse] = set()  # endless upstream streams open now

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    async def _serve(self, app: web.Application, **site: Any) -> None:
        # Endless streams (Docker's /events) must not hold up close(): stop waiting after 1 s.
        # aiohttp >= 3.9 takes shutdown_timeout on the runner, 3.8 (Debian 12) on the site.
        on_runner = tuple(int(p) for p in aiohttp.__version__.split(".")[:2]) >= (3, 9)
        timeout = {"shutdown_timeout": 1.0}
        self._runner = web.AppRunner(app, **(timeout if on_runner else {}))
        await self._runner.setup()
        on_site = {} if on_runner else timeout
        if "path" in site:
            await web.UnixSite(self._runner, site["path"], **on_site).start()
        else:
            await web.TCPSite(self._runner, "127.0.0.1", site["port"], **on_site).start()

    async def _end_streams(self) -> None:
        for upstream in list(self._streams):
            upstream.close()  # the forwarding handler's loop ends, so cleanup() need not abandon it

    def close(self) -> None:
        self.run(self._end_streams())
        if self._runner is not None:
            self.run(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class FaultyDockerProxy(_LoopThread):
    def __init__(self, path: Path, docker_socket: str) -> None:
        super().__init__()
        self.path = path
        self.url = f"unix://{path}"
        self.docker_socket = docker_socket
        self.fail_removals = False
        self.failed_removals = 0
        self.slow_inspect = 0.0
        self.slow_image = ""  # the reference whose GET /images/<reference>/json is held
        self.held_inspections = 0
        self.held_removals = 0  # DELETEs held so far (they wait for release_removals())
        self._removal_gate: asyncio.Event | None = None
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.run(self._serve(app, path=str(path)))

    def hold_removals(self) -> None:
        """From now on, hold each image DELETE before it reaches the engine."""
        self.run(self._close_gate())

    def release_removals(self) -> None:
        """Let the held DELETEs (and any later ones) through, in the order they came."""
        self.run(self._open_gate())

    async def _close_gate(self) -> None:
        self._removal_gate = asyncio.Event()

    async def _open_gate(self) -> None:
        if self._removal_gate is not None:
            self._removal_gate.set()
            self._removal_gate = None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        gate = self._removal_gate
        if gate is not None and request.method == "DELETE" and "/images/" in request.path:
            self.held_removals += 1
            await gate.wait()  # the injected fault: a DELETE that takes as long as the test likes
        if self.fail_removals and request.method == "DELETE" and "/images/" in request.path:
            self.failed_removals += 1
            return web.json_response({"message": "injected fault: driver failed"}, status=500)
        if (
            self.slow_inspect
            and request.method == "GET"
            and request.path.endswith(f"/images/{self.slow_image}/json")
        ):
            self.held_inspections += 1
            await asyncio.sleep(self.slow_inspect)  # the injected fault: a slow engine
        connector = aiohttp.UnixConnector(path=self.docker_socket)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(
                request.method,
                f"http://docker{request.path_qs}",
                data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            ) as upstream,
        ):
            headers = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower()
                not in {"content-length", "transfer-encoding", "content-encoding", "connection"}
            }
            if request.path.endswith("/events"):  # endless: pass each chunk on as it comes
                streamed = web.StreamResponse(status=upstream.status, headers=headers)
                await streamed.prepare(request)
                self._streams.add(upstream)
                try:
                    async for chunk in upstream.content.iter_any():
                        await streamed.write(chunk)
                except aiohttp.ClientError:
                    pass  # close() ended the stream
                finally:
                    self._streams.discard(upstream)
                return streamed
            body = await upstream.read()
            return web.Response(status=upstream.status, body=body, headers=headers)


class SentryReceiver(_LoopThread):
    def __init__(self, port: int) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        app = web.Application(client_max_size=16 * 1024**2)
        app.router.add_post("/api/{project}/envelope/", self._envelope)
        app.router.add_post("/api/{project}/store/", self._store)
        self.dsn = f"http://public@127.0.0.1:{port}/1"
        self.run(self._serve(app, port=port))

    async def _body(self, request: web.Request) -> bytes:
        body = await request.read()  # aiohttp decodes Content-Encoding itself; older ones may not
        return gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body

    async def _envelope(self, request: web.Request) -> web.Response:
        lines = (await self._body(request)).split(b"\n")
        # Envelope: a header line, then (item header, item payload) pairs.
        for header, payload in zip(lines[1::2], lines[2::2], strict=False):
            if json.loads(header).get("type") == "event":
                self.events.append(json.loads(payload))
        return web.json_response({})

    async def _store(self, request: web.Request) -> web.Response:
        self.events.append(json.loads(await self._body(request)))
        return web.json_response({})
