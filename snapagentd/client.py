"""Python client of snapagentd: typed calls over the agent's Unix-socket HTTP/JSON API.

Two flavours with the same methods and results: `Client` (blocking, standard library only, so
`snapagentctl` stays fast to start) and `AsyncClient` (asyncio, over aiohttp, which is imported
only when an `AsyncClient` is first used)::

    from snapagentd.client import Client, snapshot_tag

    agent = Client("/run/snapagentd/snapagentd.sock")
    found = agent.lookup("Proj Snap", "MNG_652/Worker Snapshot!")  # None: a cache miss
    image = found.image if found else "base-image:latest"
    ...  # run the worker from `image`, commit it to snapshot_tag(project, work_item)
    agent.register("Proj Snap", "MNG_652/Worker Snapshot!", snapshot_tag(...))

A router that starts a container from a found snapshot should take a lease with the lookup
(`lookup(..., lease_seconds=300)`), so that no eviction removes the image before its
`docker create`, and `release(found.lease.id)` once the container exists.

The wire contract is docs/api.md; contracts/ holds the examples this module is tested on. An
error answer raises the `SnapagentdError` subclass of its stable code (`ERRORS`), an agent
that cannot be reached raises `AgentUnreachable`, and an answer that breaks the contract
raises `ProtocolError`; all three are `ClientError`s. Fields the agent adds later are
ignored, and fields an older agent does not send yet read as None, so a client and an agent
of different versions still talk. This module imports nothing of the server, so it can be
copied into a router's code base as it is.
"""

from __future__ import annotations

import errno
import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_SOCKET",
    "ERRORS",
    "NO_RETRY",
    "AccessDeniedError",
    "AgentUnreachable",
    "AsyncClient",
    "BodyTimeoutError",
    "BodyTooLargeError",
    "Client",
    "ClientError",
    "Deletion",
    "DiskStatus",
    "DockerError",
    "DockerEvents",
    "DockerStatus",
    "DockerUnavailableError",
    "EngineStatus",
    "EvictedSnapshot",
    "Eviction",
    "FoundSnapshot",
    "ImageNotFoundError",
    "ImageNotManagedError",
    "InternalError",
    "InvalidFieldError",
    "InvalidJsonError",
    "JournalStatus",
    "JournalUnavailableError",
    "LastEviction",
    "Lease",
    "LeaseNotFoundError",
    "Limits",
    "MethodNotAllowedError",
    "NotFoundError",
    "Policy",
    "ProtocolError",
    "Registration",
    "Retry",
    "SkippedSnapshot",
    "SnapagentdError",
    "Snapshot",
    "SnapshotCounts",
    "SnapshotNotFoundError",
    "Status",
    "TooManyConnectionsError",
    "snapshot_tag",
    "to_json",
]

DEFAULT_SOCKET = "/run/snapagentd/snapagentd.sock"
DEFAULT_TIMEOUT = 30.0  # seconds; an eviction waits for Docker, everything else is quick
DEFAULT_PREFIX = "cascade-snapshot-"


# --- the naming rule --------------------------------------------------------------------------


def snapshot_tag(project: str, work_item: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The `repository:tag` a router commits a work item's snapshot to.

    The rule the agent's routers share (contracts/snapshot-tags.json): lower-case
    "<project>-<work item>", every run of characters other than a-z and 0-9 becomes one `-`,
    leading and trailing `-` go, the prefix goes in front and `:latest` behind:
    ("Proj Snap", "MNG_652/Worker Snapshot!")
        -> "cascade-snapshot-proj-snap-mng-652-worker-snapshot:latest"
    """
    slug = re.sub(r"[^a-z0-9]+", "-", f"{project}-{work_item}".lower()).strip("-")
    return f"{prefix}{slug}:latest"


# --- results ----------------------------------------------------------------------------------

Source = Literal["registered", "discovered"]
RemovalResult = Literal[
    "removed",  # Docker deleted the image: its bytes are free
    "untagged",  # only our tag came off: other references keep the image (frees nothing)
    "in-use",  # a container uses it: retried
    "has-children",  # images were committed or built on it: retried
    "referenced",  # it gained a reference since the agent looked: looked at again
    "already-gone",
    "failed",  # retried
    "kept",  # another entry holds it (DELETE), or it is someone's again (a run)
    "leased",  # a lease holds it back: retried once the lease ends
]
EvictionResult = Literal[
    "removed",
    "untagged",
    "in-use",
    "has-children",
    "referenced",
    "already-gone",
    "failed",
    "kept",
    "leased",
    "planned",  # a dry run's: it would be removed now
]
EvictionReason = Literal[
    "ttl", "count", "size", "disk", "superseded", "invalidated", "repointed", "leaked"
]
Protection = Literal["in-use", "leased", "min-age", "shared"]
Trigger = Literal[
    "start", "timer", "api", "docker-returned", "events-reconnected", "disk", "sizes-measured"
]
SizeAccounting = Literal["unique", "virtual"]

# Field metadata: `to_json` leaves the field out while it is None, for fields only some answers
# carry (a dry run's explanation, a lookup's lease), so the JSON is the answer as it was sent.
_SENT_ONLY_SOMETIMES = {"omit_if_none": True}
# A real run's outcomes carry the field (null included); a dry run's items never do.
_REAL_RUN_ONLY = {"omit_if_none_in_dry_run": True}


@dataclass(frozen=True, slots=True)
class Lease:
    """A promise that no eviction removes the image `image_id` before `expires_at` (unless
    released first); it protects the image the entry had when the lease was taken."""

    id: str  # pass it to `release`
    project: str
    work_item: str
    image_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One snapshot entry (docs/api.md, "The snapshot entry"); times are aware UTC datetimes."""

    project: str  # "" for a discovered entry
    work_item: str  # the image reference for a discovered entry
    image: str  # always repository:tag
    image_id: str  # sha256:...
    size_bytes: int | None  # Docker's Size (shared base layers included), or the router's
    created_at: datetime  # Docker's Created: the commit time, which the TTL counts from
    last_used_at: datetime | None  # the last successful lookup, or container made from it
    source: Source
    # Bytes only this image holds (about what removing it frees); None until the agent has
    # measured its layers, and from older agents that do not send it (in every answer, or in
    # the DELETE answer and a real eviction's outcomes).
    unique_bytes: int | None = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class FoundSnapshot(Snapshot):
    """What `lookup` found: the entry, now marked used, and the lease taken with it when the
    call gave `lease_seconds` (else None).

    `confirmed` is False when Docker did not answer within the agent's `lookup_timeout` (or
    cannot be reached) and the agent answered from its registry, unchecked: the image may be
    gone, so treat a failure to use it as a miss. None from an agent too old to say."""

    lease: Lease | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)
    confirmed: bool | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)


@dataclass(frozen=True, slots=True)
class EvictedSnapshot(Snapshot):
    """An entry an eviction run chose, why, and what became of its image. In a dry run also
    its age and idle time in seconds (None in a real run's outcomes). In a real run's outcomes
    `detail`: what Docker's refusal said ("running container 1d0b2ff5c018", "dependent child
    images", ...) or why the removal failed; None when there is nothing to add, in a dry run,
    and from older agents."""

    reason: EvictionReason
    result: EvictionResult
    detail: str | None = field(default=None, kw_only=True, metadata=_REAL_RUN_ONLY)
    age_seconds: int | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)
    idle_seconds: int | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)


@dataclass(frozen=True, slots=True)
class SkippedSnapshot(Snapshot):
    """An entry a rule of a dry run wanted (`reason`) but a protection kept (`protected_by`)."""

    reason: EvictionReason
    protected_by: Protection
    age_seconds: int
    idle_seconds: int  # since the last use, or since creation if never used


@dataclass(frozen=True, slots=True)
class Registration:
    """The answer to `register`: the entry, and whether the key is new (201) or not (200)."""

    snapshot: Snapshot
    created: bool


@dataclass(frozen=True, slots=True)
class Deletion:
    """The answer to `delete`: the invalidated entry and the outcome of removing its image, with
    `detail`: what Docker's refusal said ("running container 1d0b2ff5c018") or why the removal
    failed (None when there is nothing to add, and from older agents)."""

    snapshot: Snapshot
    result: RemovalResult
    detail: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Eviction:
    """The answer to `evict`. A real run: the outcome of each removal, in no set order. A dry
    run: what a run would remove now, in eviction order, then `skipped` (what a rule wanted but
    a protection kept) and `disk_bytes_to_free`; both are None for a real run."""

    dry_run: bool
    evicted: list[EvictedSnapshot]
    skipped: list[SkippedSnapshot] | None = field(
        default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES
    )
    disk_bytes_to_free: int | None = field(
        default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES
    )


@dataclass(frozen=True, slots=True)
class DockerEvents:
    """The agent's subscription to Docker's event stream."""

    connected: bool
    reconnects: int


@dataclass(frozen=True, slots=True)
class DockerStatus:
    reachable: bool
    error: str | None
    url: str
    events: DockerEvents | None = field(default=None, kw_only=True)  # None: not followed


@dataclass(frozen=True, slots=True)
class SnapshotCounts:
    count: int
    total_size_bytes: int  # Docker's Size summed (each image once): over-counts shared layers
    pending_removal: int
    # Bytes only the snapshots hold, as of the last eviction run (None before one measured).
    unique_bytes: int | None = field(default=None, kw_only=True)
    leases: int | None = field(default=None, kw_only=True)  # None: an agent without leases


@dataclass(frozen=True, slots=True)
class DiskStatus:
    """The file system of Docker's data root against the watermarks. When it could not be
    measured only `path` and `error` are set, and the rest is None."""

    path: str | None
    error: str | None
    total_bytes: int | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)
    free_bytes: int | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)
    used_ratio: float | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)
    high_free_bytes: int | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)
    low_free_bytes: int | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)
    above_high: bool | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one pool of snapshots: the global one or a project's."""

    ttl_seconds: int
    max_count: int
    max_size_bytes: int


@dataclass(frozen=True, slots=True)
class Policy:
    ttl_seconds: int
    max_count: int
    max_size_bytes: int
    interval_seconds: int
    min_age_seconds: int
    # Watermarks as configured ("85%", "20GiB") or "off"; None from an agent without them.
    disk_high: str | None = field(default=None, kw_only=True)
    disk_low: str | None = field(default=None, kw_only=True)
    disk_interval_seconds: int | None = field(default=None, kw_only=True)
    size_accounting: SizeAccounting | None = field(default=None, kw_only=True)
    projects: dict[str, Limits] = field(default_factory=dict, kw_only=True)

    def limits_for(self, project: str) -> Limits:
        """The limits `project`'s snapshots live under: its own, else the global ones (the
        TTL a lookup without `ttl_seconds` applies)."""
        own = self.projects.get(project)
        return own or Limits(self.ttl_seconds, self.max_count, self.max_size_bytes)


@dataclass(frozen=True, slots=True)
class LastEviction:
    started_at: datetime
    finished_at: datetime
    trigger: Trigger
    removed: int
    in_use: int
    already_gone: int
    failed: int
    error: str | None
    leased: int | None = field(default=None, kw_only=True)  # removals a lease held back
    reclaimed_bytes: int | None = field(default=None, kw_only=True)  # unique bytes removed
    # None from agents older than these counts:
    untagged: int | None = field(default=None, kw_only=True)  # only our tag came off
    has_children: int | None = field(default=None, kw_only=True)  # Docker refused: children
    referenced: int | None = field(default=None, kw_only=True)  # Docker refused: a new reference
    # References Docker removed that the agent had not chosen (docs/operations.md, Safety).
    wrong_removals: int | None = field(default=None, kw_only=True)
    odd_images: int | None = field(default=None, kw_only=True)  # unusable or future Created


@dataclass(frozen=True, slots=True)
class JournalStatus:
    path: str
    records: int


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """The Docker engine the agent's journal describes, and the agent's ownership marker."""

    id: str | None  # `docker info`'s ID; None until the agent has reached Docker once
    instance: str | None  # the agent's own instance id
    marker: str | None  # its marker volume's name, snapagentd-owner-<instance>


@dataclass(frozen=True, slots=True)
class Status:
    version: str
    docker: DockerStatus
    snapshots: SnapshotCounts
    policy: Policy
    last_eviction: LastEviction | None  # None before the first eviction run
    journal: JournalStatus
    disk: DiskStatus | None = field(default=None, kw_only=True)  # None: watermarks off
    # None from an agent older than ownership markers (it does not send `engine`).
    engine: EngineStatus | None = field(default=None, kw_only=True, metadata=_SENT_ONLY_SOMETIMES)


def format_time(moment: datetime) -> str:
    """The wire form of a time: RFC 3339 in UTC with microseconds and a Z."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_json(value: Any) -> Any:
    """The wire JSON form of a result (or a list of them), e.g. to log or cache it. A field an
    older agent did not send comes out as null; a `FoundSnapshot`'s `lease` and `confirmed`
    come out inside the entry (the answer has them beside the entry)."""
    return _wire(value, dry_run=False)


def _wire(value: Any, dry_run: bool) -> Any:
    """`to_json`; `dry_run`: inside a dry run's `Eviction`, whose items carry no `detail`."""
    if is_dataclass(value) and not isinstance(value, type):
        dry_run = value.dry_run if isinstance(value, Eviction) else dry_run
        wire = {}
        for f in fields(value):
            item = getattr(value, f.name)
            omit = f.metadata.get("omit_if_none") or (
                dry_run and f.metadata.get("omit_if_none_in_dry_run")
            )
            if not (item is None and omit):
                wire[f.name] = _wire(item, dry_run)
        return wire
    if isinstance(value, list):
        return [_wire(item, dry_run) for item in value]
    if isinstance(value, dict):
        return {key: _wire(item, dry_run) for key, item in value.items()}
    if isinstance(value, datetime):
        return format_time(value)
    return value


# --- errors -----------------------------------------------------------------------------------


class ClientError(Exception):
    """Anything this client raises: the agent's error answers, no answer, a broken answer."""


class AgentUnreachable(ClientError):
    """No HTTP answer: the socket is missing or refuses connections (the agent is not running
    or is restarting, after the configured retries), the connection broke, or it timed out.

    docs/api.md: carry on without snapshots.
    """

    def __init__(self, socket_path: str, reason: str) -> None:
        super().__init__(f"cannot reach snapagentd at {socket_path}: {reason}")
        self.socket_path = socket_path
        self.reason = reason


class ProtocolError(ClientError):
    """The agent answered, but not as the API promises (malformed HTTP, a body that is not a
    JSON object, an error answer without the `{"error": {"code", "message"}}` shape)."""

    def __init__(
        self, message: str, status: int | None = None, reason: str = "", body: bytes = b""
    ) -> None:
        super().__init__(message)
        self.status = status  # None when not even a status line arrived
        self.reason = reason
        self.body = body


class SnapagentdError(ClientError):
    """The agent answered with an error. `code` is stable (branch on it), `message` is for
    people. Each documented code has its subclass (`ERRORS`); a code this client does not
    know yet raises this class itself."""

    code: str = ""
    status: int = 0  # the documented HTTP status; an instance holds the one received

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        self.code = self.code if code is None else code
        self.status = self.status if status is None else status
        super().__init__(f"{self.code}: {message}")
        self.message = message


class InvalidJsonError(SnapagentdError):
    code, status = "invalid-json", 400


class InvalidFieldError(SnapagentdError):
    code, status = "invalid-field", 400


class ImageNotManagedError(SnapagentdError):
    code, status = "image-not-managed", 403


class AccessDeniedError(SnapagentdError):
    """The agent refuses this client's user: run as a member of an allowed group."""

    code, status = "access-denied", 403


class ImageNotFoundError(SnapagentdError):
    code, status = "image-not-found", 404


class SnapshotNotFoundError(SnapagentdError):
    code, status = "snapshot-not-found", 404


class LeaseNotFoundError(SnapagentdError):
    """No lease has this id: released already, or expired and dropped by an eviction run."""

    code, status = "lease-not-found", 404


class NotFoundError(SnapagentdError):
    """Unknown route: check the path and the /v1 prefix."""

    code, status = "not-found", 404


class MethodNotAllowedError(SnapagentdError):
    code, status = "method-not-allowed", 405


class BodyTimeoutError(SnapagentdError):
    """The request's body did not arrive within 10 s of its headers; the agent closed the
    connection. Send the body with the headers, at once."""

    code, status = "body-timeout", 408


class BodyTooLargeError(SnapagentdError):
    code, status = "body-too-large", 413


class DockerUnavailableError(SnapagentdError):
    """Docker cannot be reached; nothing changed. Retry later with back-off."""

    code, status = "docker-unavailable", 503


class DockerError(SnapagentdError):
    code, status = "docker-error", 502


class JournalUnavailableError(SnapagentdError):
    code, status = "journal-unavailable", 503


class InternalError(SnapagentdError):
    code, status = "internal-error", 500


class TooManyConnectionsError(SnapagentdError):
    """The agent has too many connections open: retry with back-off."""

    code, status = "too-many-connections", 503


ERRORS: dict[str, type[SnapagentdError]] = {
    cls.code: cls for cls in SnapagentdError.__subclasses__()
}


def error_from_answer(status: int, reason: str, body: bytes) -> ClientError:
    """The exception for a non-2xx answer: the class of its code, or ProtocolError."""
    try:
        error = json.loads(body)["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code = message = None
    if not isinstance(code, str) or not isinstance(message, str):
        return ProtocolError(
            f"HTTP {status} {reason} without an error code from snapagentd", status, reason, body
        )
    return ERRORS.get(code, SnapagentdError)(message, code=code, status=status)


# --- requests and answers, shared by both flavours --------------------------------------------


@dataclass(frozen=True, slots=True)
class Retry:
    """How to retry a connection the agent refused or whose socket is missing, as happens
    while it restarts. Only the connection is retried: no byte of the request was sent, so
    this is safe for every request. `attempts` counts all tries (1: never retry); the waits
    double from `initial_delay` up to `max_delay` (defaults: 0.1 + 0.2 + 0.4 + 0.8 s)."""

    attempts: int = 5
    initial_delay: float = 0.1
    max_delay: float = 1.0

    def delays(self) -> Iterator[float | None]:
        """The wait after each failed try; None after the last one (give up)."""
        delay = self.initial_delay
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_delay)
        yield None


DEFAULT_RETRY = Retry()
NO_RETRY = Retry(attempts=1)
_RETRY_ERRNOS = (errno.ECONNREFUSED, errno.ENOENT)  # agent restarting: nothing was sent


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str  # path and query, already percent-encoded
    body: bytes | None

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.body is not None:
            headers["Content-Type"] = "application/json"
        return headers


def _request(
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    json_body: Any = None,
    data: bytes | None = None,
) -> _Request:
    """Query parameters are percent-encoded as UTF-8 with %20 for a space, since the agent
    decodes them as form data, where a literal + would be a space (docs/api.md)."""
    target = path
    if query:
        target += "?" + urlencode(query, quote_via=quote)
    if data is None and json_body is not None:
        data = json.dumps(json_body).encode()
    return _Request(method, target, data)


def _decode(status: int, reason: str, body: bytes) -> dict[str, Any]:
    """The JSON object of a 2xx answer; the error of any other."""
    if not 200 <= status < 300:
        raise error_from_answer(status, reason, body)
    try:
        data = json.loads(body)
    except ValueError as error:
        raise ProtocolError(
            f"malformed answer from snapagentd: not JSON ({error})", status, reason, body
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(
            f"malformed answer from snapagentd: expected a JSON object, got {type(data).__name__}",
            status,
            reason,
            body,
        )
    return data


def _snapshot_key(project: str, work_item: str) -> dict[str, str]:
    return {"project": project, "work_item": work_item}


def _register_request(project: str, work_item: str, image: str, size_bytes: int | None) -> _Request:
    body: dict[str, Any] = {**_snapshot_key(project, work_item), "image": image}
    if size_bytes is not None:
        body["size_bytes"] = size_bytes
    return _request("POST", "/v1/snapshots", json_body=body)


def _lookup_request(
    project: str, work_item: str, ttl_seconds: int | None, lease_seconds: int | None = None
) -> _Request:
    body: dict[str, Any] = _snapshot_key(project, work_item)
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    if lease_seconds is not None:
        body["lease_seconds"] = lease_seconds
    return _request("POST", "/v1/snapshots/lookup", json_body=body)


def _lease_request(project: str, work_item: str, seconds: int) -> _Request:
    body = {**_snapshot_key(project, work_item), "seconds": seconds}
    return _request("POST", "/v1/snapshots/lease", json_body=body)


def _release_request(lease_id: str) -> _Request:
    return _request("DELETE", "/v1/snapshots/lease", query={"id": lease_id})


def _list_request(project: str | None) -> _Request:
    query = None if project is None else {"project": project}
    return _request("GET", "/v1/snapshots", query=query)


def _delete_request(project: str, work_item: str) -> _Request:
    return _request("DELETE", "/v1/snapshots", query=_snapshot_key(project, work_item))


def _evict_request(dry_run: bool) -> _Request:
    return _request("POST", "/v1/evict", json_body={"dry_run": dry_run})


_STATUS_REQUEST = _request("GET", "/v1/status")


# --- reading answers into results -------------------------------------------------------------

_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "number": (int, float),
    "bool": (bool,),
    "object": (dict,),  # a nested object, read field by field
    "list": (list,),
}
_ABSENT = object()


def _get(data: Any, key: str, kind: str, nullable: bool = False, default: Any = _ABSENT) -> Any:
    """`data[key]` checked against the contract's type; ProtocolError when it breaks it. With
    a `default`, a missing field (an older agent's answer) reads as that instead."""
    if isinstance(data, dict) and key not in data and default is not _ABSENT:
        return default
    if not isinstance(data, dict) or key not in data:
        raise ProtocolError(f"malformed answer from snapagentd: missing field {key!r}")
    value = data[key]
    if value is None and nullable:
        return None
    if kind == "time":
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except (AttributeError, ValueError):
            moment = None
        if moment is None or moment.tzinfo is None:
            raise ProtocolError(f"malformed answer from snapagentd: {key} is not a time: {value!r}")
        return moment.astimezone(UTC)
    if not isinstance(value, _KINDS[kind]) or (
        kind in ("int", "number") and isinstance(value, bool)
    ):
        raise ProtocolError(f"malformed answer from snapagentd: {key} is not a {kind}: {value!r}")
    return value


def _snapshot_fields(data: Any) -> dict[str, Any]:
    return {
        "project": _get(data, "project", "str"),
        "work_item": _get(data, "work_item", "str"),
        "image": _get(data, "image", "str"),
        "image_id": _get(data, "image_id", "str"),
        "size_bytes": _get(data, "size_bytes", "int", nullable=True),
        "created_at": _get(data, "created_at", "time"),
        "last_used_at": _get(data, "last_used_at", "time", nullable=True),
        "source": _get(data, "source", "str"),
        "unique_bytes": _get(data, "unique_bytes", "int", nullable=True, default=None),
    }


def _snapshot(data: Any) -> Snapshot:
    return Snapshot(**_snapshot_fields(data))


def _lease(data: Any) -> Lease:
    return Lease(
        id=_get(data, "id", "str"),
        project=_get(data, "project", "str"),
        work_item=_get(data, "work_item", "str"),
        image_id=_get(data, "image_id", "str"),
        expires_at=_get(data, "expires_at", "time"),
    )


def _found(data: dict[str, Any]) -> FoundSnapshot:
    lease = _get(data, "lease", "object", nullable=True, default=None)
    return FoundSnapshot(
        **_snapshot_fields(data.get("snapshot")),
        lease=None if lease is None else _lease(lease),
        confirmed=_optional(data, "confirmed", "bool"),
    )


def _evicted(data: Any) -> EvictedSnapshot:
    return EvictedSnapshot(
        **_snapshot_fields(data),
        reason=_get(data, "reason", "str"),
        result=_get(data, "result", "str"),
        detail=_optional(data, "detail", "str"),
        age_seconds=_get(data, "age_seconds", "int", nullable=True, default=None),
        idle_seconds=_get(data, "idle_seconds", "int", nullable=True, default=None),
    )


def _skipped(data: Any) -> SkippedSnapshot:
    return SkippedSnapshot(
        **_snapshot_fields(data),
        reason=_get(data, "reason", "str"),
        protected_by=_get(data, "protected_by", "str"),
        age_seconds=_get(data, "age_seconds", "int"),
        idle_seconds=_get(data, "idle_seconds", "int"),
    )


def _list_of(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise ProtocolError(f"malformed answer from snapagentd: {key} is not a list: {value!r}")
    return value


def _registration(status: int, data: dict[str, Any]) -> Registration:
    return Registration(_snapshot(data.get("snapshot")), created=status == 201)


def _deletion(data: dict[str, Any]) -> Deletion:
    return Deletion(
        _snapshot(data.get("snapshot")),
        _get(data, "result", "str"),
        detail=_optional(data, "detail", "str"),
    )


def _eviction(data: dict[str, Any]) -> Eviction:
    evicted = [_evicted(item) for item in _list_of(data, "evicted")]
    skipped = None if data.get("skipped") is None else _list_of(data, "skipped")
    return Eviction(
        _get(data, "dry_run", "bool"),
        evicted,
        skipped=None if skipped is None else [_skipped(item) for item in skipped],
        disk_bytes_to_free=_get(data, "disk_bytes_to_free", "int", nullable=True, default=None),
    )


def _released(data: dict[str, Any]) -> Lease:
    if _get(data, "released", "bool") is not True:
        raise ProtocolError("malformed answer from snapagentd: released is not true")
    return _lease(data.get("lease"))


def _optional(data: Any, key: str, kind: str) -> Any:
    """A field newer than some agents: None when missing or null."""
    return _get(data, key, kind, nullable=True, default=None)


def _limits(data: Any) -> Limits:
    return Limits(
        _get(data, "ttl_seconds", "int"),
        _get(data, "max_count", "int"),
        _get(data, "max_size_bytes", "int"),
    )


def _policy(data: Any) -> Policy:
    projects = _get(data, "projects", "object", default={})
    return Policy(
        ttl_seconds=_get(data, "ttl_seconds", "int"),
        max_count=_get(data, "max_count", "int"),
        max_size_bytes=_get(data, "max_size_bytes", "int"),
        interval_seconds=_get(data, "interval_seconds", "int"),
        min_age_seconds=_get(data, "min_age_seconds", "int"),
        disk_high=_optional(data, "disk_high", "str"),
        disk_low=_optional(data, "disk_low", "str"),
        disk_interval_seconds=_optional(data, "disk_interval_seconds", "int"),
        size_accounting=_optional(data, "size_accounting", "str"),
        projects={name: _limits(limits) for name, limits in projects.items()},
    )


def _disk(data: Any) -> DiskStatus | None:
    if data is None:
        return None
    return DiskStatus(
        path=_get(data, "path", "str", nullable=True),
        error=_get(data, "error", "str", nullable=True),
        total_bytes=_optional(data, "total_bytes", "int"),
        free_bytes=_optional(data, "free_bytes", "int"),
        used_ratio=_optional(data, "used_ratio", "number"),
        high_free_bytes=_optional(data, "high_free_bytes", "int"),
        low_free_bytes=_optional(data, "low_free_bytes", "int"),
        above_high=_optional(data, "above_high", "bool"),
    )


def _status(data: dict[str, Any]) -> Status:
    docker, snapshots = _get(data, "docker", "object"), _get(data, "snapshots", "object")
    policy, journal = _get(data, "policy", "object"), _get(data, "journal", "object")
    last = _get(data, "last_eviction", "object", nullable=True)
    events = _optional(docker, "events", "object")
    return Status(
        version=_get(data, "version", "str"),
        docker=DockerStatus(
            _get(docker, "reachable", "bool"),
            _get(docker, "error", "str", nullable=True),
            _get(docker, "url", "str"),
            events=None
            if events is None
            else DockerEvents(_get(events, "connected", "bool"), _get(events, "reconnects", "int")),
        ),
        snapshots=SnapshotCounts(
            _get(snapshots, "count", "int"),
            _get(snapshots, "total_size_bytes", "int"),
            _get(snapshots, "pending_removal", "int"),
            unique_bytes=_optional(snapshots, "unique_bytes", "int"),
            leases=_optional(snapshots, "leases", "int"),
        ),
        policy=_policy(policy),
        last_eviction=None
        if last is None
        else LastEviction(
            started_at=_get(last, "started_at", "time"),
            finished_at=_get(last, "finished_at", "time"),
            trigger=_get(last, "trigger", "str"),
            removed=_get(last, "removed", "int"),
            in_use=_get(last, "in_use", "int"),
            already_gone=_get(last, "already_gone", "int"),
            failed=_get(last, "failed", "int"),
            error=_get(last, "error", "str", nullable=True),
            leased=_optional(last, "leased", "int"),
            reclaimed_bytes=_optional(last, "reclaimed_bytes", "int"),
            untagged=_optional(last, "untagged", "int"),
            has_children=_optional(last, "has_children", "int"),
            referenced=_optional(last, "referenced", "int"),
            wrong_removals=_optional(last, "wrong_removals", "int"),
            odd_images=_optional(last, "odd_images", "int"),
        ),
        journal=JournalStatus(_get(journal, "path", "str"), _get(journal, "records", "int")),
        disk=_disk(_get(data, "disk", "object", nullable=True, default=None)),
        engine=_engine(_optional(data, "engine", "object")),
    )


def _engine(data: dict[str, Any] | None) -> EngineStatus | None:
    if data is None:
        return None
    return EngineStatus(
        _get(data, "id", "str", nullable=True),
        _get(data, "instance", "str", nullable=True),
        _get(data, "marker", "str", nullable=True),
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


# --- the blocking client ----------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix domain socket; the host part of the URL is not used."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Blocking client, standard library only. One connection per request, so a restart of
    the agent never leaves a stale connection behind. `timeout` bounds connecting and each
    wait for the answer, in seconds. Safe to share between threads."""

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: Retry = DEFAULT_RETRY,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.retry = retry

    def register(
        self, project: str, work_item: str, image: str, size_bytes: int | None = None
    ) -> Registration:
        """Record `image` (a managed repository:tag that exists in Docker) as the key's snapshot.
        Registering the same image again is harmless, so a retry is safe."""
        return _registration(*self._call(_register_request(project, work_item, image, size_bytes)))

    def lookup(
        self,
        project: str,
        work_item: str,
        ttl_seconds: int | None = None,
        lease_seconds: int | None = None,
    ) -> FoundSnapshot | None:
        """The key's usable snapshot, now marked used; None on a miss (404 snapshot-not-found:
        none, invalidated, image gone or repointed, or older than `ttl_seconds`, which defaults
        to the project's TTL, else the global one).

        With `lease_seconds` (1 to 86400) the agent also leases the image in the same request,
        so no eviction can remove it before the router's `docker create`; the lease is the
        result's `lease` (release it once the container exists)."""
        try:
            _, data = self._call(_lookup_request(project, work_item, ttl_seconds, lease_seconds))
        except SnapshotNotFoundError:
            return None
        return _found(data)

    def lease(self, project: str, work_item: str, seconds: int) -> Lease:
        """Protect the key's current image from every eviction for `seconds` (1 to 86400).
        Raises SnapshotNotFoundError when the key has no entry. Prefer `lookup(...,
        lease_seconds=...)`, which cannot miss an eviction between the two calls."""
        _, data = self._call(_lease_request(project, work_item, seconds))
        return _lease(data.get("lease"))

    def release(self, lease_id: str) -> Lease:
        """End a lease early; returns it as it was. Raises LeaseNotFoundError when there is no
        such lease (released already, or expired and dropped: either way, it protects nothing)."""
        _, data = self._call(_release_request(lease_id))
        return _released(data)

    def list(self, project: str | None = None) -> list[Snapshot]:
        """All entries (or one project's), sorted by project, then work item."""
        _, data = self._call(_list_request(project))
        return [_snapshot(item) for item in _list_of(data, "snapshots")]

    def delete(self, project: str, work_item: str) -> Deletion:
        """Invalidate the key's entry and try to remove its image now. Raises
        SnapshotNotFoundError when there is no entry (the caller may treat that as done)."""
        _, data = self._call(_delete_request(project, work_item))
        return _deletion(data)

    def evict(self, dry_run: bool = False) -> Eviction:
        """Run an eviction now and return what it removed; with `dry_run`, explain one: what
        would go, in order, and what protects the rest (`skipped`), removing nothing."""
        _, data = self._call(_evict_request(dry_run))
        return _eviction(data)

    def status(self) -> Status:
        _, data = self._call(_STATUS_REQUEST)
        return _status(data)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        json_body: Any = None,
        data: bytes | None = None,
    ) -> dict[str, Any]:
        """Any request; the answer's JSON object as sent (for tools that print it, such as
        `snapagentctl --json`). Errors raise as in the typed methods."""
        return self._call(_request(method, path, query=query, json_body=json_body, data=data))[1]

    def _call(self, request: _Request) -> tuple[int, dict[str, Any]]:
        status, reason, body = self._exchange(request)
        return status, _decode(status, reason, body)

    def _exchange(self, request: _Request) -> tuple[int, str, bytes]:
        for delay in self.retry.delays():
            connection = _UnixHTTPConnection(self.socket_path, self.timeout)
            try:
                try:
                    connection.connect()
                except OSError as error:
                    if delay is not None and error.errno in _RETRY_ERRNOS:
                        time.sleep(delay)  # back-off while the agent restarts
                        continue
                    raise AgentUnreachable(self.socket_path, _reason(error)) from error
                try:
                    connection.request(
                        request.method, request.target, request.body, request.headers
                    )
                    response = connection.getresponse()
                    return response.status, response.reason, response.read()
                except OSError as error:  # reset, closed without an answer, timed out
                    raise AgentUnreachable(self.socket_path, _reason(error)) from error
                except http.client.HTTPException as error:
                    raise ProtocolError(
                        f"malformed HTTP answer from snapagentd: {error!r}"
                    ) from None
            finally:
                connection.close()
        raise AssertionError("unreachable: the last delay is None")


# --- the asyncio client -----------------------------------------------------------------------


class AsyncClient:
    """The asyncio flavour of `Client`, over aiohttp (3.8 or newer). Use it as an async
    context manager, or call `close()`: it holds an aiohttp session. `timeout` bounds each
    whole request, in seconds."""

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: Retry = DEFAULT_RETRY,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.retry = retry
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def register(
        self, project: str, work_item: str, image: str, size_bytes: int | None = None
    ) -> Registration:
        """See `Client.register`."""
        request = _register_request(project, work_item, image, size_bytes)
        return _registration(*await self._call(request))

    async def lookup(
        self,
        project: str,
        work_item: str,
        ttl_seconds: int | None = None,
        lease_seconds: int | None = None,
    ) -> FoundSnapshot | None:
        """See `Client.lookup`: None on a miss; `lease` when `lease_seconds` is given."""
        request = _lookup_request(project, work_item, ttl_seconds, lease_seconds)
        try:
            _, data = await self._call(request)
        except SnapshotNotFoundError:
            return None
        return _found(data)

    async def lease(self, project: str, work_item: str, seconds: int) -> Lease:
        """See `Client.lease`."""
        _, data = await self._call(_lease_request(project, work_item, seconds))
        return _lease(data.get("lease"))

    async def release(self, lease_id: str) -> Lease:
        """See `Client.release`."""
        _, data = await self._call(_release_request(lease_id))
        return _released(data)

    async def list(self, project: str | None = None) -> list[Snapshot]:
        _, data = await self._call(_list_request(project))
        return [_snapshot(item) for item in _list_of(data, "snapshots")]

    async def delete(self, project: str, work_item: str) -> Deletion:
        """See `Client.delete`."""
        _, data = await self._call(_delete_request(project, work_item))
        return _deletion(data)

    async def evict(self, dry_run: bool = False) -> Eviction:
        """See `Client.evict`."""
        _, data = await self._call(_evict_request(dry_run))
        return _eviction(data)

    async def status(self) -> Status:
        _, data = await self._call(_STATUS_REQUEST)
        return _status(data)

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        json_body: Any = None,
        data: bytes | None = None,
    ) -> dict[str, Any]:
        """See `Client.request`."""
        request = _request(method, path, query=query, json_body=json_body, data=data)
        return (await self._call(request))[1]

    async def _call(self, request: _Request) -> tuple[int, dict[str, Any]]:
        status, reason, body = await self._exchange(request)
        return status, _decode(status, reason, body)

    def _open_session(self) -> aiohttp.ClientSession:
        import aiohttp  # here, so the blocking client never pays for importing it

        if self._session is None or self._session.closed:
            # force_close: one connection per request, as in Client (no stale keep-alives
            # across agent restarts, and a refused connect is always safe to retry).
            connector = aiohttp.UnixConnector(path=self.socket_path, force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._session

    async def _exchange(self, request: _Request) -> tuple[int, str, bytes]:
        import asyncio

        import aiohttp
        from yarl import URL

        session = self._open_session()
        url = URL(f"http://localhost{request.target}", encoded=True)
        for delay in self.retry.delays():
            try:
                async with session.request(
                    request.method, url, data=request.body, headers=request.headers
                ) as response:
                    return response.status, response.reason or "", await response.read()
            except aiohttp.ClientConnectorError as error:
                if delay is not None and error.os_error.errno in _RETRY_ERRNOS:
                    await asyncio.sleep(delay)  # back-off while the agent restarts
                    continue
                raise AgentUnreachable(self.socket_path, _reason(error.os_error)) from error
            except TimeoutError as error:
                raise AgentUnreachable(self.socket_path, "timed out") from error
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
                raise AgentUnreachable(self.socket_path, _reason(error)) from error
            except aiohttp.ClientResponseError as error:
                raise ProtocolError(f"malformed HTTP answer from snapagentd: {error!r}") from None
        raise AssertionError("unreachable: the last delay is None")
