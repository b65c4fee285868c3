"""Reclaimable (unique) bytes per image, from the images' layer chains.

An image's `Size` counts its shared base layers too, so summing it over snapshots committed from
one base over-counts, and removing an image frees only the layers no other image uses.
`GET /system/df` reports `SharedSize`, but it also sizes every container and volume (minutes on
big hosts) and dockerd 20.10 (API 1.41) cannot restrict it to images. So the bytes are computed
here from each image's layers instead: `GET /images/{id}/json` gives the layers' diff ids
(`RootFS.Layers`, bottom first) and `GET /images/{id}/history` their sizes. An image id is a
content hash, so an image never changes and its layers are fetched once and cached
(`LayerIndex`).

Layer identity is positional: a layer is named by its chain id (the same diff id on top of other
parents is another layer on disk), computed as Docker does: chainID(L0) = diffID(L0),
chainID(Ln) = sha256(chainID(Ln-1) + " " + diffID(Ln)).

History has one entry per instruction, newest first; instructions that changed no file
(`ENV`, `CMD`, a commit of a container that wrote nothing, ...) have an entry but no layer, and
the engine reports `Size` 0 for them. A genuine layer can have `Size` 0 too (seen on dockerd
20.10: a commit that only deleted files, or only created an empty file or directory), so the
entries that are layers cannot always be told apart from the sizes alone. `align_layer_sizes`
uses what is certain (every non-zero entry is a layer; history entries whose `Id` names a local
image, as those of committed images do, pin how many layers lie below them) and, where a choice
remains that changes which layer holds which bytes, puts the bytes on the lowest layers it may.
Sharing between images is always a common bottom part of their chains, so that choice can
only under-state an image's unique bytes, never over-state what removing images frees; every
image's layer sizes still add up to its `Size`.

Pass the ids `GET /images/json` lists (tagged and dangling images): an untagged parent of a
committed image is not listed there and is deleted along with its last child, so its layers
rightly count as that child's.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import docker
import docker.errors

from .docker_ops import DockerError

log = logging.getLogger(__name__)

T = TypeVar("T")

FETCH_CONCURRENCY = 8  # images fetched at once (each is 2 or a few Docker calls in one thread)
MISSING = "<missing>"  # history `Id` of an entry whose image is not on this host


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of an image: its chain id (positional identity) and its size on disk."""

    chain_id: str
    size: int


class DockerCall(Protocol):
    """Runs `function(api)` in a worker thread (`DockerGateway._call`)."""

    def __call__(self, function: Callable[[docker.APIClient], T], /) -> Awaitable[T]: ...


# --- pure computations ---------------------------------------------------------------------


class _LayerTable:
    """How many images use each chain id, and its size (the largest any image reports)."""

    __slots__ = ("chains", "sizes", "users")

    def __init__(self, chains: Mapping[str, Sequence[Layer]]) -> None:
        self.chains = chains
        self.users: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        for layers in chains.values():
            for chain_id in {layer.chain_id for layer in layers}:
                self.users[chain_id] = self.users.get(chain_id, 0) + 1
            for layer in layers:
                self.sizes[layer.chain_id] = max(self.sizes.get(layer.chain_id, 0), layer.size)

    def unique_bytes(self) -> dict[str, int]:
        return {
            image_id: sum(
                layer.size for layer in _distinct(layers) if self.users[layer.chain_id] == 1
            )
            for image_id, layers in self.chains.items()
        }

    def reclaimable_bytes(self, image_ids: Collection[str]) -> int:
        within: dict[str, int] = {}
        for image_id in set(image_ids):
            for chain_id in {layer.chain_id for layer in self.chains.get(image_id, ())}:
                within[chain_id] = within.get(chain_id, 0) + 1
        return sum(
            self.sizes[chain_id]
            for chain_id, count in within.items()
            if count == self.users[chain_id]
        )


def _distinct(layers: Sequence[Layer]) -> list[Layer]:
    seen: set[str] = set()
    out = []
    for layer in layers:
        if layer.chain_id not in seen:
            seen.add(layer.chain_id)
            out.append(layer)
    return out


def unique_bytes(chains: Mapping[str, Sequence[Layer]]) -> dict[str, int]:
    """Bytes of each image's layers that no other image uses.

    `chains` maps every image id on the host (managed or not) to its layers, bottom first.
    Two ids with the same chain share all of it, so neither has unique bytes.
    """
    return _LayerTable(chains).unique_bytes()


def reclaimable_bytes(chains: Mapping[str, Sequence[Layer]], image_ids: Collection[str]) -> int:
    """Bytes freed by removing exactly `image_ids` together: the layers no image outside the set
    uses, each counted once (a shared base goes with its last user). Unknown ids count 0."""
    return _LayerTable(chains).reclaimable_bytes(image_ids)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Docker's chain ids for a stack of diff ids (bottom first), `sha256:` prefixed."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            digest = hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
            chain.append(f"sha256:{digest}")
    return chain


def align_layer_sizes(
    history: Sequence[Mapping[str, Any]],
    layer_count: int,
    total: int,
    known_counts: Mapping[str, int] | None = None,
) -> tuple[list[int], bool]:
    """Sizes of an image's `layer_count` layers, bottom first, from its history.

    `history` is `GET /images/{id}/history` (newest first); `total` the image's `Size`, used
    only when history cannot be aligned at all; `known_counts` maps image ids named by history
    entries to their number of layers (the image itself and its local parents), which pins the
    alignment between them. Returns the sizes and whether the alignment is certain; when it is
    not, bytes are put on the lowest layers possible (see the module docstring).
    """
    sizes = [max(0, int(entry.get("Size") or 0)) for entry in reversed(history)]
    ids = [str(entry.get("Id") or MISSING) for entry in reversed(history)]
    if layer_count <= 0:
        return [], total == 0 and not any(sizes)
    nonzero = sum(1 for size in sizes if size)
    if len(sizes) < layer_count or nonzero > layer_count:
        log.warning(
            "layers: history does not match %d layers: bytes put on the bottom", layer_count
        )
        return [total] + [0] * (layer_count - 1), False
    # Checkpoints: (index of the entry, layers up to and including it), oldest first.
    checkpoints = [(-1, 0)]
    for index, image_id in enumerate(ids[:-1]):
        count = (known_counts or {}).get(image_id) if image_id != MISSING else None
        if count is not None:
            checkpoints.append((index, count))
    checkpoints.append((len(sizes) - 1, layer_count))
    aligned: list[int] = []
    exact = True
    for (start, below), (end, upto) in itertools.pairwise(checkpoints):
        if upto < below:  # checkpoints out of order: not what they seem
            return align_layer_sizes(history, layer_count, total)
        segment = sizes[start + 1 : end + 1]
        part = _align_segment(segment, upto - below)
        if part is None:  # a checkpoint contradicts the sizes: align without checkpoints
            return align_layer_sizes(history, layer_count, total)
        aligned.extend(part[0])
        exact = exact and part[1]
    return aligned, exact


def _align_segment(sizes: Sequence[int], layers: int) -> tuple[list[int], bool] | None:
    """Choose `layers` of the entries `sizes` (oldest first): every non-zero one, then the
    newest zero ones. Certain when no choice changes the result: all or none of the zeros are
    layers, or all zeros sit between the same two non-zero entries."""
    zeros = [index for index, size in enumerate(sizes) if not size]
    genuine_zeros = layers - (len(sizes) - len(zeros))
    if genuine_zeros < 0 or genuine_zeros > len(zeros):
        return None
    chosen = set(zeros[len(zeros) - genuine_zeros :])
    result = [size for index, size in enumerate(sizes) if size or index in chosen]
    if genuine_zeros in (0, len(zeros)):
        return result, True
    gaps = {sum(1 for size in sizes[:index] if size) for index in zeros}
    return result, len(gaps) == 1


# --- fetching from Docker ------------------------------------------------------------------


def fetch_layers(api: docker.APIClient, image_id: str) -> tuple[list[Layer], bool]:
    """An image's layers (bottom first) and whether their sizes are certain, from the engine.

    Blocking (runs in a worker thread). Raises docker.errors.NotFound when the image is gone.
    """
    data = api.inspect_image(image_id)
    diff_ids = list((data.get("RootFS") or {}).get("Layers") or ())
    history = api.history(image_id)
    total = int(data.get("Size") or 0)
    sizes, exact = align_layer_sizes(history, len(diff_ids), total)
    if not exact:
        known = {data.get("Id", image_id): len(diff_ids)}
        for entry in history:
            parent = entry.get("Id")
            if parent and parent != MISSING and parent not in known:
                try:
                    layers = (api.inspect_image(parent).get("RootFS") or {}).get("Layers")
                except docker.errors.NotFound:
                    continue
                known[parent] = len(layers or ())
        sizes, exact = align_layer_sizes(history, len(diff_ids), total, known)
        if not exact:
            log.info("layers: %s: history alignment ambiguous: bytes put low", image_id)
    chain = chain_ids(diff_ids)
    return [Layer(chain_id, size) for chain_id, size in zip(chain, sizes, strict=True)], exact


class LayerIndex:
    """The layers of every image on the host, fetched once per image id, and the unique bytes
    they give (recomputed on each refresh)."""

    def __init__(self, concurrency: int = FETCH_CONCURRENCY) -> None:
        self._concurrency = concurrency
        self._chains: dict[str, tuple[Layer, ...]] = {}
        self._uncertain: set[str] = set()
        self._table = _LayerTable({})
        self._unique: dict[str, int] = {}

    async def refresh(self, call: DockerCall, image_ids: Collection[str]) -> None:
        """Fetch the layers of ids not cached yet and forget cached ids not in `image_ids`
        (every image id on the host). An image gone meanwhile is skipped. When a fetch fails
        otherwise, the others still complete and are kept, then the first error is raised."""
        wanted = set(image_ids)
        for image_id in set(self._chains) - wanted:
            del self._chains[image_id]
            self._uncertain.discard(image_id)
        missing = sorted(wanted - set(self._chains))
        slots = asyncio.Semaphore(self._concurrency)
        errors: list[BaseException] = []

        async def fetch(image_id: str) -> None:
            async with slots:
                try:
                    layers, exact = await call(lambda api: fetch_layers(api, image_id))
                except DockerError as error:
                    if error.status == 404:
                        return  # removed between listing and inspect
                    errors.append(error)
                    return
                except Exception as error:
                    errors.append(error)
                    return
            self._chains[image_id] = tuple(layers)
            if not exact:
                self._uncertain.add(image_id)

        try:
            await asyncio.gather(*(fetch(image_id) for image_id in missing))
        finally:
            self._table = _LayerTable(self._chains)
            self._unique = self._table.unique_bytes()
        if errors:
            raise errors[0]

    def unique_bytes(self) -> dict[str, int]:
        """Unique bytes of each cached image (a copy of the figures of the last refresh)."""
        return dict(self._unique)

    def reclaimable_bytes(self, image_ids: Collection[str]) -> int:
        """Bytes freed by removing exactly `image_ids` together (uncached ids count 0)."""
        return self._table.reclaimable_bytes(image_ids)

    def known(self, image_id: str) -> bool:
        """Whether the image's layers are cached."""
        return image_id in self._chains

    def layers(self, image_id: str) -> tuple[Layer, ...] | None:
        """The cached layers of an image, bottom first."""
        return self._chains.get(image_id)

    def uncertain(self) -> frozenset[str]:
        """Cached images whose history could not be aligned with certainty."""
        return frozenset(self._uncertain)
