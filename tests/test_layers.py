"""Unique and reclaimable bytes from layer chains (snapagentd.layers): the pure computations
from tables, then the real private dockerd (history alignment, chain ids, shared bases)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import docker
import docker.errors
import pytest

from snapagentd.docker_ops import DockerError
from snapagentd.layers import (
    Layer,
    LayerIndex,
    align_layer_sizes,
    chain_ids,
    fetch_layers,
    reclaimable_bytes,
    unique_bytes,
)

from .engine import DockerEngine, make_image
from .images import commit, make_busybox_image, write

T = TypeVar("T")
KIB, MIB = 1024, 1024 * 1024
SLACK = 4 * KIB  # what a commit may add besides the file written (nothing, on overlay2)


def L(name: str, size: int) -> Layer:
    return Layer(f"sha256:{name}", size)


# --- unique_bytes / reclaimable_bytes ----------------------------------------------------------

BASE = L("base", 1000)
A1, B1, C1 = L("a1", 10), L("b1", 20), L("c1", 30)

CHAINS: dict[str, dict[str, list[Layer]]] = {
    "no sharing": {"a": [L("x", 100)], "b": [L("y", 200), L("y2", 5)]},
    "shared base": {"a": [BASE, A1], "b": [BASE, B1]},
    "base image present": {"base": [BASE], "a": [BASE, A1], "b": [BASE, B1]},
    "identical chains": {"a": [BASE, A1], "a2": [BASE, A1], "c": [BASE, C1]},
    "empty": {},
    "image without layers": {"empty": [], "a": [A1]},
}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no sharing", {"a": 100, "b": 205}),
        ("shared base", {"a": 10, "b": 20}),
        ("base image present", {"base": 0, "a": 10, "b": 20}),
        ("identical chains", {"a": 0, "a2": 0, "c": 30}),
        ("empty", {}),
        ("image without layers", {"empty": 0, "a": 10}),
    ],
)
def test_unique_bytes(case: str, expected: dict[str, int]) -> None:
    assert unique_bytes(CHAINS[case]) == expected


@pytest.mark.parametrize(
    ("case", "removed", "expected"),
    [
        ("no sharing", {"a"}, 100),
        ("no sharing", {"a", "b"}, 305),
        ("shared base", {"a"}, 10),
        ("shared base", {"a", "b"}, 1030),  # the base goes with its last user, counted once
        ("base image present", {"a", "b"}, 30),  # the base image keeps the base
        ("base image present", {"base"}, 0),
        ("base image present", {"base", "a"}, 10),
        ("base image present", {"base", "a", "b"}, 1030),
        ("identical chains", {"a"}, 0),
        ("identical chains", {"a", "a2"}, 10),
        ("identical chains", {"a", "a2", "c"}, 1040),
        ("empty", set(), 0),
        ("empty", {"unknown"}, 0),
        ("shared base", set(), 0),
        ("shared base", {"a", "unknown"}, 10),
        ("image without layers", {"empty"}, 0),
    ],
)
def test_reclaimable_bytes(case: str, removed: set[str], expected: int) -> None:
    assert reclaimable_bytes(CHAINS[case], removed) == expected
    assert reclaimable_bytes(CHAINS[case], sorted(removed) * 2) == expected  # duplicates


def test_removing_everything_frees_each_layer_once() -> None:
    for chains in CHAINS.values():
        distinct = {layer.chain_id: layer.size for layers in chains.values() for layer in layers}
        assert reclaimable_bytes(chains, chains.keys()) == sum(distinct.values())


# --- chain ids ---------------------------------------------------------------------------------


def test_chain_ids_are_dockers_and_positional() -> None:
    d0, d1 = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    expected = "sha256:" + hashlib.sha256(f"{d0} {d1}".encode()).hexdigest()
    assert chain_ids([]) == []
    assert chain_ids([d0]) == [d0]
    assert chain_ids([d0, d1]) == [d0, expected]
    # the same diff on another parent is another layer; at the bottom it is the diff itself
    assert chain_ids([d1, d1])[1] != chain_ids([d0, d1])[1]
    assert chain_ids([d1])[0] == d1 != chain_ids([d0, d1])[1]


# --- history alignment -------------------------------------------------------------------------


def history(*entries: int | tuple[int, str]) -> list[dict[str, Any]]:
    """History as the engine returns it (newest first) from entries given oldest first:
    a size, or (size, image id)."""
    rows = []
    for entry in entries:
        size, image_id = entry if isinstance(entry, tuple) else (entry, "<missing>")
        rows.append({"Id": image_id, "Size": size, "CreatedBy": "", "Tags": None})
    return rows[::-1]


@pytest.mark.parametrize(
    ("entries", "layers", "known", "expected", "exact"),
    [
        pytest.param((5, 7), 2, {}, [5, 7], True, id="one entry per layer"),
        pytest.param((5, 0, 7, 0), 2, {}, [5, 7], True, id="metadata entries have no layer"),
        pytest.param((5, 0, 7, 0), 4, {}, [5, 0, 7, 0], True, id="zero-size layers"),
        pytest.param((5, 7, 0, 0, 3), 4, {}, [5, 7, 0, 3], True, id="zeros in one gap"),
        pytest.param((5, 0, 7, 0), 3, {}, [5, 7, 0], False, id="ambiguous: bytes low"),
        pytest.param(
            (5, (0, "p1"), (7, "p2"), (0, "top")),
            3,
            {"p1": 2, "p2": 3},
            [5, 0, 7],
            True,
            id="parents pin it",
        ),
        pytest.param(
            (5, (0, "p1"), (7, "p2"), (0, "top")),
            3,
            {"p1": 2},
            [5, 0, 7],
            True,
            id="one parent pins it",
        ),
        pytest.param(
            (5, (0, "p1"), (7, "p2"), 0),
            3,
            {"p1": 1, "p2": 2},
            [5, 7, 0],
            True,
            id="parent pins a metadata entry",
        ),
        pytest.param(
            (5, (0, "p1"), (7, "p2"), 0),
            3,
            {"p1": 3, "p2": 2},
            [5, 7, 0],
            False,
            id="contradicting parents ignored",
        ),
        pytest.param(
            (5, (0, "p1"), 7, 0),
            3,
            {"p1": 1, "<missing>": 3},
            [5, 7, 0],
            True,
            id="missing ids never pin",
        ),
        pytest.param((5, 7, 9), 2, {}, [21, 0], False, id="more bytes than layers"),
        pytest.param((5,), 2, {}, [5, 0], False, id="fewer entries than layers"),
        pytest.param((), 0, {}, [], True, id="no layers"),
        pytest.param((0, 0), 0, {}, [], True, id="metadata only"),
    ],
)
def test_align_layer_sizes(
    entries: tuple[Any, ...],
    layers: int,
    known: dict[str, int],
    expected: list[int],
    exact: bool,
) -> None:
    rows = history(*entries)
    total = sum(row["Size"] for row in rows)
    assert align_layer_sizes(rows, layers, total, known) == (expected, exact)
    assert sum(expected) == total  # bytes are never lost nor invented


# --- LayerIndex with a fake engine -------------------------------------------------------------


class FakeApi:
    """inspect_image/history from a table {id: [(diff id, size), ...]}, counting calls and
    the most calls in flight at once.

    With ``overlap=True`` the calls wait (up to 10 s) until two are in flight at once, so that
    a caller that makes calls concurrently is seen doing so however loaded the machine is."""

    def __init__(
        self, images: Mapping[str, Sequence[tuple[str, int]]], overlap: bool = False
    ) -> None:
        self.images = dict(images)
        self.calls = 0
        self.in_flight = self.most_in_flight = 0
        self.fail: dict[str, Exception] = {}
        self._lock = threading.Lock()
        self._overlapped = threading.Event()
        if not overlap:
            self._overlapped.set()

    def _enter(self, image_id: str) -> None:
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if self.in_flight > 1:
                self._overlapped.set()
        self._overlapped.wait(timeout=10)
        time.sleep(0.005)  # each call lasts a little: more in flight than allowed would show
        with self._lock:
            self.in_flight -= 1
        if image_id in self.fail:
            raise self.fail[image_id]
        if image_id not in self.images:
            raise docker.errors.NotFound(f"no such image: {image_id}")

    def inspect_image(self, image_id: str) -> dict[str, Any]:
        self._enter(image_id)
        layers = self.images[image_id]
        return {
            "Id": image_id,
            "RootFS": {"Type": "layers", "Layers": [diff for diff, _ in layers]},
            "Size": sum(size for _, size in layers),
        }

    def history(self, image_id: str) -> list[dict[str, Any]]:
        self._enter(image_id)
        return history(*(size for _, size in self.images[image_id]))


def thread_call(api: Any) -> Callable[[Callable[[Any], T]], Any]:
    """What DockerGateway._call does (run `function(api)` in a thread, an error answer becomes
    a DockerError), minus its bookkeeping."""

    async def call(function: Callable[[Any], T]) -> T:
        try:
            return await asyncio.to_thread(function, api)
        except docker.errors.APIError as error:
            # The fake API's NotFound has no response to carry its status: it is a 404.
            status = 404 if isinstance(error, docker.errors.NotFound) else error.status_code
            raise DockerError(status, str(error.explanation or error)) from None

    return call


def diff(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def test_layer_index_caches_drops_and_skips_vanished_images() -> None:
    api = FakeApi(
        {
            "base": [(diff("b"), 1000)],
            "a": [(diff("b"), 1000), (diff("a"), 10)],
            "b": [(diff("b"), 1000), (diff("x"), 20)],
            "c": [(diff("x"), 30)],  # same diff as b's top, on no parent: another layer
        }
    )
    index = LayerIndex()
    assert index.unique_bytes() == {} and not index.known("a")
    asyncio.run(index.refresh(thread_call(api), ["base", "a", "b", "c", "gone"]))
    assert index.unique_bytes() == {"base": 0, "a": 10, "b": 20, "c": 30}
    assert index.known("a") and not index.known("gone")
    assert index.reclaimable_bytes({"a", "b"}) == 30
    assert index.reclaimable_bytes({"a", "b", "base"}) == 1030
    assert index.uncertain() == frozenset()
    assert index.layers("c") == (Layer(diff("x"), 30),)

    calls = api.calls
    asyncio.run(index.refresh(thread_call(api), ["base", "a", "b", "c"]))
    assert api.calls == calls  # warm: image ids are content hashes, nothing is fetched again

    asyncio.run(index.refresh(thread_call(api), ["a", "b"]))  # base and c went away
    assert api.calls == calls
    assert not index.known("base")
    assert index.unique_bytes() == {"a": 10, "b": 20}
    assert index.reclaimable_bytes({"a", "b"}) == 1030

    result = index.unique_bytes()
    result["a"] = -1  # a copy: the index keeps its figures
    assert index.unique_bytes()["a"] == 10


def test_layer_index_bounds_concurrency_and_keeps_what_it_fetched_on_errors() -> None:
    api = FakeApi({f"i{n}": [(diff(f"d{n}"), n)] for n in range(40)}, overlap=True)
    api.fail["i7"] = docker.errors.APIError("500 Server Error: boom")
    index = LayerIndex(concurrency=3)
    with pytest.raises(DockerError, match="boom"):
        asyncio.run(index.refresh(thread_call(api), list(api.images)))
    assert 1 < api.most_in_flight <= 3
    assert not index.known("i7")
    assert all(index.known(f"i{n}") for n in range(40) if n != 7)
    assert index.unique_bytes()[f"i{39}"] == 39

    del api.fail["i7"]
    calls = api.calls
    asyncio.run(index.refresh(thread_call(api), list(api.images)))
    assert index.known("i7") and api.calls == calls + 2  # only the missing one is fetched


# --- the real engine ---------------------------------------------------------------------------


def listed_ids(client: docker.APIClient) -> list[str]:
    return [row["Id"] for row in client.images()]


def test_history_aligns_with_rootfs_and_adds_up_to_size(
    docker_client: docker.APIClient, image_factory: Callable[..., str]
) -> None:
    c = docker_client
    imported = image_factory("cascade-snapshot-layers-imported:latest", size=64 * KIB)
    base = make_busybox_image(c, "foreign-layers-base:latest")
    once = commit(c, base, write("/f", MIB), "cascade-snapshot-layers-once:latest")
    twice = commit(c, once, write("/g", 256 * KIB), "cascade-snapshot-layers-twice:latest")
    # a commit that changed nothing: a history entry of Size 0 and no layer
    noop = commit(c, twice, "true", "cascade-snapshot-layers-noop:latest")
    # a commit that only deleted a file: a genuine layer of Size 0 (a whiteout)
    removed = commit(c, noop, "rm /f", "cascade-snapshot-layers-rm:latest")
    # ... then bytes, then nothing: sizes alone cannot tell which zero is the layer
    wrote = commit(c, removed, write("/h", 8 * KIB), "cascade-snapshot-layers-h:latest")
    ambiguous = commit(c, wrote, "true", "cascade-snapshot-layers-h-noop:latest")

    layers = {}
    for image in (imported, base, once, twice, noop, removed, wrote, ambiguous):
        data = c.inspect_image(image)
        layers[image], exact = fetch_layers(c, image)
        assert exact, image
        assert [layer.chain_id for layer in layers[image]] == chain_ids(data["RootFS"]["Layers"])
        assert sum(layer.size for layer in layers[image]) == data["Size"], image

    def sizes(image: str) -> list[int]:
        return [layer.size for layer in layers[image]]

    base_size = c.inspect_image(base)["Size"]
    assert sizes(imported) == [c.inspect_image(imported)["Size"]]
    assert sizes(base) == [base_size]
    assert sizes(once) == [base_size, MIB]
    assert sizes(twice) == [base_size, MIB, 256 * KIB]
    assert layers[noop] == layers[twice]  # another id, the same chain
    assert c.history(noop)[0]["Size"] == 0  # newest first: the commit's entry
    assert len(c.history(noop)) == len(layers[noop]) + 1
    assert sizes(removed) == [base_size, MIB, 256 * KIB, 0]
    assert c.history(removed)[0]["Size"] == 0
    assert len(c.history(removed)) == len(layers[removed]) + 1  # the noop's entry has none
    assert sizes(wrote) == [base_size, MIB, 256 * KIB, 0, 8 * KIB]
    # history alone would put the 8 KiB one layer low; the parents' ids pin it
    rows = c.history(ambiguous)
    assert align_layer_sizes(rows, 5, 0)[1] is False
    assert layers[ambiguous] == layers[wrote]


def test_chain_ids_name_the_engines_layers(
    clean_engine: DockerEngine, docker_client: docker.APIClient
) -> None:
    base = make_busybox_image(docker_client, "foreign-layers-base:latest")
    top = commit(docker_client, base, write("/f", 4 * KIB), "cascade-snapshot-layers-c:latest")
    on_disk = {
        "sha256:" + path.name
        for path in clean_engine.data_root.glob("image/*/layerdb/sha256/*")
        if path.is_dir()
    }
    layers, _ = fetch_layers(docker_client, top)
    assert len(layers) == 2
    assert {layer.chain_id for layer in layers} <= on_disk


def test_shared_base_counts_once_and_only_with_its_last_user(
    fresh_docker_engine: DockerEngine,
) -> None:
    # An engine of its own: the test lists every image on it, and the session engine may hold
    # images other tests made under names the clean-up does not know.
    c = fresh_docker_engine.client()
    base = make_busybox_image(c, "foreign-layers-base:latest")
    base_size = c.inspect_image(base)["Size"]
    a = commit(c, base, write("/a", MIB), "cascade-snapshot-layers-a:latest")
    b = commit(c, base, write("/b", 512 * KIB), "cascade-snapshot-layers-b:latest")
    c.tag(a, "cascade-snapshot-layers-a-again", "latest")  # two tags, one image
    ids = listed_ids(c)
    assert sorted(ids) == sorted({base, a, b})

    index = LayerIndex()
    asyncio.run(index.refresh(thread_call(c), ids))
    unique = index.unique_bytes()
    assert set(unique) == {base, a, b}
    assert MIB <= unique[a] <= MIB + SLACK
    assert 512 * KIB <= unique[b] <= 512 * KIB + SLACK
    assert unique[base] == 0
    # Size counts the base in every snapshot; unique bytes do not
    sizes = {image: c.inspect_image(image)["Size"] for image in (a, b)}
    assert sum(sizes.values()) - (unique[a] + unique[b]) == 2 * base_size
    # the base is freed only with all its users, the tagged base image included
    assert index.reclaimable_bytes({a, b}) == unique[a] + unique[b]
    assert index.reclaimable_bytes({a, b, base}) == unique[a] + unique[b] + base_size
    # what GET /system/df says (cheap on this tiny engine): Size - SharedSize
    for row in c.df()["Images"]:
        assert row["Size"] - row["SharedSize"] == unique[row["Id"]], row["RepoTags"]

    # untagged, the base becomes a hidden parent of a and b (not listed): it goes with the last
    c.remove_image("foreign-layers-base:latest")
    ids = listed_ids(c)
    assert base not in ids
    asyncio.run(index.refresh(thread_call(c), ids))
    assert not index.known(base)
    assert index.unique_bytes() == {a: unique[a], b: unique[b]}
    assert index.reclaimable_bytes({a}) == unique[a]
    assert index.reclaimable_bytes({a, b}) == unique[a] + unique[b] + base_size

    # and the prediction is what removal frees on disk
    before = c.df()["LayersSize"]
    c.remove_image("cascade-snapshot-layers-b:latest")
    assert before - c.df()["LayersSize"] == unique[b]
    c.remove_image("cascade-snapshot-layers-a:latest")
    c.remove_image("cascade-snapshot-layers-a-again:latest")
    assert before - c.df()["LayersSize"] == unique[a] + unique[b] + base_size


def test_refresh_skips_images_that_are_gone(
    docker_client: docker.APIClient, image_factory: Callable[..., str]
) -> None:
    present = image_factory("cascade-snapshot-layers-present:latest", size=8 * KIB)
    gone = make_image(docker_client, "cascade-snapshot-layers-gone:latest")
    docker_client.remove_image("cascade-snapshot-layers-gone:latest")
    index = LayerIndex()
    asyncio.run(index.refresh(thread_call(docker_client), [present, gone]))
    assert index.known(present) and not index.known(gone)
    assert index.unique_bytes() == {present: docker_client.inspect_image(present)["Size"]}
