"""How full the filesystem under Docker's data root is, against the disk watermarks.

Kept apart from the policy (which only ever sees `bytes_to_free`) and from Docker removal:
this module finds the data root once (the configured path, else Docker's `DockerRootDir`),
measures it with statvfs in a worker thread (a hung network filesystem must not stall the
event loop), and remembers the last reading for `/v1/status`, STATUS= and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .config import PolicySettings
from .disk import Pressure, disk_usage, pressure
from .docker_ops import DockerGateway, DockerUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DiskReading:
    """The last measurement, or why there is none."""

    path: str
    pressure: Pressure | None
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        measured = self.pressure
        if measured is None:
            return {"path": self.path or None, "error": self.error}
        usage = measured.usage
        return {
            "path": self.path,
            "total_bytes": usage.total_bytes,
            "free_bytes": usage.free_bytes,
            "used_ratio": round(usage.used_ratio, 4),
            "high_free_bytes": measured.high_free_bytes,
            "low_free_bytes": measured.low_free_bytes,
            "above_high": measured.above_high,
            "error": None,
        }


class DiskWatch:
    def __init__(self, docker: DockerGateway, configured_root: str) -> None:
        self.docker = docker
        self.configured_root = configured_root
        self.last: DiskReading | None = None  # None: disabled or not measured yet
        self._root: str = configured_root
        self._measured_at = float("-inf")  # time.monotonic() of the last reading

    async def measure(self, policy: PolicySettings) -> Pressure | None:
        """Measure now; None when the watermarks are off or the data root cannot be seen."""
        if policy.disk_high is None or policy.disk_low is None:
            self.last = None
            return None
        if not self._root and not self.docker.url.startswith("unix://"):
            problem = (
                f"the Docker engine at {self.docker.url} is not on this host: set [docker] "
                "data_root to a path on the filesystem of its data root, or the watermarks off"
            )
            self._record(DiskReading("", None, problem))
            return None
        if not self._root:
            try:
                self._root = await self.docker.data_root()
            except DockerUnavailable as error:
                self._record(DiskReading("", None, f"Docker is not reachable: {error}"))
                return None
        try:
            usage = await asyncio.to_thread(disk_usage, self._root)
        except OSError as error:
            problem = (
                f"cannot measure {self._root} ({error.strerror or error}); set [docker] "
                "data_root to a path of the same filesystem the agent can see"
            )
            self._record(DiskReading(self._root, None, problem))
            return None
        measured = pressure(usage, policy.disk_high, policy.disk_low)
        self._record(DiskReading(self._root, measured))
        return measured

    def seconds_until_stale(self, seconds: float) -> float:
        """How long until the last reading (below high, or failed) is `seconds` old; 0 when
        there is none or it was above high: measure now."""
        last = self.last
        quiet = last is not None and (last.pressure is None or not last.pressure.above_high)
        return max(0.0, self._measured_at + seconds - time.monotonic()) if quiet else 0.0

    def _record(self, reading: DiskReading) -> None:
        self._measured_at = time.monotonic()
        previous = self.last
        if reading.error and (previous is None or previous.error != reading.error):
            log.warning("disk watermarks: %s", reading.error)
        was_high = previous is not None and previous.pressure and previous.pressure.above_high
        if reading.pressure and reading.pressure.above_high and not was_high:
            usage = reading.pressure.usage
            log.warning(
                "disk: %s is above the high watermark (%.1f%% used, %d bytes free)",
                reading.path,
                usage.used_ratio * 100,
                usage.free_bytes,
            )
        self.last = reading
