"""Which snapshots to evict, and why, and which ones a rule wanted but could not take.

The decision is a pure function of its arguments: no clock, no Docker, no logging, no asyncio.
The caller passes `now`, the ids of images in use or leased, the bytes each image would free
and how many bytes the disk needs back, so every rule can be checked with a table of plain
values, and the daemon can explain (dry-run) a plan before it removes anything.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from .config import Limits, PolicySettings
from .models import Key, Reason, Snapshot, Victim


class Protection(StrEnum):
    """Why a snapshot a rule chose was left alone."""

    IN_USE = "in-use"  # a container (running or stopped) uses the image
    LEASED = "leased"  # a router holds a lease on it
    MIN_AGE = "min-age"  # younger than [policy] min_age (protects from count, size, disk)
    SHARED = "shared"  # its image is also held by a snapshot the rule may not take (size, disk)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A snapshot a rule would have evicted, and what protected it."""

    snapshot: Snapshot
    reason: Reason
    protection: Protection


@dataclass(frozen=True, slots=True)
class Plan:
    victims: list[Victim] = field(default_factory=list)  # in eviction order
    skipped: list[Skipped] = field(default_factory=list)  # first rule that wanted each one


def total_size_bytes(snapshots: Iterable[Snapshot]) -> int:
    """Bytes the snapshots hold on disk: each image id counted once, an unknown size as 0."""
    sizes: dict[str, int] = {}
    for snapshot in snapshots:
        sizes[snapshot.image_id] = max(sizes.get(snapshot.image_id, 0), snapshot.size_bytes or 0)
    return sum(sizes.values())


def _lru_order(snapshot: Snapshot) -> tuple[datetime, datetime, str, Key]:
    """Least recently used first; equal times fall back to creation, then image, then key."""
    return (snapshot.last_activity, snapshot.created_at, snapshot.image, snapshot.key)


def _age_order(snapshot: Snapshot) -> tuple[datetime, str, Key]:
    """Oldest first, with the same deterministic tie-break."""
    return (snapshot.created_at, snapshot.image, snapshot.key)


def _by_image(walk: list[Snapshot]) -> list[list[Snapshot]]:
    """The LRU-sorted `walk` grouped by image id, each image where its most recent holder is.

    An image is used whenever any of its tags is, so it stands where its most recently used
    holder stands (the last of its group, `walk` being sorted); its holders keep LRU order.
    """
    images: dict[str, list[Snapshot]] = {}
    for snapshot in walk:
        images.setdefault(snapshot.image_id, []).append(snapshot)
    return sorted(images.values(), key=lambda holders: _lru_order(holders[-1]))


class _Planner:
    """One planning pass: the protections and byte counts every rule shares."""

    def __init__(
        self,
        now: datetime,
        policy: PolicySettings,
        in_use_ids: Collection[str],
        leased_ids: Collection[str],
        image_bytes: Mapping[str, int] | None,
        snapshots: Iterable[Snapshot],
    ) -> None:
        self.now = now
        self.min_age = timedelta(seconds=policy.min_age_seconds)
        self.in_use_ids = in_use_ids
        self.leased_ids = leased_ids
        self.image_bytes = image_bytes or {}
        self.plan = Plan()
        self._taken: set[Key] = set()
        self._skipped_keys: set[Key] = set()
        # Every live entry of each image, whatever its pool: the image goes only with all.
        self._holders: dict[str, list[Snapshot]] = {}
        for snapshot in snapshots:
            self._holders.setdefault(snapshot.image_id, []).append(snapshot)

    def age(self, snapshot: Snapshot) -> timedelta:
        """Time since creation; a creation in the future (a skewed clock) counts as zero."""
        return max(self.now - snapshot.created_at, timedelta(0))

    def bytes_of(self, snapshot: Snapshot) -> int:
        """What removing the image frees: the caller's figure, else the registered size."""
        found = self.image_bytes.get(snapshot.image_id)
        return found if found is not None else snapshot.size_bytes or 0

    def image_bytes_of(self, holders: Iterable[Snapshot]) -> int:
        """`bytes_of` one image from its holders (the largest size any of them registered)."""
        return max((self.bytes_of(snapshot) for snapshot in holders), default=0)

    def protection(self, snapshot: Snapshot, reason: Reason) -> Protection | None:
        if snapshot.image_id in self.leased_ids:
            return Protection.LEASED
        if snapshot.image_id in self.in_use_ids:
            return Protection.IN_USE
        if reason is not Reason.TTL and self.age(snapshot) < self.min_age:
            return Protection.MIN_AGE
        return None

    def take(self, snapshot: Snapshot, reason: Reason) -> None:
        self._taken.add(snapshot.key)
        self.plan.victims.append(Victim(snapshot, reason))
        if snapshot.key in self._skipped_keys:
            # Passed as shared by its pool's size rule, taken by the disk rule (every pool):
            # it leaves, so it is no longer a snapshot the plan passed over.
            self._skipped_keys.discard(snapshot.key)
            self.plan.skipped[:] = [s for s in self.plan.skipped if s.snapshot.key != snapshot.key]

    def skip(self, snapshot: Snapshot, reason: Reason, protection: Protection) -> None:
        """Note why a rule passed `snapshot`, under the first rule that wanted it."""
        if snapshot.key not in self._skipped_keys:
            self._skipped_keys.add(snapshot.key)
            self.plan.skipped.append(Skipped(snapshot, reason, protection))

    def take_or_skip(self, snapshot: Snapshot, reason: Reason) -> bool:
        """Evict `snapshot` for `reason` unless protected (then note why); True if taken."""
        protection = self.protection(snapshot, reason)
        if protection is None:
            self.take(snapshot, reason)
            return True
        self.skip(snapshot, reason, protection)
        return False

    def take_image(self, holders: list[Snapshot], reason: Reason) -> bool:
        """Evict all of one image's `holders` for `reason`, or none (then note why each stays).

        Removing the image frees its bytes only once no tag is left on it, so a protected
        holder (noted with its protection) or one that stays outside `holders` (not leaving
        anyway: another pool's) keeps all of them; those not protected are noted `shared`.
        """
        walked = {snapshot.key for snapshot in holders}
        staying = any(
            other.key not in walked and other.key not in self._taken
            for other in self._holders[holders[0].image_id]
        )
        protections = [self.protection(snapshot, reason) for snapshot in holders]
        if not staying and all(protection is None for protection in protections):
            for snapshot in holders:
                self.take(snapshot, reason)
            return True
        for snapshot, protection in zip(holders, protections, strict=True):
            self.skip(snapshot, reason, protection or Protection.SHARED)
        return False

    def expire_and_count(self, pool: list[Snapshot], limits: Limits) -> list[Snapshot]:
        """TTL, then count, over one LRU-sorted pool; returns the rest, still LRU-sorted."""
        ttl = timedelta(seconds=limits.ttl_seconds)
        expired = [s for s in pool if self.age(s) > ttl]
        taken = {s.key for s in sorted(expired, key=_age_order) if self.take_or_skip(s, Reason.TTL)}
        remaining = [s for s in pool if s.key not in taken]

        # Count: walk the LRU list while too many remain; protected ones still count. Each
        # tag counts, so each holder of a shared image goes by its own last use.
        excess = len(remaining) - limits.max_count
        taken = set()
        for snapshot in remaining:
            if len(taken) >= excess:
                break
            if self.take_or_skip(snapshot, Reason.COUNT):
                taken.add(snapshot.key)
        return [s for s in remaining if s.key not in taken]

    def cap_size(self, remaining: list[Snapshot], limits: Limits) -> list[Snapshot]:
        """Walk the pool's images in LRU order while too many bytes remain; returns the rest."""
        images = _by_image(remaining)
        sizes = {holders[0].image_id: self.image_bytes_of(holders) for holders in images}
        size = sum(sizes.values())
        taken: set[Key] = set()
        for holders in images:
            if size <= limits.max_size_bytes:
                break
            freed = sizes[holders[0].image_id]
            if freed and self.take_image(holders, Reason.SIZE):  # an unknown size frees nothing
                taken.update(snapshot.key for snapshot in holders)
                size -= freed
        return [s for s in remaining if s.key not in taken]

    def relieve_disk(self, survivors: list[Snapshot], bytes_to_free: int) -> None:
        """Take LRU images until the bytes they free cover what the disk needs back."""
        surviving_ids = {s.image_id for s in survivors}
        leaving: dict[str, list[Snapshot]] = {}
        for victim in self.plan.victims:
            if victim.snapshot.image_id not in surviving_ids:
                leaving.setdefault(victim.snapshot.image_id, []).append(victim.snapshot)
        need = bytes_to_free - sum(self.image_bytes_of(holders) for holders in leaving.values())
        for holders in _by_image(survivors):
            if need <= 0:
                break
            freed = self.image_bytes_of(holders)
            if freed and self.take_image(holders, Reason.DISK):
                need -= freed


def plan_eviction(
    snapshots: Iterable[Snapshot],
    in_use_ids: Collection[str],
    now: datetime,
    policy: PolicySettings,
    *,
    leased_ids: Collection[str] = frozenset(),
    image_bytes: Mapping[str, int] | None = None,
    bytes_to_free: int = 0,
    sizes_known: bool = True,
) -> Plan:
    """Choose the snapshots to remove: expired ones, then LRU ones over count, size and disk.

    Each project with limits of its own ([policy.projects]) is a pool apart; every other
    snapshot shares the global limits. Within a pool: TTL (oldest first), then count and size
    (least recently used first). Then, when the disk needs `bytes_to_free` back, LRU snapshots
    of every pool until the bytes freed (`image_bytes`, by image id; the registered size where
    it has none) cover it. A leased image is never chosen; one in use never either (Docker
    would refuse); one younger than min_age never for count, size or disk. Protected snapshots
    still occupy count and bytes, so a walk passes them and takes the next one, and when the
    limits cannot be met the plan simply stops short; `Plan.skipped` says what it passed.
    With `sizes_known` false (unique bytes not measured yet) the size and disk rules wait.

    An image several entries hold (several tags) frees its bytes only when all of them go, so
    the size and disk rules take it whole: every holder, its bytes counted once, at the place
    of the most recently used of the holders they walk (it is used whenever any of its tags
    is). They pass it when a holder is protected, or when one stays elsewhere (`shared`:
    another pool's that its own rules keep; one leaving for TTL or count is no obstacle). The
    disk rule walks every pool, so it takes what a size rule passed as shared. Count goes by
    tags, each holder by its own last use. An age is `now` minus the creation time, zero when
    that is in the future (a skewed clock); the orders compare the times themselves.
    """
    ordered = sorted(snapshots, key=_lru_order)
    planner = _Planner(now, policy, in_use_ids, leased_ids, image_bytes, ordered)
    own_limits = {name for name, _limits in policy.projects}

    def pool_of(snapshot: Snapshot) -> str | None:
        return snapshot.project if snapshot.project in own_limits else None

    pools: dict[str | None, list[Snapshot]] = {}
    for snapshot in ordered:
        pools.setdefault(pool_of(snapshot), []).append(snapshot)
    order = sorted(pools, key=lambda pool: pool or "")
    limits = {p: policy.global_limits if p is None else policy.limits_for(p) for p in order}
    # TTL and count in every pool before any size rule, so that one knows which holders of
    # an image in other pools are leaving anyway, whatever order the pools come in.
    remaining = {pool: planner.expire_and_count(pools[pool], limits[pool]) for pool in order}
    if sizes_known:
        remaining = {pool: planner.cap_size(remaining[pool], limits[pool]) for pool in order}
    survivors = sorted((s for pool in order for s in remaining[pool]), key=_lru_order)
    if bytes_to_free > 0 and sizes_known:
        planner.relieve_disk(survivors, bytes_to_free)

    # List the plan as if the pools had run one after the other (each one's TTL, count and
    # size, then disk); the sorts are stable, so each rule's own order stays.
    rank = {pool: index for index, pool in enumerate(order)}

    def place(snapshot: Snapshot, reason: Reason) -> int:
        return len(rank) if reason is Reason.DISK else rank[pool_of(snapshot)]

    planner.plan.victims.sort(key=lambda victim: place(victim.snapshot, victim.reason))
    planner.plan.skipped.sort(key=lambda skipped: place(skipped.snapshot, skipped.reason))
    return planner.plan
