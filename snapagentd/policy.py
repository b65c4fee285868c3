"""Which snapshots to evict, and why.

The decision is a pure function of its arguments: no clock, no Docker, no logging, no asyncio.
The caller passes `now` and the ids of images in use, so every rule can be checked with a table
of plain values, and the daemon can show (or dry-run) a plan before it removes anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

from .config import PolicySettings
from .models import Key, Reason, Snapshot, Victim


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


def plan_eviction(
    snapshots: Iterable[Snapshot],
    in_use_ids: frozenset[str] | set[str],
    now: datetime,
    policy: PolicySettings,
) -> list[Victim]:
    """Choose the snapshots to remove: expired ones, then LRU ones over the count, then over size.

    An image in use is never chosen; a snapshot younger than `min_age_seconds` is never chosen
    for count or size. Protected snapshots still occupy count and bytes, so the walk passes them
    and takes the next one; when the limits cannot be met, the plan simply stops short.
    """
    ttl = timedelta(seconds=policy.ttl_seconds)
    min_age = timedelta(seconds=policy.min_age_seconds)

    def in_use(snapshot: Snapshot) -> bool:
        return snapshot.image_id in in_use_ids

    def protected(snapshot: Snapshot) -> bool:
        return in_use(snapshot) or now - snapshot.created_at < min_age

    # 1. TTL: strictly older than the ttl, unless the image is in use.
    expired: list[Snapshot] = []
    remaining: list[Snapshot] = []
    for snapshot in sorted(snapshots, key=_lru_order):
        is_expired = now - snapshot.created_at > ttl and not in_use(snapshot)
        (expired if is_expired else remaining).append(snapshot)
    victims = [Victim(snapshot, Reason.TTL) for snapshot in sorted(expired, key=_age_order)]

    # 2. Count: walk the LRU list while too many remain.
    excess = len(remaining) - policy.max_count
    chosen: set[int] = set()
    for index, snapshot in enumerate(remaining):
        if len(chosen) >= excess:
            break
        if not protected(snapshot):
            chosen.add(index)
            victims.append(Victim(snapshot, Reason.COUNT))
    remaining = [s for index, s in enumerate(remaining) if index not in chosen]

    # 3. Size: walk the LRU list while too many bytes remain, taking only what frees bytes.
    holders = Counter(snapshot.image_id for snapshot in remaining)
    sizes: dict[str, int] = {}
    for snapshot in remaining:
        sizes[snapshot.image_id] = max(sizes.get(snapshot.image_id, 0), snapshot.size_bytes or 0)
    size = sum(sizes.values())
    for snapshot in remaining:
        if size <= policy.max_size_bytes:
            break
        # A sharer of an image that stays frees nothing, and neither does an unknown size.
        if protected(snapshot) or holders[snapshot.image_id] > 1 or not sizes[snapshot.image_id]:
            continue
        holders[snapshot.image_id] -= 1
        size -= sizes[snapshot.image_id]
        victims.append(Victim(snapshot, Reason.SIZE))

    return victims
