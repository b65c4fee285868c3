"""B3: time from process start to READY=1.

(a) the shared managed tags on disk (1,000 tags over 200 distinct images in the full run) and
an empty journal: the agent discovers and journals every one of them before READY;
(b) the same images and a 100,000-record journal: half `put` (re-registrations), half `touch`
(lookups) over 1,000 keys, the history a busy router fleet leaves between compactions. The
agent replays it, compacts it at start (it is far over the threshold) and reconciles.

The floor is a Python process that imports `docker` and lists the same images. The journal
replay alone is timed in a fresh process (`Journal.load` on a copy of the file).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from snapagentd.journal import encode
from snapagentd.models import Snapshot, Source
from snapagentd.state import put_record, touch_record

from .floors import LIST_IMAGES
from .harness import Bench, Row, child_env, median

REPLAY = (
    "import sys, time; from pathlib import Path; "
    "from snapagentd.journal import Journal; from snapagentd.state import RegistryState; "
    "state = RegistryState(); journal = Journal(Path(sys.argv[1]), state); "
    "began = time.perf_counter(); journal.load(); elapsed = time.perf_counter() - began; "
    "assert journal.records == int(sys.argv[2]), journal.records; print(elapsed)"
)


def write_journal(bench: Bench, path: Path, records: int) -> None:
    """`records` valid records about the shared tags, as the agent itself would write them."""
    assert bench.client is not None
    tags = set(bench.shared_tags())
    snapshots = []
    for image in bench.client.images():
        for tag in image.get("RepoTags") or ():
            if tag in tags:
                snapshots.append(
                    Snapshot(
                        project="fleet",
                        work_item=f"replayed-{len(snapshots)}",
                        image=tag,
                        image_id=image["Id"],
                        size_bytes=image.get("Size"),
                        created_at=datetime.fromtimestamp(image["Created"], UTC),
                        last_used_at=None,
                        source=Source.REGISTERED,
                    )
                )
    moment = datetime.now(UTC) - timedelta(hours=1)
    lines = []
    while len(lines) < records:
        for snapshot in snapshots:
            lines.append(encode(put_record(snapshot)))
            moment += timedelta(microseconds=7)
            lines.append(encode(touch_record(snapshot, moment)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines[:records]))


def time_floor(bench: Bench) -> float:
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", LIST_IMAGES, bench.docker_url],
        check=True,
        env=child_env(),
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - began


def time_agent(bench: Bench, journal: Path | None) -> float:
    agent = bench.new_agent()
    if journal is not None:
        agent.journal_path.parent.mkdir(parents=True)
        shutil.copyfile(journal, agent.journal_path)
    try:
        return bench.start_agent(agent)
    finally:
        bench.stop_agent(agent)


def time_replay(journal: Path, records: int) -> float:
    copy = journal.with_name("replay.jsonl")
    shutil.copyfile(journal, copy)
    try:
        done = subprocess.run(
            [sys.executable, "-c", REPLAY, str(copy), str(records)],
            check=True,
            env=child_env(),
            capture_output=True,
        )
    finally:
        copy.unlink()
    return float(done.stdout)


def run(bench: Bench) -> list[Row]:
    sizes = bench.sizes
    tags = bench.shared_tags()
    journal = bench.directory / "b3" / "journal.jsonl"
    write_journal(bench, journal, sizes.journal_records)
    floor, empty, full, replay = [], [], [], []
    for _ in range(sizes.repetitions):
        floor.append(time_floor(bench))
        empty.append(time_agent(bench, None))
        full.append(time_agent(bench, journal))
        replay.append(time_replay(journal, sizes.journal_records))
    floor_ms = median(floor) * 1000
    records = f"{sizes.journal_records:,}"
    return [
        Row(
            "B3",
            f"start to READY=1, {len(tags):,} managed tags, empty journal",
            median(empty) * 1000,
            floor_ms,
            "ms",
            "<= 1.5 x floor",
            ("max_ratio", 1.5),
        ),
        Row(
            "B3",
            f"start to READY=1, {len(tags):,} managed tags, {records}-record journal",
            median(full) * 1000,
            floor_ms,
            "ms",
            "<= 1.5 x floor",
            ("max_ratio", 1.5),
        ),
        Row(
            "B3",
            f"journal replay of {records} records",
            median(replay) * 1000,
            None,
            "ms",
            "< 1000 ms",
            ("max", 1000.0),
        ),
    ]
