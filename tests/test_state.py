"""RegistryState.apply: the semantics of each journal record, malformed records, rebuilds."""

from __future__ import annotations

import copy
import random
from datetime import timedelta
from typing import Any

import pytest

from snapagentd.models import DISCOVERED_PROJECT, Reason, Snapshot, Source
from snapagentd.state import (
    PendingRemoval,
    RegistryState,
    gone_record,
    put_record,
    retire_record,
    touch_record,
)

from .builders import NOW, snap


def discovered(image: str, image_id: str) -> Snapshot:
    return snap(image, image, image_id, project=DISCOVERED_PROJECT, source=Source.DISCOVERED)


def fold(*records: dict[str, Any]) -> RegistryState:
    state = RegistryState()
    for record in records:
        state.apply(record)
    check_invariants(state)
    return state


def check_invariants(state: RegistryState) -> None:
    """The holder index matches the entries, and no pending image is held by a live entry."""
    refs = {snapshot.ref for snapshot in state.entries.values()}
    for ref in refs:
        assert state.holders(ref) == {
            key for key, snapshot in state.entries.items() if snapshot.ref == ref
        }
    for key, snapshot in state.entries.items():
        assert snapshot.key == key
        # A registration adopts a discovered image; discovery never shadows a registration.
        sources = {state.entries[k].source for k in state.holders(snapshot.ref)}
        assert len(sources) == 1, f"{snapshot.ref} is both registered and discovered"
    for ref, pending in state.pending.items():
        assert pending.ref == ref
        assert not state.holders(ref), f"{ref} is both pending and held"
    assert len(state) == len(state.to_records())
    assert not state.known_images.keys() & {s.image_id for s in state.entries.values()}


def snapshot_of(state: RegistryState) -> tuple[Any, ...]:
    refs = {s.ref for s in state.entries.values()} | set(state.pending)
    return (
        dict(state.entries),
        dict(state.pending),
        {ref: set(state.holders(ref)) for ref in refs},
    )


def assert_same_state(a: RegistryState, b: RegistryState) -> None:
    assert a.entries == b.entries
    assert a.pending == b.pending
    assert snapshot_of(a) == snapshot_of(b)


# --- put ------------------------------------------------------------------------------------


def test_put_adds_an_entry_held_under_its_ref() -> None:
    a = snap("a")
    state = fold(put_record(a))
    assert state.entries == {("proj", "a"): a}
    assert state.holders(a.ref) == {("proj", "a")}
    assert state.pending == {}
    assert len(state) == 1


def test_put_of_a_new_image_replaces_the_entry_without_a_pending_removal() -> None:
    old = snap("a", image_id="sha256:old")
    new = snap("a", image_id="sha256:new")
    state = fold(put_record(old), put_record(new))
    assert state.entries == {new.key: new}
    assert state.holders(old.ref) == set()
    assert state.holders(new.ref) == {new.key}
    assert state.pending == {}  # removals are only ever created by retire


def test_two_keys_may_hold_the_same_ref() -> None:
    a = snap("a", image="cascade-snapshot-shared:latest", image_id="sha256:s")
    b = snap("b", image="cascade-snapshot-shared:latest", image_id="sha256:s")
    state = fold(put_record(a), put_record(b))
    assert state.holders(a.ref) == {a.key, b.key}
    assert state.with_tag("cascade-snapshot-shared:latest") in ([a, b], [b, a])


# --- retire ---------------------------------------------------------------------------------


def test_put_then_retire_moves_the_entry_to_pending() -> None:
    a = snap("a")
    state = fold(put_record(a), retire_record(a, Reason.TTL, NOW))
    assert state.entries == {}
    assert state.holders(a.ref) == set()
    assert state.pending == {a.ref: PendingRemoval(a, Reason.TTL, NOW)}
    assert len(state) == 1


def test_retire_while_another_key_holds_the_same_ref_creates_no_pending_removal() -> None:
    a = snap("a", image="cascade-snapshot-shared:latest", image_id="sha256:s")
    b = snap("b", image="cascade-snapshot-shared:latest", image_id="sha256:s")
    state = fold(put_record(a), put_record(b), retire_record(a, Reason.COUNT, NOW))
    assert state.entries == {b.key: b}
    assert state.holders(a.ref) == {b.key}
    assert state.pending == {}
    # Once the last holder leaves, the image is pending removal.
    state.apply(retire_record(b, Reason.COUNT, NOW))
    assert state.entries == {}
    assert state.pending == {b.ref: PendingRemoval(b, Reason.COUNT, NOW)}


def test_stale_retire_for_another_image_id_keeps_the_current_entry() -> None:
    old = snap("a", image_id="sha256:old")
    new = snap("a", image_id="sha256:new")
    state = fold(put_record(old), put_record(new), retire_record(old, Reason.SUPERSEDED, NOW))
    assert state.entries == {new.key: new}
    assert state.pending == {old.ref: PendingRemoval(old, Reason.SUPERSEDED, NOW)}


def test_stale_retire_of_another_tag_with_the_same_image_id_keeps_the_current_entry() -> None:
    old = snap("a", image="cascade-snapshot-a:v1", image_id="sha256:same")
    new = snap("a", image="cascade-snapshot-a:v2", image_id="sha256:same")
    state = fold(put_record(old), put_record(new))
    state.apply(retire_record(old, Reason.COUNT, NOW))
    assert state.entries == {new.key: new}


def test_retire_of_an_unknown_key_still_records_the_pending_removal() -> None:
    a = snap("a")
    state = fold(retire_record(a, Reason.INVALIDATED, NOW))
    assert state.entries == {}
    assert state.pending == {a.ref: PendingRemoval(a, Reason.INVALIDATED, NOW)}


# --- gone -----------------------------------------------------------------------------------


def test_gone_removes_the_pending_removal() -> None:
    a = snap("a")
    other = snap("b")
    state = fold(
        put_record(a),
        put_record(other),
        retire_record(a, Reason.TTL, NOW),
        retire_record(other, Reason.TTL, NOW),
        gone_record(a.image, a.image_id),
    )
    assert state.pending == {other.ref: PendingRemoval(other, Reason.TTL, NOW)}
    assert state.entries == {}


def test_gone_removes_every_live_entry_with_that_image_and_id_and_nothing_else() -> None:
    tag = "cascade-snapshot-shared:latest"
    a = snap("a", image=tag, image_id="sha256:s")
    b = snap("b", image=tag, image_id="sha256:s")
    same_tag_other_id = snap("c", image=tag, image_id="sha256:other")
    same_id_other_tag = snap("d", image="cascade-snapshot-d:latest", image_id="sha256:s")
    state = fold(
        put_record(a),
        put_record(b),
        put_record(same_tag_other_id),
        put_record(same_id_other_tag),
        gone_record(tag, "sha256:s"),
    )
    assert state.entries == {
        same_tag_other_id.key: same_tag_other_id,
        same_id_other_tag.key: same_id_other_tag,
    }
    assert state.holders((tag, "sha256:s")) == set()
    assert state.pending == {}


def test_gone_of_an_unknown_image_changes_nothing() -> None:
    a = snap("a")
    state = fold(put_record(a))
    before = snapshot_of(state)
    state.apply(gone_record("cascade-snapshot-zzz:latest", "sha256:zzz"))
    assert snapshot_of(state) == before


# --- put cancels a pending removal ----------------------------------------------------------


def test_put_of_a_pending_image_cancels_the_removal() -> None:
    a = snap("a")
    again = snap("a", used=NOW)
    state = fold(put_record(a), retire_record(a, Reason.TTL, NOW), put_record(again))
    assert state.pending == {}
    assert state.entries == {a.key: again}


def test_put_of_a_pending_image_under_another_key_cancels_the_removal() -> None:
    a = snap("a", image="cascade-snapshot-shared:latest", image_id="sha256:s")
    b = snap("b", image="cascade-snapshot-shared:latest", image_id="sha256:s")
    state = fold(put_record(a), retire_record(a, Reason.TTL, NOW), put_record(b))
    assert state.pending == {}
    assert state.entries == {b.key: b}


def test_put_of_the_same_tag_with_another_id_does_not_cancel_the_removal() -> None:
    a = snap("a", image_id="sha256:old")
    b = snap("a", image_id="sha256:new")
    state = fold(put_record(a), retire_record(a, Reason.TTL, NOW), put_record(b))
    assert set(state.pending) == {a.ref}
    assert state.entries == {b.key: b}


# --- discovered entries ---------------------------------------------------------------------


def test_discovered_put_is_ignored_when_a_registered_entry_holds_the_ref() -> None:
    a = snap("a")
    state = fold(put_record(a))
    before = snapshot_of(state)
    state.apply(put_record(discovered(a.image, a.image_id)))
    assert snapshot_of(state) == before


def test_discovered_put_is_kept_when_nobody_holds_the_ref() -> None:
    d = discovered("cascade-snapshot-found:latest", "sha256:f")
    state = fold(put_record(d))
    assert state.entries == {(DISCOVERED_PROJECT, "cascade-snapshot-found:latest"): d}
    assert state.holders(d.ref) == {d.key}


def test_registering_a_discovered_image_replaces_its_discovered_entry() -> None:
    d = discovered("cascade-snapshot-found:latest", "sha256:f")
    other = discovered("cascade-snapshot-found:latest", "sha256:g")
    a = snap("a", image=d.image, image_id=d.image_id)
    state = fold(put_record(d), put_record(a))
    assert state.entries == {a.key: a}
    assert state.holders(d.ref) == {a.key}
    # A discovered entry for the same tag but another image is not adopted.
    state = fold(put_record(other), put_record(a))
    assert state.entries == {other.key: other, a.key: a}


# --- touch ----------------------------------------------------------------------------------


def test_touch_sets_last_used_at() -> None:
    a = snap("a")
    state = fold(put_record(a), touch_record(a, NOW))
    assert state.entries[a.key] == a.touched(NOW)
    assert state.entries[a.key].last_activity == NOW


def test_touch_with_a_stale_image_id_is_ignored() -> None:
    old = snap("a", image_id="sha256:old")
    new = snap("a", image_id="sha256:new")
    state = fold(put_record(old), put_record(new), touch_record(old, NOW))
    assert state.entries == {new.key: new}
    assert state.entries[new.key].last_used_at is None


def test_touch_of_an_unknown_key_creates_nothing() -> None:
    state = fold(touch_record(snap("a"), NOW))
    assert state.entries == {}
    assert len(state) == 0


# --- malformed records ----------------------------------------------------------------------


def broken_snapshot(**changes: Any) -> dict[str, Any]:
    data = snap("x").to_json()
    for name, value in changes.items():
        if value is _DELETE:
            del data[name]
        else:
            data[name] = value
    return {"op": "put", "snapshot": data}


_DELETE = object()
_TOUCH = touch_record(snap("a"), NOW)
_RETIRE = retire_record(snap("a"), Reason.TTL, NOW)


def without(record: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != name}


def changed(record: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**record, **changes}


MALFORMED = [
    pytest.param({}, id="no-op"),
    pytest.param({"op": "zap"}, id="unknown-op"),
    pytest.param({"op": "put"}, id="put-without-snapshot"),
    pytest.param(broken_snapshot(image_id=_DELETE), id="snapshot-without-image-id"),
    pytest.param(broken_snapshot(project=_DELETE), id="snapshot-without-project"),
    pytest.param(broken_snapshot(source="stolen"), id="snapshot-bad-source"),
    pytest.param(broken_snapshot(created_at="yesterday"), id="snapshot-bad-created-at"),
    pytest.param(broken_snapshot(created_at="2024-06-01T12:00:00"), id="snapshot-naive-time"),
    pytest.param(broken_snapshot(last_used_at="later"), id="snapshot-bad-last-used-at"),
    pytest.param(broken_snapshot(size_bytes="big"), id="snapshot-size-not-int"),
    pytest.param(broken_snapshot(size_bytes=True), id="snapshot-size-bool"),
    pytest.param(without(_TOUCH, "project"), id="touch-without-project"),
    pytest.param(without(_TOUCH, "at"), id="touch-without-at"),
    pytest.param(changed(_TOUCH, at="noon"), id="touch-bad-at"),
    pytest.param(without(_TOUCH, "image_id"), id="touch-without-image-id"),
    pytest.param(changed(_RETIRE, reason="boredom"), id="retire-bad-reason"),
    pytest.param(without(_RETIRE, "at"), id="retire-without-at"),
    pytest.param(without(_RETIRE, "snapshot"), id="retire-without-snapshot"),
    pytest.param(without(gone_record("i", "sha256:i"), "image_id"), id="gone-without-id"),
    pytest.param(changed(_TOUCH, at=5), id="touch-at-not-a-string"),
    pytest.param(broken_snapshot(created_at=None), id="snapshot-created-at-null"),
    pytest.param(broken_snapshot(created_at=_DELETE), id="snapshot-without-created-at"),
    pytest.param(broken_snapshot(last_used_at=1.5), id="snapshot-last-used-at-number"),
    pytest.param({"op": "instance"}, id="instance-without-id"),
    pytest.param({"op": "engine", "id": "ABCD"}, id="engine-without-root"),
]


@pytest.mark.parametrize("record", MALFORMED)
def test_malformed_record_raises_and_leaves_the_state_unchanged(record: dict[str, Any]) -> None:
    a = snap("a")
    b = snap("b")
    state = fold(put_record(a), put_record(b), retire_record(b, Reason.TTL, NOW))
    before = snapshot_of(state)
    # KeyError/ValueError as documented; TypeError (a non-object where an object belongs) is
    # also what Journal.load expects.
    with pytest.raises((KeyError, ValueError, TypeError)):
        state.apply(copy.deepcopy(record))
    assert snapshot_of(state) == before
    check_invariants(state)


@pytest.mark.parametrize("snapshot", [None, "x", [1]], ids=["null", "string", "list"])
def test_put_with_a_snapshot_that_is_not_an_object_raises_type_error(snapshot: Any) -> None:
    state = fold(put_record(snap("a")))
    before = snapshot_of(state)
    with pytest.raises(TypeError):
        state.apply({"op": "put", "snapshot": snapshot})
    assert snapshot_of(state) == before


# --- to_records -----------------------------------------------------------------------------


def test_to_records_of_an_empty_state_is_empty() -> None:
    assert RegistryState().to_records() == []


def test_to_records_rebuilds_an_equal_state() -> None:
    tag = "cascade-snapshot-shared:latest"
    a = snap("a", image=tag, image_id="sha256:s")
    b = snap("b", image=tag, image_id="sha256:s")
    c = snap("c", size=None)
    d = discovered("cascade-snapshot-found:latest", "sha256:f")
    r = snap("r")
    old = snap("c", image_id="sha256:c-old")
    state = fold(
        put_record(d),
        put_record(a),
        put_record(b),
        put_record(old),
        retire_record(old, Reason.SUPERSEDED, NOW),
        put_record(c),
        touch_record(c, NOW),
        put_record(r),
        retire_record(r, Reason.INVALIDATED, NOW + timedelta(seconds=1)),
        put_record(discovered(a.image, a.image_id)),  # ignored
    )
    assert len(state.entries) == 4
    assert len(state.pending) == 2
    records = state.to_records()
    assert len(records) == len(state)
    assert_same_state(fold(*records), state)
    # Pending removals come first: a put later in the list would otherwise cancel them.
    assert [record["op"] for record in records] == ["retire"] * 2 + ["put"] * 4


def random_records(rng: random.Random, length: int) -> list[dict[str, Any]]:
    """Records over a small universe, so keys, tags and ids collide often."""
    keys = [("proj", "a"), ("proj", "b"), ("other", "a")]
    tags = ["cascade-snapshot-x:latest", "cascade-snapshot-y:latest"]
    ids = ["sha256:1", "sha256:2"]
    state = RegistryState()
    records = []
    for step in range(length):
        moment = NOW + timedelta(seconds=step)
        kind = rng.choice(["put", "put", "discover", "touch", "retire", "gone"])
        live = list(state.entries.values())
        if kind == "put":
            project, work_item = rng.choice(keys)
            record = put_record(snap(work_item, rng.choice(tags), rng.choice(ids), project=project))
        elif kind == "discover":
            record = put_record(discovered(rng.choice(tags), rng.choice(ids)))
        elif kind == "touch" and live:
            record = touch_record(rng.choice(live), moment)
        elif kind == "retire" and live:
            record = retire_record(rng.choice(live), rng.choice(list(Reason)), moment)
        elif kind == "retire":  # a stale retire of something that is not live
            record = retire_record(snap("a", rng.choice(tags), rng.choice(ids)), Reason.TTL, moment)
        else:
            record = gone_record(rng.choice(tags), rng.choice(ids))
        state.apply(record)
        records.append(record)
    return records


@pytest.mark.parametrize("seed", range(200))
def test_random_histories_keep_invariants_and_rebuild_from_to_records(seed: int) -> None:
    rng = random.Random(seed)
    records = random_records(rng, rng.randint(1, 60))
    state = RegistryState()
    for record in records:
        state.apply(record)
        check_invariants(state)
    rebuilt = fold(*state.to_records())
    assert_same_state(rebuilt, state)
    # Rebuilding is idempotent: the rebuilt state yields the same records again.
    assert rebuilt.to_records() == state.to_records()
