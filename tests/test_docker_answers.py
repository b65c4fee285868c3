"""Tables for docker_answers: Docker's answers read into the agent's values (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from snapagentd.docker_answers import (
    RemovalAnswer,
    classify_conflict,
    containers_from_rows,
    created_from_seconds,
    created_from_text,
    image_from_listing,
    is_expected_untag,
    merge_answers,
    nanosecond_time,
)
from snapagentd.models import RemovalResult

R = RemovalResult
NOW = datetime(2026, 12, 8, tzinfo=UTC)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "conflict: unable to delete 1d0b2ff5c018 (cannot be forced) - image is being used "
            "by running container 9086f2c3e751",
            (R.IN_USE, "running container 9086f2c3e751"),
        ),
        (
            "conflict: unable to delete 7c606b049c82 (must be forced) - image is being used by "
            "stopped container ab517899d5f0",
            (R.IN_USE, "stopped container ab517899d5f0"),
        ),
        (
            'conflict: unable to remove repository reference "x:latest" (must force) - '
            "container 4a5b is using its referenced image 1d0b",
            (R.IN_USE, "is using its referenced image 1d0b"),
        ),
        (
            "conflict: unable to delete 7d665bb8c3d1 (cannot be forced) - image has dependent "
            "child images",
            (R.HAS_CHILDREN, "dependent child images"),
        ),
        (
            "conflict: unable to delete b19cfec4ef30 (must be forced) - image is referenced in "
            "multiple repositories",
            (R.REFERENCED, "referenced in multiple repositories"),
        ),
        ("conflict: something new", (R.FAILED, "conflict: something new")),
    ],
)
def test_409s_are_told_apart_by_their_words(message: str, expected: tuple) -> None:
    assert classify_conflict(message) == expected


@pytest.mark.parametrize(
    ("value", "usable"),
    [
        (1733616000, True),
        (7258118400, True),  # 2200: usable here; the registry treats the future
        (0, False),  # 1970: reproducible builds
        (-62167219200, False),  # year 0 (docker load): datetime cannot hold it
        (-62135596800, False),  # year 1
        (10**20, False),
        ("1733616000", False),
        (None, False),
        (True, False),
    ],
)
def test_listing_times_never_raise(value: object, usable: bool) -> None:
    moment, problem = created_from_seconds(value)
    assert (moment is not None, problem == "") == (usable, usable)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-06-01T12:00:00.123456789Z", datetime(2024, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-06-01T14:00:00+02:00", datetime(2024, 6, 1, 12, 0, tzinfo=UTC)),
        ("0000-01-01T00:00:00Z", None),
        ("0001-01-01T00:00:00Z", None),
        ("1970-01-01T00:00:00Z", None),
        ("yesterday", None),
        ("", None),
        (12, None),
    ],
)
def test_inspect_times_never_raise(value: object, expected: datetime | None) -> None:
    assert created_from_text(value)[0] == expected


def test_a_listing_row_with_odd_fields_still_reads() -> None:
    row = {"Id": "sha256:a", "RepoTags": ["<none>:<none>"], "Size": -1, "Labels": None}
    image = image_from_listing({**row, "Created": -62167219200})
    assert (image.tags, image.size_bytes, image.created_at, image.labels) == ((), None, None, ())
    assert image.created_problem.startswith("Created is out of range")


def test_containers_round_up_to_the_second_and_never_after_now() -> None:
    rows = [
        {"ImageID": "sha256:a", "Created": 1733616000},
        {"ImageID": "sha256:a", "Created": 1733615000},
        {"ImageID": "sha256:b", "Created": 99999999999},  # after now: now
        {"ImageID": "sha256:c", "Created": "odd"},
        {"ImageID": "", "Created": 1},
    ]
    found = containers_from_rows(rows, NOW)
    assert found.in_use_ids == {"sha256:a", "sha256:b", "sha256:c"}
    assert found.last_use_by_id["sha256:a"] == datetime.fromtimestamp(1733616001, UTC)
    assert found.last_use_by_id["sha256:b"] == NOW
    assert found.last_use_by_id["sha256:c"] == datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("reference", "expected", "ours"),
    [
        ("cascade-snapshot-a:latest", {"cascade-snapshot-a:latest"}, True),
        ("cascade-snapshot-a", {"cascade-snapshot-a:latest"}, True),
        ("cascade-snapshot-a@sha256:" + "ab" * 32, {"cascade-snapshot-a:latest"}, True),
        ("cascade-snapshot-b@sha256:" + "ab" * 32, {"cascade-snapshot-a:latest"}, False),
        ("foreign:1", {"cascade-snapshot-a:latest"}, False),
        ("cascade-snapshot-a:latest", set(), False),
        ("host:5000/cascade-snapshot-a@sha256:00", {"host:5000/cascade-snapshot-a:v1"}, True),
    ],
)
def test_expected_untags(reference: str, expected: set[str], ours: bool) -> None:
    assert is_expected_untag(reference, expected) is ours


@pytest.mark.parametrize(
    ("answers", "result"),
    [
        ([RemovalAnswer(R.REMOVED, deleted=("sha256:i",))], R.REMOVED),
        ([RemovalAnswer(R.UNTAGGED, untagged=("t:1",))], R.UNTAGGED),
        ([RemovalAnswer(R.ALREADY_GONE)], R.ALREADY_GONE),
        ([RemovalAnswer(R.REMOVED, untagged=("t:1",)), RemovalAnswer(R.IN_USE)], R.IN_USE),
        (
            [
                RemovalAnswer(R.UNTAGGED, untagged=("t:1",)),
                RemovalAnswer(R.REMOVED, untagged=("t:2",), deleted=("sha256:i",)),
            ],
            R.REMOVED,
        ),
        ([RemovalAnswer(R.ALREADY_GONE), RemovalAnswer(R.REFERENCED)], R.REFERENCED),
    ],
)
def test_steps_merge_into_what_became_of_the_image(
    answers: list[RemovalAnswer], result: RemovalResult
) -> None:
    merged = merge_answers("sha256:i", answers)
    assert merged.result is result
    assert merged.untagged == tuple(r for a in answers for r in a.untagged)


def test_event_times_carry_nanoseconds_not_a_bare_fraction() -> None:
    assert nanosecond_time(1700000000.5) == "1700000000.500000000"
    assert nanosecond_time(1700000000.0) == "1700000000.000000000"
