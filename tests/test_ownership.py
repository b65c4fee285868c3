"""One agent per engine, and a journal that moved to another engine (issue 15, items 3 and 4).

Proven against real agent processes and private dockerd engines: a second agent with
overlapping prefixes refuses to start (naming the first agent's marker and journal) and the
first agent's snapshots, leased one included, all survive, until the first agent's marker is
removed by hand; agents with disjoint prefixes share an engine only when both set
`shared_engine`, overlapping prefixes never; a marker that appears while an agent runs stops
its runs from removing anything until it goes, and a pruned own marker is made again; the
first run that reaches Docker does the start's check; of two agents started together exactly
one wins; a journal copied to another engine removes nothing there (its known images and
pending removals are dropped, entries checked) and still works on its own engine. The pure
decisions are tested by tables.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import docker.errors
import pytest

from snapagentd.models import Reason
from snapagentd.ownership import (
    Marker,
    conflict_with,
    conflicts,
    decide_claim,
    marker_name,
    overlapping,
    refusal,
)
from snapagentd.state import (
    Engine,
    Lease,
    RegistryState,
    engine_record,
    gone_record,
    instance_record,
    known_record,
    lease_record,
    put_record,
    retire_record,
)

from .agent import Agent
from .builders import NOW, snap
from .engine import DockerEngine, image_exists, make_image, wait_until

MakeAgent = Callable[..., Agent]
PREFIX = "cascade-snapshot-"
T0 = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)


# --- pure decisions ---------------------------------------------------------------------------


def marker(
    name: str = "m",
    prefixes: tuple[str, ...] = (PREFIX,),
    shared: bool = False,
    at: int | None = 0,
    host: str = "h",
    journal: str = "/j",
) -> Marker:
    """A marker made `at` seconds after T0 (None: CreatedAt unknown)."""
    created = None if at is None else T0 + timedelta(seconds=at)
    return Marker(
        marker_name(name), name, host, journal, prefixes, shared, "0.1.0", created_at=created
    )


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [
        ((PREFIX,), (PREFIX,), True),
        (("cascade-",), (PREFIX,), True),  # one starts the other
        ((PREFIX,), ("cascade-",), True),
        (("cascade-snapshot-a-",), ("cascade-snapshot-b-",), False),
        (("abc-", "xyz-"), ("xyz-1",), True),  # any pair
        (("abc-",), ("abd-", "abz"), False),
        ((PREFIX,), (), True),  # a marker without prefixes (unreadable) overlaps everything
    ],
)
def test_prefixes_overlap_when_one_starts_the_other(
    ours: tuple[str, ...], theirs: tuple[str, ...], expected: bool
) -> None:
    assert overlapping(ours, theirs) is expected


A, B = ("cascade-snapshot-a-",), ("cascade-snapshot-b-",)


@pytest.mark.parametrize(
    ("ours", "theirs", "why"),
    [
        (marker("us", A), marker("them", A), "overlap"),
        (marker("us", A, shared=True), marker("them", A, shared=True), "overlap"),
        (marker("us", A), marker("them", B), "shared_engine is false here"),
        (marker("us", A, shared=True), marker("them", B), "it does not share the engine"),
        (marker("us", A), marker("them", B, shared=True), "shared_engine is false here"),
        (marker("us", A, shared=True), marker("them", B, shared=True), None),
        (marker("us", A), marker("us", A, host="elsewhere"), "copy of this journal"),
        (marker("us", A, shared=True), marker("us", B, shared=True, journal="/k"), "copy"),
    ],
)
def test_another_agent_conflicts_unless_both_share_with_disjoint_prefixes(
    ours: Marker, theirs: Marker, why: str | None
) -> None:
    conflict = conflict_with(ours, theirs)
    if why is None:
        assert conflict is None
    else:
        assert conflict is not None and why in conflict.why


def test_our_own_marker_is_no_conflict() -> None:
    ours = marker("us", A)
    assert conflicts(ours, [ours, marker("us", A, at=5)]) == []  # same agent, any time


@pytest.mark.parametrize(
    ("theirs", "outcome"),
    [
        (marker("zz", at=-1), "lost"),  # older wins, whatever the names
        (marker("aa", at=1), "beaten"),  # younger loses, whatever the names
        (marker("aa", at=0), "lost"),  # a tie: the first name wins...
        (marker("zz", at=0), "waiting"),  # ...once the other marker is withdrawn
        (marker("zz", at=None), "waiting"),  # an unknown time ties
        (marker("aa", at=None), "lost"),
        (marker("mm", at=-5, host="elsewhere"), "lost"),  # a copy of our journal: never beaten
        (marker("mm", at=9, host="elsewhere"), "lost"),
        (marker("other", B, shared=True, at=-1), "none"),  # shares the engine with us
    ],
)
def test_claims_made_together_have_one_winner(theirs: Marker, outcome: str) -> None:
    ours = marker("mm", A, shared=True, at=0)
    verdict = decide_claim(ours, [ours, theirs])
    groups = {
        "lost": verdict.lost_to,
        "waiting": verdict.waiting_on,
        "beaten": verdict.beaten,
    }
    for name, group in groups.items():
        assert [c.marker for c in group] == ([theirs] if name == outcome else []), name
    assert verdict.won is (outcome in ("beaten", "none"))


@pytest.mark.parametrize("gap", [-1, 0, 1, None])
@pytest.mark.parametrize("names", [("aa", "zz"), ("zz", "aa")])
def test_two_claims_that_see_each_other_never_both_win(
    gap: int | None, names: tuple[str, str]
) -> None:
    """Exactly one of them is not lost: it wins now, or once the loser withdraws."""
    first, second = marker(names[0], at=0), marker(names[1], at=gap)
    one, two = decide_claim(first, [first, second]), decide_claim(second, [first, second])
    assert not (one.won and two.won)
    assert bool(one.lost_to) != bool(two.lost_to)


@pytest.mark.parametrize("gap", [0, 1, None])
def test_a_claim_that_looked_alone_is_never_beaten_by_a_later_marker(gap: int | None) -> None:
    """The first agent looked before the second marker existed, saw nothing and won: the
    second, made in the same second or later, must not win, even with the first name."""
    first, second = marker("zz", at=0), marker("aa", at=gap)
    assert decide_claim(first, [first]).won
    assert not decide_claim(second, [first, second]).won


def test_a_marker_reads_back_from_its_labels() -> None:
    ours = marker("us", ("cascade-snapshot-a-", "other-"), shared=True)
    volume = {"Name": ours.name, "Labels": ours.labels(), "CreatedAt": "2024-06-01T12:00:00Z"}
    assert Marker.from_volume(volume) == ours
    bare = Marker.from_volume({"Name": "snapagentd-owner-x", "Labels": None, "CreatedAt": "?"})
    assert (bare.prefixes, bare.shared, bare.created_at) == ((), False, None)


def test_the_refusal_names_the_other_agent_and_how_to_proceed() -> None:
    other = marker("9f3c", host="build-7", journal="/var/lib/snapagentd/journal.jsonl")
    message = refusal([conflict_with(marker("us"), other)])  # type: ignore[list-item]
    for part in (
        "instance 9f3c",
        "host build-7",
        "journal /var/lib/snapagentd/journal.jsonl",
        "marker volume snapagentd-owner-9f3c",
        "Stop that agent",
        "docker volume rm snapagentd-owner-9f3c",
    ):
        assert part in message
    assert refusal([conflict_with(marker("us"), other)], during_run=True).startswith(  # type: ignore[list-item]
        "refusing to remove anything"
    )


# --- the journal's records --------------------------------------------------------------------

E1 = Engine("ABCD:EFGH", "/var/lib/docker", "host-1")
E2 = Engine("ABCD:EFGH", "/srv/docker", "host-2")  # Docker 20.10: one ID for every engine on a host


def history() -> list[dict[str, Any]]:
    kept, retired, known = snap("kept"), snap("retired"), snap("old")
    return [
        instance_record("1234abcd"),
        engine_record(E1),
        put_record(kept),
        put_record(retired),
        retire_record(retired, Reason.TTL, NOW),  # pending removal
        put_record(known),
        gone_record(known.image, known.image_id),  # an image no entry references: known
        lease_record(Lease("l1", kept.project, kept.work_item, kept.image_id, NOW)),
    ]


def fold(records: list[dict[str, Any]]) -> RegistryState:
    state = RegistryState()
    for record in records:
        state.apply(record)
    return state


def test_another_engine_drops_known_images_and_pending_removals_only() -> None:
    state = fold(history())
    assert (len(state.known_images), len(state.pending)) == (1, 1)
    state.apply(engine_record(E2))
    assert state.engine == E2
    assert state.known_images == {} and state.pending == {}
    assert set(state.entries) == {("proj", "kept")} and set(state.leases) == {"l1"}
    assert state.instance_id == "1234abcd"


def test_the_same_engine_or_a_first_engine_record_drops_nothing() -> None:
    records = history()
    renamed = Engine(E1.id, E1.root, "renamed-host")  # the host's name is not the engine
    for extra in ([engine_record(E1)], [engine_record(renamed)]):
        state = fold(records + extra)
        assert (len(state.known_images), len(state.pending)) == (1, 1)
    older = fold([r for r in records if r["op"] != "engine"])  # an older agent's journal
    older.apply(engine_record(E2))
    assert (len(older.known_images), len(older.pending), older.engine) == (1, 1, E2)


def test_compaction_writes_the_instance_and_engine_first_and_rebuilds_the_state() -> None:
    state = fold([*history(), engine_record(E2), known_record("cascade-snapshot-n:1", "sha256:n")])
    records = state.to_records()
    assert [r["op"] for r in records[:2]] == ["instance", "engine"]
    assert len(records) == len(state)
    rebuilt = fold(records)
    assert (rebuilt.instance_id, rebuilt.engine) == (state.instance_id, state.engine)
    assert rebuilt.known_images == state.known_images == {"sha256:n": "cascade-snapshot-n:1"}
    assert (rebuilt.entries, rebuilt.pending, rebuilt.leases) == (
        state.entries,
        state.pending,
        state.leases,
    )


# --- real agents on real engines --------------------------------------------------------------


def configure(agent: Agent, prefixes: list[str] | None = None, shared: bool = False) -> Agent:
    agent.extra["docker"] = {
        "url": agent.docker_url,
        "image_prefixes": prefixes or [PREFIX],
        "shared_engine": shared,
    }
    agent.write_config()
    return agent


def refused(agent: Agent, timeout: float = 60) -> str:
    """Spawn the agent, expect it to exit non-zero before READY; returns its log."""
    seen = len(agent.notify.messages)
    code = agent.spawn().wait(timeout=timeout)
    agent.process = None
    agent.notify.drain(0.05)
    assert code != 0, agent.log()
    assert "READY=1" not in agent.notify.messages[seen:]
    return agent.log()


def markers(client: docker.APIClient) -> set[str]:
    listed = client.volumes(filters={"label": ["snapagentd.instance"]}).get("Volumes") or []
    return {volume["Name"] for volume in listed}


def evict(agent: Agent) -> list[tuple[str, str, str]]:
    evicted = agent.ok("POST", "/v1/evict", {})["evicted"]
    return [(e["image_id"], e["reason"], e["result"]) for e in evicted]


def test_a_second_agent_refuses_to_start_and_the_first_keeps_every_snapshot(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    first = make_agent()
    names = ("a", "b", "leased")
    ids = {name: make_image(docker_client, f"{PREFIX}own-{name}:latest") for name in names}
    for name in names:
        first.register("p", name, f"{PREFIX}own-{name}:latest")
    body = {"project": "p", "work_item": "leased", "seconds": 600}
    first.ok("POST", "/v1/snapshots/lease", body)
    stray = make_image(docker_client, f"{PREFIX}stray:latest")  # nobody registered it
    assert first.status()["engine"]["marker"] == first.marker()

    # It would adopt every one of them as discovered, and evict them all at start.
    second = make_agent(start=False, max_count=0)
    log = refused(second)
    assert "cannot start: another snapagentd uses this Docker engine: instance " in log
    assert first.marker() in log and str(first.journal_path) in log
    assert f"docker volume rm {first.marker()}" in log
    assert markers(docker_client) == {first.marker()}  # it took its own back
    for image_id in [*ids.values(), stray]:
        assert image_exists(docker_client, image_id)
    assert evict(first) == []  # its own run: the stray becomes its discovered entry
    assert len(first.snapshots()) == 4

    # Stopped, the first agent still owns the engine: its marker stays until removed by hand.
    assert first.stop() == 0
    assert second.marker() is not None
    refused(second)
    docker_client.remove_volume(first.marker())
    second.start()
    assert markers(docker_client) == {second.marker()}
    assert second.status()["engine"]["marker"] == second.marker()


def test_agents_with_disjoint_prefixes_share_an_engine_only_when_both_say_so(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    a_prefix, b_prefix = f"{PREFIX}a-", f"{PREFIX}b-"
    a = configure(make_agent(start=False, max_count=1), [a_prefix], shared=True)
    a.start()
    b = configure(make_agent(start=False, max_count=1), [b_prefix], shared=False)
    log = refused(b)
    assert "shared_engine is false here" in log and a.marker() in log
    configure(b, [b_prefix], shared=True)
    b.start()
    assert markers(docker_client) == {a.marker(), b.marker()}

    ids = {}
    for prefix in (a_prefix, b_prefix):
        for name in ("old", "new"):
            ids[prefix + name] = make_image(docker_client, f"{prefix}{name}:latest")
    a.register("p", "old", f"{a_prefix}old:latest")
    b.register("p", "old", f"{b_prefix}old:latest")
    # Each run adopts its own prefix's stray and keeps one snapshot (max_count = 1).
    assert [result for _, _, result in evict(a)] == ["removed"]
    assert [result for _, _, result in evict(b)] == ["removed"]
    for agent, prefix in ((a, a_prefix), (b, b_prefix)):
        left = [s["image"] for s in agent.snapshots()]
        assert len(left) == 1 and left[0].startswith(prefix), left
    survivors = [image_id for image_id in ids.values() if image_exists(docker_client, image_id)]
    assert len(survivors) == 2  # one of each: neither touched the other's

    # Overlapping prefixes are refused even when every agent shares the engine.
    c = configure(make_agent(start=False), [f"{a_prefix}x"], shared=True)
    log = refused(c)
    assert "overlap" in log and a.marker() in log and b.marker() not in log


def intruder(client: docker.APIClient, prefixes: str = PREFIX) -> str:
    """A marker made by hand, as another agent's would be."""
    name = "snapagentd-owner-intruder"
    labels = {
        "snapagentd.instance": "intruder",
        "snapagentd.host": "elsewhere",
        "snapagentd.journal": "/srv/other/journal.jsonl",
        "snapagentd.prefixes": prefixes,
        "snapagentd.shared_engine": "false",
        "snapagentd.version": "0.0.9",
    }
    client.create_volume(name=name, driver="local", labels=labels)
    return name


def test_a_marker_that_appears_stops_removals_until_it_goes_and_a_pruned_one_is_remade(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agent = make_agent(max_count=1)
    old = make_image(docker_client, f"{PREFIX}x-old:latest")
    agent.register("p", "old", f"{PREFIX}x-old:latest")
    make_image(docker_client, f"{PREFIX}x-new:latest")
    agent.register("p", "new", f"{PREFIX}x-new:latest")

    name = intruder(docker_client)
    assert evict(agent) == []  # it would have removed one (max_count = 1)
    error = agent.status()["last_eviction"]["error"]
    assert error.startswith("refusing to remove anything: another snapagentd")
    assert name in error and "/srv/other/journal.jsonl" in error and "host elsewhere" in error
    assert f"docker volume rm {name}" in error
    assert error in agent.log()
    assert image_exists(docker_client, old) and len(agent.snapshots()) == 2

    docker_client.remove_volume(name)
    assert [(reason, result) for _, reason, result in evict(agent)] == [("count", "removed")]
    assert agent.status()["last_eviction"]["error"] is None

    own = agent.marker()
    assert own is not None
    docker_client.remove_volume(own)  # as `docker volume prune` does (Docker < 23)
    assert evict(agent) == []
    assert markers(docker_client) == {own}
    labels = docker_client.inspect_volume(own)["Labels"]
    assert labels["snapagentd.journal"] == str(agent.journal_path)
    assert labels["snapagentd.prefixes"] == PREFIX
    assert "made again" in agent.log()


def test_docker_down_at_start_leaves_the_check_to_the_first_run_that_reaches_it(
    make_agent: MakeAgent, fresh_docker_engine: DockerEngine
) -> None:
    with fresh_docker_engine.client() as client:
        image_id = make_image(client, f"{PREFIX}theirs:latest")
        name = intruder(client)
    fresh_docker_engine.halt()
    agent = make_agent(docker_url=fresh_docker_engine.url, max_count=0)  # READY regardless
    assert agent.status()["engine"]["id"] is None
    assert "the first eviction run that reaches Docker checks it" in agent.log()
    fresh_docker_engine.start_again()

    def refused_run() -> Any:
        last = agent.status()["last_eviction"]
        return last and last["trigger"] == "docker-returned" and name in (last["error"] or "")

    wait_until(refused_run, timeout=60, message="the docker-returned run to refuse")
    client = fresh_docker_engine.client()
    try:
        assert image_exists(client, image_id)
        assert agent.marker() not in markers(client)  # it never made one beside the intruder
        assert agent.status()["engine"]["id"] == client.info()["ID"]
    finally:
        client.close()


def test_of_two_agents_started_together_exactly_one_wins(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    agents = [make_agent(start=False), make_agent(start=False)]
    processes = [agent.spawn() for agent in agents]
    codes: list[int | None] = [None, None]

    def settled() -> bool:
        for index, (agent, process) in enumerate(zip(agents, processes, strict=True)):
            agent.notify.drain(0)
            if process.poll() is not None:
                codes[index] = process.returncode
            elif "READY=1" in agent.notify.messages:
                codes[index] = 0
        return None not in codes

    wait_until(settled, timeout=60, message="both agents to be ready or gone")
    assert sorted(code != 0 for code in codes) == [False, True], [a.log() for a in agents]
    winner = agents[codes.index(0)]
    assert markers(docker_client) == {winner.marker()}
    assert winner.status()["engine"]["marker"] == winner.marker()


def untagged_copy(source: docker.APIClient, target: docker.APIClient, image_id: str) -> None:
    """`docker save` the image by id and `docker load` it: the same id, and no tag, there."""
    target.load_image(b"".join(source.get_image(image_id)))
    assert target.inspect_image(image_id)["RepoTags"] in ([], None)


def test_a_journal_from_another_engine_removes_nothing_there_and_works_at_home(
    make_agent: MakeAgent, docker_client: docker.APIClient, fresh_docker_engine: DockerEngine
) -> None:
    home = make_agent()
    # A known image: an entry referenced it, and a foreign tag kept it when ours went.
    leaked = make_image(docker_client, f"{PREFIX}x:latest")
    docker_client.tag(leaked, "foreign-keep", "v1")
    home.register("p", "x", f"{PREFIX}x:latest")
    home.ok("DELETE", "/v1/snapshots", query={"project": "p", "work_item": "x"})
    kept = make_image(docker_client, f"{PREFIX}kept:latest")
    home.register("p", "kept", f"{PREFIX}kept:latest")
    home.ok("POST", "/v1/snapshots/lease", {"project": "p", "work_item": "kept", "seconds": 600})
    assert home.stop() == 0
    make_image(docker_client, "foreign-keep:v1")  # the foreign tag moves on: ours is dangling

    away_client = fresh_docker_engine.client()
    try:
        # The same images on engine E2, dangling there (same ids: save by id, load).
        for image_id in (leaked, kept):
            untagged_copy(docker_client, away_client, image_id)
        away = make_agent(start=False, docker_url=fresh_docker_engine.url, max_count=0)
        shutil.copytree(home.journal_path.parent, away.journal_path.parent)
        away.start()
        log = away.log()
        assert "WARNING" in log and "engine changed" in log
        home_root = f"data root {docker_client.info()['DockerRootDir']}"
        away_root = f"data root {away_client.info()['DockerRootDir']}"
        assert home_root in log and away_root in log and home_root != away_root
        assert "dropping 1 known images" in log and "1 entries whose tag" in log
        assert evict(away) == []
        assert image_exists(away_client, leaked) and image_exists(away_client, kept)
        status = away.status()
        assert status["snapshots"]["count"] == 0 and status["snapshots"]["leases"] == 1
        assert status["engine"]["instance"] == home.instance_id()
    finally:
        away_client.close()

    # At home, with its own journal, the leak is removed as before and the entry stays.
    home.start()
    assert not image_exists(docker_client, leaked)  # by the start-up run, before READY
    assert f"evicted {PREFIX}x:latest ({leaked[:19]}): leaked" in home.log()
    assert [s["image_id"] for s in home.snapshots()] == [kept]
    assert "engine changed" not in home.log()


def test_a_journal_without_an_engine_adopts_this_one_and_keeps_its_known_images(
    make_agent: MakeAgent, docker_client: docker.APIClient
) -> None:
    leaked = make_image(docker_client, f"{PREFIX}y:latest")
    make_image(docker_client, f"{PREFIX}y:latest")  # the tag moves on: dangling
    agent = make_agent(start=False)
    agent.journal_path.parent.mkdir(parents=True)
    older = '{"v":1,"op":"known","image":"' + PREFIX + 'y:latest","image_id":"' + leaked + '"}\n'
    agent.journal_path.write_text(older)  # as an agent before engine records wrote it
    agent.start()
    assert not image_exists(docker_client, leaked)
    assert "engine changed" not in agent.log()
    records = agent.journal_path.read_text()
    assert '"op":"engine"' in records and '"op":"instance"' in records


def test_snapagentctl_status_names_the_engine_and_the_marker() -> None:
    from snapagentd.ctl import status_pairs

    from .test_ctl_format import NOW as CTL_NOW
    from .test_ctl_format import STATUS

    engine = {"id": "ABCD:EFGH", "instance": "9f3c", "marker": "snapagentd-owner-9f3c"}
    pairs = dict(status_pairs({**STATUS, "engine": engine}, CTL_NOW))
    assert pairs["engine"] == "ABCD:EFGH (instance 9f3c, marker snapagentd-owner-9f3c)"
    unreached = dict(status_pairs({**STATUS, "engine": {**engine, "id": None}}, CTL_NOW))
    assert unreached["engine"].startswith("not reached yet (")
    assert "engine" not in dict(status_pairs(STATUS, CTL_NOW))  # an older agent's answer
