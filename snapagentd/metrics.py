"""Prometheus metrics: what the agent holds, what it removed, how fast it answers.

Why: ``/v1/status`` answers "how is it now" for one host and one person; the metrics answer
"how has it been" for every host at once, so a dashboard can show disk use against the
watermarks and an alert can fire when the disk stays full or removals keep failing.

How, and why that way:

- One private ``CollectorRegistry`` per :class:`Metrics` (never the process-global default), so
  tests and restarts can make as many as they like without "duplicated timeseries" errors.
- Counters and histograms are updated where things happen (a removal, a journal fsync, a
  request); prometheus_client makes those updates thread-safe (the journal fsyncs in a thread).
- Everything that is *state* (snapshots per project, bytes, pending removals, leases, Docker's
  and the disk's condition) is read from the daemon by a custom collector at scrape time: it is
  never stale and costs nothing between scrapes. A reader that raises costs only those gauges;
  the rest of the scrape is served, the failure is logged once per episode and counted.
- ``_created`` series are left out: they double the series of every counter and histogram,
  nothing here needs them, and prometheus_client 0.16 can only turn them off process-wide.
- The exposition is the classic text format 0.0.4 on every prometheus_client version (0.26
  labels the same bytes ``version=1.0.0``): our names are all legacy-valid, so both are the same.
- Label values are bounded: a route is the matched resource's canonical path (``unmatched`` for
  anything no route matched), a method outside the standard ones is ``other``.

The endpoint is ``GET /metrics`` on the API socket (behind its peer check) and, when
``[metrics] listen`` is set, on a loopback-only TCP address, unauthenticated; see docs/metrics.md.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from . import __version__

__all__ = [
    "CONTENT_TYPE",
    "FSYNC_BUCKETS",
    "REQUEST_BUCKETS",
    "DiskGauges",
    "Metrics",
    "ProjectGauges",
    "StateGauges",
    "metrics_handler",
    "parse_listen",
    "start_metrics_site",
]

log = logging.getLogger(__name__)

PREFIX = "snapagentd_"
# The classic text format (prometheus_client 0.26 labels the same bytes version=1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# One journal write+fsync: well under a millisecond on a quiet SSD, a second on a sick disk.
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# An API request: lookups take well under a millisecond, a DELETE waits for Docker.
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# The labels evictions_total starts at 0 with, so rate() and increase() see the first one.
REASONS = ("ttl", "count", "size", "disk", "superseded", "invalidated", "repointed", "leaked")
RESULTS = (
    "removed",
    "untagged",
    "in-use",
    "has-children",
    "referenced",
    "already-gone",
    "failed",
    "leased",
    "kept",
)
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class ProjectGauges:
    """One project's snapshots (``""`` is the project of discovered, unregistered images)."""

    snapshots: int
    virtual_bytes: int  # sum of Docker's Size (shared base layers counted per image)
    unique_bytes: int  # bytes only these images hold


@dataclass(frozen=True, slots=True)
class DiskGauges:
    """The file system of Docker's data root and the watermarks on it, all in bytes."""

    path: str
    total_bytes: int
    free_bytes: int
    high_free_bytes: int  # eviction starts when free_bytes falls below this
    low_free_bytes: int  # and stops once free_bytes is at least this


@dataclass(frozen=True, slots=True)
class StateGauges:
    """What the daemon holds right now; read at scrape time."""

    projects: Mapping[str, ProjectGauges]
    pending_removal: int
    leases: int
    docker_up: bool
    events_connected: bool
    disk: DiskGauges | None  # None: watermarks disabled or the data root is not visible


StateReader = Callable[[], StateGauges]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


class Metrics:
    """The agent's metrics on a registry of their own. ``observe_*``/``count_*`` are cheap and
    thread-safe; :meth:`render` reads the state and must run on the event loop's thread."""

    def __init__(self, read_state: StateReader | None = None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._state = _StateCollector(read_state)
        registry.register(self._state)
        self._evictions = Counter(
            PREFIX + "evictions",
            "Images the agent tried to remove, by why it chose them and what Docker answered.",
            ["reason", "result"],
            registry=registry,
        )
        for reason in REASONS:
            for result in RESULTS:
                self._evictions.labels(reason, result)
        self._reclaimed = Counter(
            PREFIX + "reclaimed_bytes",
            "Bytes freed by the images the agent removed.",
            registry=registry,
        )
        self._failures = Counter(
            PREFIX + "removal_failures",
            'Image removals that failed, by Docker\'s HTTP status or "unreachable".',
            ["status"],
            registry=registry,
        )
        self._wrong = Counter(
            PREFIX + "wrong_removals",
            "References Docker removed that the agent had not chosen (see docs: Safety).",
            registry=registry,
        )
        self._odd = Gauge(
            PREFIX + "odd_images",
            "Images of the last listing whose creation time is unusable or in the future.",
            registry=registry,
        )
        self._fsync = Histogram(
            PREFIX + "journal_fsync_seconds",
            "Time of one journal write and fsync (one group commit).",
            buckets=FSYNC_BUCKETS,
            registry=registry,
        )
        self._requests = Histogram(
            PREFIX + "request_seconds",
            "API request time, by the route's path template, method and status.",
            ["route", "method", "status"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self._request_series: dict[tuple[str, str, int], Histogram] = {}
        build = Gauge(
            PREFIX + "build_info", "Always 1; the agent's version.", ["version"], registry=registry
        )
        build.labels(__version__).set(1)
        ProcessCollector(registry=registry)  # process_*: a few reads of /proc per scrape

    def set_state_reader(self, read_state: StateReader) -> None:
        """Read the state gauges with ``read_state`` from the next scrape on."""
        self._state.read_state = read_state

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One API request: ``route`` is a path template or ``unmatched``, never a raw path."""
        method = method if method in METHODS else "other"
        key = (route, method, status)  # few: routes, methods and statuses are all bounded
        series = self._request_series.get(key)
        if series is None:  # labels() takes a lock and builds a key on every call
            series = self._request_series[key] = self._requests.labels(route, method, str(status))
        series.observe(seconds)

    def observe_fsync(self, seconds: float) -> None:
        """One journal write+fsync."""
        self._fsync.observe(seconds)

    def count_removal(self, reason: str, result: str, reclaimed_bytes: int) -> None:
        """One removal attempt (``reason`` and ``result`` as models.Reason/RemovalResult)."""
        self._evictions.labels(reason, result).inc()
        if reclaimed_bytes > 0:
            self._reclaimed.inc(reclaimed_bytes)

    def count_removal_failure(self, status: str) -> None:
        """A removal Docker refused: its HTTP status as text ("500"), or "unreachable"."""
        self._failures.labels(str(status)).inc()

    def count_wrong_removal(self) -> None:
        """A reference removed without being chosen: an alarm, never expected to move."""
        self._wrong.inc()

    def set_odd_images(self, count: int) -> None:
        """Images whose Created Docker gave unusably, as of the last run's listing."""
        self._odd.set(count)

    def set_last_eviction(self, finished_at: datetime) -> None:
        """When the last eviction run finished (a naive datetime is taken as UTC)."""
        if finished_at.tzinfo is None:
            finished_at = finished_at.replace(tzinfo=UTC)
        self._state.last_eviction = finished_at.timestamp()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type (call it on the event loop's thread: the
        state reader looks at the daemon's memory)."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE

    def middleware(self) -> Middleware:
        """An aiohttp middleware that times every request, also those whose handler raises."""

        @web.middleware
        async def time_request(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except web.HTTPException as error:
                self._observe(request, error.status, started)
                raise
            except Exception:  # not CancelledError: a client that hung up got no answer
                self._observe(request, 500, started)  # what aiohttp answers
                raise
            self._observe(request, response.status, started)
            return response

        return time_request

    def _observe(self, request: web.Request, status: int, started: float) -> None:
        self.observe_request(
            route_of(request), request.method, status, time.perf_counter() - started
        )


def route_of(request: web.Request) -> str:
    """The matched resource's canonical path ("/v1/snapshots"), or "unmatched"."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def metrics_handler(metrics: Metrics) -> Handler:
    """A ``GET /metrics`` handler serving ``metrics``."""

    async def handle_metrics(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle_metrics


# --- the optional loopback TCP endpoint ----------------------------------------------------

_LISTEN = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<v4>[^:\[\]]*)):(?P<port>[0-9]{1,5})")


def parse_listen(value: Any) -> tuple[str, int]:
    """``"127.0.0.1:9465"`` or ``"[::1]:9465"`` -> (host, port). Raises ValueError with a
    phrase completing ``"metrics.listen: ..."``; any address but a loopback one is refused,
    since the endpoint has no authentication."""
    hint = 'use a loopback address and a port, such as "127.0.0.1:9465" or "[::1]:9465"'
    match = _LISTEN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"invalid value {value!r} ({hint})")
    host = match["v6"] if match["v6"] is not None else match["v4"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"invalid value {value!r}: {host!r} is not an IP address ({hint})"
        ) from None
    if match["v6"] is not None and address.version != 6:
        raise ValueError(f"invalid value {value!r}: brackets are for IPv6 addresses ({hint})")
    if not address.is_loopback:
        raise ValueError(
            f"invalid value {value!r}: {host} is not a loopback address and the metrics "
            f"endpoint is unauthenticated ({hint})"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid value {value!r}: port {port} is out of range 1-65535")
    return str(address), port


async def start_metrics_site(metrics: Metrics, listen: str) -> web.AppRunner:
    """Serve only ``GET /metrics`` on the loopback address ``listen``; the caller cleans up the
    returned runner. ValueError names ``metrics.listen``; OSError when the port is taken."""
    try:
        host, port = parse_listen(listen)
    except ValueError as error:
        raise ValueError(f"metrics.listen: {error}") from None
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(metrics))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


# --- collectors ----------------------------------------------------------------------------


class _StateCollector:
    """The state gauges, read from the daemon at each scrape, and the last eviction's time."""

    def __init__(self, read_state: StateReader | None) -> None:
        self.read_state = read_state
        self.last_eviction: float | None = None
        self.failures = 0  # scrapes whose read_state raised
        self._failing = False

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with the state; nothing to reserve in our private registry

    def collect(self) -> Iterator[Metric]:
        if self.last_eviction is not None:
            yield GaugeMetricFamily(
                PREFIX + "last_eviction_timestamp_seconds",
                "When the last eviction run finished, in seconds since the epoch.",
                value=self.last_eviction,
            )
        state = self._read()
        yield CounterMetricFamily(
            PREFIX + "state_read_failures",
            "Scrapes whose state gauges could not be read (see the agent's log).",
            value=self.failures,
        )
        if state is not None:
            yield from _state_families(state)

    def _read(self) -> StateGauges | None:
        if self.read_state is None:
            return None
        try:
            state = self.read_state()
        except Exception:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.exception("metrics: cannot read the state gauges; serving the others")
            return None
        if self._failing:
            self._failing = False
            log.info("metrics: the state gauges can be read again")
        return state


def _state_families(state: StateGauges) -> Iterator[Metric]:
    snapshots = GaugeMetricFamily(
        PREFIX + "snapshots", "Snapshots the agent holds, by project.", labels=["project"]
    )
    virtual = GaugeMetricFamily(
        PREFIX + "snapshot_virtual_bytes",
        "Sum of Docker's Size over a project's images (shared layers counted per image).",
        labels=["project"],
    )
    unique = GaugeMetricFamily(
        PREFIX + "snapshot_unique_bytes",
        "Bytes only a project's images hold (what removing them all would free).",
        labels=["project"],
    )
    for project, gauges in sorted(state.projects.items()):
        snapshots.add_metric([project], gauges.snapshots)
        virtual.add_metric([project], gauges.virtual_bytes)
        unique.add_metric([project], gauges.unique_bytes)
    yield from (snapshots, virtual, unique)
    yield GaugeMetricFamily(
        PREFIX + "pending_removals",
        "Images chosen for removal that Docker has not yet confirmed gone.",
        value=state.pending_removal,
    )
    yield GaugeMetricFamily(
        PREFIX + "leases", "Snapshots currently leased (kept from eviction).", value=state.leases
    )
    yield GaugeMetricFamily(
        PREFIX + "docker_up",
        "1 when Docker answered the agent's last call.",
        value=int(state.docker_up),
    )
    yield GaugeMetricFamily(
        PREFIX + "events_connected",
        "1 while the agent follows Docker's event stream.",
        value=int(state.events_connected),
    )
    disk = state.disk
    if disk is None:
        return
    for name, value, meaning in (
        ("disk_total_bytes", disk.total_bytes, "Size of the file system of Docker's data root"),
        ("disk_free_bytes", disk.free_bytes, "Free space on that file system (df's Avail)"),
        (
            "disk_high_threshold_bytes",
            disk.high_free_bytes,
            "Free space below which eviction starts (the high watermark)",
        ),
        (
            "disk_low_threshold_bytes",
            disk.low_free_bytes,
            "Free space at which eviction stops again (the low watermark)",
        ),
    ):
        family = GaugeMetricFamily(PREFIX + name, meaning + ".", labels=["path"])
        family.add_metric([disk.path], value)
        yield family


class _WithoutCreated:
    """The registry's metrics without their ``_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric
