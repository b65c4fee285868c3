"""The registry's in-memory state and the journal records that change it.

The state is exactly the fold of its journal: start-up replay and live changes both go through
`apply`, so what is in memory can always be rebuilt from disk. Each record names the image
(tag and id) it is about, so that applying a stale record never clobbers a newer one.

Records (journal.encode stamps each with its version "v"):
  put     {"snapshot"}                 an entry is registered, discovered or replaced
  touch   {"project","work_item","image_id","at"}   a lookup used the entry
  retire  {"snapshot","reason","at"}   the entry leaves; its image is pending removal
  gone    {"image","image_id"}         Docker confirmed that tag and image gone
  lease   {"lease"}                    a router protects an entry's image until a time
  release {"id"}                       the lease ended early, or expired and was pruned
  known   {"image","image_id"}         an image entries referenced and no longer do (for leaked
                                       layers); gone implies it, compaction writes it out
  forget  {"image_id"}                 Docker has no such image any more: stop looking for it
  instance {"id"}                      the agent's own random id, made once (its marker volume's
                                       name: ownership.py)
  engine  {"id","root","name"}         the Docker engine the journal describes (`docker info`'s
                                       ID, DockerRootDir, Name). Another engine than the one
                                       recorded drops the known images and pending removals:
                                       their ids were learned elsewhere and mean nothing here
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .models import (
    DISCOVERED_PROJECT,
    ImageRef,
    Key,
    Reason,
    Snapshot,
    Source,
    format_time,
    parse_time,
)
from .policy import total_size_bytes


@dataclass(frozen=True, slots=True)
class Lease:
    """A router's promise to use an entry's image soon: no eviction may remove it meanwhile."""

    id: str
    project: str
    work_item: str
    image_id: str
    expires_at: datetime

    @property
    def key(self) -> Key:
        return (self.project, self.work_item)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "work_item": self.work_item,
            "image_id": self.image_id,
            "expires_at": format_time(self.expires_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lease:
        expires_at = parse_time(data["expires_at"])
        if expires_at is None:
            raise ValueError("expires_at is missing")
        return cls(
            id=str(data["id"]),
            project=str(data["project"]),
            work_item=str(data["work_item"]),
            image_id=str(data["image_id"]),
            expires_at=expires_at,
        )


@dataclass(frozen=True, slots=True)
class Engine:
    """The Docker engine a journal describes.

    `id` alone does not tell engines apart: Docker 20.10 (Debian 12's) derives it from the
    host's /etc/docker/key.json, shared by every engine on the host and copied with cloned
    machines. With the data root, two engines on one host differ too.
    """

    id: str
    root: str
    name: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.id, self.root)

    def describe(self) -> str:
        return f"{self.id} (data root {self.root or '?'}, host {self.name or '?'})"


@dataclass(frozen=True, slots=True)
class PendingRemoval:
    """An image the agent decided to remove and Docker has not yet confirmed gone."""

    snapshot: Snapshot
    reason: Reason
    since: datetime

    @property
    def ref(self) -> ImageRef:
        return self.snapshot.ref


def put_record(snapshot: Snapshot) -> dict[str, Any]:
    return {"op": "put", "snapshot": snapshot.to_json()}


def touch_record(snapshot: Snapshot, moment: datetime) -> dict[str, Any]:
    return {
        "op": "touch",
        "project": snapshot.project,
        "work_item": snapshot.work_item,
        "image_id": snapshot.image_id,
        "at": format_time(moment),
    }


def retire_record(snapshot: Snapshot, reason: Reason, moment: datetime) -> dict[str, Any]:
    return {
        "op": "retire",
        "snapshot": snapshot.to_json(),
        "reason": reason.value,
        "at": format_time(moment),
    }


def gone_record(image: str, image_id: str) -> dict[str, Any]:
    return {"op": "gone", "image": image, "image_id": image_id}


def lease_record(lease: Lease) -> dict[str, Any]:
    return {"op": "lease", "lease": lease.to_json()}


def release_record(lease_id: str) -> dict[str, Any]:
    return {"op": "release", "id": lease_id}


def known_record(image: str, image_id: str) -> dict[str, Any]:
    return {"op": "known", "image": image, "image_id": image_id}


def forget_record(image_id: str) -> dict[str, Any]:
    return {"op": "forget", "image_id": image_id}


def instance_record(instance_id: str) -> dict[str, Any]:
    return {"op": "instance", "id": instance_id}


def engine_record(engine: Engine) -> dict[str, Any]:
    return {"op": "engine", "id": engine.id, "root": engine.root, "name": engine.name}


class RegistryState:
    """Live entries by key, images pending removal by (tag, id), leases, and known images."""

    def __init__(self) -> None:
        self.entries: dict[Key, Snapshot] = {}
        self.pending: dict[ImageRef, PendingRemoval] = {}
        self.leases: dict[str, Lease] = {}
        # Image ids entries referenced and no longer do (with a managed tag they had), until
        # Docker no longer has them: a dangling one among them is a leaked layer to remove.
        self.known_images: dict[str, str] = {}
        self.instance_id: str | None = None  # this agent's own id (its marker volume's name)
        self.engine: Engine | None = None  # the engine the records describe; None: not yet known
        self._keys_by_id: dict[str, set[Key]] = {}
        # Which keys hold a (tag, id), by tag then id: register asks for every entry under one
        # tag, which a flat (tag, id) index could only answer by scanning all of it.
        self._keys_by_tag: dict[str, dict[str, set[Key]]] = {}
        self._total_size: int | None = None  # cached total_size_bytes(); None: stale
        self.version = 0  # counts applied records: anything derived from the state is stale
        # once it moves (the status document is cached on it)

    def __len__(self) -> int:
        """The number of records to_records writes (the journal asks after every commit)."""
        own = (self.instance_id is not None) + (self.engine is not None)
        return (
            own + len(self.entries) + len(self.pending) + len(self.leases) + len(self.known_images)
        )

    def apply(self, record: dict[str, Any]) -> None:
        """Apply one journal record. Raises KeyError/ValueError on a malformed one, unchanged."""
        self.version += 1
        op = record["op"]
        if op == "put":
            snapshot = Snapshot.from_json(record["snapshot"])
            if snapshot.source is Source.DISCOVERED and self.holders(snapshot.ref):
                return  # registered meanwhile under a real key: nothing to discover
            # A registration adopts the image: its discovered stand-in goes.
            for key in [k for k in self.holders(snapshot.ref) if k[0] == DISCOVERED_PROJECT]:
                self._delete(key)
            # Registering an image again cancels a removal that has not happened yet.
            self.pending.pop(snapshot.ref, None)
            self._set(snapshot)
        elif op == "touch":
            key = (record["project"], record["work_item"])
            moment = parse_time(record["at"])
            current = self.entries.get(key)
            if current is not None and current.image_id == record["image_id"]:
                self.entries[key] = current.touched(moment)
        elif op == "retire":
            snapshot = Snapshot.from_json(record["snapshot"])
            pending = PendingRemoval(snapshot, Reason(record["reason"]), parse_time(record["at"]))
            current = self.entries.get(snapshot.key)
            if current is not None and current.ref == snapshot.ref:
                self._delete(snapshot.key)
            # Another entry still holding this very tag and image keeps it: nothing to remove.
            if not self.holders(snapshot.ref):
                self.pending[snapshot.ref] = pending
                self.known_images.pop(snapshot.image_id, None)
        elif op == "gone":
            ref = (str(record["image"]), str(record["image_id"]))
            self.pending.pop(ref, None)
            for key in list(self.holders(ref)):
                self._delete(key)
            self._note_if_unreferenced(*ref)
        elif op == "lease":
            lease = Lease.from_json(record["lease"])
            self.leases[lease.id] = lease
        elif op == "release":
            self.leases.pop(str(record["id"]), None)
        elif op == "known":
            self._note_if_unreferenced(str(record["image"]), str(record["image_id"]))
        elif op == "forget":
            self.known_images.pop(str(record["image_id"]), None)
        elif op == "instance":
            self.instance_id = str(record["id"])
        elif op == "engine":
            engine = Engine(str(record["id"]), str(record["root"]), str(record.get("name", "")))
            if self.engine is not None and self.engine.key != engine.key:
                # Image ids learned on another engine: a dangling image here with one of those
                # ids is someone else's. Entries stay (reconcile checks tag and id here).
                self.known_images.clear()
                self.pending.clear()
            self.engine = engine
        else:
            raise ValueError(f"unknown record type {op!r} (written by a newer snapagentd?)")

    def _note_if_unreferenced(self, image: str, image_id: str) -> None:
        """Remember an image id no entry or pending removal references any more."""
        if image_id not in self._keys_by_id and all(ref[1] != image_id for ref in self.pending):
            self.known_images[image_id] = image

    def _set(self, snapshot: Snapshot) -> None:
        self._total_size = None
        self.known_images.pop(snapshot.image_id, None)
        key = snapshot.key  # one tuple shared by the entries and both indexes, not three
        replaced = self.entries.get(key)
        if replaced is not None:
            self._delete(key)
        self.entries[key] = snapshot
        by_id = self._keys_by_tag.setdefault(snapshot.image, {})
        by_id.setdefault(snapshot.image_id, set()).add(key)
        self._keys_by_id.setdefault(snapshot.image_id, set()).add(key)
        if replaced is not None:
            self._note_if_unreferenced(replaced.image, replaced.image_id)

    def _delete(self, key: Key) -> None:
        self._total_size = None
        snapshot = self.entries.pop(key)
        by_id = self._keys_by_tag[snapshot.image]
        holders = by_id[snapshot.image_id]
        holders.discard(key)
        if not holders:
            del by_id[snapshot.image_id]
            if not by_id:
                del self._keys_by_tag[snapshot.image]
        keys = self._keys_by_id[snapshot.image_id]
        keys.discard(key)
        if not keys:
            del self._keys_by_id[snapshot.image_id]

    def holders(self, ref: ImageRef) -> set[Key]:
        """Keys of live entries registered with exactly this tag and image id."""
        tag, image_id = ref
        return self._keys_by_tag.get(tag, {}).get(image_id, set())

    def total_size_bytes(self) -> int:
        """policy.total_size_bytes of the live entries, kept until an entry comes or goes.

        `/v1/status` (and every STATUS= line) asks for it; computing it walks every entry,
        3 ms with 10,000 of them. Only put, retire and gone change it, and they all pass
        through _set or _delete; a touch keeps sizes as they are.
        """
        if self._total_size is None:
            self._total_size = total_size_bytes(self.entries.values())
        return self._total_size

    def to_records(self) -> list[dict[str, Any]]:
        """The smallest journal that rebuilds this state (pending first: put cancels pending)."""
        return list(self.iter_records())

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """to_records one at a time; the state must not change while this is consumed."""
        if self.instance_id is not None:
            yield instance_record(self.instance_id)
        if self.engine is not None:  # first: replayed with no engine before it, it drops nothing
            yield engine_record(self.engine)
        for pending in self.pending.values():
            yield retire_record(pending.snapshot, pending.reason, pending.since)
        for snapshot in self.entries.values():
            yield put_record(snapshot)
        for lease in self.leases.values():
            yield lease_record(lease)
        for image_id, image in self.known_images.items():
            yield known_record(image, image_id)

    def with_id(self, image_id: str) -> list[Snapshot]:
        """Live entries whose image is `image_id`."""
        return [self.entries[key] for key in self._keys_by_id.get(image_id, ())]

    def ids_with_prefix(self, prefix: str) -> list[str]:
        """Image ids of live entries starting with `prefix` (a short id from an event)."""
        return [image_id for image_id in self._keys_by_id if image_id.startswith(prefix)]

    def leased_ids(self, now: datetime) -> frozenset[str]:
        """Image ids protected by a lease that has not ended at `now`."""
        return frozenset(lease.image_id for lease in self.leases.values() if lease.expires_at > now)

    def with_tag(self, image: str) -> list[Snapshot]:
        """Live entries registered under the tag `image`, whatever image id they recorded."""
        return [
            self.entries[key] for keys in self._keys_by_tag.get(image, {}).values() for key in keys
        ]
