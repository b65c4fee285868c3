"""Docker, as the agent needs it: queries, and removals that name only what cannot move.

Only this module knows the docker SDK. Every call runs on the gateway's own threads (never
asyncio's default executor, which the journal and the disk readings use) with a deadline of
its kind, and engine answers leave as the agent's own values and errors: `DockerUnavailable`
(no answer), `DockerError` (an answer that is an error). How a removal stays safe while
routers, users and other agents change the engine between any two calls is told at
`_remove_image`; docs/operations.md (Safety) lists the windows that remain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from .config import DockerSettings
from .docker_answers import (
    Containers,
    ImageInfo,
    RemovalAnswer,
    classify_conflict,
    containers_from_rows,
    image_from_inspect,
    image_from_listing,
    is_expected_untag,
    merge_answers,
    nanosecond_time,
    with_unexpected,
)
from .models import RemovalResult

log = logging.getLogger(__name__)

DOCKER_THREADS = 8  # Docker calls at once; more wait on the gateway's queue, never elsewhere
T = TypeVar("T")

__all__ = [
    "Containers",
    "DockerError",
    "DockerGateway",
    "DockerUnavailable",
    "ImageInfo",
    "RemovalAnswer",
]


class DockerUnavailable(Exception):
    """The engine did not answer (socket missing, refused, or no answer before the deadline)."""


class DockerError(Exception):
    """The engine answered with an error; `status` is its HTTP status (None if it had none)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DockerGateway:
    """One engine connection plus what the agent last learnt about its health."""

    def __init__(self, settings: DockerSettings) -> None:
        self.url = settings.url
        self.prefixes = settings.image_prefixes
        self.is_managed = settings.is_managed
        self.timeouts = settings.timeouts
        self.reachable = False
        self.error: str | None = "not contacted yet"
        # Called with the new state whenever reachability flips (the daemon updates STATUS=
        # and its retry pace), from the event loop.
        self.on_change: Callable[[bool], None] | None = None
        self._client: docker.APIClient | None = None
        self._client_lock = threading.Lock()
        self._threads = concurrent.futures.ThreadPoolExecutor(
            DOCKER_THREADS, thread_name_prefix="docker"
        )

    # --- plumbing -------------------------------------------------------------------------

    def _api(self) -> docker.APIClient:
        # Created lazily: version negotiation needs the engine, which may be down at start.
        # Its socket timeout is the longest deadline, so a thread is never held for longer.
        with self._client_lock:
            if self._client is None:
                self._client = docker.APIClient(
                    base_url=self.url, version="auto", timeout=self.timeouts.longest
                )
            return self._client

    async def call(self, function: Callable[[docker.APIClient], T], deadline: float = 0) -> T:
        """Run `function(api)` on the gateway's threads (modules with queries of their own).

        Such a function may make several Docker calls (layers.py: an inspect, the history and
        the parents'), so by default it has the list deadline, not one inspect's.
        Raises DockerUnavailable, or DockerError for an error answer (status 404: not found).
        """
        return await self._call(function, deadline or self.timeouts.list)

    async def _call(
        self, function: Callable[[docker.APIClient], T], deadline: float, patient: bool = True
    ) -> T:
        """`patient` False: a deadline the caller chose short (a lookup's) says nothing about
        the engine's health, so missing it does not mark the engine unreachable."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._threads, lambda: function(self._api()))
        try:
            # A call still queued at the deadline is cancelled; one under way ends at the
            # client's socket timeout, its answer unused.
            result = await asyncio.wait_for(future, deadline)
        except TimeoutError:
            problem = f"no answer within {deadline:g} s"
            if not patient:
                raise DockerUnavailable(problem) from None
            self._mark_unreachable(problem)
            raise DockerUnavailable(self.error) from None
        except docker.errors.APIError as error:
            self._mark_reachable()  # the engine answered, if only with an error
            raise DockerError(error.status_code, _explain(error)) from None
        except (
            requests.exceptions.RequestException,
            docker.errors.DockerException,
            OSError,
        ) as error:
            self._mark_unreachable(f"{type(error).__name__}: {error}")
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

    def _mark_unreachable(self, problem: str) -> None:
        message = problem.splitlines()[0][:300] if problem else "unknown error"
        changed = self.reachable
        if changed or self.error != message:
            log.warning("docker: engine at %s is not reachable: %s", self.url, message)
        self.reachable, self.error = False, message
        if changed and self.on_change is not None:
            self.on_change(False)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # --- queries --------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            await self._call(lambda api: api.ping(), self.timeouts.inspect)
        except (DockerUnavailable, DockerError):
            return False
        return True

    async def inspect(self, reference: str, deadline: float = 0) -> ImageInfo | None:
        """The image a tag or id names now, or None when Docker has no such image."""
        try:
            data = await self._call(
                lambda api: api.inspect_image(reference),
                deadline or self.timeouts.inspect,
                patient=not deadline or deadline >= self.timeouts.inspect,
            )
        except DockerError as error:
            if error.status == 404:
                return None
            raise
        return image_from_inspect(data)

    async def list_images(self) -> list[ImageInfo]:
        """Every image `docker images` shows (tagged and dangling, not hidden parents)."""
        rows = await self._call(lambda api: api.images(), self.timeouts.list)
        return [image_from_listing(row) for row in rows]

    async def in_use_image_ids(self) -> frozenset[str]:
        """Images used by any container, running or stopped (removal would be refused)."""
        return (await self.containers()).in_use_ids

    async def containers(self) -> Containers:
        """Every container's image: the in-use set, and each image's latest container."""
        rows = await self._call(lambda api: api.containers(all=True), self.timeouts.list)
        return containers_from_rows(rows, datetime.now(UTC))

    async def data_root(self) -> str:
        """Docker's data root (DockerRootDir), the directory whose filesystem fills up."""
        info = await self._call(lambda api: api.info(), self.timeouts.inspect)
        return str(info.get("DockerRootDir") or "")

    # --- removal --------------------------------------------------------------------------

    async def remove_image(self, image_id: str, tags: Collection[str]) -> RemovalAnswer:
        """Take our references `tags` off the image `image_id`, and delete the image when no
        other reference holds it; never forced. `tags` empty: a leaked image, deleted only
        while it has no reference at all (one that gained a tag is someone's: KEPT).

        Raises DockerUnavailable or DockerError for failures the caller must report.
        """
        unmanaged = [tag for tag in tags if not self.is_managed(tag)]
        if unmanaged:
            # Unreachable through the API (which refuses such images); kept as a last guard.
            raise ValueError(f"refusing to remove unmanaged image {unmanaged[0]!r}")
        ours = frozenset(tags)
        return await self._call(
            lambda api: _remove_image(api, image_id, ours), self.timeouts.remove
        )

    # --- the engine and the ownership markers (engine_owner.py decides) -------------------

    async def engine_info(self) -> dict[str, Any]:
        """`docker info`: the engine's ID, Name, DockerRootDir and SystemTime (its clock)."""
        info = await self._call(lambda api: api.info(), self.timeouts.inspect)
        return info if isinstance(info, dict) else {}

    async def list_volumes(self, label: str) -> list[dict[str, Any]]:
        """Every volume carrying `label` (any value), as `docker volume ls` lists it."""
        answer = await self._call(
            lambda api: api.volumes(filters={"label": [label]}), self.timeouts.list
        )
        volumes = answer.get("Volumes") if isinstance(answer, dict) else None
        return [volume for volume in volumes or () if isinstance(volume, dict)]

    async def create_volume(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        """Create the volume `name`; Docker answers with an existing one of that name as it
        is (its own labels), so the caller checks them."""
        return await self._call(
            lambda api: api.create_volume(name=name, driver="local", labels=labels),
            self.timeouts.inspect,
        )

    async def remove_volume(self, name: str) -> bool:
        """Remove the volume `name`; False when Docker has no such volume."""
        try:
            await self._call(lambda api: api.remove_volume(name), self.timeouts.inspect)
        except DockerError as error:
            if error.status == 404:
                return False
            raise
        return True


# --- removal, in a worker thread -------------------------------------------------------------


def _remove_image(api: docker.APIClient, image_id: str, ours: frozenset[str]) -> RemovalAnswer:
    """Remove our references to one image, naming the immutable id wherever Docker allows.

    Docker resolves a tag when the DELETE arrives, so a DELETE of a tag can hit an image a
    router committed to that tag a moment ago. A DELETE of an id cannot: with one reference
    Docker removes it and the image, with several it refuses (409, unless forced, which we
    never are), with none it deletes the dangling image. So:
    - every reference is ours (or none is left): delete by id, expecting exactly ours;
    - other references hold the image: take each of ours off by name, just after checking
      it still names this image (the one window left: see `_untag`).
    Docker's answer says which references went; any we did not choose is in `unexpected`.
    """
    tags = _tags_of(api, image_id)
    if tags is None:
        return RemovalAnswer(RemovalResult.ALREADY_GONE)
    here = sorted(tag for tag in tags if tag in ours)
    others = [tag for tag in tags if tag not in ours]
    if others and not here:
        # Nothing of ours is left on it: our tag moved on, and others hold the image.
        result = RemovalResult.ALREADY_GONE if ours else RemovalResult.KEPT
        return RemovalAnswer(result, detail=f"held by {others[0]}")
    if others:
        return merge_answers(image_id, [_untag(api, tag, image_id) for tag in here])
    # Several tags of ours: all but one come off by name; the last goes with the id.
    taken = [_untag(api, tag, image_id) for tag in here[1:]]
    return merge_answers(image_id, [*taken, _delete_id(api, image_id, frozenset(here[:1]))])


def _untag(api: docker.APIClient, tag: str, image_id: str) -> RemovalAnswer:
    """Take `tag` off `image_id`, which other references keep.

    Docker cannot untag conditionally: the window between checking that the tag names our
    image and the DELETE is what is left. A DELETE that deleted another image is seen in the
    answer; one that only untagged another image is seen in the engine's `tag` events of the
    window (the tag moved to another id and is not there now).
    """
    started = datetime.now(UTC).timestamp()
    try:
        named = api.inspect_image(tag)["Id"]
    except docker.errors.NotFound:
        return RemovalAnswer(RemovalResult.ALREADY_GONE)
    if named != image_id:
        return RemovalAnswer(RemovalResult.ALREADY_GONE, detail=f"{tag} names another image")
    answer = _delete(api, tag)
    if answer.result is not RemovalResult.REMOVED:
        return answer  # refused or gone: nothing was touched
    deleted = answer.deleted
    if deleted and deleted[0] != image_id:
        return with_unexpected(answer, RemovalResult.UNTAGGED, [(tag, deleted[0])])
    moved_to = _moved_during(api, tag, image_id, started)
    if moved_to is not None:
        return with_unexpected(answer, RemovalResult.UNTAGGED, [(tag, moved_to)])
    result = RemovalResult.REMOVED if image_id in deleted else RemovalResult.UNTAGGED
    return RemovalAnswer(result, untagged=answer.untagged, deleted=deleted)


def _delete_id(api: docker.APIClient, image_id: str, expected: frozenset[str]) -> RemovalAnswer:
    """Delete the image by id, expecting Docker to remove exactly the references `expected`."""
    answer = _delete(api, image_id)
    if answer.result is not RemovalResult.REMOVED:
        return answer
    unexpected = [
        (reference, image_id)
        for reference in answer.untagged
        if not is_expected_untag(reference, expected)
    ]
    result = RemovalResult.REMOVED if image_id in answer.deleted else RemovalResult.UNTAGGED
    if unexpected:
        return with_unexpected(answer, result, unexpected)
    return RemovalAnswer(result, untagged=answer.untagged, deleted=answer.deleted)


def _delete(api: docker.APIClient, target: str) -> RemovalAnswer:
    """DELETE /images/<target>, never forced: Docker's answer, or its refusal classified."""
    try:
        items = api.remove_image(target, force=False, noprune=False) or []
    except docker.errors.APIError as error:
        if error.status_code == 404:
            return RemovalAnswer(RemovalResult.ALREADY_GONE)
        if error.status_code == 409:
            result, detail = classify_conflict(_explain(error))
            if result is not RemovalResult.FAILED:
                return RemovalAnswer(result, detail=detail)
        raise
    untagged = tuple(str(item["Untagged"]) for item in items if item.get("Untagged"))
    deleted = tuple(str(item["Deleted"]) for item in items if item.get("Deleted"))
    return RemovalAnswer(RemovalResult.REMOVED, untagged=untagged, deleted=deleted)


def _moved_during(api: docker.APIClient, tag: str, image_id: str, since: float) -> str | None:
    """The image `tag` was put on, other than `image_id`, since `since` and no longer names:
    an image our DELETE of `tag` took it from. None when no such `tag` event is found."""
    until = datetime.now(UTC).timestamp()
    events = api.events(
        since=nanosecond_time(since),  # the engine's clock is this host's
        until=nanosecond_time(until),
        filters={"type": ["image"], "event": ["tag"]},
        decode=True,
    )
    moved = {
        str(event.get("Actor", {}).get("ID") or event.get("id") or "")
        for event in events
        if is_expected_untag(str(event.get("Actor", {}).get("Attributes", {}).get("name")), {tag})
    } - {image_id, ""}
    if not moved:
        return None
    try:
        now_named = api.inspect_image(tag)["Id"]
    except docker.errors.NotFound:
        now_named = None
    moved.discard(now_named)  # it has the tag now: put there after our DELETE
    return sorted(moved)[0] if moved else None


def _tags_of(api: docker.APIClient, image_id: str) -> list[str] | None:
    """The image's tags now ([] when dangling), or None when Docker has no such image."""
    try:
        tags = api.inspect_image(image_id).get("RepoTags") or []
    except docker.errors.NotFound:
        return None
    return [tag for tag in tags if tag != "<none>:<none>"]


def _explain(error: docker.errors.APIError) -> str:
    """Docker's own message for an error answer (docker-py prefixes it with the URL)."""
    explanation: Any = getattr(error, "explanation", None)
    return str(explanation or error)
