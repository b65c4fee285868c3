"""Table tests and a brute-force property check for the eviction policy."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import get_args

import pytest

from snapagentd import client
from snapagentd.config import Limits, PolicySettings
from snapagentd.models import Reason, Snapshot, Source
from snapagentd.policy import Protection, plan_eviction, total_size_bytes

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
HOUR = 3600
TTL, COUNT, SIZE = Reason.TTL, Reason.COUNT, Reason.SIZE


def snap(
    name: str,
    age_h: float = 1,
    used_h: float | None = None,
    size: int | None = 100,
    image_id: str | None = None,
    age_s: int = 0,
) -> Snapshot:
    """A snapshot created `age_h` h (+ `age_s` s) and last used `used_h` h before NOW."""
    return Snapshot(
        project="proj",
        work_item=name,
        image=f"cascade-snapshot-proj-{name}:latest",
        image_id=image_id or f"sha256:{name}",
        size_bytes=size,
        created_at=NOW - timedelta(hours=age_h, seconds=age_s),
        last_used_at=None if used_h is None else NOW - timedelta(hours=used_h),
        source=Source.REGISTERED,
    )


def pol(ttl_h: float = 1000, count: int = 100, size: int = 10**9, min_age_h: float = 0):
    return PolicySettings(
        ttl_seconds=int(ttl_h * HOUR),
        max_count=count,
        max_size_bytes=size,
        min_age_seconds=int(min_age_h * HOUR),
    )


def ids(*names: str) -> frozenset[str]:
    return frozenset(f"sha256:{name}" for name in names)


def plan(snapshots, in_use=frozenset(), policy=None) -> list[tuple[str, Reason]]:
    victims = plan_eviction(snapshots, in_use, NOW, policy or pol()).victims
    return [(victim.snapshot.work_item, victim.reason) for victim in victims]


CASES = [
    pytest.param([], ids(), pol(count=0, size=0), [], id="empty"),
    pytest.param(
        [snap("a", 3), snap("b", 2, size=None), snap("c", 1)], ids(), pol(10, 3, 300), [],
        id="nothing-to-do",
    ),
    pytest.param(
        [snap("exact", 10), snap("over", 10, age_s=1), snap("under", 10, age_s=-1)],
        ids(), pol(ttl_h=10), [("over", TTL)],
        id="ttl-boundary",
    ),
    pytest.param(
        [snap("b", 20), snap("c", 30, used_h=0.1), snap("a", 25)], ids(), pol(ttl_h=10),
        [("c", TTL), ("a", TTL), ("b", TTL)],
        id="ttl-oldest-first-even-if-recently-used",
    ),
    pytest.param(
        # activity: a 1h (used), b 4h (never used: created), c 2h (used), d 1.5h (created)
        [snap("a", 5, used_h=1), snap("b", 4), snap("c", 3, used_h=2), snap("d", 1.5)],
        ids(), pol(count=2), [("b", COUNT), ("c", COUNT)],
        id="count-lru-last-used-vs-created-fallback",
    ),
    pytest.param(
        [snap("d", 1), snap("a", 4), snap("c", 2), snap("b", 3)], ids(), pol(size=250),
        [("a", SIZE), ("b", SIZE)],
        id="size-lru",
    ),
    pytest.param(
        [snap("a", 4, size=50), snap("b", 3, size=300), snap("c", 2, size=10)], ids(),
        pol(size=300), [("a", SIZE), ("b", SIZE)],
        id="size-lru-not-biggest-first",
    ),
    pytest.param(
        [snap("a", 4), snap("b", 3), snap("c", 2), snap("d", 1)], ids(), pol(count=3, size=150),
        [("a", COUNT), ("b", SIZE), ("c", SIZE)],
        id="count-then-size",
    ),
    pytest.param(
        [snap("b", 3), snap("a", 30), snap("c", 2), snap("d", 1)], ids(), pol(10, 1, 0),
        [("a", TTL), ("b", COUNT), ("c", COUNT), ("d", SIZE)],
        id="ttl-count-size-each-victim-once",
    ),
    pytest.param(
        [snap("a", 30), snap("b", 20)], ids("a"), pol(ttl_h=10), [("b", TTL)],
        id="in-use-protected-from-ttl",
    ),
    pytest.param(
        [snap("a", 4), snap("b", 3), snap("c", 2), snap("d", 1)], ids("a"), pol(count=2),
        [("b", COUNT), ("c", COUNT)],
        id="in-use-protected-from-count-walk-continues",
    ),
    pytest.param(
        [snap("a", 4), snap("b", 3), snap("c", 2), snap("d", 1)], ids("a"), pol(size=200),
        [("b", SIZE), ("c", SIZE)],
        id="in-use-protected-from-size-walk-continues",
    ),
    pytest.param(
        # y is least recently used but only 1h old; o is older but was used since
        [snap("y", 1), snap("o", 5, used_h=0.1)], ids(), pol(count=1, min_age_h=2),
        [("o", COUNT)],
        id="min-age-protects-from-count",
    ),
    pytest.param(
        [snap("y", 1), snap("o", 5, used_h=0.1), snap("n", 3, used_h=0.05)], ids(),
        pol(size=100, min_age_h=2), [("o", SIZE), ("n", SIZE)],
        id="min-age-protects-from-size",
    ),
    pytest.param(
        [snap("a", 2)], ids(), pol(ttl_h=1, min_age_h=5), [("a", TTL)],
        id="min-age-does-not-protect-from-ttl",
    ),
    pytest.param(
        [snap("a", 3, size=300, image_id="sha256:x"), snap("b", 2, size=300, image_id="sha256:x"),
         snap("c", 1, size=100)],
        ids(), pol(size=400), [],
        id="shared-image-counted-once",
    ),
    pytest.param(
        [snap("a", 3, size=300, image_id="sha256:x"), snap("b", 2, size=300, image_id="sha256:x"),
         snap("c", 1, size=100)],
        ids(), pol(size=300), [("a", SIZE), ("b", SIZE)],
        id="size-takes-both-sharers-of-an-lru-image",
    ),
    pytest.param(
        [snap("a", 3, size=300, image_id="sha256:x"), snap("b", 2, size=300, image_id="sha256:x"),
         snap("c", 1, size=100)],
        ids(), pol(count=1, size=300), [("a", COUNT), ("b", COUNT)],
        id="count-removes-both-sharers",
    ),
    pytest.param(
        [snap("a", 3, size=None), snap("b", 2), snap("c", 1)], ids(), pol(size=150),
        [("b", SIZE)],
        id="none-size-counts-zero-and-is-skipped",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2), snap("c", 1)], ids("b"), pol(count=0), [("a", COUNT),
        ("c", COUNT)],
        id="max-count-zero",
    ),
    pytest.param(
        [snap("a", 4), snap("b", 3, size=None), snap("c", 2), snap("d", 1, size=50),
         snap("e", 0.5, size=0)],
        ids("c"), pol(size=0), [("a", SIZE), ("d", SIZE)],
        id="max-size-zero",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2), snap("c", 1)], ids("a", "b", "c"), pol(count=1, size=0), [],
        id="impossible-all-in-use",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2), snap("c", 1)], ids(), pol(count=1, size=0, min_age_h=5), [],
        id="impossible-all-young",
    ),
    pytest.param(
        [snap("c", 2), snap("a", 2), snap("b", 2), snap("d", 1)], ids(), pol(count=2),
        [("a", COUNT), ("b", COUNT)],
        id="tie-break-by-image",
    ),
    pytest.param(
        [snap("b", 2, used_h=1), snap("a", 1)], ids(), pol(count=1), [("b", COUNT)],
        id="tie-on-activity-older-created-first",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("snapshots", "in_use", "policy", "expected"), CASES)
def test_plan_eviction(snapshots, in_use, policy, expected):
    assert plan(snapshots, in_use, policy) == expected


def test_input_order_does_not_matter():
    snapshots = [snap("c", 2), snap("a", 2), snap("b", 2), snap("d", 3, used_h=2), snap("e", 30)]
    expected = plan(snapshots, policy=pol(10, 2, 100))
    assert expected == [("e", TTL), ("d", COUNT), ("a", COUNT), ("b", SIZE)]
    for order in itertools.permutations(snapshots):
        assert plan(order, policy=pol(10, 2, 100)) == expected


def test_accepts_generator_and_set():
    victims = plan_eviction(
        (s for s in [snap("a", 2), snap("b", 1)]), set(), NOW, pol(count=1)
    ).victims
    assert [v.snapshot.work_item for v in victims] == ["a"]


@pytest.mark.parametrize(
    ("snapshots", "expected"),
    [
        ([], 0),
        ([snap("a", size=None)], 0),
        ([snap("a", size=100), snap("b", size=50)], 150),
        ([snap("a", size=100, image_id="x"), snap("b", size=100, image_id="x")], 100),
        ([snap("a", size=None, image_id="x"), snap("b", size=70, image_id="x")], 70),
    ],
)
def test_total_size_bytes(snapshots, expected):
    assert total_size_bytes(snapshots) == expected


# --- brute force: invariants over random small inputs ---


def _random_case(rng: random.Random):
    images = [f"sha256:{i}" for i in range(rng.randint(1, 5))]
    image_size = {image: rng.choice([None, 0, 10, 50, 100, 300]) for image in images}
    snapshots = []
    for n in range(rng.randint(0, 8)):
        image = rng.choice(images)
        age = rng.randint(0, 30 * HOUR)
        used = rng.choice([None, rng.randint(0, age)])
        snapshots.append(
            Snapshot(
                project="p",
                work_item=f"s{n}",
                image=f"cascade-snapshot-{rng.choice('xyz')}:latest",
                image_id=image,
                size_bytes=image_size[image],
                created_at=NOW - timedelta(seconds=age),
                last_used_at=None if used is None else NOW - timedelta(seconds=used),
                source=Source.REGISTERED,
            )
        )
    in_use = frozenset(image for image in images if rng.random() < 0.25)
    policy = PolicySettings(
        ttl_seconds=rng.randint(0, 30 * HOUR),
        max_count=rng.randint(0, 8),
        max_size_bytes=rng.choice([0, 50, 100, 200, 400, 1000]),
        min_age_seconds=rng.choice([0, 0, HOUR, 5 * HOUR, 40 * HOUR]),
    )
    return snapshots, in_use, policy


def _lru(snapshot: Snapshot):
    return (snapshot.last_activity, snapshot.created_at, snapshot.image, snapshot.key)


@pytest.mark.parametrize("seed", range(400))
def test_invariants_random(seed):
    snapshots, in_use, policy = _random_case(random.Random(seed))
    victims = plan_eviction(snapshots, in_use, NOW, policy).victims

    def age(s: Snapshot) -> timedelta:
        return NOW - s.created_at

    def protected(s: Snapshot) -> bool:
        return s.image_id in in_use or age(s) < timedelta(seconds=policy.min_age_seconds)

    chosen = [v.snapshot.key for v in victims]
    assert len(chosen) == len(set(chosen)), "a snapshot chosen twice"
    assert all(v.snapshot.image_id not in in_use for v in victims)
    assert all(not protected(v.snapshot) for v in victims if v.reason is not TTL)
    reasons = [v.reason for v in victims]
    assert reasons == sorted(reasons, key=[TTL, COUNT, SIZE].index)

    by_reason = {r: [v.snapshot for v in victims if v.reason is r] for r in (TTL, COUNT, SIZE)}
    ttl = timedelta(seconds=policy.ttl_seconds)
    expired = {s.key for s in snapshots if age(s) > ttl and s.image_id not in in_use}
    assert {s.key for s in by_reason[TTL]} == expired
    assert [s.created_at for s in by_reason[TTL]] == sorted(s.created_at for s in by_reason[TTL])
    assert by_reason[COUNT] == sorted(by_reason[COUNT], key=_lru)

    after_ttl = [s for s in snapshots if s.key not in expired]
    after_count = [s for s in after_ttl if s not in by_reason[COUNT]]
    remaining = [s for s in snapshots if s.key not in set(chosen)]
    # count: met, or only protected ones are left; never more taken than needed; LRU respected
    assert len(remaining) <= policy.max_count or all(protected(s) for s in remaining)
    if by_reason[COUNT]:
        assert len(after_count) >= policy.max_count
        last = _lru(by_reason[COUNT][-1])
        assert all(protected(s) or _lru(s) > last for s in after_count)
    # size: met, or every unprotected one left frees no bytes; the last one taken was needed
    size = total_size_bytes(remaining)
    if size > policy.max_size_bytes:
        for s in remaining:
            others = [o for o in remaining if o is not s]
            assert protected(s) or total_size_bytes(others) == size
    if by_reason[SIZE]:
        assert total_size_bytes([*remaining, by_reason[SIZE][-1]]) > policy.max_size_bytes
    # size takes images whole (every holder, one after the other), each image at the place of
    # its most recently used holder in the walk; while over the cap, only a protected holder
    # keeps an image that frees bytes
    sized = [image for image, _holders in itertools.groupby(s.image_id for s in by_reason[SIZE])]
    assert len(sized) == len(set(sized)), "an image's holders taken apart"
    assert not [s for s in remaining if s.image_id in sized], "a holder of a taken image left"

    def position(image_id: str):
        return max(_lru(s) for s in after_count if s.image_id == image_id)

    assert sized == sorted(sized, key=position)
    if size > policy.max_size_bytes:
        for image_id in {s.image_id for s in remaining}:
            holders = [s for s in remaining if s.image_id == image_id]
            assert any(protected(s) for s in holders) or not total_size_bytes(holders)


# --- leases, per-project pools, disk pressure, unique bytes, and the explanation ---

DISK = Reason.DISK


def psnap(project: str, name: str, age_h: float = 1, **kwargs) -> Snapshot:
    """`snap` in another project."""
    base = snap(name, age_h, **kwargs)
    return Snapshot(
        project, base.work_item, base.image, base.image_id, base.size_bytes,
        base.created_at, base.last_used_at, base.source,
    )  # fmt: skip


def with_projects(policy: PolicySettings, **projects: tuple[float, int, int]) -> PolicySettings:
    """`policy` plus per-project (ttl hours, max count, max size)."""
    own = tuple(
        (name, Limits(int(ttl_h * HOUR), count, size))
        for name, (ttl_h, count, size) in sorted(projects.items())
    )
    return PolicySettings(
        ttl_seconds=policy.ttl_seconds, max_count=policy.max_count,
        max_size_bytes=policy.max_size_bytes, min_age_seconds=policy.min_age_seconds,
        projects=own,
    )  # fmt: skip


def explain(snapshots, policy, in_use=frozenset(), leased=frozenset(), image_bytes=None,
            bytes_to_free=0):  # fmt: skip
    result = plan_eviction(
        snapshots, in_use, NOW, policy, leased_ids=leased, image_bytes=image_bytes,
        bytes_to_free=bytes_to_free,
    )  # fmt: skip
    return (
        [(v.snapshot.work_item, v.reason) for v in result.victims],
        [(s.snapshot.work_item, s.reason, s.protection.value) for s in result.skipped],
    )


RULE_CASES = [
    pytest.param(
        [snap("a", 30), snap("b", 20)], pol(ttl_h=10), ids(), ids("a"), None, 0,
        ([("b", TTL)], [("a", TTL, "leased")]),
        id="lease-protects-from-ttl",
    ),
    pytest.param(
        [snap("a", 4), snap("b", 3), snap("c", 2)], pol(count=1), ids(), ids("a"), None, 0,
        ([("b", COUNT), ("c", COUNT)], [("a", COUNT, "leased")]),
        id="lease-protects-from-count-walk-continues",
    ),
    pytest.param(
        [snap("a", 4), snap("b", 3)], pol(count=0), ids("a"), ids("a"), None, 0,
        ([("b", COUNT)], [("a", COUNT, "leased")]),
        id="leased-and-in-use-says-leased",
    ),
    pytest.param(
        [snap("a", 4), snap("b", 3), snap("c", 0.5)], pol(count=0, min_age_h=1), ids("b"),
        ids(), None, 0,
        ([("a", COUNT)], [("b", COUNT, "in-use"), ("c", COUNT, "min-age")]),
        id="skipped-say-what-protects-them",
    ),
    pytest.param(
        [snap("a", 30), snap("b", 4)], pol(ttl_h=10, count=0), ids("a"), ids(), None, 0,
        ([("b", COUNT)], [("a", TTL, "in-use")]),
        id="skipped-once-under-the-first-rule",
    ),
    pytest.param(
        # virtual sizes say 300 > 250; unique bytes say 30 + 30 + 100 = 160: nothing to do
        [snap("a", 3), snap("b", 2), snap("c", 1)], pol(size=250), ids(), ids(),
        {"sha256:a": 30, "sha256:b": 30, "sha256:c": 100}, 0,
        ([], []),
        id="unique-bytes-under-the-cap",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2), snap("c", 1)], pol(size=120), ids(), ids(),
        {"sha256:a": 30, "sha256:b": 30, "sha256:c": 100}, 0,
        ([("a", SIZE), ("b", SIZE)], []),
        id="unique-bytes-over-the-cap",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2), snap("c", 1)], pol(size=10**9), ids(), ids(),
        {"sha256:a": 30, "sha256:b": 200}, 150,
        ([("a", DISK), ("b", DISK)], []),
        id="disk-takes-lru-until-enough-is-freed",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2), snap("c", 1)], pol(size=10**9), ids(), ids(),
        {"sha256:a": 0, "sha256:b": 200}, 150,
        ([("b", DISK)], []),
        id="disk-skips-what-frees-nothing",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2), snap("c", 1)], pol(count=2), ids(), ids(), None, 150,
        ([("a", COUNT), ("b", DISK)], []),
        id="disk-counts-bytes-other-rules-free",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2), snap("c", 0.5)], pol(min_age_h=1), ids(), ids("a"),
        None, 10**6,
        ([("b", DISK)], [("a", DISK, "leased"), ("c", DISK, "min-age")]),
        id="disk-respects-every-protection",
    ),
    pytest.param(
        [snap("a", 3), snap("b", 2)], pol(), ids(), ids(), None, 0,
        ([], []),
        id="no-pressure-no-disk-victims",
    ),
    pytest.param(
        [psnap("big", "a", 3), psnap("big", "b", 2), psnap("p", "c", 4), psnap("p", "d", 1)],
        with_projects(pol(count=1), big=(1000, 5, 10**9)), ids(), ids(), None, 0,
        ([("c", COUNT)], []),
        id="project-pool-has-its-own-count",
    ),
    pytest.param(
        [psnap("short", "a", 3), psnap("p", "b", 3)],
        with_projects(pol(ttl_h=10), short=(2, 5, 10**9)), ids(), ids(), None, 0,
        ([("a", TTL)], []),
        id="project-ttl-shorter-than-global",
    ),
    pytest.param(
        [psnap("long", "a", 30), psnap("p", "b", 30)],
        with_projects(pol(ttl_h=10), long=(100, 5, 10**9)), ids(), ids(), None, 0,
        ([("b", TTL)], []),
        id="project-ttl-longer-than-global",
    ),
    pytest.param(
        [psnap("small", "a", 3), psnap("small", "b", 2), psnap("p", "c", 4)],
        with_projects(pol(size=10**9), small=(1000, 5, 100)), ids(), ids(), None, 0,
        ([("a", SIZE)], []),
        id="project-size-cap",
    ),
    pytest.param(
        [psnap("x", "a", 5), psnap("y", "b", 4), psnap("x", "c", 3)],
        with_projects(pol(), x=(1000, 5, 10**9)), ids(), ids(), None, 150,
        ([("a", DISK), ("b", DISK)], []),
        id="disk-walks-every-pool-in-lru-order",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("snapshots", "policy", "in_use", "leased", "image_bytes", "bytes_to_free", "expected"),
    RULE_CASES,
)
def test_plan_rules(snapshots, policy, in_use, leased, image_bytes, bytes_to_free, expected):
    assert explain(snapshots, policy, in_use, leased, image_bytes, bytes_to_free) == expected


@pytest.mark.parametrize("seed", range(300))
def test_leases_and_disk_invariants_random(seed):
    rng = random.Random(seed)
    snapshots, in_use, policy = _random_case(rng)
    leased = frozenset(s.image_id for s in snapshots if rng.random() < 0.2)
    bytes_to_free = rng.choice([0, 0, 50, 200, 10**6])
    result = plan_eviction(
        snapshots, in_use, NOW, policy, leased_ids=leased, bytes_to_free=bytes_to_free
    )
    victims = result.victims
    assert not [v for v in victims if v.snapshot.image_id in leased], "a leased image chosen"
    assert not [v for v in victims if v.snapshot.image_id in in_use], "an image in use chosen"
    chosen = {v.snapshot.key for v in victims}
    assert len(chosen) == len(victims)
    assert not chosen & {s.snapshot.key for s in result.skipped}, "both chosen and skipped"
    if bytes_to_free == 0:
        assert DISK not in {v.reason for v in victims}


# --- images with several tags: the size and disk rules take them whole, or not at all ---

X = "sha256:x"
SHARED_CASES = [
    pytest.param(
        # the reproduction: before, neither holder was ever taken
        [snap("a", 2, size=5000, image_id=X), snap("b", 1, size=5000, image_id=X)],
        pol(size=1000), ids(), ids(), None, 0,
        ([("a", SIZE), ("b", SIZE)], []),
        id="two-holders-over-max-size-taken-together",
    ),
    pytest.param(
        # 300 + 100 + 100 > 150: x frees 300 once (counted twice, the walk would stop at 600)
        [snap("a", 3, size=300, image_id=X), snap("b", 2, size=300, image_id=X), snap("c", 1),
         snap("d", 0.5)],
        pol(size=150), ids(), ids(), None, 0,
        ([("a", SIZE), ("b", SIZE), ("c", SIZE)], []),
        id="two-holders-bytes-counted-once",
    ),
    pytest.param(
        # a is young: x stays, b is passed because a keeps the image; c is taken instead
        [snap("b", 3, size=300, image_id=X), snap("a", 0.5, size=300, image_id=X), snap("c", 2)],
        pol(size=100, min_age_h=1), ids(), ids(), None, 0,
        ([("c", SIZE)], [("b", SIZE, "shared"), ("a", SIZE, "min-age")]),
        id="one-holder-young-none-taken",
    ),
    pytest.param(
        [snap("a", 3, size=300, image_id=X), snap("b", 2, size=300, image_id=X), snap("c", 1)],
        pol(size=100), ids("x"), ids(), None, 0,
        ([("c", SIZE)], [("a", SIZE, "in-use"), ("b", SIZE, "in-use")]),
        id="image-in-use-none-taken",
    ),
    pytest.param(
        # b holds x in the global pool, whose rules keep it: own's size rule cannot free x
        [psnap("own", "a", 3, size=300, image_id=X), psnap("p", "b", 2, size=300, image_id=X),
         psnap("own", "c", 1)],
        with_projects(pol(), own=(1000, 5, 100)), ids(), ids(), None, 0,
        ([("c", SIZE)], [("a", SIZE, "shared")]),
        id="holder-in-another-pool-shared",
    ),
    pytest.param(
        # zz's count rule takes a, so aa's size rule (whose pool comes first) may take x
        [psnap("zz", "a", 3, size=300, image_id=X), psnap("aa", "b", 2, size=300, image_id=X)],
        with_projects(pol(), aa=(1000, 5, 100), zz=(1000, 0, 10**9)), ids(), ids(), None, 0,
        ([("b", SIZE), ("a", COUNT)], []),
        id="holder-leaving-another-pool-is-no-obstacle",
    ),
    pytest.param(
        # the disk rule walks every pool: it takes x, and a is no longer listed as passed
        [psnap("own", "a", 3, size=300, image_id=X), psnap("p", "b", 2, size=300, image_id=X),
         psnap("own", "c", 1)],
        with_projects(pol(), own=(1000, 5, 100)), ids(), ids(), None, 250,
        ([("c", SIZE), ("a", DISK), ("b", DISK)], []),
        id="disk-takes-what-a-size-rule-passed-as-shared",
    ),
    pytest.param(
        # x stands where b (1h) does: c goes first, then x frees the 150 still needed
        [snap("a", 3, size=300, image_id=X), snap("c", 2), snap("b", 1, size=300, image_id=X)],
        pol(), ids(), ids(), None, 250,
        ([("c", DISK), ("a", DISK), ("b", DISK)], []),
        id="disk-takes-a-multi-tag-image-whole",
    ),
    pytest.param(
        [snap("a", 3, size=300, image_id=X), snap("c", 2), snap("b", 1, size=300, image_id=X)],
        pol(), ids(), ids("x"), None, 250,
        ([("c", DISK)], [("a", DISK, "leased"), ("b", DISK, "leased")]),
        id="disk-passes-a-leased-multi-tag-image",
    ),
    pytest.param(
        # b (4h) is x's least recent holder, but a used it 30 min ago: c (3h) goes first
        [snap("a", 5, used_h=0.5, image_id=X), snap("b", 4, image_id=X), snap("c", 3)],
        pol(size=100), ids(), ids(), None, 0,
        ([("c", SIZE)], []),
        id="lru-position-of-the-most-recent-holder",
    ),
    pytest.param(
        # count goes by tags: each holder by its own last use, as before
        [snap("a", 5, used_h=0.5, image_id=X), snap("b", 4, image_id=X), snap("c", 3)],
        pol(count=1), ids(), ids(), None, 0,
        ([("b", COUNT), ("c", COUNT)], []),
        id="count-takes-each-holder-by-its-own-use",
    ),
    pytest.param(
        [snap("d", 5), snap("a", 4, size=300, image_id=X), snap("b", 3, size=300, image_id=X),
         snap("c", 2, size=300, image_id=X)],
        pol(size=150), ids(), ids(), None, 0,
        ([("d", SIZE), ("a", SIZE), ("b", SIZE), ("c", SIZE)], []),
        id="three-holders",
    ),
    pytest.param(
        # count takes d and a; x goes with its two holders left, a leaving anyway
        [snap("d", 5), snap("a", 4, size=300, image_id=X), snap("b", 3, size=300, image_id=X),
         snap("c", 2, size=300, image_id=X)],
        pol(count=2, size=150), ids(), ids(), None, 0,
        ([("d", COUNT), ("a", COUNT), ("b", SIZE), ("c", SIZE)], []),
        id="three-holders-one-taken-by-count",
    ),
    pytest.param(
        # created an hour "from now" (a skewed clock): age zero, so min_age 0 does not protect
        [snap("f", -1), snap("a", 2)], pol(count=0), ids(), ids(), None, 0,
        ([("a", COUNT), ("f", COUNT)], []),
        id="future-creation-is-age-zero",
    ),
    pytest.param(
        [snap("f", -1, size=300)], pol(ttl_h=0, count=0, min_age_h=1), ids(), ids(), None, 10,
        ([], [("f", COUNT, "min-age")]),
        id="future-creation-younger-than-min-age-and-never-expired",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("snapshots", "policy", "in_use", "leased", "image_bytes", "bytes_to_free", "expected"),
    SHARED_CASES,
)
def test_multi_tag_images(snapshots, policy, in_use, leased, image_bytes, bytes_to_free, expected):
    assert explain(snapshots, policy, in_use, leased, image_bytes, bytes_to_free) == expected


@pytest.mark.parametrize("seed", range(300))
def test_pools_and_shared_images_invariants_random(seed):
    rng = random.Random(seed)
    snapshots, in_use, policy = _random_case(rng)
    # the global pool and two projects with limits of their own
    snapshots = [replace(s, project=rng.choice("pqr")) for s in snapshots]
    own = {
        name: (rng.choice([1, 10, 1000]), rng.randint(0, 4), rng.choice([0, 100, 400, 10**9]))
        for name in "qr"
    }
    policy = with_projects(policy, **own)
    leased = frozenset(s.image_id for s in snapshots if rng.random() < 0.1)
    bytes_to_free = rng.choice([0, 0, 50, 200, 10**6])
    result = plan_eviction(
        snapshots, in_use, NOW, policy, leased_ids=leased, bytes_to_free=bytes_to_free
    )

    def protected(s: Snapshot) -> bool:
        young = NOW - s.created_at < timedelta(seconds=policy.min_age_seconds)
        return s.image_id in in_use | leased or young

    chosen = {v.snapshot.key for v in result.victims}
    skipped = [s.snapshot.key for s in result.skipped]
    assert len(chosen) == len(result.victims)
    assert len(skipped) == len(set(skipped))
    assert not chosen & set(skipped), "both chosen and skipped"
    assert not [v for v in result.victims if v.reason is not TTL and protected(v.snapshot)]
    left = [s for s in snapshots if s.key not in chosen]
    taken_whole = {v.snapshot.image_id for v in result.victims if v.reason in (SIZE, DISK)}
    assert not [s for s in left if s.image_id in taken_whole], "a holder of a taken image left"
    for passed in result.skipped:
        if passed.protection == "shared":
            holder = passed.snapshot
            assert not protected(holder)
            assert [s for s in left if s.image_id == holder.image_id and s.key != holder.key]
    # listed pool by pool (the global one first), disk last
    order = [None, "q", "r", DISK]

    def pool(s: Snapshot) -> str | None:
        return s.project if s.project in own else None

    ranks = [order.index(DISK if v.reason is DISK else pool(v.snapshot)) for v in result.victims]
    assert ranks == sorted(ranks)

    def kept_by_protection(holders: list[Snapshot]) -> bool:
        return any(protected(s) for s in holders) or not total_size_bytes(holders)

    # the disk rule stops short only where protections keep every image left that frees bytes
    if bytes_to_free:
        gone = [v.snapshot for v in result.victims if v.snapshot.image_id not in
                {s.image_id for s in left}]  # fmt: skip
        if total_size_bytes(gone) < bytes_to_free:
            for image_id in {s.image_id for s in left}:
                assert kept_by_protection([s for s in left if s.image_id == image_id])
    # a pool over its cap keeps an image only for a protected holder or one left elsewhere
    for name in [None, "q", "r"]:
        cap = policy.limits_for(name).max_size_bytes if name else policy.max_size_bytes
        members = [s for s in left if pool(s) == name]
        if total_size_bytes(members) > cap:
            for image_id in {s.image_id for s in members}:
                holders = [s for s in members if s.image_id == image_id]
                elsewhere = [s for s in left if s.image_id == image_id and pool(s) != name]
                assert kept_by_protection(holders) or elsewhere


def test_protections_are_the_wire_contracts():
    """The dry run sends `protected_by` as these values: the schema and the client list them."""
    document = json.loads((Path(__file__).parent.parent / "docs" / "openapi.json").read_text())
    wire = document["components"]["schemas"]["Protection"]["enum"]
    assert [p.value for p in Protection] == wire == list(get_args(client.Protection))
