"""The Prometheus metrics (snapagentd/metrics.py), the dashboard and the alerting rules.

Values are read back the way Prometheus reads them: the exposition is parsed with
prometheus_client's own parser. The middleware is tested on real aiohttp apps served on a real
Unix socket, the loopback endpoint on a real TCP port. No Docker needed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from snapagentd.api import create_app
from snapagentd.daemon import make_runner
from snapagentd.metrics import (
    FSYNC_BUCKETS,
    REASONS,
    REQUEST_BUCKETS,
    RESULTS,
    DiskGauges,
    Metrics,
    ProjectGauges,
    StateGauges,
    metrics_handler,
    parse_listen,
    start_metrics_site,
)
from snapagentd.models import Reason, RemovalResult

# Every request of these tests is local and quick: a hang fails the test, not the CI run.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana" / "snapagentd.json"
ALERTS = ROOT / "contrib" / "prometheus" / "snapagentd-alerts.yml"
DOCS = ROOT / "docs" / "metrics.md"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value) from an exposition."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return types, samples


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body)[1]


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


DISK = DiskGauges("/var/lib/docker", 100_000, 40_000, 15_000, 20_000)


def a_state(**changes: Any) -> StateGauges:
    state = StateGauges(
        projects={
            "": ProjectGauges(snapshots=1, virtual_bytes=300, unique_bytes=100),
            "Proj Snap": ProjectGauges(snapshots=3, virtual_bytes=9_000, unique_bytes=2_500),
        },
        pending_removal=2,
        leases=1,
        docker_up=True,
        events_connected=False,
        disk=DISK,
    )
    return replace(state, **changes)


def everything() -> Metrics:
    """A Metrics on which every metric has a sample."""
    metrics = Metrics(a_state)
    metrics.observe_request("/v1/status", "GET", 200, 0.001)
    metrics.observe_fsync(0.001)
    metrics.count_removal("ttl", "removed", 10)
    metrics.count_removal_failure("500")
    metrics.set_last_eviction(datetime.now(UTC))
    return metrics


# ======================================================================================
# Counters, histograms, gauges
# ======================================================================================


def test_counters_increase_by_what_was_counted() -> None:
    metrics = Metrics()
    before = scrape(metrics)
    assert value(before, "snapagentd_reclaimed_bytes_total") == 0
    assert value(before, "snapagentd_evictions_total", reason="size", result="removed") == 0

    metrics.count_removal("size", "removed", 4096)
    metrics.count_removal("size", "removed", 1000)
    metrics.count_removal("ttl", "in-use", 0)
    metrics.count_removal("superseded", "already-gone", -5)  # nothing reclaimed, not an error
    metrics.count_removal_failure("500")
    metrics.count_removal_failure("unreachable")
    metrics.count_removal_failure("500")
    after = scrape(metrics)

    assert value(after, "snapagentd_evictions_total", reason="size", result="removed") == 2
    assert value(after, "snapagentd_evictions_total", reason="ttl", result="in-use") == 1
    assert value(after, "snapagentd_evictions_total", reason="superseded", result="already-gone")
    assert value(after, "snapagentd_evictions_total", reason="count", result="removed") == 0
    assert value(after, "snapagentd_reclaimed_bytes_total") == 5096
    assert value(after, "snapagentd_removal_failures_total", status="500") == 2
    assert value(after, "snapagentd_removal_failures_total", status="unreachable") == 1


def test_every_known_reason_and_result_starts_at_zero() -> None:
    samples = scrape(Metrics())
    evictions = {
        dict(labels)["reason"] + "/" + dict(labels)["result"]: v
        for (name, labels), v in samples.items()
        if name == "snapagentd_evictions_total"
    }
    assert evictions == {f"{r}/{s}": 0 for r in REASONS for s in RESULTS}
    assert {r.value for r in Reason} == set(REASONS)  # every reason the agent can give
    assert {r.value for r in RemovalResult} - {"planned"} == set(RESULTS)


def test_histograms_count_observations_into_their_buckets() -> None:
    metrics = Metrics()
    for seconds in (0.0004, 0.0009, 0.003, 2.0):
        metrics.observe_fsync(seconds)
    metrics.observe_request("/v1/snapshots", "POST", 201, 0.002)
    metrics.observe_request("/v1/snapshots", "POST", 201, 0.2)
    metrics.observe_request("/v1/snapshots", "POST", 400, 0.0001)
    samples = scrape(metrics)

    fsync = "snapagentd_journal_fsync_seconds"
    assert value(samples, fsync + "_count") == 4
    assert value(samples, fsync + "_sum") == pytest.approx(2.0043)
    assert value(samples, fsync + "_bucket", le="0.0005") == 1
    assert value(samples, fsync + "_bucket", le="0.001") == 2
    assert value(samples, fsync + "_bucket", le="0.005") == 3
    assert value(samples, fsync + "_bucket", le="1.0") == 3
    assert value(samples, fsync + "_bucket", le="+Inf") == 4
    assert {dict(labels)["le"] for name, labels in samples if name == fsync + "_bucket"} == {
        *(str(float(b)) for b in FSYNC_BUCKETS),
        "+Inf",
    }

    request = "snapagentd_request_seconds"
    created = {"route": "/v1/snapshots", "method": "POST", "status": "201"}
    assert value(samples, request + "_count", **created) == 2
    assert value(samples, request + "_bucket", **created, le="0.0025") == 1
    assert value(samples, request + "_bucket", **created, le="0.25") == 2
    assert value(samples, request + "_count", **{**created, "status": "400"}) == 1
    buckets = {dict(labels)["le"] for name, labels in samples if name == request + "_bucket"}
    assert buckets == {*(str(float(b)) for b in REQUEST_BUCKETS), "+Inf"}
    assert min(REQUEST_BUCKETS) == 0.0005 and max(REQUEST_BUCKETS) == 10


def test_unknown_methods_share_one_label_value() -> None:
    metrics = Metrics()
    metrics.observe_request("unmatched", "FROBNICATE", 404, 0.001)
    metrics.observe_request("unmatched", "X" * 200, 404, 0.001)
    samples = scrape(metrics)
    labels = {"route": "unmatched", "method": "other", "status": "404"}
    assert value(samples, "snapagentd_request_seconds_count", **labels) == 2


def test_observations_from_threads_are_all_counted() -> None:
    metrics = Metrics()  # the journal fsyncs in a worker thread

    def observe() -> None:
        for _ in range(500):
            metrics.observe_fsync(0.001)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert value(scrape(metrics), "snapagentd_journal_fsync_seconds_count") == 2000


def test_state_gauges_are_read_at_each_scrape() -> None:
    current = {"state": a_state()}
    reads: list[int] = []

    def read_state() -> StateGauges:
        reads.append(1)
        return current["state"]

    metrics = Metrics(read_state)
    assert reads == []  # nothing is read before a scrape
    first = scrape(metrics)
    assert value(first, "snapagentd_snapshots", project="Proj Snap") == 3
    assert value(first, "snapagentd_snapshots", project="") == 1
    assert value(first, "snapagentd_snapshot_virtual_bytes", project="Proj Snap") == 9000
    assert value(first, "snapagentd_snapshot_unique_bytes", project="Proj Snap") == 2500
    assert value(first, "snapagentd_snapshot_unique_bytes", project="") == 100
    assert value(first, "snapagentd_pending_removals") == 2
    assert value(first, "snapagentd_leases") == 1
    assert value(first, "snapagentd_docker_up") == 1
    assert value(first, "snapagentd_events_connected") == 0
    disk = {"path": "/var/lib/docker"}
    assert value(first, "snapagentd_disk_total_bytes", **disk) == 100_000
    assert value(first, "snapagentd_disk_free_bytes", **disk) == 40_000
    assert value(first, "snapagentd_disk_high_threshold_bytes", **disk) == 15_000
    assert value(first, "snapagentd_disk_low_threshold_bytes", **disk) == 20_000

    current["state"] = a_state(
        projects={"other": ProjectGauges(7, 70, 7)},
        pending_removal=0,
        docker_up=False,
        events_connected=True,
        disk=replace(DISK, free_bytes=10_000),
    )
    second = scrape(metrics)
    assert len(reads) == 2
    assert value(second, "snapagentd_snapshots", project="other") == 7
    assert value(second, "snapagentd_snapshots", project="Proj Snap") is None  # gone, not stale
    assert value(second, "snapagentd_pending_removals") == 0
    assert value(second, "snapagentd_docker_up") == 0
    assert value(second, "snapagentd_events_connected") == 1
    assert value(second, "snapagentd_disk_free_bytes", **disk) == 10_000


def test_no_disk_gauges_without_a_disk() -> None:
    samples = scrape(Metrics(lambda: a_state(disk=None)))
    assert not {n for n in names(samples) if n.startswith("snapagentd_disk_")}
    assert value(samples, "snapagentd_docker_up") == 1


def test_a_raising_reader_costs_only_the_state_gauges(caplog: pytest.LogCaptureFixture) -> None:
    failing = {"now": True}

    def read_state() -> StateGauges:
        if failing["now"]:
            raise RuntimeError("registry is being rebuilt")
        return a_state()

    metrics = Metrics(read_state)
    metrics.count_removal("ttl", "removed", 7)
    metrics.set_last_eviction(datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    with caplog.at_level(logging.INFO, logger="snapagentd.metrics"):
        first, second = scrape(metrics), scrape(metrics)
        for samples in (first, second):
            assert value(samples, "snapagentd_reclaimed_bytes_total") == 7
            assert value(samples, "snapagentd_last_eviction_timestamp_seconds") == 1714564800
            assert value(samples, "snapagentd_build_info", version="0.1.0") == 1
            assert "snapagentd_docker_up" not in names(samples)
            assert "snapagentd_snapshots" not in names(samples)
        assert value(second, "snapagentd_state_read_failures_total") == 2
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1  # logged once, not at every scrape
        assert "registry is being rebuilt" in caplog.text

        failing["now"] = False
        recovered = scrape(metrics)
        assert value(recovered, "snapagentd_docker_up") == 1
        assert value(recovered, "snapagentd_state_read_failures_total") == 2
        failing["now"] = True
        scrape(metrics)  # a new failure after a recovery is logged again
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2


def test_state_reader_can_be_set_later() -> None:
    metrics = Metrics()
    assert "snapagentd_snapshots" not in names(scrape(metrics))
    metrics.set_state_reader(lambda: a_state(leases=9))
    assert value(scrape(metrics), "snapagentd_leases") == 9


def test_last_eviction_is_absent_until_set_and_naive_times_are_utc() -> None:
    metrics = Metrics()
    assert "snapagentd_last_eviction_timestamp_seconds" not in names(scrape(metrics))
    metrics.set_last_eviction(datetime(2024, 5, 1, 12, 0))
    assert value(scrape(metrics), "snapagentd_last_eviction_timestamp_seconds") == 1714564800
    later = datetime(2024, 5, 1, 14, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    metrics.set_last_eviction(later)
    assert value(scrape(metrics), "snapagentd_last_eviction_timestamp_seconds") == 1714564830


def test_exposition_types_and_no_created_series() -> None:
    body, _ = everything().render()
    types, samples = parse(body)
    assert not [n for n in names(samples) if n.endswith("_created")]
    assert types["snapagentd_evictions"] == "counter"
    assert types["snapagentd_reclaimed_bytes"] == "counter"
    assert types["snapagentd_removal_failures"] == "counter"
    assert types["snapagentd_state_read_failures"] == "counter"
    assert types["snapagentd_journal_fsync_seconds"] == "histogram"
    assert types["snapagentd_request_seconds"] == "histogram"
    for gauge in ("snapshots", "docker_up", "disk_free_bytes", "last_eviction_timestamp_seconds"):
        assert types["snapagentd_" + gauge] == "gauge"
    assert "process_cpu_seconds_total" in names(samples)
    assert value(samples, "process_open_fds") >= 3


def test_every_metric_is_documented() -> None:
    text = DOCS.read_text()
    for family in parse(everything().render()[0])[0]:
        if family.startswith("snapagentd_"):
            counter = family + "_total"
            assert f"`{family}`" in text or f"`{counter}`" in text, family


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.count_removal_failure("500")
    assert value(scrape(first), "snapagentd_removal_failures_total", status="500") == 1
    assert value(scrape(second), "snapagentd_removal_failures_total", status="500") is None


# ======================================================================================
# The middleware, on real apps served on a real Unix socket
# ======================================================================================


async def _item(request: web.Request) -> web.Response:
    return web.json_response({"name": request.match_info["name"]})


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("handler bug")


async def _forbidden(request: web.Request) -> web.Response:
    raise web.HTTPForbidden(text="no")


class Served:
    """An app served on a Unix socket, with a client session to it."""

    def __init__(self, runner: web.AppRunner, session: aiohttp.ClientSession) -> None:
        self.runner = runner
        self.session = session

    async def call(self, method: str, path: str) -> int:
        async with self.session.request(method, "http://localhost" + path) as response:
            await response.read()
            return response.status


@pytest.fixture
async def serve(short_tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    served: list[Served] = []

    async def start(app: web.Application) -> Served:
        path = short_tmp_path / f"api-{len(served)}.sock"
        runner = make_runner(app)  # the daemon's runner options
        await runner.setup()
        await web.UnixSite(runner, str(path)).start()
        session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(path)), timeout=CLIENT_TIMEOUT
        )
        served.append(Served(runner, session))
        return served[-1]

    yield start
    for one in served:
        await one.session.close()
        await one.runner.cleanup()


def api_app(metrics: Metrics) -> web.Application:
    """The API's app (with its JSON error middleware) as the daemon would wire metrics in."""
    app = create_app()
    app.middlewares.insert(0, metrics.middleware())
    app.router.add_get("/metrics", metrics_handler(metrics))
    app.router.add_get("/t/items/{name}", _item)
    app.router.add_post("/t/boom", _boom)
    app.router.add_get("/t/forbidden", _forbidden)
    return app


def requests(samples: Samples) -> dict[tuple[str, str, str], float]:
    return {
        (labels["route"], labels["method"], labels["status"]): v
        for (name, frozen), v in samples.items()
        if name == "snapagentd_request_seconds_count"
        for labels in [dict(frozen)]
    }


async def test_middleware_records_route_templates_unmatched_and_errors(serve: Any) -> None:
    metrics = Metrics()
    served = await serve(api_app(metrics))
    assert await served.call("GET", "/t/items/alpha") == 200
    assert await served.call("GET", "/t/items/beta?x=1") == 200
    assert await served.call("GET", "/no/such/path/123") == 404
    assert await served.call("GET", "/v1/snapshots/unknown-id") == 404
    assert await served.call("DELETE", "/v1/status") == 405
    assert await served.call("POST", "/t/boom") == 500  # errors_as_json made it a JSON 500
    assert await served.call("GET", "/t/forbidden") == 403  # an HTTPException passing through
    assert await served.call("GET", "/metrics") == 200

    counted = requests(scrape(metrics))
    assert counted == {
        ("/t/items/{name}", "GET", "200"): 2,
        ("unmatched", "GET", "404"): 2,
        ("unmatched", "DELETE", "405"): 1,
        ("/t/boom", "POST", "500"): 1,
        ("/t/forbidden", "GET", "403"): 1,
        ("/metrics", "GET", "200"): 1,
    }
    routes = {route for route, _, _ in counted}
    assert not [r for r in routes if "alpha" in r or "beta" in r or "123" in r or "?" in r]


async def test_middleware_times_a_handler_that_raises_past_it(serve: Any) -> None:
    metrics = Metrics()
    app = web.Application(middlewares=[metrics.middleware()])  # no JSON error middleware
    app.router.add_post("/t/boom", _boom)
    app.router.add_get("/t/forbidden", _forbidden)
    served = await serve(app)
    assert await served.call("POST", "/t/boom") == 500
    assert await served.call("GET", "/t/forbidden") == 403
    assert await served.call("GET", "/nothing") == 404
    assert requests(scrape(metrics)) == {
        ("/t/boom", "POST", "500"): 1,
        ("/t/forbidden", "GET", "403"): 1,
        ("unmatched", "GET", "404"): 1,
    }


async def test_metrics_on_the_socket_answer_the_exposition(serve: Any) -> None:
    metrics = Metrics(a_state)
    served = await serve(api_app(metrics))
    async with served.session.get("http://localhost/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = parse(await response.read())[1]
    assert value(samples, "snapagentd_snapshots", project="Proj Snap") == 3
    async with served.session.get("http://localhost/metrics") as response:
        samples = parse(await response.read())[1]
    assert requests(samples) == {("/metrics", "GET", "200"): 1}  # the first scrape


# ======================================================================================
# The loopback TCP endpoint and metrics.listen
# ======================================================================================


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def _get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
        session.request(method, url) as response,
    ):
        return response.status, response.headers.get("Content-Type", ""), await response.read()


async def test_metrics_site_serves_only_metrics_on_loopback() -> None:
    metrics = Metrics(a_state)
    metrics.count_removal("disk", "removed", 123)
    port = free_port()
    runner = await start_metrics_site(metrics, f"127.0.0.1:{port}")
    try:
        status, content_type, body = await _get(f"http://127.0.0.1:{port}/metrics")
        assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
        samples = parse(body)[1]
        assert value(samples, "snapagentd_reclaimed_bytes_total") == 123
        assert value(samples, "snapagentd_leases") == 1
        assert (await _get(f"http://127.0.0.1:{port}/v1/status"))[0] == 404
        assert (await _get(f"http://127.0.0.1:{port}/metrics", "POST"))[0] == 405
        # Scrapes of the TCP endpoint are not API requests.
        assert requests(scrape(metrics)) == {}
    finally:
        await runner.cleanup()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(f"http://127.0.0.1:{port}/metrics")


async def test_metrics_site_on_ipv6_loopback() -> None:
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    runner = await start_metrics_site(Metrics(), f"[::1]:{port}")
    try:
        assert (await _get(f"http://[::1]:{port}/metrics"))[0] == 200
    finally:
        await runner.cleanup()


async def test_metrics_site_on_a_taken_port_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await start_metrics_site(Metrics(), f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:9465", "127.0.0.1:http", "[::]:9465", "192.168.1.10:9465", "localhost:9465"],
)
async def test_metrics_site_refuses_other_addresses_naming_the_key(listen: str) -> None:
    with pytest.raises(ValueError, match=r"^metrics\.listen: ") as error:
        await start_metrics_site(Metrics(), listen)
    assert repr(listen) in str(error.value)


@pytest.mark.parametrize(
    ("listen", "parsed"),
    [
        ("127.0.0.1:9465", ("127.0.0.1", 9465)),
        ("127.0.0.53:1", ("127.0.0.53", 1)),
        ("[::1]:9465", ("::1", 9465)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_listen_accepts_loopback_addresses(listen: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(listen) == parsed


@pytest.mark.parametrize(
    ("listen", "mentions"),
    [
        ("0.0.0.0:9465", "not a loopback address"),
        ("[::]:9465", "not a loopback address"),
        ("10.1.2.3:9465", "unauthenticated"),
        ("[fe80::1]:9465", "not a loopback address"),
        ("127.0.0.1:http", "loopback address and a port"),
        ("127.0.0.1:", "loopback address and a port"),
        ("127.0.0.1", "loopback address and a port"),
        ("127.0.0.1:٩٤٦٥", "loopback address and a port"),  # Arabic-Indic digits
        ("::1:9465", "loopback address and a port"),
        ("[127.0.0.1]:9465", "brackets are for IPv6"),
        ("localhost:9465", "is not an IP address"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:99999", "out of range"),
        (" 127.0.0.1:9465", "loopback address and a port"),
        ("", "loopback address and a port"),
        (9465, "loopback address and a port"),
    ],
)
def test_parse_listen_refuses_with_a_phrase_quoting_the_value(listen: Any, mentions: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_listen(listen)
    message = str(error.value)
    assert message.startswith(f"invalid value {listen!r}")
    assert mentions in message


# ======================================================================================
# The dashboard and the alerting rules use only exported names
# ======================================================================================

EXPORTED = names(scrape(everything()))
PROMQL_WORDS = {
    # functions and aggregations used in contrib/, and PromQL's keywords
    "histogram_quantile", "rate", "increase", "sum", "max", "min", "avg", "count", "time",
    "label_replace", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
    "or", "unless", "offset", "bool",
}  # fmt: skip


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression selects (its identifiers minus PromQL's own words)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # ranges, [$__rate_interval]
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)  # groupings
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped)) - PROMQL_WORDS


def test_promql_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) (rate(snapagentd_request_seconds_bucket"
        '{instance=~"$instance"}[$__rate_interval]))) > 0 unless on (instance) up'
    )
    assert metric_names_in(expr) == {"snapagentd_request_seconds_bucket", "up"}


def dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "expr" and isinstance(item, str):
                yield item
            else:
                yield from dashboard_exprs(item)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def test_dashboard_is_importable_and_uses_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["id"] is None and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "instance" in variables
    assert metric_names_in(variables["instance"]["definition"].replace("label_values", "")) <= (
        EXPORTED | {"instance"}
    )

    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used: set[str] = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            found = metric_names_in(expr)
            assert found, expr
            assert found <= EXPORTED, (panel["title"], found - EXPORTED)
            assert 'instance=~"$instance"' in expr, expr
            used |= found
    wanted = {
        "snapagentd_disk_free_bytes",
        "snapagentd_disk_high_threshold_bytes",
        "snapagentd_disk_low_threshold_bytes",
        "snapagentd_snapshots",
        "snapagentd_snapshot_unique_bytes",
        "snapagentd_snapshot_virtual_bytes",
        "snapagentd_evictions_total",
        "snapagentd_reclaimed_bytes_total",
        "snapagentd_removal_failures_total",
        "snapagentd_request_seconds_bucket",
        "snapagentd_journal_fsync_seconds_bucket",
        "snapagentd_docker_up",
        "snapagentd_last_eviction_timestamp_seconds",
    }
    assert wanted <= used


def rules_without_yaml(text: str) -> list[dict[str, Any]]:
    """The rules of an alerting file written as ours is (block style, one rule per "- alert"),
    for machines without PyYAML: alert, expr (plain or folded), for, severity."""
    rules: list[dict[str, Any]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*(#|$)", line):
            continue
        if match := re.match(r"\s*- alert: (\S+)$", line):
            rules.append({"alert": match[1]})
        elif match := re.match(r"(\s*)(expr|for|severity): ?(.*)$", line):
            indent, key, item = match.groups()
            if item in (">-", ">", "|", "|-"):
                block = []
                for following in lines[number + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) <= len(
                        indent
                    ):
                        break
                    block.append(following.strip())
                item = " ".join(part for part in block if part)
            rules[-1][key] = item.strip().strip('"')
    return rules


def load_rules() -> list[dict[str, Any]]:
    """Every rule, flattened (severity lifted from labels); via PyYAML when installed."""
    text = ALERTS.read_text()
    try:
        import yaml
    except ImportError:
        return rules_without_yaml(text)
    document = yaml.safe_load(text)
    assert set(document) == {"groups"}
    rules = []
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert set(rule["annotations"]) == {"summary", "description"}, rule
            flat = {key: rule[key] for key in ("alert", "expr", "for") if key in rule}
            flat["expr"] = " ".join(str(flat["expr"]).split())
            flat["severity"] = rule["labels"]["severity"]
            rules.append(flat)
    assert rules_without_yaml(text) == rules  # the fallback reads our file the same way
    return rules


def test_alerting_rules_use_only_exported_metrics() -> None:
    rules = {rule["alert"]: rule for rule in load_rules()}
    assert len(rules) == len(load_rules())  # unique names
    for rule in rules.values():
        assert re.fullmatch(r"Snapagentd[A-Z][A-Za-z]+", rule["alert"])
        assert rule["severity"] in {"warning", "critical"}
        if "for" in rule:
            assert re.fullmatch(r"[0-9]+[smh]", rule["for"])
        found = metric_names_in(rule["expr"])
        assert found and found <= EXPORTED, (rule["alert"], found - EXPORTED)

    disk = rules["SnapagentdDiskAboveHighWatermark"]
    assert disk["expr"] == "snapagentd_disk_free_bytes < snapagentd_disk_high_threshold_bytes"
    assert disk["for"] == "15m"
    docker_down = rules["SnapagentdDockerUnreachable"]
    assert (docker_down["expr"], docker_down["for"]) == ("snapagentd_docker_up == 0", "5m")
    assert "snapagentd_removal_failures_total" in rules["SnapagentdRemovalFailures"]["expr"]
    no_eviction = rules["SnapagentdNoRecentEviction"]["expr"]
    assert "snapagentd_last_eviction_timestamp_seconds" in no_eviction


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: the prometheus package)")
    return found


def run_promtool(promtool: str, *args: str) -> None:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerting_rules_pass_promtool(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", str(ALERTS))


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rules = [
        {"record": f"dashboard:query_{number}", "expr": grafana_to_promql(expr)}
        for number, expr in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*")


def test_alerts_fire_when_they_should(promtool: str, tmp_path: Path) -> None:
    """promtool's rule unit tests, on our rules without their annotations (promtool would
    compare those word for word; check_rules already parses their templates)."""
    rules = [
        {key: rule[key] for key in ("alert", "expr", "for") if key in rule}
        | {"labels": {"severity": rule["severity"]}}
        for rule in load_rules()
    ]
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "snapagentd", "rules": rules}]}))

    def series(name: str, instance: str, values: str, **labels: str) -> dict[str, str]:
        matchers = ",".join(f'{k}="{v}"' for k, v in {"instance": instance, **labels}.items())
        return {"series": f'{name}{{job="snapagentd",{matchers}}}', "values": values}

    def alert(name: str, at: str, *instances: str, **labels: str) -> dict[str, Any]:
        expected = [
            {"exp_labels": {"job": "snapagentd", "instance": i, **labels}} for i in instances
        ]
        return {"eval_time": at, "alertname": name, "exp_alerts": expected}

    disk = {"path": "/var/lib/docker"}
    tests = {
        "rule_files": [str(rule_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # "full": below the high watermark from the start; "ok": above it.
                    series("snapagentd_disk_free_bytes", "full", "100x40", **disk),
                    series("snapagentd_disk_high_threshold_bytes", "full", "150x40", **disk),
                    series("snapagentd_disk_free_bytes", "ok", "200x40", **disk),
                    series("snapagentd_disk_high_threshold_bytes", "ok", "150x40", **disk),
                    # Docker: "down" from minute 10, "up" throughout.
                    series("snapagentd_docker_up", "down", "1x9 0x30"),
                    series("snapagentd_docker_up", "up", "1x40"),
                    series("snapagentd_docker_up", "full", "1x40"),
                    series("snapagentd_docker_up", "ok", "1x40"),
                    # Removal failures: one more every minute from minute 5 on "up".
                    series("snapagentd_removal_failures_total", "up", "0x4 1+1x35", status="500"),
                    series("snapagentd_removal_failures_total", "ok", "3x40", status="409"),
                    # Evictions: "up" stopped at time 0; "full" evicts every 5 minutes;
                    # "down" stopped too, but Docker is down there.
                    series("snapagentd_last_eviction_timestamp_seconds", "up", "0x40"),
                    series("snapagentd_last_eviction_timestamp_seconds", "down", "0x40"),
                    series(
                        "snapagentd_last_eviction_timestamp_seconds",
                        "full",
                        " ".join(str(300 * (m // 5)) for m in range(41)),
                    ),
                    series("snapagentd_state_read_failures_total", "up", "0 0 0 1x37"),
                    series("snapagentd_state_read_failures_total", "ok", "0x40"),
                ],
                "alert_rule_test": [
                    alert("SnapagentdDiskAboveHighWatermark", "14m"),
                    alert(
                        "SnapagentdDiskAboveHighWatermark",
                        "16m",
                        "full",
                        severity="warning",
                        **disk,
                    ),
                    alert("SnapagentdDockerUnreachable", "14m"),
                    alert("SnapagentdDockerUnreachable", "16m", "down", severity="critical"),
                    alert("SnapagentdRemovalFailures", "20m"),
                    alert("SnapagentdRemovalFailures", "40m", "up", severity="warning"),
                    alert("SnapagentdNoRecentEviction", "19m"),
                    alert("SnapagentdNoRecentEviction", "22m", "up", severity="warning"),
                    alert("SnapagentdStateUnreadable", "2m"),
                    alert("SnapagentdStateUnreadable", "4m", "up", severity="warning"),
                ],
            }
        ],
    }
    test_file = tmp_path / "tests.yml"
    test_file.write_text(json.dumps(tests))
    run_promtool(promtool, "test", "rules", str(test_file))
