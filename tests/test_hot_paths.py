"""The indexes and caches the request paths rely on (see docs/benchmarks.md): each must agree
with the plain computation it replaces, whatever history the journal holds."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import timedelta

import pytest

from snapagentd.models import Reason, parse_time
from snapagentd.policy import total_size_bytes
from snapagentd.state import RegistryState, gone_record, put_record, retire_record, touch_record

from .agent import REPO
from .builders import NOW, snap


@pytest.mark.parametrize("seed", range(50))
def test_cached_total_size_and_tag_index_agree_with_a_scan(seed: int) -> None:
    rng = random.Random(seed)
    tags = [f"cascade-snapshot-{name}:latest" for name in "xyz"]
    ids = ["sha256:1", "sha256:2", "sha256:3"]
    state = RegistryState()
    for step in range(80):
        live = list(state.entries.values())
        kind = rng.choice(["put", "put", "touch", "retire", "gone"])
        if kind == "put" or not live:
            work_item = rng.choice("abcde")
            size = rng.choice([None, 0, 10, 250, 4000])
            record = put_record(snap(work_item, rng.choice(tags), rng.choice(ids), size=size))
        elif kind == "touch":
            record = touch_record(rng.choice(live), NOW + timedelta(seconds=step))
        elif kind == "retire":
            record = retire_record(rng.choice(live), Reason.COUNT, NOW)
        else:
            record = gone_record(rng.choice(tags), rng.choice(ids))
        state.apply(record)
        assert state.total_size_bytes() == total_size_bytes(state.entries.values())
        for tag in tags:
            scanned = [s for s in state.entries.values() if s.image == tag]
            assert sorted(state.with_tag(tag), key=lambda s: s.key) == sorted(
                scanned, key=lambda s: s.key
            )


def test_parse_time_takes_z_and_offsets_and_refuses_naive_times() -> None:
    assert parse_time("2024-06-01T12:00:00.123456Z") == NOW
    assert parse_time("2024-06-01T14:00:00.123456+02:00") == NOW
    assert parse_time("2024-06-01T14:00:00.123456+02:00").tzinfo is NOW.tzinfo
    with pytest.raises(ValueError, match="without a zone"):
        parse_time("2024-06-01T12:00:00")


def test_the_daemon_imports_sentry_only_with_a_dsn() -> None:
    """Start-up time and memory: sentry_sdk costs about 20 ms and 3 MiB nobody without a DSN
    needs."""
    code = (
        "import sys, snapagentd.daemon; "
        "assert 'sentry_sdk' not in sys.modules, 'sentry_sdk imported at start'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
