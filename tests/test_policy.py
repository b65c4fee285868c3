"""Table tests and a brute-force property check for the eviction policy."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from snapagentd.config import Limits, PolicySettings
from snapagentd.models import Reason, Snapshot, Source
from snapagentd.policy import plan_eviction, total_size_bytes

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
        ids(), pol(size=300), [("c", SIZE)],
        id="evicting-one-sharer-frees-nothing",
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
    assert by_reason[SIZE] == sorted(by_reason[SIZE], key=_lru)

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
