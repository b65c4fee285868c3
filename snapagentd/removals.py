"""Removing what was decided: one Docker removal per image, its outcome counted and told.

Every removal passes here, whoever decided it: an eviction run, a registration that superseded
an image, an invalidation. Before Docker is asked, each is looked at again (registered again,
leased meanwhile?); an image's pending tags go in one removal (docker_ops names the image id
wherever Docker allows); Docker's confirmation is journalled; and a reference Docker removed
without being chosen is a wrong removal, raised as an alarm (ERROR, metric, Sentry).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import telemetry
from .docker_ops import DockerError, DockerGateway, DockerUnavailable, RemovalAnswer
from .engine_owner import EngineOwner
from .models import RemovalResult, Snapshot, utcnow
from .registry import Registry
from .state import PendingRemoval

log = logging.getLogger(__name__)

REMOVAL_CONCURRENCY = 4  # Docker serialises much of image deletion; more threads buy little
IN_USE = "a container uses it (the run's container listing)"  # Docker is not asked then


@dataclass(frozen=True, slots=True)
class Outcome:
    removal: PendingRemoval
    result: RemovalResult
    unique_bytes: int | None = None  # what the image alone held (freed if removed), if known
    detail: str = ""  # what Docker's refusal said, or why the removal failed
    # References Docker removed that the agent had not chosen: (reference, image id).
    wrong: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            **self.removal.snapshot.to_json(),
            "unique_bytes": self.unique_bytes,
            "reason": self.removal.reason.value,
            "result": self.result.value,
            "detail": self.detail or None,
        }


class Remover:
    """Asks Docker to remove images, at most REMOVAL_CONCURRENCY at a time."""

    def __init__(
        self,
        registry: Registry,
        docker: DockerGateway,
        unique_of: Callable[[str], int | None] = lambda image_id: None,
    ) -> None:
        self.registry = registry
        self.docker = docker
        self.unique_of = unique_of  # the bytes only an image holds, as last measured
        self.metrics: Any = None  # metrics.Metrics: counts every removal outcome
        # One agent per engine (the daemon sets it): no removal while another agent is seen.
        self.ownership: EngineOwner | None = None
        self._removal_slots = asyncio.Semaphore(REMOVAL_CONCURRENCY)
        self._background: set[asyncio.Task[Any]] = set()

    async def remove(
        self, removals: list[PendingRemoval], in_use: frozenset[str] = frozenset()
    ) -> list[Outcome]:
        """Ask Docker to remove each image once for all its pending tags (bounded
        concurrency); forget those whose reference Docker confirmed gone.

        A leased image is not asked for: it stays pending until its lease ends.
        """
        if self.ownership is not None and (problem := await self.ownership.engine_problem()):
            return [Outcome(r, RemovalResult.FAILED, detail=problem) for r in removals]
        leased = self.registry.state.leased_ids(utcnow())
        by_image: dict[str, list[PendingRemoval]] = {}
        for removal in removals:
            by_image.setdefault(removal.snapshot.image_id, []).append(removal)
        groups = await asyncio.gather(
            *(self._remove_image(group, in_use, leased) for group in by_image.values())
        )
        outcomes = [outcome for group in groups for outcome in group]
        self.count(outcomes)
        await self.registry.confirm_gone([o.removal for o in outcomes if o.result.confirmed_gone])
        return outcomes

    def count(self, outcomes: Iterable[Outcome]) -> None:
        """Every removal outcome, whoever asked (runs, the API's background removals)."""
        if self.metrics is None:
            return
        for outcome in outcomes:
            removed = outcome.result is RemovalResult.REMOVED
            freed = (outcome.unique_bytes or 0) if removed else 0
            self.metrics.count_removal(outcome.removal.reason.value, outcome.result.value, freed)

    def _count_failure(self, error: BaseException) -> None:
        if self.metrics is None:
            return
        if isinstance(error, DockerUnavailable):
            self.metrics.count_removal_failure("unreachable")
        else:  # DockerError: Docker's HTTP status; anything else has none
            self.metrics.count_removal_failure(str(getattr(error, "status", None) or "error"))

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

    async def _remove_image(
        self, removals: list[PendingRemoval], in_use: frozenset[str], leased: frozenset[str]
    ) -> list[Outcome]:
        """One image's pending removals: one Docker removal for every tag of ours on it."""
        image_id = removals[0].snapshot.image_id
        if image_id in leased:
            return [Outcome(removal, RemovalResult.LEASED) for removal in removals]
        if image_id in in_use:  # Docker would refuse: don't ask
            return [Outcome(removal, RemovalResult.IN_USE, detail=IN_USE) for removal in removals]
        freed = self.unique_of(image_id)
        async with self._removal_slots:
            await self.registry.removal_settled(image_id)  # one removal of an image at a time
            # Decided earlier: look again, now that nothing can change before Docker is asked.
            state = self.registry.state
            current = [r for r in removals if state.pending.get(r.ref) is not None]
            outcomes = [  # registered again meanwhile
                Outcome(removal, RemovalResult.KEPT)
                for removal in removals
                if removal not in current
            ]
            if not current:
                return outcomes
            if image_id in state.leased_ids(utcnow()):  # leased meanwhile
                return outcomes + [Outcome(r, RemovalResult.LEASED) for r in current]
            # Every pending tag of ours on this image goes in the one removal, so that none
            # of them is mistaken for someone else's reference.
            tags = sorted({tag for tag, pending_id in state.pending if pending_id == image_id})
            with self.registry.removing(image_id):
                answer = await self._ask_docker(image_id, tags, current[0].snapshot)
        self._report(current, answer)
        # The image's bytes and any wrong removal are told once, with the first of its tags.
        first = Outcome(current[0], answer.result, freed, answer.detail, answer.unexpected)
        rest = [Outcome(r, answer.result, None, answer.detail) for r in current[1:]]
        return [*outcomes, first, *rest]

    async def _ask_docker(
        self, image_id: str, tags: Iterable[str], snapshot: Snapshot
    ) -> RemovalAnswer:
        """The gateway's removal; a failure becomes a FAILED answer, logged and counted."""
        try:
            return await self.docker.remove_image(image_id, list(tags))
        except DockerUnavailable as error:
            log.warning("remove %s: Docker is not reachable: %s", _name(snapshot), error)
            self._count_failure(error)
            return RemovalAnswer(RemovalResult.FAILED, detail=f"Docker is not reachable: {error}")
        except (DockerError, ValueError) as error:
            self._count_failure(error)
            log.warning("remove %s failed, will retry: %s", _name(snapshot), error)
            telemetry.capture_removal_failure(snapshot, error)
            return RemovalAnswer(RemovalResult.FAILED, detail=str(error)[:300])

    def _report(self, removals: list[PendingRemoval], answer: RemovalAnswer) -> None:
        """Say what Docker refused, and raise the alarm for every reference it removed that
        the agent had not chosen (a wrong removal: see docs/operations.md, Safety)."""
        snapshot = removals[0].snapshot
        if answer.result in (
            RemovalResult.IN_USE,
            RemovalResult.HAS_CHILDREN,
            RemovalResult.REFERENCED,
        ):
            log.info(
                "remove %s: %s (%s), will retry", _name(snapshot), answer.result, answer.detail
            )
        for reference, image_id in answer.unexpected:
            log.error(
                "wrong removal: %s (image %s) was removed while removing %s (image %s, %s): "
                "it changed in a window Docker's API cannot close",
                reference,
                image_id[:19],
                ", ".join(sorted({r.snapshot.image for r in removals})),
                snapshot.image_id[:19],
                removals[0].reason.value,
            )
            if self.metrics is not None:
                self.metrics.count_wrong_removal()
            telemetry.capture_wrong_removal(reference, image_id, snapshot)

    async def remove_leaked(self, removal: PendingRemoval, in_use: frozenset[str]) -> Outcome:
        """A leaked image: removed by id only while nothing references it."""
        image_id = removal.snapshot.image_id
        if image_id in in_use:
            return Outcome(removal, RemovalResult.IN_USE, detail=IN_USE)  # Docker would refuse
        async with self._removal_slots:
            answer = await self._ask_docker(image_id, (), removal.snapshot)
        self._report([removal], answer)
        return Outcome(removal, answer.result, self.unique_of(image_id), answer.detail)

    async def close(self) -> None:
        """Let background removals finish (they are short and must record their outcome)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _name(snapshot: Snapshot) -> str:
    """How log lines name a snapshot: its tag and short id."""
    return f"{snapshot.image} ({snapshot.image_id[:19]})"
