"""The JSON-lines journal on real files: replay, group commit, torn tails, corruption,
compaction, the single-writer lock and failed writes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from snapagentd import journal as journal_module
from snapagentd.journal import (
    COMPACT_SLACK,
    RECORD_VERSION,
    THREAD_NAME,
    Journal,
    JournalCorrupt,
    JournalUnavailable,
    encode,
)
from snapagentd.models import DISCOVERED_PROJECT, Reason, Source
from snapagentd.state import (
    PendingRemoval,
    RegistryState,
    gone_record,
    put_record,
    retire_record,
    touch_record,
)

from .builders import NOW, snap

LOGGER = "snapagentd.journal"


# --- helpers --------------------------------------------------------------------------------


def open_journal(path: Path) -> tuple[Journal, RegistryState]:
    """A loaded Journal over a fresh RegistryState."""
    state = RegistryState()
    journal = Journal(path, state)
    journal.load()
    return journal, state


async def reopen(path: Path) -> tuple[RegistryState, int]:
    """Replay `path` into a new state (as a restarted daemon would) and release it again."""
    journal, state = open_journal(path)
    records = journal.records
    await journal.close()
    return state, records


def fold(records: list[dict[str, Any]]) -> RegistryState:
    state = RegistryState()
    for record in records:
        state.apply(record)
    return state


def assert_same_state(a: RegistryState, b: RegistryState) -> None:
    assert a.entries == b.entries
    assert a.pending == b.pending
    refs = {s.ref for s in a.entries.values()} | {s.ref for s in b.entries.values()}
    for ref in refs:
        assert a.holders(ref) == b.holders(ref)


def file_records(path: Path) -> list[dict[str, Any]]:
    """Every line of the file as a record; fails on a torn or garbage line."""
    content = path.read_bytes()
    assert content == b"" or content.endswith(b"\n"), "the file must end with a whole line"
    records = [json.loads(line) for line in content.splitlines()]
    assert all(record["v"] == RECORD_VERSION for record in records)
    return records


def journal_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno == logging.WARNING
    ]


async def wait_until(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


A, B, C = snap("a"), snap("b"), snap("c")
# Three records whose prefixes fold to distinct states.
THREE = [put_record(A), put_record(B), touch_record(A, NOW)]


async def write_journal(path: Path, records: list[dict[str, Any]]) -> bytes:
    journal, _state = open_journal(path)
    await journal.append(records)
    await journal.close()
    return path.read_bytes()


# --- creation and replay --------------------------------------------------------------------


async def test_load_creates_the_directory_and_file_with_private_modes(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "snapagentd" / "journal.jsonl"
    journal, state = open_journal(path)
    try:
        assert path.is_file()
        assert path.read_bytes() == b""
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert (tmp_path / "var" / "lib").is_dir()
        assert journal.records == 0
        assert len(state) == 0
    finally:
        await journal.close()


async def test_empty_file_loads_as_empty_state(tmp_path: Path, caplog) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"")
    state, records = await reopen(path)
    assert records == 0
    assert state.entries == {}
    assert state.pending == {}
    assert path.read_bytes() == b""
    assert journal_warnings(caplog) == []


async def test_append_then_reopen_gives_the_same_state(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    tag = "cascade-snapshot-d:latest"
    d = snap(tag, tag, "sha256:d", project=DISCOVERED_PROJECT, source=Source.DISCOVERED)
    batches = [
        [put_record(A), put_record(B)],
        [put_record(C)],
        [touch_record(A, NOW)],
        [retire_record(B, Reason.TTL, NOW)],
        [put_record(snap("e")), retire_record(snap("e"), Reason.SUPERSEDED, NOW)],
        [gone_record("cascade-snapshot-e:latest", "sha256:e")],
        [put_record(d)],
    ]
    for batch in batches:
        await journal.append(batch)
    assert journal.records == sum(len(batch) for batch in batches) == 9
    assert set(state.entries) == {A.key, C.key, d.key}
    assert state.entries[A.key].last_used_at == NOW
    assert state.pending == {B.ref: PendingRemoval(B, Reason.TTL, NOW)}
    await journal.close()

    assert len(file_records(path)) == 9
    replayed, records = await reopen(path)
    assert records == 9
    assert_same_state(replayed, state)


async def test_append_applies_only_what_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    try:
        await journal.append([put_record(A)])
        assert state.entries == {A.key: A}
        assert file_records(path) == [{**put_record(A), "v": RECORD_VERSION}]
    finally:
        await journal.close()


async def test_concurrent_appends_all_complete_and_are_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    snapshots = [snap(f"item-{i}") for i in range(50)]
    await asyncio.gather(*(journal.append([put_record(s)]) for s in snapshots))
    assert journal.records == 50
    assert set(state.entries) == {s.key for s in snapshots}
    await journal.close()

    replayed, records = await reopen(path)
    assert records == 50
    assert replayed.entries == {s.key: s for s in snapshots}


def write_syscalls() -> int:
    """write-type system calls made so far by this process (all threads), from /proc."""
    with open("/proc/self/io") as stream:
        for line in stream:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    raise OSError("no syscw in /proc/self/io")


async def test_group_commit_shares_writes_between_concurrent_appends(tmp_path: Path) -> None:
    try:
        write_syscalls()
    except OSError:
        pytest.skip("/proc/self/io is not readable here: cannot count write system calls")
    journal, _state = open_journal(tmp_path / "journal.jsonl")
    try:
        before = write_syscalls()
        for i in range(50):
            await journal.append([put_record(snap(f"seq-{i}"))])
        sequential = write_syscalls() - before

        before = write_syscalls()
        await asyncio.gather(*(journal.append([put_record(snap(f"con-{i}"))]) for i in range(50)))
        concurrent = write_syscalls() - before
    finally:
        await journal.close()
    assert journal.records == 100
    # The counter is real: one-at-a-time appends need at least one write each.
    assert sequential >= 50
    # Fifty appends issued together share far fewer writes.
    assert concurrent < 10, (sequential, concurrent)


# --- torn and invalid tails -----------------------------------------------------------------


@pytest.mark.parametrize("cut", ["two-bytes", "half", "one-byte-left"])
async def test_torn_last_line_is_cut_off(tmp_path: Path, caplog, cut: str) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = tmp_path / "journal.jsonl"
    original = await write_journal(path, [dict(r) for r in THREE])
    last = len(original.splitlines(keepends=True)[-1])
    chop = {"two-bytes": 2, "half": last // 2, "one-byte-left": last - 1}[cut]
    os.truncate(path, len(original) - chop)
    kept = original[: len(original) - last]

    journal, state = open_journal(path)
    try:
        assert journal.records == 2
        assert_same_state(state, fold([dict(r) for r in THREE[:2]]))
        warnings = journal_warnings(caplog)
        assert len(warnings) == 1
        assert "torn last line" in warnings[0]
        assert path.read_bytes() == kept  # truncated to the last whole line

        await journal.append([touch_record(B, NOW)])
    finally:
        await journal.close()
    assert path.read_bytes().startswith(kept)
    assert len(file_records(path)) == 3  # no garbage in the middle
    replayed, records = await reopen(path)
    assert records == 3
    assert replayed.entries[B.key].last_used_at == NOW
    assert replayed.entries[A.key].last_used_at is None  # the torn touch is gone


async def test_last_record_missing_only_its_newline_is_kept(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = tmp_path / "journal.jsonl"
    original = await write_journal(path, [dict(r) for r in THREE])
    os.truncate(path, len(original) - 1)

    journal, state = open_journal(path)
    try:
        assert journal.records == 3
        assert_same_state(state, fold([dict(r) for r in THREE]))
        assert path.read_bytes() == original  # the newline was added back
        assert journal_warnings(caplog) == []
        await journal.append([put_record(C)])
    finally:
        await journal.close()
    assert len(file_records(path)) == 4
    replayed, _ = await reopen(path)
    assert set(replayed.entries) == {A.key, B.key, C.key}


async def test_last_line_cut_inside_a_utf8_sequence_is_cut_off(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = tmp_path / "journal.jsonl"
    accented = snap("café-✓", image="cascade-snapshot-cafe:latest", image_id="sha256:cafe")
    original = await write_journal(path, [put_record(A), put_record(accented)])
    last_start = len(original.splitlines(keepends=True)[0])
    # Keep the lead byte of the first multi-byte character of the last line, and nothing after.
    lead = next(i for i in range(last_start, len(original)) if original[i] >= 0xC0)
    os.truncate(path, lead + 1)

    journal, state = open_journal(path)
    try:
        assert state.entries == {A.key: A}
        warnings = journal_warnings(caplog)
        assert len(warnings) == 1
        assert "codec can't decode" in warnings[0]
        assert path.read_bytes() == original[:last_start]
    finally:
        await journal.close()


async def test_tail_of_only_a_partial_utf8_sequence_is_cut_off(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = tmp_path / "journal.jsonl"
    original = await write_journal(path, [dict(r) for r in THREE])
    with open(path, "ab") as stream:
        stream.write("✓".encode()[:2])

    state, records = await reopen(path)
    assert records == 3
    assert_same_state(state, fold([dict(r) for r in THREE]))
    assert len(journal_warnings(caplog)) == 1
    assert path.read_bytes() == original


@pytest.mark.parametrize(
    "garbage",
    [b"garbage\n", b"\n", b"\x00\x00\x00\n", b"[1, 2]\n", b'{"v":1,"op":"put"}\n'],
    ids=["text", "blank", "zeros", "json-array", "record-missing-a-field"],
)
async def test_invalid_last_line_with_a_newline_is_cut_off(
    tmp_path: Path, caplog, garbage: bytes
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = tmp_path / "journal.jsonl"
    original = await write_journal(path, [dict(r) for r in THREE])
    with open(path, "ab") as stream:
        stream.write(garbage)

    journal, state = open_journal(path)
    try:
        assert journal.records == 3
        assert_same_state(state, fold([dict(r) for r in THREE]))
        warnings = journal_warnings(caplog)
        assert len(warnings) == 1
        assert "invalid last line" in warnings[0]
        assert path.read_bytes() == original
        await journal.append([put_record(C)])
    finally:
        await journal.close()
    assert len(file_records(path)) == 4


# --- corruption in the middle ---------------------------------------------------------------

_TOUCH_AT_INT = {**touch_record(A, NOW), "v": 1, "at": 5}

CORRUPT_LINES = [
    pytest.param(b"garbage", id="garbage"),
    pytest.param(b"", id="blank"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(encode({**put_record(C), "v": 2}).rstrip(b"\n"), id="version-2"),
    pytest.param(b'{"v":1,"op":"zap"}', id="unknown-op"),
    pytest.param(b'{"v":1,"op":"put"}', id="missing-field"),
    pytest.param(encode(_TOUCH_AT_INT).rstrip(b"\n"), id="touch-at-not-a-string"),
]


async def corrupt_middle(path: Path, line: bytes) -> bytes:
    original = await write_journal(path, [dict(r) for r in THREE])
    lines = original.split(b"\n")
    lines[1] = line
    path.write_bytes(b"\n".join(lines))
    return path.read_bytes()


@pytest.mark.parametrize("line", CORRUPT_LINES)
async def test_corrupt_middle_line_refuses_naming_the_line_and_leaves_the_file_alone(
    tmp_path: Path, line: bytes
) -> None:
    path = tmp_path / "journal.jsonl"
    before = await corrupt_middle(path, line)
    journal = Journal(path, RegistryState())
    try:
        with pytest.raises(JournalCorrupt) as caught:
            journal.load()
    finally:
        await journal.close()
    assert f"{path}:2" in str(caught.value)
    assert path.read_bytes() == before


async def test_version_2_message_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    await corrupt_middle(path, encode({**put_record(C), "v": 2}).rstrip(b"\n"))
    journal = Journal(path, RegistryState())
    try:
        with pytest.raises(JournalCorrupt, match="record version 2 is not 1"):
            journal.load()
    finally:
        await journal.close()


async def test_corrupt_line_before_a_torn_tail_is_still_corruption(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    original = await write_journal(path, [dict(r) for r in THREE])
    lines = original.split(b"\n")  # three records and an empty remainder
    lines[2] = b"garbage"
    lines[3] = b'{"v":1,"op":'
    path.write_bytes(b"\n".join(lines))
    before = path.read_bytes()
    journal = Journal(path, RegistryState())
    try:
        with pytest.raises(JournalCorrupt):
            journal.load()
    finally:
        await journal.close()
    assert path.read_bytes() == before


# --- opening: symlinks and a second writer --------------------------------------------------


async def test_symlinked_journal_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(b"")
    path = tmp_path / "journal.jsonl"
    path.symlink_to(target)
    journal = Journal(path, RegistryState())
    try:
        with pytest.raises(JournalCorrupt, match="cannot open journal") as caught:
            journal.load()
    finally:
        await journal.close()
    assert str(path) in str(caught.value)


async def test_a_second_journal_on_the_same_file_is_refused_while_the_first_is_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    first, _ = open_journal(path)
    try:
        await first.append([put_record(A)])
        second_state = RegistryState()
        second = Journal(path, second_state)
        with pytest.raises(JournalCorrupt, match="in use by another snapagentd"):
            second.load()
        assert len(second_state) == 0
        await second.close()
        # The refused attempt did not release the first journal's lock, nor disturb its file.
        with pytest.raises(JournalCorrupt, match="in use"):
            Journal(path, RegistryState()).load()
        await first.append([put_record(B)])
    finally:
        await first.close()
    state, records = await reopen(path)
    assert records == 2
    assert set(state.entries) == {A.key, B.key}


# --- compaction -----------------------------------------------------------------------------


async def test_compact_rewrites_the_file_as_the_live_state(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    # Enough other entries that 3000 touches stay below the automatic compaction threshold
    # (records > 2 * len(state) + COMPACT_SLACK), so the explicit compaction does the work.
    fillers = [snap(f"filler-{i}") for i in range(2000)]
    await journal.append([put_record(s) for s in fillers] + [put_record(A)])
    await journal.append([put_record(B), retire_record(B, Reason.COUNT, NOW)])
    times = [NOW + timedelta(seconds=i) for i in range(3000)]
    for start in range(0, 3000, 100):
        await journal.append([touch_record(A, moment) for moment in times[start : start + 100]])
    assert journal.records == 2001 + 2 + 3000
    assert journal.records <= 2 * len(state) + COMPACT_SLACK
    assert len(file_records(path)) == journal.records  # nothing compacted it yet
    size_before = path.stat().st_size

    await journal.compact()
    assert journal.records == len(state.to_records()) == len(state) == 2002
    assert len(file_records(path)) == 2002
    assert path.stat().st_size < size_before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.jsonl"]  # no .compact left
    assert state.entries[A.key].last_used_at == times[-1]

    # The compacted file still takes appends.
    await journal.append([touch_record(B, NOW), put_record(C)])
    await journal.close()
    replayed, records = await reopen(path)
    assert records == 2004
    assert_same_state(replayed, state)
    assert replayed.pending == {B.ref: PendingRemoval(B, Reason.COUNT, NOW)}


@pytest.mark.parametrize("position", ["first", "middle", "last", "after-flush-started"])
async def test_appends_concurrent_with_a_compaction_all_land(tmp_path: Path, position: str) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    await journal.append([put_record(A)] + [touch_record(A, NOW) for _ in range(500)])
    newcomers = [snap(f"new-{i}") for i in range(20)]
    appends = [journal.append([put_record(s)]) for s in newcomers]
    if position == "after-flush-started":
        started = [asyncio.ensure_future(append) for append in appends]
        await asyncio.sleep(0)  # yield: the appends queue and the flusher starts writing
        await asyncio.sleep(0)
        await asyncio.gather(journal.compact(), *started)
    else:
        index = {"first": 0, "middle": 10, "last": 20}[position]
        appends.insert(index, journal.compact())
        await asyncio.gather(*appends)
    assert set(state.entries) == {A.key} | {s.key for s in newcomers}
    await journal.close()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.jsonl"]
    assert len(file_records(path)) == journal.records
    assert journal.records < 501 + 20  # the compaction did happen
    replayed, records = await reopen(path)
    assert records == journal.records
    assert_same_state(replayed, state)


async def test_appends_during_a_running_compaction_all_land(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    fillers = [snap(f"filler-{i}") for i in range(3000)]
    await journal.append([put_record(s) for s in fillers])
    compaction = asyncio.ensure_future(journal.compact())
    await asyncio.sleep(0)  # let the compaction take the lock and start its rewrite
    newcomers = [snap(f"new-{i}") for i in range(30)]
    await asyncio.gather(*(journal.append([put_record(s)]) for s in newcomers))
    await compaction
    await journal.close()

    replayed, records = await reopen(path)
    assert records == 3030
    assert replayed.entries.keys() == state.entries.keys()
    assert {s.key for s in newcomers} <= replayed.entries.keys()


async def test_journal_compacts_itself_once_it_exceeds_the_threshold(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    threshold = 2 * 1 + COMPACT_SLACK  # one live entry
    touches = [touch_record(A, NOW + timedelta(seconds=i)) for i in range(threshold - 1)]
    await journal.append([put_record(A), *touches])
    await journal.close()  # waits for any compaction it might have started
    assert journal.records == threshold  # exactly at the threshold: not compacted
    assert len(file_records(path)) == threshold

    journal, state = open_journal(path)
    journal.compact_now()  # not grown past the threshold either
    assert journal.records == threshold
    last = NOW + timedelta(days=1)
    await journal.append([touch_record(A, last)])  # one more: over the threshold
    await wait_until(lambda: journal.records == 1, "the automatic compaction")
    assert file_records(path) == [{**put_record(state.entries[A.key]), "v": RECORD_VERSION}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.jsonl"]
    await journal.append([put_record(B)])
    await journal.close()

    replayed, records = await reopen(path)
    assert records == 2
    assert replayed.entries == {A.key: A.touched(last), B.key: B}


async def test_automatic_compaction_under_many_concurrent_appends(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    await journal.append([put_record(A)])
    moments = [NOW + timedelta(seconds=i) for i in range(1500)]
    await asyncio.gather(*(journal.append([touch_record(A, m)]) for m in moments))
    await wait_until(lambda: journal.records < 1000, "the automatic compaction")
    await journal.close()
    assert len(file_records(path)) == journal.records
    replayed, _ = await reopen(path)
    assert_same_state(replayed, state)
    assert replayed.entries[A.key].last_used_at == moments[-1]


def write_raw(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(encode({**record, "v": RECORD_VERSION}) for record in records))


async def test_compact_now_shrinks_a_grown_file_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    last = NOW + timedelta(seconds=1499)
    touches = [touch_record(A, NOW + timedelta(seconds=i)) for i in range(1500)]
    write_raw(path, [put_record(A), put_record(B), retire_record(B, Reason.TTL, NOW), *touches])
    size_before = path.stat().st_size

    journal, state = open_journal(path)
    assert journal.records == 1503
    journal.compact_now()
    assert journal.records == len(state) == 2
    assert path.stat().st_size < size_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.jsonl"]
    assert [record["op"] for record in file_records(path)] == ["retire", "put"]
    await journal.append([put_record(C)])
    await journal.close()

    replayed, records = await reopen(path)
    assert records == 3
    assert_same_state(replayed, state)
    assert replayed.entries[A.key].last_used_at == last
    assert replayed.pending == {B.ref: PendingRemoval(B, Reason.TTL, NOW)}


async def test_compact_now_leaves_a_small_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    write_raw(path, [put_record(A), *(touch_record(A, NOW) for _ in range(100))])
    before = path.read_bytes()
    inode = path.stat().st_ino
    journal, _state = open_journal(path)
    journal.compact_now()
    assert journal.records == 101
    await journal.close()
    assert path.read_bytes() == before
    assert path.stat().st_ino == inode


# --- state semantics through the journal ----------------------------------------------------


async def test_removal_lifecycle_survives_restarts(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    tag = "cascade-snapshot-shared:latest"
    x = snap("x", image=tag, image_id="sha256:s")
    y = snap("y", image=tag, image_id="sha256:s")

    journal, _ = open_journal(path)
    await journal.append([put_record(A), put_record(x), put_record(y)])
    await journal.append([retire_record(A, Reason.TTL, NOW), retire_record(x, Reason.COUNT, NOW)])
    await journal.close()
    state, _ = await reopen(path)
    assert state.entries == {y.key: y}
    assert state.pending == {A.ref: PendingRemoval(A, Reason.TTL, NOW)}  # y still holds x's image

    journal, _ = open_journal(path)
    await journal.append([put_record(A)])  # registered again: the removal is cancelled
    await journal.append([gone_record(tag, "sha256:s")])  # Docker lost the shared image
    await journal.close()
    state, records = await reopen(path)
    assert records == 7
    assert state.entries == {A.key: A}
    assert state.pending == {}


# --- failed writes --------------------------------------------------------------------------


@pytest.mark.skipif(
    not hasattr(signal, "SIGXFSZ") or signal.getsignal(signal.SIGXFSZ) != signal.SIG_IGN,
    reason="needs SIGXFSZ ignored (as CPython sets it) so that RLIMIT_FSIZE yields EFBIG",
)
async def test_failed_write_applies_nothing_and_cuts_the_partial_record(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    await journal.append([put_record(A)])
    good = path.read_bytes()
    big = snap("b" * 2000)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Room for part of the record only: the kernel writes a prefix, then refuses with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) + 100, hard))
    try:
        with pytest.raises(JournalUnavailable, match="File too large"):
            await journal.append([put_record(big)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert state.entries == {A.key: A}
    assert journal.records == 1
    assert path.read_bytes() == good  # the partial record was cut off again

    await journal.append([put_record(B)])
    await journal.close()
    assert len(file_records(path)) == 2
    replayed, _ = await reopen(path)
    assert replayed.entries == {A.key: A, B.key: B}


# --- a journal from the future -------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b""], ids=["whole-line", "without-newline"])
@pytest.mark.parametrize(
    "future",
    [
        pytest.param(encode({**put_record(C), "v": 2}).rstrip(b"\n"), id="version-2"),
        pytest.param(b'{"v":1,"op":"pin","project":"p"}', id="unknown-record-type"),
    ],
)
async def test_a_future_record_as_the_last_line_stops_the_start_and_is_kept(
    tmp_path: Path, future: bytes, newline: bytes
) -> None:
    """A newer agent's record is not a torn write: cutting it would lose what it recorded."""
    path = tmp_path / "journal.jsonl"
    await write_journal(path, [dict(r) for r in THREE])
    with open(path, "ab") as stream:
        stream.write(future + newline)
    before = path.read_bytes()
    journal = Journal(path, RegistryState())
    try:
        with pytest.raises(JournalCorrupt, match="newer snapagentd"):
            journal.load()
    finally:
        await journal.close()
    assert path.read_bytes() == before  # nothing cut, nothing rewritten


# --- the journal's own thread ---------------------------------------------------------------


async def test_appends_and_compaction_run_on_the_journal_thread_while_the_default_executor_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hung Docker calls once filled asyncio's default executor and every fsync waited behind
    them (22 s): the journal's writes, fsyncs and compactions have a thread of their own."""
    loop = asyncio.get_running_loop()
    default = ThreadPoolExecutor(max_workers=2)
    loop.set_default_executor(default)
    release = threading.Event()
    blocked = [loop.run_in_executor(None, release.wait, 60) for _ in range(2)]
    queued = asyncio.ensure_future(asyncio.to_thread(lambda: None))  # waits for a worker
    path = tmp_path / "journal.jsonl"
    journal, state = open_journal(path)
    workers: list[threading.Thread] = []
    journal.on_fsync = lambda seconds: workers.append(threading.current_thread())
    real_fsync_directory = journal_module._fsync_directory

    def fsync_directory(directory: Path) -> None:  # the last step of a compaction
        workers.append(threading.current_thread())
        real_fsync_directory(directory)

    monkeypatch.setattr(journal_module, "_fsync_directory", fsync_directory)
    try:
        await asyncio.wait_for(journal.append([put_record(A), put_record(B)]), timeout=10)
        await asyncio.wait_for(journal.append([retire_record(B, Reason.TTL, NOW)]), timeout=10)
        assert file_records(path) == [
            {**record, "v": RECORD_VERSION}
            for record in [put_record(A), put_record(B), retire_record(B, Reason.TTL, NOW)]
        ]
        await asyncio.wait_for(journal.compact(), timeout=10)
        assert len(file_records(path)) == len(list(state.iter_records())) < 3
        assert not queued.done(), "the default executor was not full: the test proves nothing"
    finally:
        release.set()
        await asyncio.gather(*blocked, queued)
        default.shutdown(wait=True)
        await journal.close()
    assert [thread.name for thread in workers] == [THREAD_NAME] * 3
    assert len(set(workers)) == 1 and workers[0] is not threading.main_thread()
    assert not workers[0].is_alive()  # close() ended it


async def test_an_append_after_close_fails_instead_of_hanging(tmp_path: Path) -> None:
    journal, state = open_journal(tmp_path / "journal.jsonl")
    await journal.close()
    with pytest.raises(JournalUnavailable):
        await asyncio.wait_for(journal.append([put_record(A)]), timeout=10)
    assert state.entries == {}
