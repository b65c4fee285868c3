"""Docker's answers read into the agent's values: images, removal answers, refusals.

Pure functions of the JSON the engine sent, kept apart from docker_ops (which owns the SDK and
the calls) so that every odd answer can be tested with a table. Nothing here raises on a
strange value: one odd image must never stop a listing, and so never an eviction run.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .models import RemovalResult, normalise_reference

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    id: str
    tags: tuple[str, ...]
    size_bytes: int | None
    # None when Docker's `Created` is unusable (unparseable, out of range, or at or before
    # 1970, as reproducible builds and crafted tarballs set it): `created_problem` says why,
    # and the registry counts the image's age from when it first saw it instead.
    created_at: datetime | None
    labels: tuple[tuple[str, str], ...] = ()
    created_problem: str = ""


@dataclass(frozen=True, slots=True)
class RemovalAnswer:
    """What one removal did, from Docker's own answer."""

    result: RemovalResult
    detail: str = ""  # why Docker refused (a 409 told apart), or what held the image
    untagged: tuple[str, ...] = ()  # references Docker says it removed
    deleted: tuple[str, ...] = ()  # ids Docker says it deleted (the image first, then layers)
    # References removed that the agent had not chosen, each with the image it was on: a
    # wrong removal (a tag that landed in a window Docker's API cannot close; see Safety).
    unexpected: tuple[tuple[str, str], ...] = ()


def image_from_inspect(data: dict[str, Any]) -> ImageInfo:
    """`GET /images/{name}/json`: `Created` is RFC 3339 with nanoseconds."""
    created_at, problem = created_from_text(data.get("Created"))
    return ImageInfo(
        id=str(data["Id"]),
        tags=_tags(data.get("RepoTags")),
        size_bytes=_size(data.get("Size")),
        created_at=created_at,
        created_problem=problem,
    )


def image_from_listing(row: dict[str, Any]) -> ImageInfo:
    """A row of `GET /images/json`: `Created` is whole seconds since 1970."""
    created_at, problem = created_from_seconds(row.get("Created"))
    labels = row.get("Labels") if isinstance(row.get("Labels"), dict) else {}
    return ImageInfo(
        id=str(row["Id"]),
        tags=_tags(row.get("RepoTags")),
        size_bytes=_size(row.get("Size")),
        created_at=created_at,
        labels=tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items())),
        created_problem=problem,
    )


def created_from_seconds(value: Any) -> tuple[datetime | None, str]:
    """A listing's `Created`: the time, or None and the reason it cannot be used."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None, f"Created is not a number: {value!r}"
    try:
        moment = datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError):
        return None, f"Created is out of range: {value}"
    return _usable(moment, str(value))


def created_from_text(value: Any) -> tuple[datetime | None, str]:
    """An inspect's `Created` (RFC 3339; nanoseconds are cut to what datetime holds)."""
    if not isinstance(value, str) or not value:
        return None, f"Created is missing: {value!r}"
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", value)
    if match is None:
        return None, f"Created is not an RFC 3339 time: {value[:40]!r}"
    fraction = (match[2] or "")[:7]  # the dot and at most six digits
    zone = "+00:00" if match[3] == "Z" else match[3]
    try:
        moment = datetime.fromisoformat(f"{match[1]}{fraction}{zone}").astimezone(UTC)
    except (ValueError, OverflowError):
        return None, f"Created is out of range: {value[:40]!r}"
    return _usable(moment, value)


def _usable(moment: datetime, shown: str) -> tuple[datetime | None, str]:
    if moment <= EPOCH:
        return None, f"Created is at or before 1970: {shown[:40]}"
    return moment, ""


def _tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(str(tag) for tag in value if tag and tag != "<none>:<none>")


def _size(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass(frozen=True, slots=True)
class Containers:
    """What the containers say about images: which are in use, and when each was last used."""

    in_use_ids: frozenset[str]
    last_use_by_id: dict[str, datetime]  # the newest container's creation time, per image


def containers_from_rows(rows: list[dict[str, Any]], now: datetime) -> Containers:
    """`GET /containers/json?all=1`: the in-use set, and each image's newest container."""
    last_use: dict[str, datetime] = {}
    for row in rows:
        image_id, created = row.get("ImageID"), row.get("Created")
        if not image_id:
            continue
        # Docker lists creation in whole seconds, cut down: round up, so that a use is never
        # placed before the container existed (an LRU tie within that second would otherwise
        # go against the image just used), nor after now.
        try:
            moment = min(datetime.fromtimestamp(int(created) + 1, UTC), now)
        except (TypeError, ValueError, OverflowError, OSError):
            moment = EPOCH  # an odd time is no use at all
        if image_id not in last_use or last_use[image_id] < moment:
            last_use[image_id] = moment
    return Containers(frozenset(last_use), last_use)


# --- removal answers ---------------------------------------------------------------------------

# Docker's 409 messages, told apart by their words (20.10 to 26, classic and containerd stores).
_CONFLICTS = (
    ("running container", RemovalResult.IN_USE),
    ("stopped container", RemovalResult.IN_USE),
    ("is using its referenced image", RemovalResult.IN_USE),
    ("dependent child images", RemovalResult.HAS_CHILDREN),
    ("referenced in multiple repositories", RemovalResult.REFERENCED),
)


def classify_conflict(message: str) -> tuple[RemovalResult, str]:
    """A 409's result and a short detail; FAILED for a refusal the agent does not know."""
    lowered = message.lower()
    for words, result in _CONFLICTS:
        if words in lowered:
            detail = lowered[lowered.index(words) :].split(" - ")[0]
            return result, detail[:200]
    return RemovalResult.FAILED, message[:200]


def is_expected_untag(reference: str, expected: Collection[str]) -> bool:
    """Whether Docker's `Untagged` (or a tag event's name) is one of the `expected` tags, or a
    digest reference in one of their repositories (deleting by id removes those too)."""
    repository, at, _digest = reference.partition("@")
    if at:
        return any(normalise_reference(tag).rpartition(":")[0] == repository for tag in expected)
    normalised = normalise_reference(reference)
    return any(normalised == normalise_reference(tag) for tag in expected)


def nanosecond_time(seconds: float) -> str:
    """A time for Docker's `since`/`until`: "seconds.nanoseconds" (a bare fraction would be
    read as nanoseconds)."""
    whole = int(seconds)
    return f"{whole}.{round((seconds - whole) * 1e9) % 1_000_000_000:09d}"


def with_unexpected(
    answer: RemovalAnswer, result: RemovalResult, unexpected: list[tuple[str, str]]
) -> RemovalAnswer:
    return RemovalAnswer(
        result, untagged=answer.untagged, deleted=answer.deleted, unexpected=tuple(unexpected)
    )


def merge_answers(image_id: str, answers: list[RemovalAnswer]) -> RemovalAnswer:
    """One answer for several steps: the first step Docker refused decides the result, else
    what became of the image; every reference touched is kept."""
    done = (RemovalResult.REMOVED, RemovalResult.UNTAGGED, RemovalResult.ALREADY_GONE)
    refused = next((a for a in answers if a.result not in done), None)
    deleted = [d for a in answers for d in a.deleted]
    if refused is not None:
        result = refused.result
    elif image_id in deleted:
        result = RemovalResult.REMOVED
    elif any(a.untagged for a in answers):
        result = RemovalResult.UNTAGGED
    else:
        result = RemovalResult.ALREADY_GONE
    return RemovalAnswer(
        result,
        detail=(refused or answers[-1]).detail,
        untagged=tuple(r for a in answers for r in a.untagged),
        deleted=tuple(deleted),
        unexpected=tuple(u for a in answers for u in a.unexpected),
    )
