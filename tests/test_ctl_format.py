"""Unit tests of snapagentctl's pure functions: formatting, rendering, request building."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from snapagentd.ctl import (
    DEFAULT_SOCKET,
    MalformedAnswer,
    build_parser,
    build_request,
    clean,
    display_width,
    format_error,
    format_pairs,
    format_table,
    human_age,
    human_duration,
    human_size,
    render,
    short_id,
)

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

ENTRY = {
    "project": "Proj",
    "work_item": "MNG-1",
    "image": "cascade-snapshot-proj-mng-1:latest",
    "image_id": "sha256:0123456789abcdef0123",
    "size_bytes": 1234567890,
    "created_at": "2024-04-30T12:00:00.000000Z",
    "last_used_at": "2024-05-01T09:00:00.000000Z",
    "source": "registered",
}
UNICODE_ENTRY = {
    "project": "日本プロジェクト",
    "work_item": "é-2",
    "image": "cascade-snapshot-x:latest",
    "image_id": "sha256:fedcba9876543210ff",
    "size_bytes": None,
    "created_at": "2024-05-01T11:58:30Z",
    "last_used_at": None,
    "source": "registered",
}
DISCOVERED_ENTRY = {
    "project": "",
    "work_item": "",
    "image": "cascade-snapshot-old:latest",
    "image_id": "sha256:aaaaaaaaaaaaaaaa",
    "size_bytes": 999,
    "created_at": "2024-04-01T12:00:00Z",
    "last_used_at": None,
    "source": "discovered",
}
STATUS = {
    "version": "0.1.0",
    "docker": {"reachable": True, "error": None, "url": "unix:///run/docker.sock"},
    "snapshots": {"count": 3, "total_size_bytes": 1234568889, "pending_removal": 0},
    "policy": {
        "ttl_seconds": 86400,
        "max_count": 5,
        "max_size_bytes": 10 * 1024**3,
        "interval_seconds": 300,
        "min_age_seconds": 0,
    },
    "last_eviction": None,
    "journal": {"path": "/var/lib/snapagentd/journal.jsonl", "records": 12},
}
# What this version's agent answers: unique bytes, leases, events, the disk, project limits.
NEW_STATUS = {
    "version": "0.2.0",
    "docker": {
        "reachable": True,
        "error": None,
        "url": "unix:///run/docker.sock",
        "events": {"connected": True, "reconnects": 0},
    },
    "snapshots": {
        "count": 3,
        "total_size_bytes": 1234568889,
        "unique_bytes": 300_000_000,
        "pending_removal": 1,
        "leases": 2,
    },
    "disk": {
        "path": "/var/lib/docker",
        "total_bytes": 100_000_000_000,
        "free_bytes": 10_000_000_000,
        "used_ratio": 0.9,
        "high_free_bytes": 15_000_000_000,
        "low_free_bytes": 20_000_000_000,
        "above_high": True,
        "error": None,
    },
    "policy": {
        **STATUS["policy"],
        "disk_high": "85%",
        "disk_low": "80%",
        "disk_interval_seconds": 30,
        "size_accounting": "unique",
        "projects": {
            "Small": {"ttl_seconds": 3600, "max_count": 2, "max_size_bytes": 10**9},
            "Big": {"ttl_seconds": 7 * 86400, "max_count": 50, "max_size_bytes": 10**11},
        },
    },
    "last_eviction": {
        "started_at": "2024-05-01T11:55:00Z",
        "finished_at": "2024-05-01T11:55:02Z",
        "trigger": "disk",
        "removed": 2,
        "in_use": 0,
        "already_gone": 0,
        "failed": 0,
        "leased": 1,
        "untagged": 0,
        "has_children": 0,
        "referenced": 0,
        "wrong_removals": 0,
        "reclaimed_bytes": 2_500_000_000,
        "odd_images": 0,
        "error": None,
    },
    "journal": {"path": "/var/lib/snapagentd/journal.jsonl", "records": 12},
}
LEASE = {
    "id": "9f2c4e1a7b3d5f60c8e1a2b4",
    "project": "Proj",
    "work_item": "MNG-1",
    "image_id": "sha256:0123456789abcdef0123",
    "expires_at": "2024-05-01T12:05:00.000000Z",
}


def explained(entry: dict, **extra: object) -> dict:
    """`entry` as a dry run gives it: with unique bytes, age and idle time."""
    return {**entry, "unique_bytes": 999_000, "age_seconds": 86400, "idle_seconds": 10800, **extra}


# --- sizes, durations, ages ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (None, "-"),
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (1234, "1.2 kB"),
        (999_949, "999.9 kB"),
        (999_950, "1.0 MB"),  # rounding up must carry into the next unit, never "1000.0 kB"
        (1_234_567_890, "1.2 GB"),
        (10 * 1024**3, "10.7 GB"),
        (2_500_000_000_000, "2.5 TB"),
        (3 * 1000**6, "3000.0 PB"),
    ],
)
def test_human_size(size: int | None, expected: str) -> None:
    assert human_size(size) == expected


@pytest.mark.parametrize("bad", [-1, True, "12", 1.5])
def test_human_size_rejects_non_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="size is not a non-negative integer"):
        human_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0, "0s"), (45, "45s"), (90, "1m30s"), (300, "5m"), (86400, "1d"), (90061, "1d1h")],
)
def test_human_duration(seconds: int, expected: str) -> None:
    assert human_duration(seconds) == expected


@pytest.mark.parametrize(
    ("iso", "expected"),
    [
        (None, "-"),
        ("2024-05-01T12:00:00Z", "just now"),
        ("2024-05-01T11:59:59.500000Z", "just now"),
        ("2024-05-01T11:59:15Z", "45s ago"),
        ("2024-05-01T11:58:30Z", "1m ago"),
        ("2024-05-01T08:59:00.123456Z", "3h ago"),  # 3h01m: the largest unit only
        ("2024-05-01T11:00:00+02:00", "3h ago"),  # an offset is honoured
        ("2024-05-01T09:00:00", "3h ago"),  # no zone means UTC
        ("2024-04-28T12:00:00Z", "3d ago"),
        ("2023-05-01T12:00:00Z", "366d ago"),
        ("2024-05-01T12:05:00Z", "in 5m"),  # clock skew: the future is said as such
    ],
)
def test_human_age(iso: str | None, expected: str) -> None:
    assert human_age(iso, NOW) == expected


@pytest.mark.parametrize("bad", ["yesterday", 12])
def test_human_age_rejects_non_times(bad: object) -> None:
    with pytest.raises(ValueError):
        human_age(bad, NOW)  # type: ignore[arg-type]


def test_short_id() -> None:
    assert short_id("sha256:0123456789abcdef0123") == "0123456789ab"
    assert short_id("0123456789abcdef") == "0123456789ab"


# --- text, tables, pairs ---------------------------------------------------------------------


def test_clean_marks_empty_and_escapes_control_characters() -> None:
    assert clean(None) == "-"
    assert clean("") == "-"
    assert clean(0) == "0"
    assert clean("日本 é") == "日本 é"
    assert clean("a\nb\tc") == "a\\nb\\tc"
    assert clean("\x1b[31mred") == "\\x1b[31mred"
    assert clean("line\u2028sep") == "line\\u2028sep"


def test_display_width_counts_terminal_columns() -> None:
    assert display_width("abc") == 3
    assert display_width("日本") == 4
    assert display_width("é") == 1  # precomposed
    assert display_width("e\u0301") == 1  # e + combining acute
    assert display_width("\uff30") == 2  # fullwidth P


def test_format_table_aligns_wide_characters() -> None:
    rows = [["日本", "x"], ["abcde", "y"], ["e\u0301", "zz"]]
    assert format_table(rows, ["PROJECT", "N"]).split("\n") == [
        "PROJECT  N",
        "日本     x",
        "abcde    y",
        "e\u0301        zz",
    ]


def test_format_table_has_no_trailing_spaces() -> None:
    assert format_table([["a", ""]], ["LONG HEADER", "B"]) == "LONG HEADER  B\na"


def test_format_pairs_aligns_values() -> None:
    assert format_pairs([("id", "1"), ("work item", "w"), ("日本", "")]) == (
        "id:        1\nwork item: w\n日本:"
    )


# --- render ----------------------------------------------------------------------------------


def test_render_list() -> None:
    """UNIQUE: the bytes only the image holds; '-' unmeasured (null) or from an older agent."""
    body = {"snapshots": [{**ENTRY, "unique_bytes": 1000}, UNICODE_ENTRY, DISCOVERED_ENTRY]}
    body["snapshots"][1] = {**UNICODE_ENTRY, "unique_bytes": None}
    assert render("list", body, NOW).split("\n") == [
        "PROJECT           WORK ITEM  IMAGE                               ID            SIZE    "
        "UNIQUE  CREATED  LAST USED  SOURCE",
        "Proj              MNG-1      cascade-snapshot-proj-mng-1:latest  0123456789ab  1.2 GB  "
        "1.0 kB  1d ago   3h ago     registered",
        "日本プロジェクト  é-2        cascade-snapshot-x:latest           fedcba987654  -       "
        "-       1m ago   -          registered",
        "-                 -          cascade-snapshot-old:latest         aaaaaaaaaaaa  999 B   "
        "-       30d ago  -          discovered",
    ]


def test_render_empty_list() -> None:
    assert render("list", {"snapshots": []}, NOW) == "no snapshots"


def test_render_evict() -> None:
    body = {
        "dry_run": True,
        "evicted": [
            {**ENTRY, "reason": "ttl", "result": "planned"},
            {**DISCOVERED_ENTRY, "reason": "count", "result": "in-use"},
        ],
    }
    assert render("evict", body, NOW).split("\n") == [
        "PROJECT  WORK ITEM  IMAGE                               ID            SIZE    CREATED  "
        "LAST USED  SOURCE      REASON  RESULT",
        "Proj     MNG-1      cascade-snapshot-proj-mng-1:latest  0123456789ab  1.2 GB  1d ago   "
        "3h ago     registered  ttl     planned",
        "-        -          cascade-snapshot-old:latest         aaaaaaaaaaaa  999 B   30d ago  "
        "-          discovered  count   in-use",
    ]


def test_render_real_run_with_a_detail_column_when_docker_said_something() -> None:
    """A real run's outcomes carry `detail`; the DETAIL column is there only when one has one."""
    body = {
        "dry_run": False,
        "evicted": [
            {
                **ENTRY,
                "reason": "ttl",
                "result": "in-use",
                "detail": "running container 1d0b2ff5c018",
            },
            {**DISCOVERED_ENTRY, "reason": "count", "result": "untagged", "detail": None},
        ],
    }
    assert render("evict", body, NOW).split("\n") == [
        "PROJECT  WORK ITEM  IMAGE                               ID            SIZE    CREATED  "
        "LAST USED  SOURCE      REASON  RESULT    DETAIL",
        "Proj     MNG-1      cascade-snapshot-proj-mng-1:latest  0123456789ab  1.2 GB  1d ago   "
        "3h ago     registered  ttl     in-use    running container 1d0b2ff5c018",
        "-        -          cascade-snapshot-old:latest         aaaaaaaaaaaa  999 B   30d ago  "
        "-          discovered  count   untagged  -",
    ]
    body["evicted"][0] = {**ENTRY, "reason": "ttl", "result": "removed", "detail": None}
    assert "DETAIL" not in render("evict", body, NOW)


def test_render_empty_evict() -> None:
    assert render("evict", {"dry_run": False, "evicted": []}, NOW) == "nothing to evict"


def test_render_dry_run_explanation() -> None:
    """In eviction order (as sent): reason, image, age, last use, unique bytes, result; then
    what was skipped and what protected it; then the disk, when it wants bytes back."""
    body = {
        "dry_run": True,
        "evicted": [
            explained(DISCOVERED_ENTRY, reason="ttl", result="planned", idle_seconds=2592000),
            explained(ENTRY, reason="invalidated", result="leased", unique_bytes=None),
        ],
        "skipped": [
            explained(UNICODE_ENTRY, reason="count", protected_by="min-age", idle_seconds=90),
            explained(ENTRY, reason="disk", protected_by="in-use", age_seconds=5),
        ],
        "disk_bytes_to_free": 4_200_000_000,
    }
    assert render("evict", body, NOW).split("\n") == [
        "REASON       IMAGE                               AGE  LAST USE  UNIQUE    RESULT",
        "ttl          cascade-snapshot-old:latest         1d   never     999.0 kB  planned",
        "invalidated  cascade-snapshot-proj-mng-1:latest  1d   3h ago    -         leased",
        "",
        "skipped:",
        "REASON  IMAGE                               AGE  LAST USE  UNIQUE    PROTECTED BY",
        "count   cascade-snapshot-x:latest           1d   never     999.0 kB  min-age",
        "disk    cascade-snapshot-proj-mng-1:latest  5s   3h ago    999.0 kB  in-use",
        "",
        "disk: above the high watermark, 4.2 GB to free",
    ]


def test_render_dry_run_with_nothing_to_evict_and_nothing_skipped() -> None:
    body = {"dry_run": True, "evicted": [], "skipped": [], "disk_bytes_to_free": 0}
    assert render("evict", body, NOW) == "nothing to evict"
    skipped = [explained(ENTRY, reason="count", protected_by="leased")]
    assert render("evict", {**body, "skipped": skipped}, NOW).split("\n") == [
        "nothing to evict",
        "",
        "skipped:",
        "REASON  IMAGE                               AGE  LAST USE  UNIQUE    PROTECTED BY",
        "count   cascade-snapshot-proj-mng-1:latest  1d   3h ago    999.0 kB  leased",
    ]


@pytest.mark.parametrize("command", ["lookup", "register"])
def test_render_single_snapshot(command: str) -> None:
    assert render(command, {"snapshot": ENTRY}, NOW) == (
        "project:   Proj\n"
        "work item: MNG-1\n"
        "image:     cascade-snapshot-proj-mng-1:latest\n"
        "id:        sha256:0123456789abcdef0123\n"
        "size:      1.2 GB (1234567890 bytes)\n"
        "created:   2024-04-30T12:00:00.000000Z (1d ago)\n"
        "last used: 2024-05-01T09:00:00.000000Z (3h ago)\n"
        "source:    registered"
    )


def test_render_single_snapshot_with_unique_bytes() -> None:
    lines = render("register", {"snapshot": {**ENTRY, "unique_bytes": 2048}}, NOW).split("\n")
    assert lines[4:7] == [
        "size:      1.2 GB (1234567890 bytes)",
        "unique:    2.0 kB (2048 bytes)",
        "created:   2024-04-30T12:00:00.000000Z (1d ago)",
    ]
    unmeasured = render("register", {"snapshot": {**ENTRY, "unique_bytes": None}}, NOW)
    assert "unique:    -" in unmeasured.split("\n")


def test_render_lookup_with_its_lease() -> None:
    body = {"snapshot": {**ENTRY, "unique_bytes": None}, "lease": LEASE}
    assert render("lookup", body, NOW).split("\n")[-2:] == [
        "lease:     9f2c4e1a7b3d5f60c8e1a2b4",
        "expires:   2024-05-01T12:05:00.000000Z (in 5m)",
    ]


def test_render_lease_and_release() -> None:
    assert render("lease", {"lease": LEASE}, NOW) == (
        "lease:     9f2c4e1a7b3d5f60c8e1a2b4\n"
        "project:   Proj\n"
        "work item: MNG-1\n"
        "id:        sha256:0123456789abcdef0123\n"
        "expires:   2024-05-01T12:05:00.000000Z (in 5m)"
    )
    released = render("release", {"lease": LEASE, "released": True}, NOW)
    assert released == render("lease", {"lease": LEASE}, NOW) + "\nreleased:  yes"


def test_render_remove_with_null_fields() -> None:
    assert render("remove", {"snapshot": UNICODE_ENTRY, "result": "already-gone"}, NOW) == (
        "project:   日本プロジェクト\n"
        "work item: é-2\n"
        "image:     cascade-snapshot-x:latest\n"
        "id:        sha256:fedcba9876543210ff\n"
        "size:      -\n"
        "created:   2024-05-01T11:58:30Z (1m ago)\n"
        "last used: -\n"
        "source:    registered\n"
        "result:    already-gone"
    )


def test_render_remove_with_docker_s_refusal_as_detail() -> None:
    """`detail` follows the result when Docker said something; a null one is not shown."""
    refused = {"snapshot": ENTRY, "result": "has-children", "detail": "dependent child images"}
    assert render("remove", refused, NOW).split("\n")[-2:] == [
        "result:    has-children",
        "detail:    dependent child images",
    ]
    removed = render("remove", {"snapshot": ENTRY, "result": "removed", "detail": None}, NOW)
    assert removed.split("\n")[-1] == "result:    removed"


def test_render_lookup_answered_from_the_registry() -> None:
    """`confirmed` false: Docker did not answer within lookup_timeout; true is not shown."""
    lines = render("lookup", {"snapshot": ENTRY, "confirmed": False}, NOW).split("\n")
    assert lines[-1] == "confirmed: no: Docker did not answer in time, from the registry"
    assert render("lookup", {"snapshot": ENTRY, "confirmed": True}, NOW) == render(
        "lookup", {"snapshot": ENTRY}, NOW
    )


def test_render_status_never_evicted() -> None:
    assert render("status", STATUS, NOW) == (
        "version:       0.1.0\n"
        "docker:        reachable (unix:///run/docker.sock)\n"
        "snapshots:     3, 1.2 GB total, 0 pending removal\n"
        "policy:        ttl 1d, max 5 snapshots, max 10.7 GB, every 5m, min age 0s\n"
        "last eviction: never\n"
        "journal:       /var/lib/snapagentd/journal.jsonl (12 records)"
    )


def test_render_status_docker_down_after_an_eviction() -> None:
    body = {
        **STATUS,
        "docker": {"reachable": False, "error": "connection refused", "url": "tcp://h:2375"},
        "last_eviction": {
            "started_at": "2024-05-01T11:55:00Z",
            "finished_at": "2024-05-01T11:55:02Z",
            "trigger": "interval",
            "removed": 2,
            "in_use": 1,
            "already_gone": 0,
            "failed": 1,
            "error": "docker: boom",
        },
    }
    lines = render("status", body, NOW).split("\n")
    assert lines[1] == "docker:        unreachable (tcp://h:2375): connection refused"
    assert lines[4] == (
        "last eviction: 5m ago (interval): 2 removed, 1 in use, 0 already gone, 1 failed, "
        "error: docker: boom"
    )


def test_render_status_eviction_still_running() -> None:
    running = {
        "started_at": "2024-05-01T11:59:50Z",
        "finished_at": None,
        "trigger": "manual",
        "removed": 0,
        "in_use": 0,
        "already_gone": 0,
        "failed": 0,
        "error": None,
    }
    lines = render("status", {**STATUS, "last_eviction": running}, NOW).split("\n")
    assert lines[4] == (
        "last eviction: 10s ago (manual): 0 removed, 0 in use, 0 already gone, 0 failed, "
        "still running"
    )


def test_render_status_of_this_version() -> None:
    """Virtual and unique bytes, leases, the event stream, the disk against its watermarks,
    the projects with limits of their own, leased removals and reclaimed bytes."""
    assert render("status", NEW_STATUS, NOW).split("\n") == [
        "version:       0.2.0",
        "docker:        reachable (unix:///run/docker.sock), events connected",
        "snapshots:     3, 1.2 GB virtual, 300.0 MB unique, 1 pending removal, 2 leases",
        "disk:          90.0% used, 10.0 GB free of 100.0 GB (/var/lib/docker): "
        "ABOVE the high watermark",
        "watermarks:    high 85% (evict below 15.0 GB free), low 80% (until 20.0 GB free), "
        "checked every 30s",
        "policy:        ttl 1d, max 5 snapshots, max 10.7 GB, every 5m, min age 0s, sizes unique",
        "projects:      Big: ttl 7d, max 50 snapshots, max 100.0 GB; "
        "Small: ttl 1h, max 2 snapshots, max 1.0 GB",
        "last eviction: 5m ago (disk): 2 removed, 0 in use, 0 already gone, 0 failed, 1 leased, "
        "2.5 GB reclaimed",
        "journal:       /var/lib/snapagentd/journal.jsonl (12 records)",
    ]


def test_render_status_shows_the_new_eviction_counts_when_not_zero() -> None:
    """Untagged, has children and referenced removals, wrong removals and odd images are
    shown only when the run had some (NEW_STATUS has them all at 0)."""
    last = {
        **NEW_STATUS["last_eviction"],
        "untagged": 3,
        "has_children": 1,
        "referenced": 2,
        "wrong_removals": 1,
        "odd_images": 2,
    }
    lines = render("status", {**NEW_STATUS, "last_eviction": last}, NOW).split("\n")
    assert lines[7] == (
        "last eviction: 5m ago (disk): 2 removed, 0 in use, 0 already gone, 0 failed, 1 leased, "
        "3 untagged, 1 has children, 2 referenced, 2.5 GB reclaimed, 1 wrong removal, "
        "2 odd images"
    )


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"disk": None}, "disk:          watermarks off"),
        (
            {"disk": {"path": "/srv/docker", "error": "cannot measure /srv/docker (EACCES)"}},
            "disk:          cannot measure /srv/docker: cannot measure /srv/docker (EACCES)",
        ),
        (
            {"disk": {"path": None, "error": "Docker is not reachable: refused"}},
            "disk:          cannot measure: Docker is not reachable: refused",
        ),
    ],
)
def test_render_status_disk_off_or_unmeasured(change: dict, line: str) -> None:
    lines = render("status", {**NEW_STATUS, **change}, NOW).split("\n")
    assert lines[3] == line
    assert not lines[4].startswith("watermarks:")


def test_render_status_events_and_unmeasured_bytes() -> None:
    body = {
        **NEW_STATUS,
        "docker": {**NEW_STATUS["docker"], "events": {"connected": False, "reconnects": 3}},
        "snapshots": {**NEW_STATUS["snapshots"], "unique_bytes": None, "leases": 1},
    }
    lines = render("status", body, NOW).split("\n")
    assert lines[1] == (
        "docker:        reachable (unix:///run/docker.sock), events not connected (3 reconnects)"
    )
    assert lines[2] == (
        "snapshots:     3, 1.2 GB virtual, unique not measured yet, 1 pending removal, 1 lease"
    )
    no_events = {**NEW_STATUS, "docker": {**NEW_STATUS["docker"], "events": None}}
    assert render("status", no_events, NOW).split("\n")[1] == (
        "docker:        reachable (unix:///run/docker.sock)"
    )


def test_render_escapes_control_characters_from_the_server() -> None:
    entry = {**ENTRY, "project": "evil\x1b]0;title\x07", "work_item": "a\nb"}
    output = render("lookup", {"snapshot": entry}, NOW)
    assert output.split("\n")[:2] == [
        "project:   evil\\x1b]0;title\\x07",
        "work item: a\\nb",
    ]


@pytest.mark.parametrize(
    ("command", "body", "message"),
    [
        ("list", {}, "missing field 'snapshots'"),
        ("list", {"snapshots": [{"project": "p"}]}, "missing field 'work_item'"),
        ("list", {"snapshots": None}, "unexpected structure ('NoneType' object is not iterable)"),
        ("lookup", {"snapshot": {**ENTRY, "size_bytes": "12"}}, "size is not a non-negative"),
        ("register", {"snapshot": {**ENTRY, "created_at": "yesterday"}}, "yesterday"),
        ("evict", {"evicted": [ENTRY]}, "missing field 'reason'"),
        ("status", {**STATUS, "journal": None}, "unexpected structure"),
        (
            "status",
            {**STATUS, "snapshots": {**STATUS["snapshots"], "pending_removal": "x"}},
            "pending_removal is not a non-negative integer: 'x'",
        ),
        ("remove", {"snapshot": ENTRY}, "missing field 'result'"),
        (
            "evict",
            {"dry_run": True, "evicted": [], "skipped": [explained(ENTRY, reason="count")]},
            "missing field 'protected_by'",
        ),
        (
            "evict",
            {"dry_run": True, "evicted": [], "skipped": [], "disk_bytes_to_free": -1},
            "disk_bytes_to_free is not a non-negative integer",
        ),
        ("evict", {"dry_run": True, "evicted": [ENTRY], "skipped": []}, "missing field 'result'"),
        (
            "status",
            {**NEW_STATUS, "disk": {**NEW_STATUS["disk"], "used_ratio": "90%"}},
            "used_ratio is not a number: '90%'",
        ),
        ("lease", {"lease": {**LEASE, "expires_at": "soon"}}, "soon"),
        ("release", {"lease": LEASE, "released": False}, "released is not true"),
        ("release", {"lease": LEASE}, "missing field 'released'"),
    ],
)
def test_render_malformed_answers(command: str, body: dict, message: str) -> None:
    with pytest.raises(MalformedAnswer) as caught:
        render(command, body, NOW)
    assert message in str(caught.value)


# --- errors ----------------------------------------------------------------------------------


def test_format_error_uses_the_server_code_and_message() -> None:
    body = b'{"error": {"code": "not_found", "message": "no snapshot for (\'p\', \'w\')"}}'
    assert format_error(404, "Not Found", body) == (
        "snapagentctl: not_found: no snapshot for ('p', 'w')"
    )


def test_format_error_escapes_control_characters() -> None:
    body = b'{"error": {"code": "bad_request", "message": "line1\\nline2"}}'
    assert format_error(400, "Bad Request", body) == "snapagentctl: bad_request: line1\\nline2"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"<html>oops</html>", "snapagentctl: HTTP 502 Bad Gateway: <html>oops</html>"),
        (b"", "snapagentctl: HTTP 502 Bad Gateway"),
        (b" \n", "snapagentctl: HTTP 502 Bad Gateway"),
        (b'{"error": "boom"}', 'snapagentctl: HTTP 502 Bad Gateway: {"error": "boom"}'),
        (
            b'{"error": {"code": 1, "message": null}}',
            'snapagentctl: HTTP 502 Bad Gateway: {"error": {"code": 1, "message": null}}',
        ),
        (b"\xff\xfe", "snapagentctl: HTTP 502 Bad Gateway: \ufffd\ufffd"),
        (b"x" * 300, "snapagentctl: HTTP 502 Bad Gateway: " + "x" * 200),
    ],
)
def test_format_error_without_the_error_shape(body: bytes, expected: str) -> None:
    assert format_error(502, "Bad Gateway", body) == expected


# --- requests --------------------------------------------------------------------------------


PW = {"project": "P", "work_item": "W"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status"], ("GET", "/v1/status", None)),
        (["list"], ("GET", "/v1/snapshots", None)),
        (
            ["list", "--project", "Proj Snap/é&x"],
            ("GET", "/v1/snapshots?project=Proj+Snap%2F%C3%A9%26x", None),
        ),
        (["list", "--project", ""], ("GET", "/v1/snapshots?project=", None)),
        (["lookup", "P", "W"], ("POST", "/v1/snapshots/lookup", PW)),
        (
            ["lookup", "P", "W", "--ttl", "60"],
            ("POST", "/v1/snapshots/lookup", {**PW, "ttl_seconds": 60}),
        ),
        (
            ["register", "P", "W", "img:latest"],
            ("POST", "/v1/snapshots", {**PW, "image": "img:latest"}),
        ),
        (
            ["register", "P", "W", "img", "--size", "0"],
            ("POST", "/v1/snapshots", {**PW, "image": "img", "size_bytes": 0}),
        ),
        (["remove", "P", "a b&c"], ("DELETE", "/v1/snapshots?project=P&work_item=a+b%26c", None)),
        (
            ["lookup", "P", "W", "--lease", "300"],
            ("POST", "/v1/snapshots/lookup", {**PW, "lease_seconds": 300}),
        ),
        (
            ["lease", "P", "W", "86400"],
            ("POST", "/v1/snapshots/lease", {**PW, "seconds": 86400}),
        ),
        (
            ["release", "9f2c 4e&1"],
            ("DELETE", "/v1/snapshots/lease?id=9f2c+4e%261", None),
        ),
        (["evict"], ("POST", "/v1/evict", {"dry_run": False})),
        (["evict", "--dry-run"], ("POST", "/v1/evict", {"dry_run": True})),
    ],
)
def test_build_request(argv: list[str], expected: tuple) -> None:
    assert build_request(build_parser().parse_args(argv)) == expected


def test_parser_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNAPAGENTD_SOCKET", raising=False)
    args = build_parser().parse_args(["status"])
    assert (args.socket, args.json, args.timeout) == (DEFAULT_SOCKET, False, 30.0)
    assert DEFAULT_SOCKET == "/run/snapagentd/snapagentd.sock"
    monkeypatch.setenv("SNAPAGENTD_SOCKET", "/tmp/env.sock")
    assert build_parser().parse_args(["status"]).socket == "/tmp/env.sock"
    args = build_parser().parse_args(["--socket", "/x.sock", "--json", "--timeout", "2.5", "list"])
    assert (args.socket, args.json, args.timeout) == ("/x.sock", True, 2.5)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["lookup", "P"],
        ["lookup", "P", "W", "--ttl", "-5"],
        ["register", "P", "W", "img", "--size", "1.5"],
        ["lookup", "P", "W", "--lease", "0"],
        ["lookup", "P", "W", "--lease", "86401"],
        ["lease", "P", "W"],
        ["lease", "P", "W", "-5"],
        ["lease", "P", "W", "1m"],
        ["release"],
        ["--timeout", "0", "status"],
        ["--timeout", "nan", "status"],
    ],
)
def test_parser_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2
