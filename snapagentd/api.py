"""HTTP/JSON handlers: validate the request, call the registry or evictor, shape the answer.

Every error leaves as `{"error": {"code", "message"}}` with a stable code (see errors.py),
including aiohttp's own 404/405/413, so clients never have to parse HTML.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from aiohttp import web

from . import __version__, telemetry
from .config import MAX_DURATION_SECONDS, Settings
from .connections import ConnectionShed
from .docker_ops import DockerError, DockerUnavailable
from .errors import (
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    DockerFailed,
    DockerUnreachable,
    Fault,
    ImageNotManaged,
    InternalError,
    InvalidField,
    InvalidJson,
    MethodNotAllowed,
    RouteNotFound,
    SnapshotNotFound,
    TooManyConnections,
)
from .evictor import Evictor, Explained
from .models import (
    Reason,
    RemovalResult,
    Snapshot,
    Victim,
    normalise_reference,
    utcnow,
)
from .ownership import engine_status
from .registry import Registry
from .state import Lease

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
BODY_SECONDS = 10  # a body still arriving this long after its headers is refused (408)
MAX_NAME_CHARS = 1024  # project and work item
# A lease bridges a lookup and a container create: minutes. A day is a bug in the router.
MAX_LEASE_SECONDS = 24 * 3600
# Docker's reference grammar: [host[:port]/]component(/component)*[:tag], lower-case names.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_HOST = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
_REFERENCE = re.compile(
    rf"(?:{_HOST}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?",
    re.ASCII,  # Docker's grammar is ASCII; Python's \w alone would take any letter
)
# Control characters, and lone surrogates (valid JSON escapes that UTF-8 cannot store).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass
class Services:
    """What the handlers work with; filled in by the daemon's start-up contexts."""

    settings: Settings
    registry: Registry
    evictor: Evictor
    # Set by the daemon once its event follower and metrics exist (None in bare test apps).
    events: Any = None
    metrics: Any = None
    status_cache: StatusCache = field(default_factory=lambda: StatusCache())  # for GET /v1/status


SERVICES: Any = web.AppKey("services", Services) if hasattr(web, "AppKey") else "services"


# --- request parsing ------------------------------------------------------------------------


async def read_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """The JSON object in the body; an empty body is an empty object.

    The body must arrive within BODY_SECONDS: one trickled byte by byte would otherwise hold
    its connection, and a place under the connection cap, for as long as its sender likes."""
    try:
        if request.content.is_eof():  # all of it is here (nearly always): no timer needed
            body = await request.read()  # raises 413 over client_max_size (MAX_BODY_BYTES + 1)
        else:
            async with asyncio.timeout(BODY_SECONDS):
                body = await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {BODY_SECONDS} s") from None
    except ConnectionShed as error:  # the guard gave its place away and answered it
        raise TooManyConnections(str(error)) from None
    except OSError:  # aiohttp fails the read with the reason the connection was lost
        raise ClientDisconnected("client disconnected before sending its whole body") from None
    if len(body) > MAX_BODY_BYTES:  # aiohttp < 3.9 already refuses exactly client_max_size
        raise BodyTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # also deep nesting and >4300-digit ints
        raise InvalidJson(f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidJson("request body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidField(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return data


def name_field(data: dict[str, Any], field: str) -> str:
    """A project or work item: a non-empty string, at most 1024 characters, no control codes."""
    value = data.get(field)
    if value is None:
        raise InvalidField(f"field {field!r} is required")
    if not isinstance(value, str):
        raise InvalidField(f"field {field!r} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidField(f"field {field!r} must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidField(f"field {field!r} is longer than {MAX_NAME_CHARS} characters")
    if _CONTROL.search(value):
        raise InvalidField(f"field {field!r} must not contain control characters or surrogates")
    return value


def optional_count(data: dict[str, Any], field: str) -> int | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise InvalidField(f"field {field!r} must be a non-negative integer, got {value!r}")
    return value


def lease_seconds(data: dict[str, Any], field: str) -> int | None:
    value = optional_count(data, field)
    if value is not None and not 1 <= value <= MAX_LEASE_SECONDS:
        raise InvalidField(
            f"field {field!r} must be between 1 and {MAX_LEASE_SECONDS} seconds, got {value}"
        )
    return value


def image_field(data: dict[str, Any]) -> str:
    value = data.get("image")
    if not isinstance(value, str) or not value:
        raise InvalidField("field 'image' is required and must be a non-empty string")
    shown = value if len(value) <= 80 else value[:80] + "..."  # never echo 10 KB back
    if "@" in value or value.startswith("sha256:"):
        raise ImageNotManaged(
            f"image {shown!r} is a digest or id; register the repository:tag it was committed to"
        )
    if len(value) > 255 or not _REFERENCE.fullmatch(value):
        raise InvalidField(f"field 'image' is not a valid Docker reference: {shown!r}")
    return normalise_reference(value)  # the registry decides whether it is managed


def query_name(request: web.Request, field: str) -> str:
    return name_field(dict(request.query), field)


# --- answers --------------------------------------------------------------------------------


def snapshot_json(services: Services, snapshot: Snapshot) -> dict[str, Any]:
    """An entry as clients see it: its record plus the bytes only its image holds."""
    unique = services.evictor.unique_of(snapshot.image_id)
    return {**snapshot.to_json(), "unique_bytes": unique}


def lease_json(lease: Lease) -> dict[str, Any]:
    return lease.to_json()


# --- handlers -------------------------------------------------------------------------------


async def register(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    data = await read_object(request, {"project", "work_item", "image", "size_bytes"})
    project, work_item = name_field(data, "project"), name_field(data, "work_item")
    image = image_field(data)
    size = optional_count(data, "size_bytes")
    registration = await services.registry.register(project, work_item, image, size)
    services.evictor.removals.remove_soon(registration.retired)
    services.evictor.check_disk_soon()  # a new snapshot may have pushed the disk over
    status = 201 if registration.created else 200
    return web.json_response(
        {"snapshot": snapshot_json(services, registration.snapshot)}, status=status
    )


async def lookup(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    data = await read_object(request, {"project", "work_item", "ttl_seconds", "lease_seconds"})
    key = (name_field(data, "project"), name_field(data, "work_item"))
    ttl_seconds = optional_count(data, "ttl_seconds")
    hold = lease_seconds(data, "lease_seconds")
    if ttl_seconds is None:
        ttl_seconds = services.evictor.policy.limits_for(key[0]).ttl_seconds
    # Longer than the longest configurable TTL means "never expires" (and stays in range).
    ttl = timedelta(seconds=min(ttl_seconds, MAX_DURATION_SECONDS))
    found = await services.registry.lookup(key, ttl)
    services.evictor.removals.remove_soon(found.retired)
    if found.snapshot is None:
        raise SnapshotNotFound(
            f"no snapshot for project {key[0]!r}, work item {key[1]!r}: {found.why_missing}"
        )
    answer = {"snapshot": snapshot_json(services, found.snapshot), "confirmed": found.confirmed}
    if hold is not None:  # lookup and lease in one step: no eviction can slip in between
        answer["lease"] = lease_json(await services.registry.lease(key, hold))
    return web.json_response(answer)


async def create_lease(request: web.Request) -> web.Response:
    """Protect a snapshot's image from every eviction until the lease ends or is released."""
    services = request.app[SERVICES]
    data = await read_object(request, {"project", "work_item", "seconds"})
    key = (name_field(data, "project"), name_field(data, "work_item"))
    seconds = lease_seconds(data, "seconds")
    if seconds is None:
        raise InvalidField("field 'seconds' is required")
    lease = await services.registry.lease(key, seconds)
    return web.json_response({"lease": lease_json(lease)}, status=201)


async def release_lease(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    lease_id = request.query.get("id", "")
    if not lease_id or len(lease_id) > 64 or _CONTROL.search(lease_id):
        raise InvalidField("query parameter 'id' is required: the lease's id")
    lease = await services.registry.release(lease_id)
    return web.json_response({"lease": lease_json(lease), "released": True})


async def list_snapshots(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    project = request.query.get("project")
    if project:  # "" selects the discovered entries, whose project is empty
        project = query_name(request, "project")
    snapshots = services.registry.list(project)
    return web.json_response({"snapshots": [snapshot_json(services, s) for s in snapshots]})


async def delete_snapshot(request: web.Request) -> web.Response:
    """Invalidate an entry and remove its image now; an unconfirmed removal is retried later."""
    services = request.app[SERVICES]
    key = (query_name(request, "project"), query_name(request, "work_item"))
    snapshot = services.registry.get(key)
    if snapshot is None:
        raise SnapshotNotFound(f"no snapshot for project {key[0]!r}, work item {key[1]!r}")
    retired = await services.registry.retire([Victim(snapshot, Reason.INVALIDATED)])
    result, detail = RemovalResult.KEPT, ""  # another entry still holds this tag and image
    if retired:
        outcome = (await services.evictor.removals.remove(retired))[0]
        result, detail = outcome.result, outcome.detail
    return web.json_response(
        {
            "snapshot": snapshot_json(services, snapshot),
            "result": result.value,
            "detail": detail or None,
        }
    )


async def evict(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    data = await read_object(request, {"dry_run"})
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidField(f"field 'dry_run' must be true or false, got {dry_run!r}")
    if dry_run:
        return web.json_response(explanation(await services.evictor.explain()))
    outcomes = await services.evictor.run("api")
    return web.json_response(
        {"dry_run": False, "evicted": [outcome.to_json() for outcome in outcomes]}
    )


def explanation(explained: Explained) -> dict[str, Any]:
    """A dry run, in eviction order: each candidate with its reason, age, last use and unique
    bytes, then the pending removals, and what protects each snapshot a rule passed over."""
    now = utcnow()

    def facts(snapshot: Snapshot) -> dict[str, Any]:
        return {
            **snapshot.to_json(),
            "unique_bytes": explained.unique_bytes.get(snapshot.image_id),
            "age_seconds": int((now - snapshot.created_at).total_seconds()),
            "idle_seconds": int((now - snapshot.last_activity).total_seconds()),
        }

    planned = [
        {**facts(v.snapshot), "reason": v.reason.value, "result": RemovalResult.PLANNED.value}
        for v in explained.plan.victims
    ]
    for pending in explained.pending:
        blocked = (
            RemovalResult.LEASED
            if pending.snapshot.image_id in explained.leased_ids
            else RemovalResult.IN_USE
            if pending.snapshot.image_id in explained.in_use_ids
            else RemovalResult.PLANNED
        )
        planned.append(
            {**facts(pending.snapshot), "reason": pending.reason.value, "result": blocked.value}
        )
    skipped = [
        {**facts(s.snapshot), "reason": s.reason.value, "protected_by": s.protection.value}
        for s in explained.plan.skipped
    ]
    return {
        "dry_run": True,
        "evicted": planned,
        "skipped": skipped,
        "disk_bytes_to_free": explained.bytes_to_free,
    }


async def status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = services.status_cache.body(services)
    return web.Response(body=body, content_type="application/json", charset="utf-8")


@dataclass
class StatusCache:
    """The encoded status document, rebuilt only when something it shows has changed.

    Monitoring polls status far more often than the state changes, and building and encoding
    the document was most of a status request's cost. Everything the document shows is in
    the key, except lease expiry (time alone ends a lease): the key's clock second bounds
    that staleness to one second.
    """

    key: tuple[Any, ...] | None = None
    encoded: bytes = b""

    def body(self, services: Services) -> bytes:
        registry, evictor, docker = services.registry, services.evictor, services.registry.docker
        events = services.events
        key = (
            registry.state.version,
            registry.journal.records,
            docker.reachable,
            docker.error,
            None if events is None else (events.connected, events.reconnects),
            evictor.disk.last,
            evictor.policy,
            evictor.last_report,
            evictor.last_report.finished_at if evictor.last_report else None,
            evictor.managed_unique,
            int(time.monotonic()),
        )
        if key != self.key:
            self.encoded = json.dumps(status_document(services)).encode()
            self.key = key
        return self.encoded


def status_document(services: Services) -> dict[str, Any]:
    registry, evictor, docker = services.registry, services.evictor, services.registry.docker
    state = registry.state
    events = services.events
    now = utcnow()
    disk = evictor.disk.last
    return {
        "version": __version__,
        "docker": {
            "reachable": docker.reachable,
            "error": docker.error,
            "url": docker.url,
            "events": None
            if events is None
            else {"connected": events.connected, "reconnects": events.reconnects},
        },
        "snapshots": {
            "count": len(state.entries),
            "total_size_bytes": state.total_size_bytes(),
            "unique_bytes": evictor.managed_unique_bytes(),
            "pending_removal": len(state.pending),
            "leases": sum(1 for lease in state.leases.values() if lease.expires_at > now),
        },
        "disk": None if disk is None else disk.to_json(),
        "policy": evictor.policy.to_json(),
        "last_eviction": evictor.last_report.to_json() if evictor.last_report else None,
        "journal": {"path": str(registry.journal.path), "records": registry.journal.records},
        "engine": engine_status(state),
    }


# --- errors ---------------------------------------------------------------------------------


def error_response(fault: Fault, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": fault.code, "message": fault.message}}
    return web.json_response(body, status=fault.status, headers=headers)


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except BodyTimeout as fault:
        # Answer now and close: aiohttp would go on reading (lingering) the rest of a body
        # that is not coming for up to 10 s more, holding the connection and its place.
        response = error_response(fault)
        response.force_close()
        with contextlib.suppress(ConnectionError):  # it hung up meanwhile: nobody to tell
            await response.prepare(request)
            await response.write_eof()
        request.protocol.force_close()
        return response
    except Fault as fault:
        return error_response(fault)
    except ClientDisconnected as gone:  # one line, no traceback: the client's doing
        log.info("%s %s: %s", request.method, request.path, gone)
        return web.Response(status=499)  # nginx's "client closed request", for the metrics
    except DockerUnavailable as error:
        return error_response(DockerUnreachable(f"Docker is not reachable: {error}"))
    except DockerError as error:
        return error_response(DockerFailed(f"Docker answered with an error: {error.message}"))
    except web.HTTPNotFound:
        return error_response(RouteNotFound(f"no route for {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed as error:
        allowed = ", ".join(sorted(error.allowed_methods))
        fault = MethodNotAllowed(
            f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
        )
        return error_response(fault, headers={"Allow": allowed})
    except web.HTTPRequestEntityTooLarge:
        return error_response(BodyTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes"))
    except web.HTTPException:
        raise
    except Exception as error:
        log.exception("unexpected error in %s %s", request.method, request.path)
        telemetry.capture_exception(error)
        return error_response(InternalError(f"internal error: {type(error).__name__}"))


@web.middleware
async def close_after_an_unread_body(request: web.Request, handler: Any) -> web.StreamResponse:
    """Read and discard the rest of a request body the route did not read, then answer and
    close the connection. A body on GET /v1/status is pointless anyway.

    Read first: a client sends its whole request before it reads the answer, so an answer
    too large for the socket buffers (a long list) would wait for the client to read it while
    the client waits for us to read its body, for ever. A body still arriving BODY_SECONDS
    after the answer is ready gets none: the connection is closed. Close after: aiohttp 3.8
    (Debian 12's) stops reading a connection once an unread body fills its 64 KiB buffer and
    never starts again, so the client's next request on it would wait out the keep-alive
    timeout."""
    response = await handler(request)
    if request.body_exists and not request.content.at_eof():
        response.force_close()
        try:
            async with asyncio.timeout(BODY_SECONDS):
                while await request.content.readany():
                    pass
        except Exception:  # still arriving at the deadline, or the client is gone
            request.protocol.force_close()
    return response


def create_app() -> web.Application:
    """The application without its services; the daemon adds them via cleanup contexts."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES + 1,
        middlewares=[close_after_an_unread_body, errors_as_json],
    )
    app.router.add_post("/v1/snapshots", register)
    app.router.add_post("/v1/snapshots/lookup", lookup)
    app.router.add_post("/v1/snapshots/lease", create_lease)
    app.router.add_delete("/v1/snapshots/lease", release_lease)
    app.router.add_get("/v1/snapshots", list_snapshots)
    app.router.add_delete("/v1/snapshots", delete_snapshot)
    app.router.add_post("/v1/evict", evict)
    app.router.add_get("/v1/status", status)
    return app
