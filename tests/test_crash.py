"""Crash consistency: `kill -9` at random moments under concurrent load, and during
compaction. An acknowledged registration must survive every crash; nothing a client was not
told about may exist half-made; the journal must always load."""

from __future__ import annotations

import http.client
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from snapagentd.journal import Journal, encode
from snapagentd.models import Snapshot, Source, format_time, utcnow
from snapagentd.state import RegistryState, put_record, touch_record

from .agent import Agent, call
from .engine import make_image, wait_until

ROUNDS = 20
CLIENTS = 8
SEED = int(os.environ.get("SNAPAGENTD_CRASH_SEED", "20261127"))


@dataclass
class Ledger:
    """What the clients were told, per key: acknowledged, or sent without an answer."""

    acknowledged: dict[tuple[str, str], str] = field(default_factory=dict)  # key -> image id
    unanswered: set[tuple[str, str]] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)  # answers that were not a success
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(agent: Agent, number: int, run: int, image: str, ledger: Ledger) -> None:
    """Register new keys and look up acknowledged ones until the agent dies under us."""
    item = 0
    while True:
        key = ("crash", f"c{number}-r{run}-{item}")
        try:
            status, answer = call(
                agent.socket_path,
                "POST",
                "/v1/snapshots",
                {"project": key[0], "work_item": key[1], "image": image},
                timeout=10,
            )
        except (OSError, http.client.HTTPException):  # reset, refused, cut short: no answer
            with ledger.lock:
                ledger.unanswered.add(key)
            return
        if status != 201:
            ledger.unexpected.append(f"register {key}: {status} {answer}")
            return
        with ledger.lock:
            ledger.acknowledged[key] = answer["snapshot"]["image_id"]
            seen = list(ledger.acknowledged)
        item += 1
        try:  # a lookup journals a touch: crashes must not lose or corrupt those either
            project, work_item = seen[item % len(seen)]
            status, answer = call(
                agent.socket_path,
                "POST",
                "/v1/snapshots/lookup",
                {"project": project, "work_item": work_item},
                timeout=10,
            )
        except (OSError, http.client.HTTPException):
            return
        if status != 200:
            ledger.unexpected.append(f"lookup {project}/{work_item}: {status} {answer}")
            return


def test_kill_9_under_load_loses_no_acknowledged_registration(
    make_agent: Callable[..., Agent], docker_client: docker.APIClient
) -> None:
    chance = random.Random(SEED)
    images = [make_image(docker_client, f"cascade-snapshot-crash-{n}:latest") for n in range(8)]
    references = [f"cascade-snapshot-crash-{n}:latest" for n in range(8)]
    agent = make_agent(max_count=1_000_000)
    ledger = Ledger()
    killed_with_writes_in_flight = 0
    for run in range(ROUNDS):
        target = len(ledger.acknowledged) + CLIENTS
        unanswered_before = len(ledger.unanswered)
        threads = [
            threading.Thread(target=client, args=(agent, n, run, references[n], ledger))
            for n in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        # The random moment: some writes acknowledged in this round, then a random delay.
        wait_until(lambda: len(ledger.acknowledged) >= target or ledger.unexpected, 30)  # noqa: B023
        time.sleep(chance.uniform(0.0, 0.3))  # fault injection time, not synchronisation
        assert agent.process is not None
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(timeout=30)
        agent.process = None
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive()
        assert ledger.unexpected == []
        killed_with_writes_in_flight += len(ledger.unanswered) > unanswered_before

        agent.start()  # replays the journal; READY only once it loaded
        present = {(s["project"], s["work_item"]): s for s in agent.snapshots()}
        lost = [key for key in ledger.acknowledged if key not in present]
        assert lost == [], f"round {run}: acknowledged registrations lost: {lost[:5]}"
        for key, snapshot in present.items():
            # Present means whole: a key either acknowledged or in flight, with its image.
            assert key in ledger.acknowledged or key in ledger.unanswered, key
            assert snapshot["image_id"] in images, snapshot
            if key in ledger.acknowledged:
                assert snapshot["image_id"] == ledger.acknowledged[key]
    print(
        f"{ROUNDS} kill -9 rounds (seed {SEED}), {len(ledger.acknowledged)} acknowledged "
        f"registrations, 0 lost; {killed_with_writes_in_flight} rounds killed with a "
        "request unanswered"
    )
    assert killed_with_writes_in_flight > 0  # the kills did land in the middle of writes


# --- kill during compaction --------------------------------------------------------------


def grown_journal(path: Path, live: int, touches: int) -> RegistryState:
    """A journal of `live` entries and `touches` lookups (far above the compaction threshold),
    and the state it folds to. The images need not exist: compaction runs before the
    start-up reconcile, and the check below reads the file, not the agent."""
    now = utcnow()
    snapshots = [
        Snapshot(
            project="compact",
            work_item=f"item-{n}",
            image=f"cascade-snapshot-compact-item-{n}:latest",
            image_id="sha256:" + f"{n:064x}",
            size_bytes=1000 + n,
            created_at=now,
            last_used_at=None,
            source=Source.REGISTERED,
        )
        for n in range(live)
    ]
    records = [put_record(snapshot) for snapshot in snapshots]
    records += [touch_record(snapshots[n % live], now) for n in range(touches)]
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(b"".join(encode(record) for record in records))
    return load_state(path)


def load_state(path: Path) -> RegistryState:
    state = RegistryState()
    journal = Journal(path, state)
    journal.load()
    journal._close_files()
    return state


@pytest.mark.parametrize("attempt", range(3))
def test_kill_9_during_compaction_keeps_every_record(
    make_agent: Callable[..., Agent], attempt: int
) -> None:
    agent = make_agent(start=False)
    expected = grown_journal(agent.journal_path, live=20_000, touches=40_000 + attempt)
    temporary = agent.journal_path.with_name(agent.journal_path.name + ".compact")
    process = agent.spawn()
    deadline = time.monotonic() + 60
    while not temporary.exists():  # start-up compaction writes here, then renames
        assert process.poll() is None, agent.log()
        assert time.monotonic() < deadline, "the start-up compaction never began"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    agent.process = None

    state = load_state(agent.journal_path)
    assert state.entries == expected.entries
    print(f"attempt {attempt}: killed during compaction at {format_time(utcnow())}")
