"""Snapshot values for the pure tests (state, journal): compact to write, fixed in time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from snapagentd.models import Snapshot, Source

NOW = datetime(2024, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


def snap(
    work_item: str,
    image: str | None = None,
    image_id: str | None = None,
    project: str = "proj",
    source: Source = Source.REGISTERED,
    size: int | None = 100,
    used: datetime | None = None,
) -> Snapshot:
    """A snapshot of `work_item`, committed an hour before NOW, with a tag and id named after it."""
    return Snapshot(
        project=project,
        work_item=work_item,
        image=image or f"cascade-snapshot-{work_item}:latest",
        image_id=image_id or f"sha256:{work_item}",
        size_bytes=size,
        created_at=NOW - timedelta(hours=1),
        last_used_at=used,
        source=source,
    )
