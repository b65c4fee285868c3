"""Free space on the file system that holds Docker's data root, and the watermarks on it.

The agent evicts least recently used snapshots when that file system fills up: below the
*high* watermark it starts, and it stops once the *low* watermark is met again. A watermark is
either a used percentage (``"85%"``, as df's ``Use%`` column shows it) or an absolute amount of
free space (``"20GiB"``: evict while less than 20 GiB is free). Both kinds are turned into one
number, the free bytes below which the watermark is crossed, so the rest of the agent compares
bytes only.

Space is counted as an unprivileged process sees it: "free" is what df calls ``Avail``
(``f_bavail``), never the blocks only root may use, and "total" is used + available, so that
``used_ratio`` is exactly df's ``Use%`` (df rounds it up). df's ``Size`` (``f_blocks``) is larger
by the blocks nobody but root can allocate: the root reserve (``mkfs -m``) and, on ext4, the
clusters the kernel keeps back for delayed allocation (2 % of the blocks, at most 4096 clusters).

Everything here is pure apart from :func:`disk_usage` (one ``statvfs``); no Docker.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DiskUsage",
    "Pressure",
    "Watermark",
    "check_watermarks",
    "disk_usage",
    "parse_watermark",
    "pressure",
]

_HINT = '(use a used percentage such as "85%" or free space such as "20GiB")'
_PERCENT = re.compile(r"\s*([0-9]{1,3}(?:\.[0-9]{1,6})?)\s*%\s*")


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """One ``statvfs`` of a file system, in bytes as df shows them."""

    path: str
    total_bytes: int  # used + available: (f_blocks - f_bfree + f_bavail) * f_frsize
    free_bytes: int  # df's Avail: f_bavail * f_frsize (root-only blocks do not count)

    @property
    def used_ratio(self) -> float:
        """1 - free/total: 0.85 when df's ``Use%`` says 85% (df rounds up to whole percent)."""
        if self.total_bytes <= 0:
            return 1.0  # a file system with no usable block is as full as it gets
        return 1.0 - self.free_bytes / self.total_bytes

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes


def disk_usage(path: str | os.PathLike[str]) -> DiskUsage:
    """The usage of the file system holding ``path``; OSError from statvfs propagates."""
    stat = os.statvfs(path)
    used_blocks = stat.f_blocks - stat.f_bfree
    return DiskUsage(
        path=os.fspath(path),
        total_bytes=(used_blocks + stat.f_bavail) * stat.f_frsize,
        free_bytes=stat.f_bavail * stat.f_frsize,
    )


@dataclass(frozen=True, slots=True)
class Watermark:
    """A threshold on free space: a used percentage, or absolute free bytes."""

    used_percent: float | None = None  # e.g. 85.0
    free_bytes: int | None = None  # e.g. 20 * 1024**3

    def __post_init__(self) -> None:
        if (self.used_percent is None) == (self.free_bytes is None):
            raise ValueError("a watermark is either a used percentage or free bytes, not both")

    def min_free_bytes(self, total_bytes: int) -> int:
        """The free bytes below which the watermark is crossed, on a file system of
        ``total_bytes`` (used + available)."""
        if self.free_bytes is not None:
            return self.free_bytes
        assert self.used_percent is not None
        # Exact rational arithmetic: 85% of 100 bytes leaves exactly 15 free, not 15.000001.
        numerator = total_bytes * round((100 - self.used_percent) * 10**6)
        return max(0, -(-numerator // (100 * 10**6)))

    def describe(self) -> str:
        """``"85%"``, ``"85.5%"``, ``"20GiB"``, ``"500MB"`` or ``"1234B"``, for logs and status."""
        if self.used_percent is not None:
            return f"{self.used_percent:.6f}".rstrip("0").rstrip(".") + "%"
        assert self.free_bytes is not None
        return _describe_bytes(self.free_bytes)


def _describe_bytes(value: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    for unit, factor in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value}B"


def parse_watermark(value: Any) -> Watermark:
    """``"85%"``, ``"85.5%"`` (used, >0 and <=100), or free space: ``"20GiB"``, ``"500MB"``,
    integer bytes. Raises ValueError with a phrase that completes ``"policy.disk_high: ..."``."""
    from .config import size_bytes  # local: config.py imports this module

    if isinstance(value, str) and "%" in value:
        match = _PERCENT.fullmatch(value)
        if match:
            percent = float(match[1])
            if 0 < percent <= 100:
                return Watermark(used_percent=percent)
    elif isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return Watermark(free_bytes=size_bytes(value))
        except ValueError:
            pass
    raise ValueError(f"invalid watermark {value!r} {_HINT}")


def check_watermarks(high: Watermark, low: Watermark) -> None:
    """ValueError when eviction would stop (``low``) before it starts (``high``).

    Only comparable for watermarks of the same kind: used percentages need low < high, free
    bytes need low > high. Mixed kinds are allowed; :func:`pressure` reconciles them against
    the file system's size at run time.
    """
    if high.used_percent is not None and low.used_percent is not None:
        ordered, wanted = low.used_percent < high.used_percent, "a lower used percentage"
    elif high.free_bytes is not None and low.free_bytes is not None:
        ordered, wanted = low.free_bytes > high.free_bytes, "more free space"
    else:
        return  # mixed kinds: compared against the file system's size at run time
    if not ordered:
        raise ValueError(
            f"disk_low {low.describe()!r} must be {wanted} than disk_high {high.describe()!r} "
            "(eviction starts at disk_high and stops at disk_low)"
        )


@dataclass(frozen=True, slots=True)
class Pressure:
    """Where a file system stands against the watermarks, in free bytes."""

    usage: DiskUsage
    high_free_bytes: int  # eviction starts when fewer bytes than this are free
    low_free_bytes: int  # and stops once this many are free (never below high_free_bytes)

    @property
    def above_high(self) -> bool:
        return self.usage.free_bytes < self.high_free_bytes

    @property
    def bytes_to_free(self) -> int:
        """How much eviction should give back now: 0 unless above the high watermark."""
        if not self.above_high:
            return 0
        return max(0, self.low_free_bytes - self.usage.free_bytes)


def pressure(usage: DiskUsage, high: Watermark, low: Watermark) -> Pressure:
    high_free = high.min_free_bytes(usage.total_bytes)
    low_free = max(low.min_free_bytes(usage.total_bytes), high_free)
    return Pressure(usage=usage, high_free_bytes=high_free, low_free_bytes=low_free)
