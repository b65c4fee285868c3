"""The rules that let a lookup skip asking Docker (snapagentd.confirmations): pure logic, tables.

Each case starts following the stream, applies steps, and states which (tag, image id) pairs
still hold. The daemon's wiring to real image events is tested in test_lookup_confirmations.
"""

from __future__ import annotations

from typing import Any

import pytest

from snapagentd.confirmations import Confirmations

A, B, C = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
T1, T2, T3 = "cascade-snapshot-1:latest", "cascade-snapshot-2:latest", "cascade-snapshot-3:latest"


def apply(confirmations: Confirmations, step: tuple[Any, ...]) -> None:
    kind, *args = step
    if kind == "confirm":  # asked and answered with no event in between
        tag, image_id = args
        confirmations.confirm(tag, image_id, confirmations.ticket())
    elif kind == "event":
        action, image_id = args
        confirmations.image_changed(action, image_id)
    elif kind == "overtaken":  # an event arrived while Docker was being asked
        tag, image_id, action, event_id = args
        ticket = confirmations.ticket()
        confirmations.image_changed(action, event_id)
        confirmations.confirm(tag, image_id, ticket)
    elif kind == "follow":
        confirmations.follow(*args)
    else:  # pragma: no cover - a typo in the table
        raise ValueError(kind)


CASES: dict[str, tuple[list[tuple[Any, ...]], set[tuple[str, str]]]] = {
    "confirmed holds": ([("confirm", T1, A)], {(T1, A)}),
    "re-confirmed to a new id": ([("confirm", T1, A), ("confirm", T1, B)], {(T1, B)}),
    "untag of its image drops it": (
        [("confirm", T1, A), ("confirm", T2, B), ("event", "untag", A)],
        {(T2, B)},
    ),
    "delete of its image drops it": (
        [("confirm", T1, A), ("confirm", T2, A), ("confirm", T3, B), ("event", "delete", A)],
        {(T3, B)},
    ),
    "untag of another image keeps it": ([("confirm", T1, A), ("event", "untag", C)], {(T1, A)}),
    "a tag event drops everything (it names the new image, not the old)": (
        [("confirm", T1, A), ("confirm", T2, B), ("event", "tag", C)],
        set(),
    ),
    "load drops everything": ([("confirm", T1, A), ("event", "load", C)], set()),
    "pull drops everything": ([("confirm", T1, A), ("event", "pull", C)], set()),
    "import drops everything": ([("confirm", T1, A), ("event", "import", C)], set()),
    "an action not known yet drops everything": (
        [("confirm", T1, A), ("event", "rename-in-a-future-engine", A)],
        set(),
    ),
    "untag without an id drops everything": ([("confirm", T1, A), ("event", "untag", "")], set()),
    "an event overtaking the answer voids it, even about another image": (
        [("overtaken", T1, A, "untag", C)],
        set(),
    ),
    "the stream lost drops everything": ([("confirm", T1, A), ("follow", False)], set()),
    "nothing is confirmed while the stream is down": (
        [("follow", False), ("confirm", T1, A)],
        set(),
    ),
    "back again: confirmed anew": (
        [("follow", False), ("follow", True), ("confirm", T1, A)],
        {(T1, A)},
    ),
    "a reconnect does not bring back what was confirmed before": (
        [("confirm", T1, A), ("follow", False), ("follow", True)],
        set(),
    ),
    "re-confirmed after an untag": (
        [("confirm", T1, A), ("event", "untag", A), ("confirm", T1, A)],
        {(T1, A)},
    ),
    "moved tag no longer listed under its old image": (
        [("confirm", T1, A), ("confirm", T1, B), ("event", "delete", A)],
        {(T1, B)},
    ),
}


@pytest.mark.parametrize(("steps", "holding"), CASES.values(), ids=CASES.keys())
def test_what_holds(steps: list[tuple[Any, ...]], holding: set[tuple[str, str]]) -> None:
    confirmations = Confirmations()
    confirmations.follow(True)
    for step in steps:
        apply(confirmations, step)
    every = {(tag, image_id) for tag in (T1, T2, T3) for image_id in (A, B, C)}
    assert {pair for pair in every if confirmations.holds(*pair)} == holding
    assert len(confirmations) == len(holding)


def test_nothing_holds_before_the_stream_is_followed() -> None:
    confirmations = Confirmations()
    confirmations.confirm(T1, A, confirmations.ticket())
    assert not confirmations.holds(T1, A)
