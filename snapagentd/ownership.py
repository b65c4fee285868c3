"""One agent per engine: the marker volumes agents keep in the engine, and the decisions on them.

Nothing in an image says which agent manages it, so a second agent on an engine adopts every
managed tag it has no entry for as `discovered` and evicts it, leased ones included. Each
agent therefore keeps a marker in the engine itself, a volume named after its instance id
whose labels name it, and refuses to work beside another agent's marker unless both share
the engine on purpose with disjoint image prefixes.

Pure values and decisions, tested by tables; engine_owner.py makes the Docker calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .docker_answers import created_from_text
from .state import RegistryState

MARKER_PREFIX = "snapagentd-owner-"
# Every marker carries these labels; the first is the listing's filter.
LABEL_INSTANCE = "snapagentd.instance"
LABEL_HOST = "snapagentd.host"
LABEL_JOURNAL = "snapagentd.journal"
LABEL_PREFIXES = "snapagentd.prefixes"  # comma-separated (a prefix has no comma)
LABEL_SHARED = "snapagentd.shared_engine"  # "true" or "false"
LABEL_VERSION = "snapagentd.version"  # the version that made the marker


def marker_name(instance_id: str) -> str:
    return f"{MARKER_PREFIX}{instance_id}"


@dataclass(frozen=True, slots=True)
class Marker:
    """One agent's marker as its labels say (`created_at`: Docker's CreatedAt, seconds)."""

    name: str
    instance: str
    host: str
    journal: str
    prefixes: tuple[str, ...]
    shared: bool
    version: str = ""
    created_at: datetime | None = None

    def labels(self) -> dict[str, str]:
        return {
            LABEL_INSTANCE: self.instance,
            LABEL_HOST: self.host,
            LABEL_JOURNAL: self.journal,
            LABEL_PREFIXES: ",".join(self.prefixes),
            LABEL_SHARED: "true" if self.shared else "false",
            LABEL_VERSION: self.version,
        }

    @classmethod
    def from_volume(cls, volume: dict[str, Any]) -> Marker:
        """A volume as Docker lists it; missing labels read as empty (an unreadable marker
        conflicts with everyone: see `overlapping`)."""
        labels = volume.get("Labels") if isinstance(volume.get("Labels"), dict) else {}
        labels = {str(k): str(v) for k, v in (labels or {}).items()}
        created_at, _problem = created_from_text(volume.get("CreatedAt"))
        return cls(
            name=str(volume.get("Name") or ""),
            instance=labels.get(LABEL_INSTANCE, ""),
            host=labels.get(LABEL_HOST, ""),
            journal=labels.get(LABEL_JOURNAL, ""),
            prefixes=tuple(p for p in labels.get(LABEL_PREFIXES, "").split(",") if p),
            shared=labels.get(LABEL_SHARED) == "true",
            version=labels.get(LABEL_VERSION, ""),
            created_at=created_at,
        )

    def same_agent(self, other: Marker) -> bool:
        """The same instance on the same host and journal (a copied journal has the same
        instance id, but another host or path)."""
        return (self.name, self.host, self.journal) == (other.name, other.host, other.journal)

    def describe(self) -> str:
        version = f", snapagentd {self.version}" if self.version else ""
        return (
            f"instance {self.instance or '?'} on host {self.host or '?'} "
            f"(journal {self.journal or '?'}{version}), marker volume {self.name}"
        )


def overlapping(ours: Iterable[str], theirs: Iterable[str]) -> bool:
    """Some repository would be managed by both: one prefix starts the other. A marker with
    no prefixes (unreadable) overlaps everything."""
    ours, theirs = tuple(ours), tuple(theirs)
    if not ours or not theirs:
        return True
    return any(a.startswith(b) or b.startswith(a) for a in ours for b in theirs)


@dataclass(frozen=True, slots=True)
class Conflict:
    """Another agent's marker this agent cannot work beside, and why."""

    marker: Marker
    why: str
    copy: bool = False  # it carries our instance id: a copy of our journal runs elsewhere


def conflict_with(ours: Marker, other: Marker) -> Conflict | None:
    """Why `other` (not our own marker) forbids `ours` to work on the engine, or None."""
    if other.name == ours.name:
        return Conflict(
            other,
            "it carries this journal's instance id, so another agent runs from a copy of this "
            "journal (a restored backup, a copied state directory)",
            copy=True,
        )
    shown_ours, shown_theirs = ", ".join(ours.prefixes), ", ".join(other.prefixes) or "unknown"
    if overlapping(ours.prefixes, other.prefixes):
        return Conflict(
            other,
            f"its image prefixes ({shown_theirs}) overlap this agent's ({shown_ours}), so each "
            "would delete the other's snapshots (refused even with shared_engine)",
        )
    if not ours.shared:
        return Conflict(
            other,
            f"its image prefixes ({shown_theirs}) and this agent's ({shown_ours}) are disjoint, "
            "but [docker] shared_engine is false here: set shared_engine = true on both agents "
            "to share the engine",
        )
    if not other.shared:
        return Conflict(
            other,
            f"its image prefixes ({shown_theirs}) and this agent's ({shown_ours}) are disjoint, "
            "but it does not share the engine (its shared_engine is false): set "
            "shared_engine = true there too",
        )
    return None


def conflicts(ours: Marker, markers: Iterable[Marker]) -> list[Conflict]:
    """Every marker but our own that forbids us to work on the engine, oldest first."""
    found = [
        conflict
        for marker in markers
        if not ours.same_agent(marker) and (conflict := conflict_with(ours, marker)) is not None
    ]
    return sorted(
        found, key=lambda c: (c.marker.created_at is None, c.marker.created_at or 0, c.marker.name)
    )


def own_marker(ours: Marker, markers: Iterable[Marker]) -> Marker | None:
    return next((marker for marker in markers if ours.same_agent(marker)), None)


def needs_renewal(ours: Marker, own: Marker) -> bool:
    """Our marker's labels no longer say what others decide on (prefixes, shared_engine)."""
    return (own.prefixes, own.shared) != (ours.prefixes, ours.shared)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A claim's outcome against the markers seen after making ours."""

    lost_to: tuple[Conflict, ...]  # older markers, ties named first, copies of our journal
    waiting_on: tuple[Conflict, ...]  # ties named after ours: we win once they are withdrawn
    beaten: tuple[Conflict, ...]  # younger markers: their agents refuse and withdraw them

    @property
    def won(self) -> bool:
        return not self.lost_to and not self.waiting_on


def age_order(a: Marker, b: Marker) -> int:
    """-1 when `a` is older than `b`, 1 when younger, 0 when Docker's CreatedAt (whole
    seconds) cannot tell (the same second, or a time unknown)."""
    if a.created_at is None or b.created_at is None or a.created_at == b.created_at:
        return 0
    return -1 if a.created_at < b.created_at else 1


def decide_claim(own: Marker, markers: Iterable[Marker]) -> Verdict:
    """Agents that made their markers at about the same moment: the older marker wins; a tie
    goes to the name that sorts first, but only once the other marker is withdrawn. Its agent
    may have looked before ours existed, seen nothing and won, so a tie is never won while
    the other marker stays (the first-named agent waits a moment for it to go)."""
    lost, waiting, beaten = [], [], []
    for conflict in conflicts(own, markers):
        order = age_order(own, conflict.marker)
        if conflict.copy or order > 0 or (order == 0 and conflict.marker.name < own.name):
            lost.append(conflict)
        elif order == 0:
            waiting.append(conflict)
        else:
            beaten.append(conflict)
    return Verdict(tuple(lost), tuple(waiting), tuple(beaten))


def refusal(conflicts: Iterable[Conflict], during_run: bool = False) -> str:
    """What the operator reads: who the other agent is, why, and how to proceed. At start the
    daemon puts "cannot start: " before it."""
    found = list(conflicts)
    parts = [
        f"another snapagentd uses this Docker engine: {c.marker.describe()}: {c.why}" for c in found
    ]
    names = " ".join(c.marker.name for c in found)
    return (
        ("refusing to remove anything: " if during_run else "")
        + "; ".join(parts)
        + ". Stop that agent; if it is gone for good, remove its marker: "
        + f"docker volume rm {names}"
    )


def engine_status(state: RegistryState) -> dict[str, Any]:
    """`/v1/status`'s `engine`: the engine the journal describes, and this agent's marker."""
    instance = state.instance_id
    return {
        "id": state.engine.id if state.engine is not None else None,
        "instance": instance,
        "marker": marker_name(instance) if instance is not None else None,
    }
