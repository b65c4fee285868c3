"""Last use of snapshot images, and changes to images, from the Docker engine's event stream.

Eviction is least-recently-used first, and a router uses a snapshot by creating or starting a
container from it, which the agent never sees through its own API: the engine's events say so.
Image events (tag, untag, delete, ...) tell the agent when what Docker confirmed about a tag
may no longer hold, so lookups need not ask Docker each time (see confirmations.py).
The engine pushes events only to a live subscriber, keeps a short backlog (256 events) and skips
slow readers, so the follower reconnects with backoff, replays the backlog with `since=` and tells
the agent each time it (re)connects, so that it can reconcile what the stream may have lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import docker.errors

log = logging.getLogger(__name__)

USE_ACTIONS = frozenset({"create", "start"})  # of containers
# Of images: every action that can add, move or remove a tag. (The filter's keys are ANDed, so
# the actions of both types share one list; neither type has an action of the other's names.)
IMAGE_ACTIONS = frozenset({"tag", "untag", "delete", "import", "load", "pull", "prune"})
EVENT_FILTERS: dict[str, list[str]] = {
    "type": ["container", "image"],
    "event": sorted(USE_ACTIONS | IMAGE_ACTIONS),
}
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
# For the version negotiation only: events() always reads its stream without a timeout.
CONNECT_TIMEOUT_SECONDS = 30
STOP_WAIT_SECONDS = 1.0  # how long a cancelled run() waits for its reader thread to finish


@dataclass(frozen=True, slots=True)
class ContainerUse:
    """A container was created or started from `image` (as the user named it) at `at` (UTC)."""

    container_id: str
    image: str
    at: datetime


def parse_container_use(event: Any) -> ContainerUse | None:
    """The image use an engine event reports, or None for any other or malformed event."""
    if not isinstance(event, dict):
        return None
    if "Type" not in event and "Action" not in event:
        # Engines before API 1.22 sent only the legacy fields; only container events had "from".
        kind = "container" if "from" in event else None
        action, container_id, image = event.get("status"), event.get("id"), event.get("from")
    else:
        kind, action = event.get("Type"), event.get("Action")
        actor = event.get("Actor")
        actor = actor if isinstance(actor, dict) else {}
        attributes = actor.get("Attributes")
        container_id = actor.get("ID")
        image = attributes.get("image") if isinstance(attributes, dict) else None
    if kind != "container" or not isinstance(action, str) or action not in USE_ACTIONS:
        return None
    if not (isinstance(container_id, str) and container_id and isinstance(image, str) and image):
        return None
    at = _event_time(event)
    return None if at is None else ContainerUse(container_id, image, at)


@dataclass(frozen=True, slots=True)
class ImageChange:
    """Docker changed an image's tags: `image_id` is the event's Actor.ID ("" if it had none)."""

    action: str
    image_id: str


def parse_image_change(event: Any) -> ImageChange | None:
    """The image change an engine event reports, or None for any event not about images."""
    if not isinstance(event, dict) or event.get("Type") != "image":
        return None
    action = event.get("Action")
    actor = event.get("Actor")
    image_id = actor.get("ID") if isinstance(actor, dict) else None
    return ImageChange(
        action if isinstance(action, str) else "",
        image_id if isinstance(image_id, str) else "",
    )


def _event_time(event: dict[str, Any]) -> datetime | None:
    """`timeNano` (preferred) or `time` as a UTC datetime; None when neither is usable."""
    nano = event.get("timeNano")
    if isinstance(nano, int) and not isinstance(nano, bool) and nano > 0:
        seconds, rest = divmod(nano, 1_000_000_000)
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest // 1000)
    seconds = event.get("time")
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0:
        with contextlib.suppress(OverflowError, OSError, ValueError):  # inf, or past year 9999
            return datetime.fromtimestamp(seconds, UTC)
    return None


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "the engine closed the stream"
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


class _Reader:
    """One connection to the event stream, read in a thread of its own (the SDK blocks)."""

    def __init__(
        self,
        url: str,
        since: int | None,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[Any], None],
    ) -> None:
        self.url, self.since, self.loop, self.on_event = url, since, loop, on_event
        self.connected: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[BaseException | None] = loop.create_future()
        self.ended_at = 0.0  # Unix time the stream ended, set before `finished`
        self.closing = False
        self._lock = threading.Lock()
        self._api: docker.APIClient | None = None
        self._stream: Any = None
        self._thread = threading.Thread(target=self._read, name="snapagentd-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop reading (from the event loop): unblocks a thread waiting on the stream."""
        with self._lock:
            self.closing = True
            stream = self._stream
        # Both docker-py 5.0.3 and 7.x return a CancellableStream, whose close() shuts the
        # socket down: the blocked read returns and the thread releases the rest.
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def _release(self) -> None:
        """Close the response and the client (in the thread, which no longer reads them)."""
        with self._lock:
            self.closing = True
            stream, api = self._stream, self._api
        for resource in (getattr(stream, "_response", None), api):
            if resource is not None:
                with contextlib.suppress(Exception):
                    resource.close()

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            api = docker.APIClient(
                base_url=self.url, version="auto", timeout=CONNECT_TIMEOUT_SECONDS
            )
            with self._lock:
                self._api = api
            if self.closing:
                return
            stream = api.events(since=self.since, decode=True, filters=EVENT_FILTERS)
            with self._lock:
                self._stream = stream
            if self.closing:
                return
            _raise_for_status(stream)
            self._signal(self.connected, None)
            for event in stream:  # ends when the engine closes it, or on close()
                if self.closing:
                    return
                self.on_event(event)
        except Exception as caught:  # anything that ends this connection: retry with backoff
            error = caught
        finally:
            self.ended_at = time.time()
            self._release()
            self._signal(self.finished, error)

    def _signal(self, future: asyncio.Future[Any], value: Any) -> None:
        def settle() -> None:
            if not future.done():
                future.set_result(value)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(settle)


def _raise_for_status(stream: Any) -> None:
    """An engine that refuses the request answers an error, not a stream: raise it now."""
    response = getattr(stream, "_response", None)  # the same private name in 5.0.3 and 7.x
    status = getattr(response, "status_code", 200)
    if status >= 400:
        explanation = str(getattr(response, "text", "")).strip()[:300]
        raise docker.errors.APIError(f"GET /events: {status}", response, explanation)


class EventFollower:
    """Follows container create/start and image events on the engine at `url`, until cancelled.

    `on_use` is called on the event loop for each use; after a reconnect the backlog replay
    can repeat a use already reported, so it must be idempotent. `on_image_change` is called on
    the event loop for each image event, in the stream's order. `on_connected(first)` is
    awaited on the event loop each time the stream (re)connects, `on_disconnected()` called
    each time it is lost. Counters for metrics: `connected`, `reconnects` (connections after
    the first) and `events_seen` (events read).
    """

    def __init__(
        self,
        url: str,
        on_use: Callable[[ContainerUse], None],
        on_connected: Callable[[bool], Awaitable[None]],
        on_image_change: Callable[[ImageChange], None] = lambda change: None,
        on_disconnected: Callable[[], None] = lambda: None,
        *,
        backoff_initial: float = BACKOFF_INITIAL_SECONDS,
        backoff_cap: float = BACKOFF_CAP_SECONDS,
    ) -> None:
        self.url = url
        self.on_use = on_use
        self.on_connected = on_connected
        self.on_image_change = on_image_change
        self.on_disconnected = on_disconnected
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.connected = False
        self.reconnects = 0
        self.events_seen = 0
        self._since: int | None = None  # when the last stream ended (Unix seconds)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        """Connect, stream and reconnect with exponential backoff until cancelled."""
        self._loop = asyncio.get_running_loop()
        delay, first = self.backoff_initial, True
        outage_started: float | None = None  # monotonic time the stream went down, while down
        while True:
            reader = _Reader(self.url, self._since, self._loop, self._read_event)
            reader.start()
            try:
                error, lasted = await self._follow(reader, first, outage_started)
            except BaseException:  # cancelled: unblock the thread and let it finish
                reader.close()
                await asyncio.wait({reader.finished}, timeout=STOP_WAIT_SECONDS)
                raise
            finally:
                if self.connected:
                    self.connected = False
                    self._notify(self.on_disconnected)
            if lasted is not None:
                first, outage_started = False, None
                self._since = int(reader.ended_at)  # whole seconds: may replay a few seen ones
                if lasted > self.backoff_cap:
                    delay = self.backoff_initial
            if outage_started is None:  # once per outage; each retry only at DEBUG
                outage_started = time.monotonic()
                log.warning(
                    "docker events: no stream from %s (%s); retrying in %gs",
                    self.url,
                    _describe(error),
                    delay,
                )
            else:
                log.debug(
                    "docker events: still no stream from %s (%s); retrying in %gs",
                    self.url,
                    _describe(error),
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_cap)

    async def _follow(
        self, reader: _Reader, first: bool, outage_started: float | None
    ) -> tuple[BaseException | None, float | None]:
        """Wait out one connection: (why it ended, how long it lasted or None if it never did)."""
        await asyncio.wait({reader.connected, reader.finished}, return_when=asyncio.FIRST_COMPLETED)
        if not reader.connected.done():
            return reader.finished.result(), None
        started = time.monotonic()
        self.connected = True
        down = "" if outage_started is None else f" after {started - outage_started:.1f}s"
        if first:
            log.info("docker events: following %s%s", self.url, down)
        else:
            self.reconnects += 1
            log.info("docker events: stream from %s is back%s", self.url, down)
        try:
            await self.on_connected(first)
        except Exception:
            log.exception("docker events: on_connected failed")
        error = await reader.finished
        return error, time.monotonic() - started

    def _read_event(self, event: Any) -> None:
        """In the reader thread: count the event and hand what it says to the event loop."""
        self.events_seen += 1
        use = parse_container_use(event)
        if use is not None:
            self._hand_over(self.on_use, use)
            return
        change = parse_image_change(event)
        if change is not None:
            self._hand_over(self.on_image_change, change)

    def _hand_over(self, callback: Callable[[Any], None], item: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self._notify, callback, item)

    def _notify(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("docker events: %s failed for %s", callback.__name__, args)
