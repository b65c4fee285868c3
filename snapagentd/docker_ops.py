"""Docker, as the agent needs it: inspect, list, in-use ids and safe removal.

The docker SDK is blocking, so every call runs in a worker thread. Engine answers are mapped to
results here (404 already gone, 409 in use), so nothing above this module parses Docker errors.
Removal never uses `force` and only ever names a managed tag, or the id of an image that no
longer has any tag at all.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from .config import DockerSettings
from .models import RemovalResult, Snapshot

log = logging.getLogger(__name__)

API_TIMEOUT_SECONDS = 120  # removing a large image can take a while on a busy disk
T = TypeVar("T")


class DockerUnavailable(Exception):
    """The engine could not be reached (socket missing, refused, timed out)."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    id: str
    tags: tuple[str, ...]
    size_bytes: int | None
    created_at: datetime
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Containers:
    """What the containers say about images: which are in use, and when each was last used."""

    in_use_ids: frozenset[str]
    last_use_by_id: dict[str, datetime]  # the newest container's creation time, per image


class DockerGateway:
    """One engine connection plus what the agent last learnt about its health."""

    def __init__(self, settings: DockerSettings) -> None:
        self.url = settings.url
        self.prefixes = settings.image_prefixes
        self.is_managed = settings.is_managed
        self.reachable = False
        self.error: str | None = "not contacted yet"
        # Called with the new state whenever reachability flips (the daemon updates STATUS=
        # and its retry pace), from the event loop.
        self.on_change: Callable[[bool], None] | None = None
        self._client: docker.APIClient | None = None
        self._client_lock = threading.Lock()

    # --- plumbing -------------------------------------------------------------------------

    def _api(self) -> docker.APIClient:
        # Created lazily: version negotiation needs the engine, which may be down at start.
        with self._client_lock:
            if self._client is None:
                self._client = docker.APIClient(
                    base_url=self.url, version="auto", timeout=API_TIMEOUT_SECONDS
                )
            return self._client

    async def call(self, function: Callable[[docker.APIClient], T]) -> T:
        """Run `function(api)` in a worker thread (for modules with Docker queries of their own)."""
        return await self._call(function)

    async def _call(self, function: Callable[[docker.APIClient], T]) -> T:
        """Run `function(api)` in a thread; connection trouble becomes DockerUnavailable."""

        def run() -> T:
            return function(self._api())

        try:
            result = await asyncio.to_thread(run)
        except docker.errors.APIError:
            self._mark_reachable()  # the engine answered, if only with an error
            raise
        except (
            requests.exceptions.RequestException,
            docker.errors.DockerException,
            OSError,
        ) as error:
            self._mark_unreachable(error)
            raise DockerUnavailable(self.error) from None
        self._mark_reachable()
        return result

    def _mark_reachable(self) -> None:
        changed = not self.reachable
        if changed:
            log.info("docker: engine at %s is reachable", self.url)
        self.reachable, self.error = True, None
        if changed and self.on_change is not None:
            self.on_change(True)

    def _mark_unreachable(self, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        changed = self.reachable
        if changed or self.error != message:
            log.warning("docker: engine at %s is not reachable: %s", self.url, message)
        self.reachable, self.error = False, message
        if changed and self.on_change is not None:
            self.on_change(False)

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # --- queries --------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            await self._call(lambda api: api.ping())
        except (DockerUnavailable, docker.errors.APIError):
            return False
        return True

    async def inspect(self, reference: str) -> ImageInfo | None:
        """The image a tag or id names now, or None when Docker has no such image."""
        try:
            data = await self._call(lambda api: api.inspect_image(reference))
        except docker.errors.NotFound:
            return None
        return ImageInfo(
            id=data["Id"],
            tags=tuple(data.get("RepoTags") or ()),
            size_bytes=data.get("Size"),
            created_at=_parse_docker_time(data.get("Created")),
        )

    async def list_images(self) -> list[ImageInfo]:
        rows = await self._call(lambda api: api.images())
        return [
            ImageInfo(
                id=row["Id"],
                tags=tuple(tag for tag in row.get("RepoTags") or () if tag != "<none>:<none>"),
                size_bytes=row.get("Size"),
                created_at=datetime.fromtimestamp(row.get("Created", 0), UTC),
                labels=tuple(sorted((row.get("Labels") or {}).items())),
            )
            for row in rows
        ]

    async def in_use_image_ids(self) -> frozenset[str]:
        """Images used by any container, running or stopped (removal would be refused)."""
        return (await self.containers()).in_use_ids

    async def containers(self) -> Containers:
        """Every container's image: the in-use set, and each image's latest container."""
        rows = await self._call(lambda api: api.containers(all=True))
        now = datetime.now(UTC)
        last_use: dict[str, datetime] = {}
        for row in rows:
            image_id, created = row.get("ImageID"), row.get("Created")
            if not image_id:
                continue
            # Docker lists creation in whole seconds, cut down: round up, so that a use is
            # never placed before the container existed (an LRU tie within that second would
            # otherwise go against the image just used), nor after now.
            seconds = created + 1 if isinstance(created, int) else 0
            moment = min(datetime.fromtimestamp(seconds, UTC), now)
            if image_id not in last_use or last_use[image_id] < moment:
                last_use[image_id] = moment
        return Containers(frozenset(last_use), last_use)

    async def data_root(self) -> str:
        """Docker's data root (DockerRootDir), the directory whose filesystem fills up."""
        info = await self._call(lambda api: api.info())
        return str(info.get("DockerRootDir") or "")

    # --- removal --------------------------------------------------------------------------

    async def remove(self, snapshot: Snapshot) -> RemovalResult:
        """Remove our reference to the snapshot's image, and its bytes if nothing else holds them.

        Raises DockerUnavailable or docker.errors.APIError for failures the caller must report.
        """
        if not self.is_managed(snapshot.image):
            # Unreachable through the API (which refuses such images); kept as a last guard.
            raise ValueError(f"refusing to remove unmanaged image {snapshot.image!r}")
        return await self._call(lambda api: _remove(api, snapshot.image, snapshot.image_id))

    async def remove_dangling(self, image_id: str) -> RemovalResult:
        """Remove an image by id only if it still has no tag at all (a leaked layer).

        An image that gained a tag meanwhile is someone's again: KEPT, never untagged.
        """
        return await self._call(lambda api: _remove_dangling(api, image_id))


def _remove_dangling(api: docker.APIClient, image_id: str) -> RemovalResult:
    tags = _tags_of(api, image_id)
    if tags is None:
        return RemovalResult.ALREADY_GONE
    if tags:
        return RemovalResult.KEPT
    return _delete(api, image_id)


def _remove(api: docker.APIClient, tag: str, image_id: str) -> RemovalResult:
    tags = _tags_of(api, image_id)
    if tags is None:
        return RemovalResult.ALREADY_GONE
    if tag in tags:
        return _delete(api, tag)  # untags; Docker deletes the image with its last tag
    if not tags:
        return _delete(api, image_id)  # the tag moved on and left our image dangling
    return RemovalResult.ALREADY_GONE  # our tag is gone; other tags own the image now


def _tags_of(api: docker.APIClient, image_id: str) -> list[str] | None:
    """The image's tags now ([] when dangling), or None when Docker has no such image."""
    try:
        tags = api.inspect_image(image_id).get("RepoTags") or []
    except docker.errors.NotFound:
        return None
    return [t for t in tags if t != "<none>:<none>"]


def _delete(api: docker.APIClient, target: str) -> RemovalResult:
    """Ask Docker to delete a tag or an id, never forced: 404 gone, 409 in use."""
    try:
        api.remove_image(target, force=False, noprune=False)
    except docker.errors.APIError as error:
        if error.status_code == 404:
            return RemovalResult.ALREADY_GONE
        if error.status_code == 409:
            return RemovalResult.IN_USE
        raise
    return RemovalResult.REMOVED


def _parse_docker_time(value: Any) -> datetime:
    """Docker's RFC 3339 times carry nanoseconds, which datetime does not take."""
    if not isinstance(value, str) or not value:
        return datetime.now(UTC)
    main, _, rest = value.partition(".")
    if rest:
        digits = rest.rstrip("Z").split("+")[0].split("-")[0]
        zone = rest[len(digits) :] or "Z"
        value = f"{main}.{digits[:6]}{zone}"
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
