"""Wiring and lifecycle: start-up in order, READY only when serving, clean stop on SIGTERM.

Two aiohttp cleanup contexts hold the resources: the services (journal, Docker client, registry,
evictor) and the background tasks (timer, Docker watch, watchdog). Each is released if and only
if it was set up, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import stat
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from . import telemetry
from .access import group_ids, peer_screen
from .api import SERVICES, Services, create_app, status_document
from .config import ConfigError, Settings, load_settings
from .connections import ConnectionGuard
from .docker_ops import DockerGateway
from .engine_owner import EngineOwner, OwnershipRefused
from .events import ContainerUse, EventFollower, ImageChange
from .evictor import Evictor
from .journal import Journal, JournalUnavailable
from .metrics import (
    DiskGauges,
    Metrics,
    ProjectGauges,
    StateGauges,
    metrics_handler,
    start_metrics_site,
)
from .models import utcnow
from .notify import Notifier
from .paths import UntrustedDirectory, check_trusted_directory
from .registry import Registry
from .state import RegistryState

log = logging.getLogger(__name__)

DOCKER_RETRY_SECONDS = 5  # while the engine is unreachable
DOCKER_HEALTH_SECONDS = 30  # while it answers
SHUTDOWN_TIMEOUT_SECONDS = 30  # in-flight requests get this long to finish on SIGTERM
MAX_CONNECTIONS = 256  # open API connections; more get 503 too-many-connections
FIRST_REQUEST_SECONDS = 10  # a new connection must have sent a request's headers by then
# At the cap, a newcomer takes the place of a connection stuck longer than this in reading a
# request (headers or body incomplete); a body's own deadline is api.BODY_SECONDS.
SHED_AFTER_SECONDS = 1
KEEPALIVE_SECONDS = 30  # an idle keep-alive connection is closed after this long
# The request line and each header: two 1024-character names percent-encode to about 25 KB
# in a DELETE's query line (aiohttp's default, 8190 bytes, would refuse valid keys).
MAX_LINE_BYTES = 32 * 1024


class StartupError(Exception):
    """The daemon cannot start (bad journal, socket in use, ...); the message says why."""


def status_line(services: Services) -> str:
    """The one-line STATUS= for systemctl status: entries, bytes, Docker's state."""
    status = status_document(services)
    snapshots, docker = status["snapshots"], status["docker"]
    gib = snapshots["total_size_bytes"] / 1024**3
    state = "docker ok" if docker["reachable"] else f"docker unreachable ({docker['error']})"
    return (
        f"{snapshots['count']} snapshots, {gib:.2f} GiB, "
        f"{snapshots['pending_removal']} pending removal; {state}"
    )[:200]


def build_app(
    settings: Settings,
    notifier: Notifier,
    guard: ConnectionGuard | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The API with its services. Peers are checked by `guard`'s screen, so the daemon always
    serves the app through one (tests that build it bare serve it to themselves only)."""
    app = create_app()
    metrics = metrics if metrics is not None else Metrics()
    app.middlewares.insert(0, metrics.middleware())  # outside errors_as_json: final statuses
    app.router.add_get("/metrics", metrics_handler(metrics))  # behind the guard, as the API
    if guard is not None:
        app.middlewares.insert(0, guard.middleware())  # first: every request disarms it

    async def services_context(app: web.Application) -> AsyncIterator[None]:
        state = RegistryState()
        journal = Journal(settings.journal.path, state)
        journal.on_fsync = metrics.observe_fsync
        try:
            journal.load()
            journal.compact_now()
        except Exception as error:
            await journal.close()
            raise StartupError(str(error)) from None
        docker = DockerGateway(settings.docker)
        registry = Registry(state, journal, docker)
        evictor = Evictor(
            registry,
            docker,
            settings.policy,
            dangling_label=settings.docker.dangling_label,
            data_root=settings.docker.data_root,
        )
        services = Services(settings, registry, evictor)
        services.metrics = evictor.metrics = evictor.removals.metrics = metrics
        evictor.on_report = lambda report: note_eviction(metrics, report)
        metrics.set_state_reader(lambda: state_gauges(services))
        app[SERVICES] = services
        # One agent per engine, and the journal's image ids this engine's: before any reconcile.
        owner = EngineOwner(state, journal, docker, settings)
        evictor.ownership = evictor.removals.ownership = owner
        try:
            await evictor.ownership.start()
        except (OwnershipRefused, JournalUnavailable) as error:
            await journal.close()
            docker.close()
            raise StartupError(str(error)) from None
        # Reconcile with Docker and apply the policy once, before serving anyone.
        await evictor.run_quietly("start")
        try:
            yield
        finally:
            await evictor.close()
            await journal.close()
            docker.close()

    async def background_context(app: web.Application) -> AsyncIterator[None]:
        services = app[SERVICES]
        follower = services.events = follow_events(services)
        tasks = [
            asyncio.ensure_future(follower.run()),
            asyncio.ensure_future(services.evictor.run_periodically()),
            asyncio.ensure_future(services.evictor.watch_disk()),
            asyncio.ensure_future(services.evictor.measure_after_start()),
            asyncio.ensure_future(watch_docker(services, notifier)),
        ]
        interval = notifier.watchdog_interval()
        if interval is not None:
            tasks.append(asyncio.ensure_future(notifier.ping_watchdog(interval)))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.extend([services_context, background_context])
    return app


def follow_events(services: Services) -> EventFollower:
    """The engine's event stream, feeding last use and keeping lookups' confirmations current;
    a reconnect reconciles what it missed."""
    registry, evictor = services.registry, services.evictor
    recording: set[asyncio.Task[None]] = set()

    async def record(use: ContainerUse) -> None:
        try:
            await registry.note_use(use.image, use.at)
        except Exception as error:  # a failed touch only loses one last-use time
            log.warning("could not record the use of %s: %s", use.image, error)

    def on_use(use: ContainerUse) -> None:
        task = asyncio.ensure_future(record(use))
        recording.add(task)
        task.add_done_callback(recording.discard)

    async def on_connected(first: bool) -> None:
        registry.confirmations.follow(True)
        if not first:  # the start-up run already reconciled for the first connection
            await evictor.run_quietly("events-reconnected")

    def on_image_change(change: ImageChange) -> None:
        registry.confirmations.image_changed(change.action, change.image_id)

    def on_disconnected() -> None:
        registry.confirmations.follow(False)

    return EventFollower(
        services.settings.docker.url, on_use, on_connected, on_image_change, on_disconnected
    )


def note_eviction(metrics: Metrics, report: Any) -> None:
    """A run finished: its time is the last eviction's when it ran to the end."""
    if report.error is None and report.finished_at is not None:
        metrics.set_last_eviction(report.finished_at)


def state_gauges(services: Services) -> StateGauges:
    """The metrics' state gauges, from the daemon's memory (at each scrape: keep it cheap)."""
    state, evictor = services.registry.state, services.evictor
    counts = Counter(snapshot.project for snapshot in state.entries.values())
    sizes: dict[str, dict[str, int]] = {}  # project -> image id -> Docker's Size
    for snapshot in state.entries.values():
        sizes.setdefault(snapshot.project, {})[snapshot.image_id] = snapshot.size_bytes or 0
    projects = {
        project: ProjectGauges(
            snapshots=counts[project],
            virtual_bytes=sum(by_id.values()),
            unique_bytes=evictor.layers.reclaimable_bytes(by_id),
        )
        for project, by_id in sizes.items()
    }
    reading = evictor.disk.last
    measured = reading.pressure if reading is not None else None
    disk = None
    if reading is not None and measured is not None:
        disk = DiskGauges(
            path=reading.path,
            total_bytes=measured.usage.total_bytes,
            free_bytes=measured.usage.free_bytes,
            high_free_bytes=measured.high_free_bytes,
            low_free_bytes=measured.low_free_bytes,
        )
    now = utcnow()
    return StateGauges(
        projects=projects,
        pending_removal=len(state.pending),
        leases=sum(1 for lease in state.leases.values() if lease.expires_at > now),
        docker_up=services.registry.docker.reachable,
        events_connected=bool(getattr(services.events, "connected", False)),
        disk=disk,
    )


async def watch_docker(services: Services, notifier: Notifier) -> None:
    """Keep Docker's state fresh; reconcile and evict once it answers after an outage.

    Any Docker call that finds the engine gone (or back) wakes this loop at once and updates
    STATUS=, so the retry pace switches to DOCKER_RETRY_SECONDS without waiting for a ping.
    """
    docker, evictor = services.registry.docker, services.evictor
    changed = asyncio.Event()

    def on_change(reachable: bool) -> None:
        notifier.status(status_line(services))
        changed.set()

    docker.on_change = on_change
    while True:
        pace = DOCKER_HEALTH_SECONDS if docker.reachable else DOCKER_RETRY_SECONDS
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), pace)
        changed.clear()
        if await docker.ping():
            last = evictor.last_report
            if last is None or last.error is not None:
                await evictor.run_quietly("docker-returned")
        notifier.status(status_line(services))


# --- the listening socket -------------------------------------------------------------------


def socket_from_systemd() -> socket.socket | None:
    """The socket systemd passed us (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    sock = socket.socket(fileno=3)
    sock.setblocking(False)
    return sock


def bind_unix_socket(path: Path, mode: int, group: str) -> socket.socket:
    """Bind the API socket with its mode and group, refusing to steal a live one."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        check_trusted_directory(path.parent)
    except UntrustedDirectory as error:
        raise StartupError(f"api.socket: {error}; refusing to put the socket there") from None
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.lstat().st_mode)):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens
        else:
            raise StartupError(f"another process is already serving {path}")
        finally:
            probe.close()
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"api.socket_group: no such group {group!r}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never briefly wider than owner-only
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if gid != -1:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


# --- main loop ------------------------------------------------------------------------------


# aiohttp >= 3.9 takes shutdown_timeout on the runner; 3.8 (Debian 12) on the site.
_TIMEOUT_ON_RUNNER = tuple(int(p) for p in aiohttp.__version__.split(".")[:2]) >= (3, 9)


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner with the daemon's HTTP limits and timeouts (tests serve the app with it too)."""
    options: dict[str, Any] = {
        "access_log": None,
        "keepalive_timeout": KEEPALIVE_SECONDS,
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_LINE_BYTES,
    }
    if _TIMEOUT_ON_RUNNER:
        options["shutdown_timeout"] = SHUTDOWN_TIMEOUT_SECONDS
    return web.AppRunner(app, **options)


class GuardedSockSite(web.SockSite):
    """A SockSite whose connections pass through a ConnectionGuard.

    It replaces SockSite.start, which is three lines; it relies on SockSite's attributes
    _runner, _sock, _backlog and _server, the same in aiohttp 3.8 to 3.14 (tested on both).
    """

    def __init__(
        self, runner: web.AppRunner, sock: socket.socket, guard: ConnectionGuard, **options: Any
    ) -> None:
        super().__init__(runner, sock, **options)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.wrap(server), sock=self._sock, backlog=self._backlog
        )


def _site(runner: web.AppRunner, sock: socket.socket, guard: ConnectionGuard) -> web.SockSite:
    if _TIMEOUT_ON_RUNNER:
        return GuardedSockSite(runner, sock, guard)
    return GuardedSockSite(runner, sock, guard, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)


async def serve(settings: Settings, reload_settings: Callable[[], Settings]) -> None:
    """Run until SIGTERM/SIGINT. Raises StartupError when the daemon cannot start."""
    try:
        allowed_gids = group_ids(settings.api.allowed_groups)
    except KeyError as error:
        raise StartupError(f"api.allowed_groups: no such group {error.args[0]!r}") from None
    notifier = Notifier()
    telemetry.init(settings.sentry)
    notifier.status("starting: replaying the journal")
    # Bound first: routers that connect during start-up wait in the backlog instead of failing.
    sock = socket_from_systemd()
    bound_here = sock is None
    if sock is None:
        api = settings.api
        sock = bind_unix_socket(api.socket, api.socket_mode, api.socket_group)
    guard = ConnectionGuard(
        MAX_CONNECTIONS,
        FIRST_REQUEST_SECONDS,
        peer_screen(allowed_gids),
        shed_after=SHED_AFTER_SECONDS,
    )
    metrics = Metrics()
    app = build_app(settings, notifier, guard, metrics)
    runner = make_runner(app)
    metrics_runner: web.AppRunner | None = None
    try:
        await runner.setup()  # journal replay, Docker reconcile, first eviction
        await _site(runner, sock, guard).start()
        if settings.metrics.listen:
            try:
                metrics_runner = await start_metrics_site(metrics, settings.metrics.listen)
            except OSError as error:
                raise StartupError(
                    f"metrics.listen: cannot listen on {settings.metrics.listen!r}: "
                    f"{error.strerror or error}"
                ) from None
            log.info("metrics on http://%s/metrics", settings.metrics.listen)
        services: Services = app[SERVICES]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: reload_policy(services, reload_settings, notifier)
        )
        origin = "bound here" if bound_here else "from systemd"
        log.info("listening on %s (%s)", sock.getsockname(), origin)
        notifier.ready(status_line(services))
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
        notifier.stopping()
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        sock.close()
        if bound_here:
            settings.api.socket.unlink(missing_ok=True)
        telemetry.flush()


def reload_policy(
    services: Services, reload_settings: Callable[[], Settings], notifier: Notifier
) -> None:
    """SIGHUP: re-read the configuration and apply the new policy; keep the old on errors."""
    notifier.reloading()
    try:
        settings = reload_settings()
    except ConfigError as error:
        log.error("reload: configuration rejected, keeping the current policy:\n%s", error)
    else:
        if settings.policy != services.evictor.policy:
            log.info("reload: policy is now %s", settings.policy.to_json())
        services.evictor.policy = settings.policy
        changed = [
            name
            for name in ("api", "docker", "journal", "sentry", "metrics")
            if getattr(settings, name) != getattr(services.settings, name)
        ]
        if changed:
            log.warning(
                "reload: changes to [%s] take effect only after a restart", "], [".join(changed)
            )
    notifier.ready(status_line(services))


def run(config_path: Path) -> int:
    """Load the configuration and serve; returns the process exit code."""
    try:
        settings = load_settings(config_path)
    except ConfigError as error:
        log.error("configuration error:\n%s", error)
        return 1
    try:
        asyncio.run(serve(settings, lambda: load_settings(config_path)))
    except StartupError as error:
        log.error("cannot start: %s", error)
        return 1
    return 0
