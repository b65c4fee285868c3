"""B5: resident memory with 10,000 entries, and the journal's size after compaction.

Runs on B2's agent after its load: RSS is read from /proc. Then lookups are sent until the
journal is one record short of its compaction threshold (2 x live records + 1000), one more
triggers the compaction, and the file is measured once `/v1/status` shows it compacted. The
floor is the live state serialised once: every entry of `GET /v1/snapshots` as one compact
JSON line.
"""

from __future__ import annotations

import json
import time

from snapagentd.journal import COMPACT_SLACK
from tests.agent import Agent

from .b2_lookup import lookups
from .harness import Bench, Row, drive, rss_bytes

MIB = 1024 * 1024


IDENTITY_RECORDS = 2  # the agent's instance and its engine, first in a compacted journal


def live_records(status: dict) -> int:
    """The records a compacted journal holds: entries, pending removals and the identity."""
    snapshots = status["snapshots"]
    return snapshots["count"] + snapshots["pending_removal"] + IDENTITY_RECORDS


def compact(agent: Agent, entries: int) -> None:
    """Drive lookups until the agent compacts its journal, then wait for it to finish."""
    requests = lookups(entries)
    for _ in range(100):
        status = agent.status()
        live = live_records(status)
        missing = 2 * live + COMPACT_SLACK - status["journal"]["records"] + 1
        if missing <= 0:
            break
        # Fast most of the way, then one at a time, so no append lands after the compaction.
        fast = max(0, missing - 20)
        if fast:
            drive(agent.socket_path, requests[:fast], 16, None)
        else:
            drive(agent.socket_path, requests[:missing], 1, None)
            break
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = agent.status()
        if status["journal"]["records"] == live_records(status):
            return
        time.sleep(0.05)
    raise RuntimeError("the journal did not compact")


def run(bench: Bench, agent: Agent) -> list[Row]:
    assert agent.process is not None
    rss = rss_bytes(agent.process.pid)
    entries = agent.status()["snapshots"]["count"]
    compact(agent, bench.sizes.entries)
    journal_bytes = agent.journal_path.stat().st_size
    live = b"".join(
        json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        for entry in agent.snapshots()
    )
    return [
        Row(
            "B5",
            f"resident memory, {entries:,} entries",
            rss / MIB,
            None,
            "MiB",
            "<= 60 MiB",
            ("max", 60.0),
        ),
        Row(
            "B5",
            "journal bytes after compaction",
            journal_bytes / 1024,
            len(live) / 1024,
            "KiB",
            "<= 2 x live state",
            ("max_ratio", 2.0),
        ),
    ]
