"""The durable JSON-lines journal under the registry.

Every change is a record; a record is applied to the in-memory state only after it has been
written and fsynced, so memory never runs ahead of the disk. Concurrent appends share one
write and one fsync (group commit). Compaction rewrites the live state to a temporary file,
fsyncs it, renames it over the journal and fsyncs the directory.

All blocking file work runs on the journal's own thread, never on asyncio's default executor:
a hung Docker engine whose calls fill that executor would otherwise stall every durable
write behind them (leases, releases and deletes once waited 22 s).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

RECORD_VERSION = 1
# The record types state.py applies.
KNOWN_OPS = frozenset(
    {"put", "touch", "retire", "gone", "lease", "release", "known", "forget", "instance", "engine"}
)
# Compact once the file holds this many records more than the live state needs.
COMPACT_SLACK = 1000
REWRITE_CHUNK = 1000  # records encoded per write while compacting
THREAD_NAME = "journal"  # the thread doing its writes, fsyncs and compactions


class JournalCorrupt(Exception):
    """The journal cannot be trusted; the daemon must not start on it."""


class JournalUnavailable(Exception):
    """A write or fsync failed (disk full, I/O error); nothing was applied."""


class JournalState(Protocol):
    """What the journal needs from the state it protects."""

    def apply(self, record: dict[str, Any]) -> None: ...

    def iter_records(self) -> Iterator[dict[str, Any]]: ...

    def __len__(self) -> int: ...


def encode(record: dict[str, Any]) -> bytes:
    """One line, stamped with the record version unless the record names one itself."""
    stamped = {"v": RECORD_VERSION, **record}
    return json.dumps(stamped, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (it may write fewer than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_DECODER = json.JSONDecoder()


def decode(line: bytes, number: int, path: Path) -> dict[str, Any]:
    """Parse one line; raises ValueError with a message naming the line."""
    try:
        # raw_decode skips json.loads' wrappers (a fifth of replay); the line must be one value.
        text = line.decode("utf-8").strip()
        record, end = _DECODER.raw_decode(text)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: not a JSON object")
    version = record.get("v")
    if version != RECORD_VERSION:
        raise FutureRecord(
            f"{path}:{number}: record version {version!r} is not {RECORD_VERSION} "
            "(written by a newer snapagentd?)"
        )
    if record.get("op") not in KNOWN_OPS:
        raise FutureRecord(
            f"{path}:{number}: unknown record type {record.get('op')!r} "
            "(written by a newer snapagentd?)"
        )
    return record


class FutureRecord(ValueError):
    """A whole record this version cannot read. Never cut off, even as the last line: it is
    not a torn write, and dropping it would lose what a newer agent recorded."""


@dataclass
class _Pending:
    data: bytes
    records: list[dict[str, Any]]
    done: asyncio.Future[None] = field(repr=False)


class Journal:
    """Append-only record log with group commit; owns one file descriptor."""

    def __init__(self, path: Path, state: JournalState) -> None:
        self.path = path
        self.records = 0
        self._state = state
        self._fd = -1
        self._dir_fd = -1
        self._size = 0  # bytes of whole, fsynced records: the truncation point after a failure
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._io_lock = asyncio.Lock()
        self._compaction: asyncio.Task[None] | None = None
        # One worker: writes are serialised by _io_lock anyway, and a thread of its own means
        # nothing else queued on an executor can delay an fsync. Started on first use.
        self._thread = ThreadPoolExecutor(max_workers=1, initializer=_name_thread)
        # Called with the seconds of each write+fsync of appended records (the metrics).
        self.on_fsync: Callable[[float], None] | None = None

    # --- start-up -------------------------------------------------------------------------

    def load(self) -> None:
        """Replay the file into the state (creating it if missing), cutting a torn last line."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        created = not self.path.exists()
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as error:
            raise JournalCorrupt(f"{self.path}: cannot open journal: {error.strerror}") from None
        if created:
            _fsync_directory(self.path.parent)
        # One writer only: a second daemon on the same journal would corrupt it. The lock is on
        # the directory, which (unlike the file) compaction never replaces.
        self._dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close_files()
            raise JournalCorrupt(f"{self.path} is in use by another snapagentd") from None
        with open(self._fd, "rb", closefd=False) as stream:
            content = stream.read()
        lines = content.split(b"\n")
        # Everything before the last "\n" is whole lines; the remainder is a tail without newline.
        whole, tail = lines[:-1], lines[-1]
        good_bytes = 0
        for number, line in enumerate(whole, start=1):
            is_last = number == len(whole) and not tail
            try:
                self._replay(line, number)
            except ValueError as error:
                if is_last and not isinstance(error, FutureRecord):
                    log.warning("cutting off an invalid last line: %s", error)
                    break
                raise JournalCorrupt(f"journal corrupt, refusing to start: {error}") from None
            good_bytes += len(line) + 1
            self.records += 1
        else:
            if tail:
                try:
                    self._replay(tail, len(whole) + 1)
                except FutureRecord as error:
                    raise JournalCorrupt(f"journal from a newer snapagentd: {error}") from None
                except ValueError as error:
                    log.warning("cutting off a torn last line: %s", error)
                else:
                    # A whole record that lost only its newline: keep it and finish the line.
                    os.write(self._fd, b"\n")
                    good_bytes += len(tail) + 1
                    self.records += 1
        if os.fstat(self._fd).st_size != good_bytes:
            os.ftruncate(self._fd, good_bytes)
        os.fsync(self._fd)
        self._size = good_bytes
        log.info("replayed %d records from %s", self.records, self.path)

    def _replay(self, line: bytes, number: int) -> None:
        """Apply one line; any problem becomes a ValueError naming the file and line."""
        record = decode(line, number, self.path)
        try:
            self._state.apply(record)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            problem = f"missing field {error}" if isinstance(error, KeyError) else error
            raise ValueError(f"{self.path}:{number}: invalid record: {problem}") from None

    # --- appends --------------------------------------------------------------------------

    async def append(self, records: list[dict[str, Any]]) -> None:
        """Write `records` durably, then apply them to the state, in order.

        Returns once they are fsynced and applied; raises JournalUnavailable (nothing applied)
        when the write fails. Concurrent callers share one write and one fsync.
        """
        data = b"".join(encode(record) for record in records)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(data, records, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        # Shielded: a client that hangs up must not cancel a write others are waiting on.
        await asyncio.shield(done)

    async def _flush(self) -> None:
        while self._queue:
            async with self._io_lock:
                batch, self._queue = self._queue, []
                data = b"".join(pending.data for pending in batch)
                try:
                    await self._in_thread(self._write_durably, data)
                except (OSError, RuntimeError) as error:  # RuntimeError: closed already
                    reason = getattr(error, "strerror", None) or error
                    failure = JournalUnavailable(f"journal write to {self.path} failed: {reason}")
                    log.error("%s", failure)
                    for pending in batch:
                        pending.done.set_exception(failure)
                    continue
                # Applied here, under the lock, so a compaction never misses a committed record.
                for pending in batch:
                    for record in pending.records:
                        self._state.apply(record)
                    self.records += len(pending.records)
                    pending.done.set_result(None)
            self._maybe_compact()

    def _write_durably(self, data: bytes) -> None:
        """Write and fsync; on failure cut the file back so no partial record remains."""
        started = time.perf_counter()
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as error:
                log.error("cannot cut back a failed write: %s", error)
            raise
        self._size += len(data)
        if self.on_fsync is not None:  # in the writer thread: the metrics are thread-safe
            self.on_fsync(time.perf_counter() - started)

    # --- compaction -----------------------------------------------------------------------

    def _grown(self) -> bool:
        """The file holds far more records than the live state needs."""
        return self.records > 2 * len(self._state) + COMPACT_SLACK

    def _maybe_compact(self) -> None:
        if not self._grown():
            return
        if self._compaction is None or self._compaction.done():
            self._compaction = asyncio.ensure_future(self.compact())

    async def compact(self) -> None:
        """Rewrite the journal as the live state; appends wait meanwhile, reads do not.

        The state is serialised in the worker thread, record by record: it cannot change
        meanwhile (changes are applied under the lock held here), so the event loop keeps
        serving reads instead of stalling for the whole serialisation (30 ms for 10,000
        entries), and no list of every record is ever held (it left 3.5 MiB of heap behind).
        """
        async with self._io_lock:
            before = self.records
            try:
                await self._in_thread(self._rewrite, self._state.iter_records())
            except (OSError, RuntimeError) as error:  # RuntimeError: closed already
                log.error("compaction of %s failed, keeping the old file: %s", self.path, error)
                return
            log.info("compacted %d records into %d", before, self.records)

    def compact_now(self) -> None:
        """Start-up variant: rewrite synchronously when the file has grown."""
        if self._grown():
            self._rewrite(self._state.iter_records())

    def _rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        temporary = self.path.with_name(self.path.name + ".compact")
        # Opened for appending before the rename: the descriptor follows the new file, so a
        # failure after the rename can never leave appends going to the replaced one.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        size = count = 0
        try:
            chunk: list[bytes] = []
            for record in records:
                chunk.append(encode(record))
                count += 1
                if len(chunk) == REWRITE_CHUNK:
                    size += _write_chunk(fd, chunk)
            size += _write_chunk(fd, chunk)
            os.fsync(fd)
            os.replace(temporary, self.path)
        except OSError:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        os.close(self._fd)
        self._fd = fd
        self._size = size
        self.records = count
        _fsync_directory(self.path.parent)

    # --- shutdown -------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish queued writes and a running compaction, then close the file and end the
        journal's thread (idle by then: the join is immediate)."""
        if self._flusher is not None:
            await self._flusher
        if self._compaction is not None:
            await self._compaction
        self._close_files()
        self._thread.shutdown(wait=True)

    def _in_thread(self, work: Callable[..., None], *args: Any) -> asyncio.Future[None]:
        """Run blocking file work on the journal's own thread."""
        return asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    def _close_files(self) -> None:
        for fd in (self._fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dir_fd = -1


def _name_thread() -> None:
    threading.current_thread().name = THREAD_NAME  # named in stack dumps and thread listings


def _write_chunk(fd: int, chunk: list[bytes]) -> int:
    """Write the encoded records and empty the list; returns the bytes written."""
    data = b"".join(chunk)
    write_all(fd, data)
    chunk.clear()
    return len(data)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
