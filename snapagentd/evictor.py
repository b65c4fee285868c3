"""Eviction runs: reconcile with Docker, apply the policy, remove what it chose.

One run at a time. Runs happen at start, on every `interval` tick, on `POST /v1/evict` and when
Docker comes back. Removals of superseded or expired images requested by the API go through the
same removal path in the background, so registration never waits for Docker to delete anything.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import docker.errors

from . import telemetry
from .config import PolicySettings
from .docker_ops import DockerGateway, DockerUnavailable
from .errors import DockerUnreachable
from .models import RemovalResult, format_time, utcnow
from .policy import plan_eviction
from .registry import Registry
from .state import PendingRemoval

log = logging.getLogger(__name__)

REMOVAL_CONCURRENCY = 4  # Docker serialises much of image deletion; more threads buy little


@dataclass(frozen=True, slots=True)
class Outcome:
    removal: PendingRemoval
    result: RemovalResult

    def to_json(self) -> dict[str, Any]:
        return {
            **self.removal.snapshot.to_json(),
            "reason": self.removal.reason.value,
            "result": self.result.value,
        }


@dataclass
class EvictionReport:
    trigger: str
    started_at: datetime
    finished_at: datetime | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        counts = {result: 0 for result in RemovalResult}
        for outcome in self.outcomes:
            counts[outcome.result] += 1
        return {
            "started_at": format_time(self.started_at),
            "finished_at": format_time(self.finished_at),
            "trigger": self.trigger,
            "removed": counts[RemovalResult.REMOVED],
            "in_use": counts[RemovalResult.IN_USE],
            "already_gone": counts[RemovalResult.ALREADY_GONE],
            "failed": counts[RemovalResult.FAILED],
            "error": self.error,
        }


class Evictor:
    def __init__(self, registry: Registry, docker: DockerGateway, policy: PolicySettings) -> None:
        self.registry = registry
        self.docker = docker
        self.policy = policy
        self.last_report: EvictionReport | None = None
        self._run_lock = asyncio.Lock()
        self._removal_slots = asyncio.Semaphore(REMOVAL_CONCURRENCY)
        self._background: set[asyncio.Task[Any]] = set()

    async def run(self, trigger: str, dry_run: bool = False) -> list[Outcome]:
        """One eviction run. Raises DockerUnreachable when Docker cannot be asked."""
        async with self._run_lock:
            report = EvictionReport(trigger, utcnow())
            try:
                outcomes = await self._run(dry_run)
            except DockerUnavailable as error:
                report.error = f"Docker is not reachable: {error}"
                raise DockerUnreachable(report.error) from None
            except Exception as error:
                report.error = str(error) or type(error).__name__
                raise
            finally:
                report.finished_at = utcnow()
                if not dry_run:
                    self.last_report = report
            report.outcomes = outcomes
            if not dry_run:
                self._log(report)
            return outcomes

    async def _run(self, dry_run: bool) -> list[Outcome]:
        images = await self.docker.list_images()
        in_use = await self.docker.in_use_image_ids()
        await self.registry.reconcile(images)
        victims = plan_eviction(self.registry.state.entries.values(), in_use, utcnow(), self.policy)
        if dry_run:
            planned = [PendingRemoval(v.snapshot, v.reason, utcnow()) for v in victims]
            planned += self.registry.pending()
            return [Outcome(p, RemovalResult.PLANNED) for p in planned]
        await self.registry.retire(victims)
        return await self.remove(self.registry.pending(), in_use)

    async def remove(
        self, removals: list[PendingRemoval], in_use: frozenset[str] = frozenset()
    ) -> list[Outcome]:
        """Ask Docker to remove each image (bounded concurrency); forget those confirmed gone."""
        outcomes = await asyncio.gather(*(self._remove_one(p, in_use) for p in removals))
        await self.registry.confirm_gone([o.removal for o in outcomes if o.result.confirmed_gone])
        return list(outcomes)

    def remove_soon(self, removals: list[PendingRemoval]) -> None:
        """Start removals without waiting (superseded or expired images found by the API)."""
        if removals:
            task = asyncio.ensure_future(self._remove_logged(removals))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _remove_logged(self, removals: list[PendingRemoval]) -> None:
        try:
            await self.remove(removals)
        except Exception as error:  # the next run retries; never lose the task's error
            log.warning("background removal failed, will retry on the next run: %s", error)

    async def _remove_one(self, removal: PendingRemoval, in_use: frozenset[str]) -> Outcome:
        snapshot = removal.snapshot
        if snapshot.image_id in in_use:
            return Outcome(removal, RemovalResult.IN_USE)  # Docker would refuse: don't ask
        async with self._removal_slots:
            try:
                result = await self.docker.remove(snapshot)
            except DockerUnavailable as error:
                log.warning("remove %s: Docker is not reachable: %s", snapshot.image, error)
                result = RemovalResult.FAILED
            except (docker.errors.APIError, ValueError) as error:
                log.warning(
                    "remove %s (%s) failed, will retry: %s",
                    snapshot.image,
                    snapshot.image_id,
                    error,
                )
                telemetry.capture_removal_failure(snapshot, error)
                result = RemovalResult.FAILED
        if result is RemovalResult.IN_USE:
            log.info("remove %s: in use by a container, will retry", snapshot.image)
        return Outcome(removal, result)

    def _log(self, report: EvictionReport) -> None:
        summary = report.to_json()
        if report.outcomes or report.error:
            log.info(
                "eviction (%s): removed %d, in use %d, already gone %d, failed %d%s",
                report.trigger,
                summary["removed"],
                summary["in_use"],
                summary["already_gone"],
                summary["failed"],
                f", error: {report.error}" if report.error else "",
            )
        for outcome in report.outcomes:
            if outcome.result is RemovalResult.REMOVED:
                log.info(
                    "evicted %s (%s): %s",
                    outcome.removal.snapshot.image,
                    outcome.removal.snapshot.image_id[:19],
                    outcome.removal.reason.value,
                )

    async def run_periodically(self) -> None:
        """The eviction timer; a failing run is logged and the next tick tries again."""
        while True:
            await asyncio.sleep(self.policy.interval_seconds)
            await self.run_quietly("timer")

    async def run_quietly(self, trigger: str) -> None:
        try:
            await self.run(trigger)
        except DockerUnreachable as error:
            log.warning("eviction (%s) skipped: %s", trigger, error.message)
        except Exception as error:
            log.exception("eviction (%s) failed", trigger)
            telemetry.capture_exception(error)

    async def close(self) -> None:
        """Let background removals finish (they are short and must record their outcome)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
