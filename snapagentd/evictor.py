"""Eviction runs: reconcile with Docker, apply the policy, remove what it chose.

One run at a time. Runs happen at start, on every `interval` tick, on `POST /v1/evict`, when
Docker or its event stream comes back, and when the disk is above its high watermark (checked
every `disk_interval` and after each registration). Removals of superseded or expired images
requested by the API go through the same removal path in the background, so registration
never waits for Docker to delete anything. Each run also removes leaked layers: dangling
images an entry once referenced (or carrying the configured label).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import telemetry
from .config import PolicySettings
from .diskwatch import DiskWatch
from .docker_ops import DockerError, DockerGateway, DockerUnavailable, ImageInfo
from .engine_owner import EngineOwner, OwnershipRefused
from .errors import DockerUnreachable
from .layers import LayerIndex
from .models import DISCOVERED_PROJECT, Reason, RemovalResult, Snapshot, Source, format_time, utcnow
from .policy import Plan, plan_eviction
from .registry import Registry
from .removals import Outcome, Remover
from .state import PendingRemoval

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Explained:
    """A dry run: the plan, with the facts it was made from."""

    plan: Plan
    pending: list[PendingRemoval]
    unique_bytes: dict[str, int]
    leased_ids: frozenset[str]
    in_use_ids: frozenset[str]
    bytes_to_free: int


@dataclass
class EvictionReport:
    trigger: str
    started_at: datetime
    finished_at: datetime | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    error: str | None = None
    odd_images: int = 0  # images whose Created Docker gave unusably (see docker_answers)

    @property
    def reclaimed_bytes(self) -> int:
        removed = (o for o in self.outcomes if o.result is RemovalResult.REMOVED)
        return sum(o.unique_bytes or 0 for o in removed)

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
            "leased": counts[RemovalResult.LEASED],
            "untagged": counts[RemovalResult.UNTAGGED],
            "has_children": counts[RemovalResult.HAS_CHILDREN],
            "referenced": counts[RemovalResult.REFERENCED],
            "wrong_removals": sum(len(outcome.wrong) for outcome in self.outcomes),
            "reclaimed_bytes": self.reclaimed_bytes,
            "odd_images": self.odd_images,
            "error": self.error,
        }


class Evictor:
    def __init__(
        self,
        registry: Registry,
        docker: DockerGateway,
        policy: PolicySettings,
        dangling_label: str = "",
        data_root: str = "",
    ) -> None:
        self.registry = registry
        self.docker = docker
        self.policy = policy
        self.dangling_label = dangling_label
        self.layers = LayerIndex()
        self.disk = DiskWatch(docker, data_root)
        self.last_report: EvictionReport | None = None
        self.managed_unique: int | None = None  # bytes only the snapshots hold, at the last run
        self._unique: dict[str, int] = {}  # unique bytes per image id, as of the last refresh
        # Images of the last listing whose Created is unusable or in the future, and why.
        self.odd_images: dict[str, str] = {}
        self._sized = False  # layers measured at least once (the size and disk rules need it)
        self._disk_check: asyncio.Task[None] | None = None
        self._disk_wanted = False  # a registration asked for a disk check not yet made
        # Called with each report once its run has finished (the last eviction's time).
        self.on_report: Any = None
        self.metrics: Any = None  # metrics.Metrics: counts every removal outcome
        # One agent per engine (the daemon sets it): checked before each run and removal.
        self.ownership: EngineOwner | None = None
        self._run_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self.removals = Remover(registry, docker, unique_of=self.unique_of)

    async def run(self, trigger: str) -> list[Outcome]:
        """One eviction run. Raises DockerUnreachable when Docker cannot be asked.

        The start-up run ("start", before READY=1) does not measure layers: two Docker calls
        per image (0.6 s for 200 images here) would delay READY, and without unique bytes it
        applies only TTL and count; the first run after READY measures and applies the rest.
        """
        async with self._run_lock:
            report = EvictionReport(trigger, utcnow())
            try:
                if self.ownership is not None:
                    await self.ownership.check()
                report.outcomes = await self._run(measure=trigger != "start")
            except OwnershipRefused as error:  # another agent's marker: remove nothing
                report.error = error.message
                log.error("eviction (%s): %s", trigger, error.message)
            except DockerUnavailable as error:
                report.error = f"Docker is not reachable: {error}"
                raise DockerUnreachable(report.error) from None
            except Exception as error:
                report.error = str(error) or type(error).__name__
                raise
            finally:
                report.odd_images = len(self.odd_images)
                report.finished_at = utcnow()
                self.last_report = report
                self._log(report)
                if self.on_report is not None:
                    self.on_report(report)
            return report.outcomes

    async def explain(self) -> Explained:
        """A dry run: what a run would remove now and what protects the rest; removes nothing
        (it reconciles with Docker first, as a run does, so the plan is about the real disk)."""
        async with self._run_lock:
            _images, containers, plan, pressure_bytes = await self._plan()
            return Explained(
                plan=plan,
                pending=self.registry.pending(),
                unique_bytes=dict(self._unique),
                leased_ids=self.registry.state.leased_ids(utcnow()),
                in_use_ids=containers,
                bytes_to_free=pressure_bytes,
            )

    async def _plan(
        self, measure: bool = True
    ) -> tuple[list[ImageInfo], frozenset[str], Plan, int]:
        if self.ownership is not None:  # the journal's ids must be this engine's
            await self.ownership.ensure_engine()
        images = await self.docker.list_images()
        self._note_odd_images(images)
        containers = await self.docker.containers()
        await self.registry.reconcile(images)
        # Events can be lost (short backlog, slow subscribers): containers tell the rest.
        await self.registry.note_last_uses(containers.last_use_by_id)
        if measure:
            await self._refresh_layers(images)
        pressure = await self.disk.measure(self.policy)
        bytes_to_free = pressure.bytes_to_free if pressure is not None else 0
        now = utcnow()
        entries = self.registry.state.entries
        self._note_managed_unique()
        plan = plan_eviction(
            entries.values(),
            containers.in_use_ids,
            now,
            self.policy,
            leased_ids=self.registry.state.leased_ids(now),
            image_bytes=self.image_bytes(),
            bytes_to_free=bytes_to_free,
            sizes_known=self._sized or self.policy.size_accounting == "virtual",
        )
        return images, containers.in_use_ids, plan, bytes_to_free

    async def _run(self, measure: bool) -> list[Outcome]:
        images, in_use, plan, _bytes_to_free = await self._plan(measure)
        await self.registry.prune_leases(utcnow())
        await self.registry.retire(plan.victims)
        outcomes = await self.removals.remove(self.registry.pending(), in_use)
        handled = frozenset(outcome.removal.snapshot.image_id for outcome in outcomes)
        outcomes += await self._remove_leaked(images, in_use, handled)
        if measure and any(o.result.confirmed_gone for o in outcomes):
            # A base the removed images shared may now be held by one snapshot alone.
            await self._refresh_layers(await self.docker.list_images())
        self._note_managed_unique()
        return outcomes

    def _note_odd_images(self, images: list[ImageInfo]) -> None:
        """Say once per image when Docker's Created cannot be used: such an image never stops a
        run (its age counts from when the agent first saw it), but someone should know."""
        now = utcnow()
        odd = {
            image.id: image.created_problem or f"Created is in the future: {image.created_at}"
            for image in images
            if image.created_problem or (image.created_at is not None and image.created_at > now)
        }
        for image_id in sorted(odd.keys() - self.odd_images.keys()):
            log.warning(
                "image %s: %s; its age counts from when the agent saw it", image_id, odd[image_id]
            )
        self.odd_images = odd
        if self.metrics is not None:
            self.metrics.set_odd_images(len(odd))

    def _note_managed_unique(self) -> None:
        """Status's figure: what removing every snapshot would free (None until measured)."""
        if self._sized:
            entries = self.registry.state.entries.values()
            self.managed_unique = self.layers.reclaimable_bytes({s.image_id for s in entries})

    async def _refresh_layers(self, images: list[ImageInfo]) -> None:
        """Layer chains for unique bytes; a failure leaves the registered sizes in charge."""
        try:
            await self.layers.refresh(self.docker.call, [image.id for image in images])
        except DockerError as error:
            waiting = "keeping the last measurement" if self._sized else "size and disk rules wait"
            log.warning("layer sizes: %s; %s", error, waiting)
        else:
            self._sized = True
        self._unique = self.layers.unique_bytes()

    def unique_of(self, image_id: str) -> int | None:
        """The bytes only this image holds (None until a run has sized it)."""
        return self._unique.get(image_id)

    def image_bytes(self) -> dict[str, int]:
        """Bytes per image id the size cap and the disk rule count, by size_accounting."""
        if self.policy.size_accounting == "unique":
            return self._unique
        return {}  # virtual: each snapshot's registered size (Docker's Size)

    async def _remove_leaked(
        self, images: list[ImageInfo], in_use: frozenset[str], handled: frozenset[str]
    ) -> list[Outcome]:
        """Remove dangling images an entry once referenced, or that carry dangling_label.

        One in use is answered `in-use` without asking Docker, as a pending removal is;
        `handled`: images this run's removals already dealt with.
        """
        state = self.registry.state
        busy = handled | state.leased_ids(utcnow()) | {ref[1] for ref in state.pending}
        removals = []
        for image in images:
            if image.tags or image.id in busy or state.with_id(image.id):
                continue
            known_tag = state.known_images.get(image.id)
            if known_tag is None and not self._labelled(image):
                continue
            placeholder = Snapshot(
                project=DISCOVERED_PROJECT,
                work_item=image.id,
                image=known_tag or "<none>:<none>",
                image_id=image.id,
                size_bytes=image.size_bytes,
                created_at=image.created_at or utcnow(),
                last_used_at=None,
                source=Source.DISCOVERED,
            )
            removals.append(PendingRemoval(placeholder, Reason.LEAKED, utcnow()))
        outcomes = await asyncio.gather(*(self.removals.remove_leaked(p, in_use) for p in removals))
        self.removals.count(outcomes)
        gone = [o.removal.snapshot.image_id for o in outcomes if o.result.confirmed_gone]
        await self.registry.forget([i for i in gone if i in state.known_images])
        return list(outcomes)

    def _labelled(self, image: ImageInfo) -> bool:
        if not self.dangling_label:
            return False
        key, sep, value = self.dangling_label.partition("=")
        labels = dict(image.labels)
        return key in labels and (not sep or labels[key] == value)

    def _log(self, report: EvictionReport) -> None:
        if report.outcomes or report.error:
            counts = Counter(outcome.result.value for outcome in report.outcomes)
            told = ", ".join(f"{result} {count}" for result, count in sorted(counts.items()))
            log.info(
                "eviction (%s): %s%s",
                report.trigger,
                told or "nothing removed",
                f"; error: {report.error}" if report.error else "",
            )
        for outcome in report.outcomes:
            if outcome.result in (RemovalResult.REMOVED, RemovalResult.UNTAGGED):
                log.info(
                    "evicted %s (%s): %s, %s",
                    outcome.removal.snapshot.image,
                    outcome.removal.snapshot.image_id[:19],
                    outcome.removal.reason.value,
                    outcome.result.value,
                )

    async def measure_after_start(self) -> None:
        """Right after READY=1: measure the layers the start-up run skipped, and run the size
        and disk rules at once if they have anything to do (else they wait for the timer)."""
        try:
            explained = await self.explain()
        except DockerUnavailable:
            return  # the Docker watch runs an eviction when the engine answers
        except Exception as error:
            log.exception("measuring layers after start-up failed")
            telemetry.capture_exception(error)
            return
        if any(v.reason in (Reason.SIZE, Reason.DISK) for v in explained.plan.victims):
            await self.run_quietly("sizes-measured")

    def managed_unique_bytes(self) -> int | None:
        """What removing every snapshot would free, as of the last run (None before one)."""
        return self.managed_unique

    def check_disk_soon(self) -> None:
        """Measure the disk soon (without waiting) and run an eviction if it is above high.

        Registrations come in bursts: they share one reading, taken after the last of them,
        at most one a second; none is dropped.
        """
        self._disk_wanted = True
        if self._disk_check is None or self._disk_check.done():
            self._disk_check = asyncio.ensure_future(self._check_disk_after_registrations())
            self._background.add(self._disk_check)
            self._disk_check.add_done_callback(self._background.discard)

    async def _check_disk_after_registrations(self) -> None:
        while self._disk_wanted:
            await asyncio.sleep(self.disk.seconds_until_stale(1.0))
            self._disk_wanted = False
            async with self._run_lock:  # a run under way measured before the registration
                pass
            await self._check_disk()

    async def _check_disk(self) -> None:
        if self._run_lock.locked():
            return  # a run is under way; it measures the disk itself
        pressure = await self.disk.measure(self.policy)
        if pressure is not None and pressure.above_high:
            await self.run_quietly("disk")

    async def watch_disk(self) -> None:
        """The disk timer: a statvfs every disk_interval, a run only above the high mark."""
        while True:
            await asyncio.sleep(self.policy.disk_interval_seconds)
            try:
                await self._check_disk()
            except Exception as error:  # never let the watch die; the timer runs retry
                log.exception("disk check failed")
                telemetry.capture_exception(error)

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
        await self.removals.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
