"""The snapshot entry and the small value types every layer shares.

Kept free of I/O so the policy, the registry and the journal can all import it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

# Entries found on disk at reconcile time have no (project, work item) of their own; they are
# keyed under this project (which clients cannot register, since it is empty) and their image.
DISCOVERED_PROJECT = ""


class Source(StrEnum):
    REGISTERED = "registered"
    DISCOVERED = "discovered"


class Reason(StrEnum):
    """Why an image was chosen for removal."""

    TTL = "ttl"
    COUNT = "count"
    SIZE = "size"
    SUPERSEDED = "superseded"  # a newer image was registered for the same key or tag
    INVALIDATED = "invalidated"  # DELETE /v1/snapshots
    REPOINTED = "repointed"  # its tag now names another image: ours is dangling
    DISK = "disk"  # the filesystem of Docker's data root is above the high watermark
    LEAKED = "leaked"  # a dangling image an entry once referenced, or carrying the label


class RemovalResult(StrEnum):
    REMOVED = "removed"  # Docker deleted the image (its bytes are free)
    UNTAGGED = "untagged"  # our tag is off; other references keep the image and its bytes
    IN_USE = "in-use"  # a container, running or stopped, uses it: retried
    HAS_CHILDREN = "has-children"  # images were committed or built on it: retried
    REFERENCED = "referenced"  # it gained a reference since the agent looked: looked at again
    ALREADY_GONE = "already-gone"
    FAILED = "failed"
    PLANNED = "planned"
    KEPT = "kept"  # not removed: another entry (or, for a leaked image, a new tag) holds it
    LEASED = "leased"  # not removed yet: a lease protects the image; retried after it ends

    @property
    def confirmed_gone(self) -> bool:
        """Docker no longer holds our reference: the entry may be forgotten."""
        return self in (RemovalResult.REMOVED, RemovalResult.UNTAGGED, RemovalResult.ALREADY_GONE)


Key = tuple[str, str]  # (project, work item)
ImageRef = tuple[str, str]  # (repository:tag, image id)


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, as the wire contract promises."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"time is not a string: {text!r}")
    moment = datetime.fromisoformat(text)  # takes the Z suffix since Python 3.11
    if moment.tzinfo is None:
        raise ValueError(f"time without a zone: {text!r}")
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One registered (or discovered) snapshot image, keyed by (project, work item)."""

    project: str
    work_item: str
    image: str  # repository:tag
    image_id: str  # sha256:...
    size_bytes: int | None
    created_at: datetime
    last_used_at: datetime | None
    source: Source

    @property
    def key(self) -> Key:
        return (self.project, self.work_item)

    @property
    def ref(self) -> ImageRef:
        return (self.image, self.image_id)

    @property
    def last_activity(self) -> datetime:
        """What least-recently-used ordering sorts on."""
        return self.last_used_at or self.created_at

    def touched(self, moment: datetime) -> Snapshot:
        # Spelled out: dataclasses.replace was a tenth of replaying a lookup-heavy journal.
        return Snapshot(
            self.project,
            self.work_item,
            self.image,
            self.image_id,
            self.size_bytes,
            self.created_at,
            moment,
            self.source,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "work_item": self.work_item,
            "image": self.image,
            "image_id": self.image_id,
            "size_bytes": self.size_bytes,
            "created_at": format_time(self.created_at),
            "last_used_at": format_time(self.last_used_at),
            "source": self.source.value,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        size = data["size_bytes"]
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise ValueError(f"size_bytes is not an integer: {size!r}")
        created_at = parse_time(data["created_at"])
        if created_at is None:
            raise ValueError("created_at is missing")
        return cls(
            project=sys.intern(str(data["project"])),  # a few projects share many entries
            work_item=str(data["work_item"]),
            image=str(data["image"]),
            image_id=str(data["image_id"]),
            size_bytes=size,
            created_at=created_at,
            last_used_at=parse_time(data.get("last_used_at")),
            source=Source(data["source"]),
        )


@dataclass(frozen=True, slots=True)
class Victim:
    """A snapshot the policy (or a client) decided to remove, and why."""

    snapshot: Snapshot
    reason: Reason


def snapshot_tag(project: str, work_item: str, prefix: str = "cascade-snapshot-") -> str:
    """The tag routers commit a work item's snapshot to.

    Lower-cased, every run of non-alphanumerics turned into one `-`, ends trimmed:
    ("Proj Snap", "MNG_652/Worker Snapshot!")
        -> "cascade-snapshot-proj-snap-mng-652-worker-snapshot:latest"
    """
    slug = re.sub(r"[^a-z0-9]+", "-", f"{project}-{work_item}".lower()).strip("-")
    return f"{prefix}{slug}:latest"


def split_reference(reference: str) -> tuple[str, str]:
    """Split `repo[:tag]` into (repository, tag); the colon of a registry's host:port is no tag."""
    repository, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        return reference, "latest"
    return repository, tag


def normalise_reference(reference: str) -> str:
    """`repo` and `repo:latest` name the same image; store the explicit form."""
    repository, tag = split_reference(reference)
    return f"{repository}:{tag}"
