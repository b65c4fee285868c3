"""The registry: which snapshot each (project, work item) has, kept durable by the journal.

Every change is expressed as journal records and applied only once they are on disk. The
registry decides *what* leaves (it retires entries into pending removals); the evictor decides
*when* Docker is asked to remove them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .confirmations import Confirmations
from .docker_ops import DockerGateway, DockerUnavailable, ImageInfo
from .errors import (
    DockerUnreachable,
    ImageNotFound,
    ImageNotManaged,
    JournalFailed,
    LeaseNotFound,
    SnapshotNotFound,
)
from .journal import Journal, JournalUnavailable
from .models import (
    DISCOVERED_PROJECT,
    Key,
    Reason,
    Snapshot,
    Source,
    Victim,
    format_time,
    normalise_reference,
    utcnow,
)
from .state import (
    Lease,
    PendingRemoval,
    RegistryState,
    forget_record,
    gone_record,
    lease_record,
    put_record,
    release_record,
    retire_record,
    touch_record,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Registration:
    snapshot: Snapshot
    created: bool  # a new key (201) rather than an update (200)
    retired: list[PendingRemoval]  # older images this registration superseded


@dataclass(frozen=True, slots=True)
class Lookup:
    snapshot: Snapshot | None
    retired: list[PendingRemoval]  # set when the entry expired or lost its image
    why_missing: str = ""
    # False when Docker did not answer within the lookup deadline: answered from the registry.
    confirmed: bool = True


class Registry:
    def __init__(self, state: RegistryState, journal: Journal, docker: DockerGateway) -> None:
        self.state = state
        self.journal = journal
        self.docker = docker
        self._key_locks: dict[Key, tuple[asyncio.Lock, int]] = {}  # lock, users
        # Image ids Docker is being asked to remove now, each with an event set when done.
        self._removing: dict[str, asyncio.Event] = {}
        # Tags Docker confirmed, kept valid by its image events (the daemon feeds them in).
        self.confirmations = Confirmations()

    # --- reads ----------------------------------------------------------------------------

    def get(self, key: Key) -> Snapshot | None:
        return self.state.entries.get(key)

    def list(self, project: str | None = None) -> list[Snapshot]:
        entries = self.state.entries.values()
        if project is not None:
            entries = [s for s in entries if s.project == project]
        return sorted(entries, key=lambda s: s.key)

    def pending(self) -> list[PendingRemoval]:
        return list(self.state.pending.values())

    # --- changes --------------------------------------------------------------------------

    async def register(
        self, project: str, work_item: str, image: str, size_bytes: int | None
    ) -> Registration:
        """Record `image` as the snapshot of (project, work item), superseding what it replaces."""
        if not self.docker.is_managed(image):
            raise ImageNotManaged(
                f"image {image!r} is outside the managed image prefixes "
                f"({', '.join(self.docker.prefixes)})"
            )
        ticket = self.confirmations.ticket()
        info = await self._inspect(image)
        if info is None:
            raise ImageNotFound(f"image {image!r} does not exist in Docker")
        self.confirmations.confirm(image, info.id, ticket)
        now = utcnow()
        key = (project, work_item)
        created_at = first_seen_creation(info, now)
        async with self._locked(key):
            current = self.state.entries.get(key)
            snapshot = Snapshot(
                project=project,
                work_item=work_item,
                image=image,
                image_id=info.id,
                size_bytes=size_bytes if size_bytes is not None else info.size_bytes,
                # The same image registered again keeps the creation time it was given.
                created_at=current.created_at
                if current and current.ref == (image, info.id)
                else created_at,
                # The same image registered again keeps its history of use.
                last_used_at=current.last_used_at
                if current and current.ref == (image, info.id)
                else None,
                source=Source.REGISTERED,
            )
            # The key's previous image, and any entry whose tag now names this new image.
            superseded = [s for s in self.state.with_tag(image) if s.image_id != info.id]
            if current is not None and current.ref != snapshot.ref and current not in superseded:
                superseded.append(current)
            records = [retire_record(s, Reason.SUPERSEDED, now) for s in superseded]
            records.append(put_record(snapshot))
            await self._commit(records)
        if info.id in self._removing:  # a removal that began before this put cancelled it
            await self.removal_settled(info.id)
            found = await self._inspect(image)
            if found is None or found.id != info.id:
                raise ImageNotFound(f"image {image!r} was removed while it was being registered")
        retired = [p for s in superseded if (p := self.state.pending.get(s.ref)) is not None]
        return Registration(self.state.entries.get(key, snapshot), current is None, retired)

    async def lookup(self, key: Key, ttl: timedelta) -> Lookup:
        """The entry for `key` if it is fresh and its image still exists; marks it used.

        Docker is asked whether the image still exists unless its image events have kept the
        answer it last gave current (see confirmations.py)."""
        snapshot = self.state.entries.get(key)
        if snapshot is None:
            return Lookup(None, [], "no snapshot is registered for this project and work item")
        now = utcnow()
        if now - snapshot.created_at > ttl:
            retired = await self.retire([Victim(snapshot, Reason.TTL)])
            return Lookup(None, retired, f"the snapshot is older than {int(ttl.total_seconds())}s")
        confirmed = True
        if not self.confirmations.holds(snapshot.image, snapshot.image_id):
            ticket = self.confirmations.ticket()
            try:
                info = await self.docker.inspect(snapshot.image, self.docker.timeouts.lookup)
            except DockerUnavailable:
                # Cannot check in time: serve what we know; the router needs Docker anyway.
                log.info(
                    "lookup: Docker did not answer, answering project %r, work item %r "
                    "from the registry",
                    *key,
                )
                confirmed = False
            else:
                if info is None or info.id != snapshot.image_id:
                    return await self._lost_image(snapshot)
                self.confirmations.confirm(snapshot.image, snapshot.image_id, ticket)
        await self._commit([touch_record(snapshot, now)])
        return Lookup(self.state.entries.get(key), [], confirmed=confirmed)

    async def lease(self, key: Key, seconds: int) -> Lease:
        """Protect the entry's current image from every eviction for `seconds`."""
        snapshot = self.state.entries.get(key)
        if snapshot is None:
            raise SnapshotNotFound(
                f"no snapshot for project {key[0]!r}, work item {key[1]!r} to lease"
            )
        lease = Lease(
            id=secrets.token_hex(12),
            project=key[0],
            work_item=key[1],
            image_id=snapshot.image_id,
            expires_at=utcnow() + timedelta(seconds=seconds),
        )
        await self._commit([lease_record(lease)])
        current = self.state.entries.get(key)
        evicted = current is None or current.image_id != lease.image_id
        if evicted or lease.image_id in self._removing:
            # Evicted while the lease was written: its removal may be under way, so the lease
            # cannot keep its promise. (A removal looks at the leases again just before it
            # asks Docker: a lease applied before that protects the image.)
            await self._commit([release_record(lease.id)])
            raise SnapshotNotFound(
                f"no snapshot for project {key[0]!r}, work item {key[1]!r} to lease"
                " (it was evicted meanwhile)"
            )
        return lease

    async def release(self, lease_id: str) -> Lease:
        """End a lease early; its image may be evicted again."""
        lease = self.state.leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r} (it may have expired and been pruned)")
        await self._commit([release_record(lease_id)])
        return lease

    async def prune_leases(self, now: datetime) -> None:
        """Journal the end of leases that have expired (they protect nothing already)."""
        ended = [lease.id for lease in self.state.leases.values() if lease.expires_at <= now]
        if ended:
            await self._commit([release_record(lease_id) for lease_id in ended])

    async def note_use(self, image: str, moment: datetime) -> int:
        """A container was created or started from `image` (a tag, an id or a short id):
        mark the entries holding that image used. Returns how many were touched."""
        snapshots: list[Snapshot] = []
        if image.startswith("sha256:"):
            snapshots = self.state.with_id(image)
        elif len(image) >= 12 and all(c in "0123456789abcdef" for c in image):
            for image_id in self.state.ids_with_prefix(f"sha256:{image}"):
                snapshots += self.state.with_id(image_id)
        if not snapshots and self.docker.is_managed(normalise_reference(image)):
            snapshots = self.state.with_tag(normalise_reference(image))
        fresh = [s for s in snapshots if s.last_used_at is None or s.last_used_at < moment]
        if fresh:
            await self._commit([touch_record(s, moment) for s in fresh])
        return len(fresh)

    async def note_last_uses(self, last_use_by_id: dict[str, datetime]) -> None:
        """Containers seen at reconcile time: an entry is used no later than its newest one."""
        records = [
            touch_record(snapshot, moment)
            for image_id, moment in last_use_by_id.items()
            for snapshot in self.state.with_id(image_id)
            if snapshot.last_used_at is None or snapshot.last_used_at < moment
        ]
        if records:
            await self._commit(records)

    async def forget(self, image_ids: Collection[str]) -> None:
        """Docker no longer has these formerly referenced images: stop watching for them."""
        if image_ids:
            await self._commit([forget_record(image_id) for image_id in image_ids])

    async def _lost_image(self, snapshot: Snapshot) -> Lookup:
        """The entry's tag is gone or names another image: drop it, removing ours if dangling."""
        if await self.docker.inspect(snapshot.image_id) is None:
            await self._commit([gone_record(snapshot.image, snapshot.image_id)])
            return Lookup(None, [], "the snapshot's image is gone from Docker")
        retired = await self.retire([Victim(snapshot, Reason.REPOINTED)])
        return Lookup(None, retired, "the snapshot's tag now names another image")

    async def retire(self, victims: list[Victim]) -> list[PendingRemoval]:
        """Take entries out of the registry and mark their images for removal (durably)."""
        if not victims:
            return []
        now = utcnow()
        await self._commit([retire_record(v.snapshot, v.reason, now) for v in victims])
        return [p for v in victims if (p := self.state.pending.get(v.snapshot.ref)) is not None]

    async def confirm_gone(self, removals: list[PendingRemoval]) -> None:
        """Docker confirmed these images gone: forget them."""
        if removals:
            await self._commit(
                [gone_record(p.snapshot.image, p.snapshot.image_id) for p in removals]
            )

    async def reconcile(self, images: list[ImageInfo]) -> None:
        """Bring the registry in line with the images Docker has now.

        Entries whose tag no longer names their image are retired (the removal then asks Docker
        about the image itself: a listing does not show an untagged parent of other images,
        so absence from it proves nothing), and managed tags nobody registered become
        `discovered` entries. Pending removals are left to their removal, which alone may
        conclude an image is gone.
        """
        image_ids = {image.id for image in images}
        managed = self.docker.is_managed
        tag_to_image = {tag: image for image in images for tag in image.tags if managed(tag)}
        now = utcnow()
        records: list[dict[str, Any]] = []
        for snapshot in list(self.state.entries.values()):
            found = tag_to_image.get(snapshot.image)
            if found is None or found.id != snapshot.image_id:
                records.append(retire_record(snapshot, Reason.REPOINTED, now))
            elif snapshot.created_at > now:
                # Journalled before creation times were checked: its age starts now.
                records.append(put_record(_created(snapshot, now)))
        # Images Docker no longer lists need no watching for leaks.
        absent = {i for i in self.state.known_images if i not in image_ids}
        records += [forget_record(image_id) for image_id in sorted(absent)]
        for tag, image in tag_to_image.items():
            if (
                not self.state.holders((tag, image.id))
                and (tag, image.id) not in self.state.pending
            ):
                records.append(
                    put_record(
                        Snapshot(
                            project=DISCOVERED_PROJECT,
                            work_item=tag,
                            image=tag,
                            image_id=image.id,
                            size_bytes=image.size_bytes,
                            created_at=first_seen_creation(image, now),
                            last_used_at=None,
                            source=Source.DISCOVERED,
                        )
                    )
                )
        if records:
            await self._commit(records)
            log.info("reconcile: %d changes from %d images in Docker", len(records), len(images))

    @contextmanager
    def removing(self, image_id: str) -> Iterator[None]:
        """Mark `image_id` as being removed by Docker (the evictor, around its Docker call)."""
        done = asyncio.Event()
        self._removing[image_id] = done
        try:
            yield
        finally:
            done.set()
            if self._removing.get(image_id) is done:
                del self._removing[image_id]

    async def removal_settled(self, image_id: str) -> None:
        """Wait until no removal of `image_id` is under way."""
        while (done := self._removing.get(image_id)) is not None:
            await done.wait()

    # --- helpers --------------------------------------------------------------------------

    async def _inspect(self, reference: str) -> ImageInfo | None:
        try:
            return await self.docker.inspect(reference)
        except DockerUnavailable as error:
            raise DockerUnreachable(f"Docker is not reachable: {error}") from None

    async def _commit(self, records: list[dict[str, Any]]) -> None:
        try:
            await self.journal.append(records)
        except JournalUnavailable as error:
            raise JournalFailed(f"{error}; nothing was changed") from None

    @asynccontextmanager
    async def _locked(self, key: Key) -> AsyncIterator[None]:
        """Serialise read-modify-write of one key; other keys proceed (and share fsyncs)."""
        lock, users = self._key_locks.get(key, (asyncio.Lock(), 0))
        self._key_locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._key_locks[key]
            if users == 1:
                del self._key_locks[key]
            else:
                self._key_locks[key] = (lock, users - 1)


def first_seen_creation(image: ImageInfo, now: datetime) -> datetime:
    """The creation time an entry records: Docker's `Created`, unless that is unusable or in
    the future (clock skew, a crafted image); then the age counts from now, when the agent
    first saw the image, so that TTL and min_age work on it as on any other (and it is said)."""
    created = image.created_at
    if created is not None and created <= now:
        return created
    problem = image.created_problem or f"Created is in the future: {format_time(created)}"
    log.warning("image %s: %s; counting its age from now", image.id[:19], problem)
    return now


def _created(snapshot: Snapshot, moment: datetime) -> Snapshot:
    return Snapshot(
        snapshot.project,
        snapshot.work_item,
        snapshot.image,
        snapshot.image_id,
        snapshot.size_bytes,
        moment,
        snapshot.last_used_at,
        snapshot.source,
    )
