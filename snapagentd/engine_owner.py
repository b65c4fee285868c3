"""The engine's owner: this agent's marker volume, and the engine its journal describes.

Checked against Docker at start, before the first reconcile, and again before every eviction
run (a volume listing). When Docker does not answer at start, the first run that reaches it
does the start's work. The decisions are ownership.py's; this module asks Docker through the
gateway and journals what it learns.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket

from . import __version__
from .config import Settings
from .docker_ops import DockerError, DockerGateway, DockerUnavailable
from .journal import Journal
from .ownership import (
    LABEL_INSTANCE,
    Marker,
    Verdict,
    conflicts,
    decide_claim,
    marker_name,
    needs_renewal,
    own_marker,
    refusal,
)
from .state import Engine, RegistryState, engine_record, gone_record, instance_record

log = logging.getLogger(__name__)

TIE_SECONDS = 3.0  # how long a claim tied on CreatedAt waits for the other marker to go
TIE_POLL_SECONDS = 0.05


class OwnershipRefused(Exception):
    """Another agent's marker forbids this agent to work on the engine; the message names it
    and says how to proceed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineOwner:
    """This agent's claim on its engine, held for the process's life."""

    def __init__(
        self,
        state: RegistryState,
        journal: Journal,
        docker: DockerGateway,
        settings: Settings,
        host: str | None = None,
    ) -> None:
        self.state = state
        self.journal = journal
        self.docker = docker
        self.prefixes = settings.docker.image_prefixes
        self.shared = settings.docker.shared_engine
        self.journal_path = str(settings.journal.path)
        self.host = host or socket.gethostname()
        self.engine_checked = False  # this process compared the engine with the journal's
        self.claimed = False  # this process's claim was decided in its favour
        # Younger conflicting markers seen at the claim: their agents lost and withdraw them.
        self.beaten: set[str] = set()
        self._lock = asyncio.Lock()

    def ours(self) -> Marker:
        """The marker this agent keeps (its instance id must be known: see `start`)."""
        instance = self.state.instance_id or ""
        return Marker(
            name=marker_name(instance),
            instance=instance,
            host=self.host,
            journal=self.journal_path,
            prefixes=tuple(self.prefixes),
            shared=self.shared,
            version=__version__,
        )

    # --- entry points ---------------------------------------------------------------------

    async def start(self) -> None:
        """At start, before the first reconcile. Raises OwnershipRefused (the agent must not
        start) or JournalUnavailable; Docker unreachable leaves the check to the first run."""
        if self.state.instance_id is None:
            instance = secrets.token_hex(8)
            await self.journal.append([instance_record(instance)])
            log.info("ownership: new instance id %s (marker volume %s)", instance, self.ours().name)
        try:
            async with self._lock:
                await self._check_engine()
                await self._claim()
        except (DockerUnavailable, DockerError) as error:
            log.warning(
                "ownership: cannot check the engine now (%s); the first eviction run that "
                "reaches Docker checks it, and removes nothing before",
                error,
            )

    async def check(self) -> None:
        """Before each eviction run: the claim if not made yet, else a look for markers that
        appeared (and our own, re-made if pruned). Raises OwnershipRefused, DockerUnavailable
        or DockerError: the run must then remove nothing."""
        async with self._lock:
            await self._check_engine()
            if self.claimed:
                await self._recheck()
            else:
                await self._claim()

    async def ensure_engine(self) -> None:
        """Before any removal or reconcile: the journal's image ids belong to this engine."""
        if not self.engine_checked:
            async with self._lock:
                await self._check_engine()

    async def engine_problem(self) -> str | None:
        """Before removals outside a run: why the journal's ids cannot be trusted on this
        engine yet (it could not be asked), or None once they can."""
        try:
            await self.ensure_engine()
        except DockerUnavailable as error:
            return f"Docker is not reachable: {error}"
        except DockerError as error:
            return f"the engine could not be identified: {error}"
        return None

    # --- the engine -----------------------------------------------------------------------

    async def _check_engine(self) -> None:
        """Record the engine; on another engine than the journal's, re-learn: the known images
        and pending removals go (the engine record's apply), and entries whose tag does not
        name their image here go without a removal (`gone`, written before it)."""
        if self.engine_checked:
            return
        info = await self.docker.engine_info()
        engine = Engine(
            str(info.get("ID") or ""),
            str(info.get("DockerRootDir") or ""),
            str(info.get("Name") or ""),
        )
        known = self.state.engine
        records = []
        if known is None:
            log.info("ownership: the journal now describes engine %s", engine.describe())
        elif known.key != engine.key:
            images = await self.docker.list_images()
            here = {tag: image.id for image in images for tag in image.tags}
            strangers = [s for s in self.state.entries.values() if here.get(s.image) != s.image_id]
            log.warning(
                "engine changed: journal %s was written against engine %s, this is engine %s. "
                "Image ids learned there mean nothing here: dropping %d known images (leak "
                "candidates), %d pending removals and %d entries whose tag does not name their "
                "image here, none of them removed; keeping %d entries and %d leases",
                self.journal_path,
                known.describe(),
                engine.describe(),
                len(self.state.known_images),
                len(self.state.pending),
                len(strangers),
                len(self.state.entries) - len(strangers),
                len(self.state.leases),
            )
            # Each `gone` notes its image as known; the engine record after them drops that.
            records = [gone_record(s.image, s.image_id) for s in strangers]
        if known != engine:
            await self.journal.append([*records, engine_record(engine)])
        self.engine_checked = True

    # --- the marker -----------------------------------------------------------------------

    async def _markers(self) -> list[Marker]:
        return [Marker.from_volume(v) for v in await self.docker.list_volumes(LABEL_INSTANCE)]

    async def _claim(self) -> None:
        """Make our marker if missing, unless another forbids it; then look again, and let
        the older marker win (a tie: the first name, once the other marker is withdrawn)."""
        ours = self.ours()
        markers = await self._markers()
        own = own_marker(ours, markers)
        created = False
        if own is not None and needs_renewal(ours, own):
            log.info("ownership: marker %s names old prefixes or shared_engine: renewed", own.name)
            await self.docker.remove_volume(own.name)
            own = None
        if own is None:
            found = conflicts(ours, markers)
            if found:
                raise OwnershipRefused(refusal(found))
            own = await self._create(ours)
            created = True
        verdict = await self._decide(ours, own)
        if not verdict.won:
            if created:  # we lost a race we took part in: leave the engine to the winner
                await self.docker.remove_volume(own.name)
            raise OwnershipRefused(refusal(verdict.lost_to + verdict.waiting_on))
        for conflict in verdict.beaten:
            log.warning(
                "ownership: %s is younger than this agent's marker, so its agent refuses to "
                "start and removes it; if it stays, remove it: docker volume rm %s",
                conflict.marker.describe(),
                conflict.marker.name,
            )
        self.beaten = {conflict.marker.name for conflict in verdict.beaten}
        self.claimed = True
        log.info("ownership: this agent owns its prefixes on the engine (marker %s)", own.name)

    async def _decide(self, ours: Marker, own: Marker) -> Verdict:
        """The claim's verdict, waiting up to TIE_SECONDS for tied markers to be withdrawn
        (their agents see ours, named first, and give way at once)."""
        give_up = asyncio.get_running_loop().time() + TIE_SECONDS
        while True:
            markers = await self._markers()
            verdict = decide_claim(own_marker(ours, markers) or own, markers)
            if not verdict.waiting_on or asyncio.get_running_loop().time() >= give_up:
                return verdict
            await asyncio.sleep(TIE_POLL_SECONDS)

    async def _recheck(self) -> None:
        ours = self.ours()
        markers = await self._markers()
        present = {marker.name for marker in markers}
        self.beaten &= present
        found = [c for c in conflicts(ours, markers) if c.marker.name not in self.beaten]
        if own_marker(ours, markers) is None and ours.name not in present:
            log.warning("ownership: marker volume %s is gone (pruned?): made again", ours.name)
            await self._create(ours)
        if found:
            raise OwnershipRefused(refusal(found, during_run=True))

    async def _create(self, ours: Marker) -> Marker:
        made = Marker.from_volume(await self.docker.create_volume(ours.name, ours.labels()))
        if not ours.same_agent(made) or needs_renewal(ours, made):
            raise OwnershipRefused(
                f"a volume named {ours.name} exists but its labels are not this agent's "
                f"marker's ({made.describe()}); if nothing uses it, remove it: "
                f"docker volume rm {ours.name}"
            )
        return made
