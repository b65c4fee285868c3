"""Which snapshots to evict, and why, and which ones a rule wanted but could not take.

The decision is a pure function of its arguments: no clock, no Docker, no logging, no asyncio.
The caller passes `now`, the ids of images in use or leased, the bytes each image would free
and how many bytes the disk needs back, so every rule can be checked with a table of plain
values, and the daemon can explain (dry-run) a plan before it removes anything.
"""

from __future__ import annotations

from collections import Counter
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


class _Planner:
    """One planning pass: the protections and byte counts every rule shares."""

    def __init__(
        self,
        now: datetime,
        policy: PolicySettings,
        in_use_ids: Collection[str],
        leased_ids: Collection[str],
        image_bytes: Mapping[str, int] | None,
    ) -> None:
        self.now = now
        self.min_age = timedelta(seconds=policy.min_age_seconds)
        self.in_use_ids = in_use_ids
        self.leased_ids = leased_ids
        self.image_bytes = image_bytes or {}
        self.plan = Plan()
        self._skipped_keys: set[Key] = set()

    def bytes_of(self, snapshot: Snapshot) -> int:
        """What removing the image frees: the caller's figure, else the registered size."""
        found = self.image_bytes.get(snapshot.image_id)
        return found if found is not None else snapshot.size_bytes or 0

    def protection(self, snapshot: Snapshot, reason: Reason) -> Protection | None:
        if snapshot.image_id in self.leased_ids:
            return Protection.LEASED
        if snapshot.image_id in self.in_use_ids:
            return Protection.IN_USE
        if reason is not Reason.TTL and self.now - snapshot.created_at < self.min_age:
            return Protection.MIN_AGE
        return None

    def take_or_skip(self, snapshot: Snapshot, reason: Reason) -> bool:
        """Evict `snapshot` for `reason` unless protected (then note why); True if taken."""
        protection = self.protection(snapshot, reason)
        if protection is None:
            self.plan.victims.append(Victim(snapshot, reason))
            return True
        if snapshot.key not in self._skipped_keys:
            self._skipped_keys.add(snapshot.key)
            self.plan.skipped.append(Skipped(snapshot, reason, protection))
        return False

    def apply_limits(self, pool: list[Snapshot], limits: Limits, size_rule: bool) -> list[Snapshot]:
        """TTL, count, then (with `size_rule`) size over one LRU-sorted pool; returns the rest."""
        ttl = timedelta(seconds=limits.ttl_seconds)
        expired = [s for s in pool if self.now - s.created_at > ttl]
        taken = {s.key for s in sorted(expired, key=_age_order) if self.take_or_skip(s, Reason.TTL)}
        remaining = [s for s in pool if s.key not in taken]

        # Count: walk the LRU list while too many remain; protected ones still count.
        excess = len(remaining) - limits.max_count
        taken = set()
        for snapshot in remaining:
            if len(taken) >= excess:
                break
            if self.take_or_skip(snapshot, Reason.COUNT):
                taken.add(snapshot.key)
        remaining = [s for s in remaining if s.key not in taken]
        if not size_rule:
            return remaining

        # Size: walk the LRU list while too many bytes remain, taking only what frees bytes.
        holders = Counter(s.image_id for s in remaining)
        sizes = {s.image_id: self.bytes_of(s) for s in remaining}
        size = sum(sizes.values())
        taken = set()
        for snapshot in remaining:
            if size <= limits.max_size_bytes:
                break
            # A sharer of an image that stays frees nothing, and neither does an unknown size.
            if holders[snapshot.image_id] > 1 or not sizes[snapshot.image_id]:
                continue
            if self.take_or_skip(snapshot, Reason.SIZE):
                taken.add(snapshot.key)
                holders[snapshot.image_id] -= 1
                size -= sizes[snapshot.image_id]
        return [s for s in remaining if s.key not in taken]

    def relieve_disk(self, survivors: list[Snapshot], bytes_to_free: int) -> None:
        """Take LRU snapshots until the bytes they free cover what the disk needs back."""
        surviving_ids = {s.image_id for s in survivors}
        freed_ids = {v.snapshot.image_id for v in self.plan.victims} - surviving_ids
        freeing = {v.snapshot.image_id: v.snapshot for v in self.plan.victims}
        need = bytes_to_free - sum(self.bytes_of(freeing[i]) for i in freed_ids)
        holders = Counter(s.image_id for s in survivors)
        for snapshot in survivors:
            if need <= 0:
                break
            freed = self.bytes_of(snapshot)
            if holders[snapshot.image_id] > 1 or not freed:
                continue
            if self.take_or_skip(snapshot, Reason.DISK):
                holders[snapshot.image_id] -= 1
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
    """
    planner = _Planner(now, policy, in_use_ids, leased_ids, image_bytes)
    pools: dict[str | None, list[Snapshot]] = {}
    own_limits = {name for name, _limits in policy.projects}
    for snapshot in sorted(snapshots, key=_lru_order):
        pool = snapshot.project if snapshot.project in own_limits else None
        pools.setdefault(pool, []).append(snapshot)
    survivors: list[Snapshot] = []
    for pool, members in sorted(pools.items(), key=lambda item: item[0] or ""):
        limits = policy.global_limits if pool is None else policy.limits_for(pool)
        survivors.extend(planner.apply_limits(members, limits, sizes_known))
    if bytes_to_free > 0 and sizes_known:
        planner.relieve_disk(sorted(survivors, key=_lru_order), bytes_to_free)
    return planner.plan
