"""schemathesis against docs/openapi.json: the real application (as the daemon wires it) served on
loopback TCP (127.0.0.1, port 0) in-process, backed by the private dockerd.

Every operation gets positive and negative cases from schemathesis' phases (examples, coverage,
fuzzing); each answer must pass ``not_a_server_error``, ``response_schema_conformance``,
``status_code_conformance`` and ``content_type_conformance``. The last test checks that at
least 10,000 requests were sent in all (the exact number is printed with ``-s``).

SNAPAGENTD_SCHEMATHESIS_ALL_CHECKS=1 runs every check schemathesis has (negative data
rejection, positive data acceptance, ...) and reports what they find without failing: what the
server does that docs/openapi.json does not say.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .engine import in_ci, make_image, make_short_tmpdir, remove_test_artifacts

if in_ci() and not sys.executable.startswith("/usr/bin/"):
    import schemathesis  # the .venv pass under CI: a missing schemathesis is an error
else:
    schemathesis = pytest.importorskip(
        "schemathesis",
        reason="schemathesis is not packaged in Debian 12: this file runs on the .venv "
        "(pip install schemathesis), not on Debian's python3",
    )

import requests
from hypothesis import HealthCheck, settings
from schemathesis import checks

from .test_fuzz_handlers import (
    IMAGES,
    KEEPERS,
    MANAGED_PREFIX,
    LiveApp,
    _ensure_engine,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
SCALE = float(os.environ.get("SNAPAGENTD_FUZZ_SCALE", "1"))
ALL_CHECKS = os.environ.get("SNAPAGENTD_SCHEMATHESIS_ALL_CHECKS") == "1"
REQUIRED_REQUESTS = 10_000
# The image the documentation's examples name: registering it succeeds, so the examples phase
# exercises the 201/200 answers (and lookup and DELETE of the same key) too.
EXAMPLE_IMAGE = "cascade-snapshot-proj-snap-mng-652-worker-snapshot:latest"

schema = schemathesis.openapi.from_path(DOCS)

STRICT_CHECKS = [
    checks.not_a_server_error,
    checks.response_schema_conformance,
    checks.status_code_conformance,
    checks.content_type_conformance,
]
sent: dict[str, int] = {}  # operation -> requests
findings: dict[str, set[str]] = {}  # with ALL_CHECKS: check failure -> examples


@pytest.fixture(scope="module")
def base_url(docker_engine: Any) -> Iterator[str]:
    _ensure_engine(docker_engine)
    client = docker_engine.client()
    prefixes = (MANAGED_PREFIX, "foreign-", "keep-fuzz-")
    remove_test_artifacts(client, prefixes=prefixes)
    for image in [*IMAGES, EXAMPLE_IMAGE]:
        make_image(client, image)
    for image in IMAGES:
        client.tag(image, KEEPERS[image], "latest")
    directory = make_short_tmpdir("sa-st-")
    live = LiveApp(directory, docker_engine.url).start()
    try:
        yield f"http://127.0.0.1:{live.port}"
    finally:
        live.stop()
        remove_test_artifacts(client, prefixes=prefixes)
        client.close()
        print(f"\nschemathesis requests per operation: {sent}; total {sum(sent.values())}")
        for finding, cases in sorted(findings.items()):
            print(f"finding: {finding}\n    e.g. {sorted(cases)[:3]}")


@pytest.fixture(scope="module")
def session(base_url: str) -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


def _sent_body(response: Any) -> bytes:
    body = response.request.body or b""
    return body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body


@schema.parametrize()
@settings(
    max_examples=max(1, round(2150 * SCALE)),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_matches_openapi_document(case: Any, base_url: str, session: Any) -> None:
    label = f"{case.method} {case.path}"
    response = case.call(base_url=base_url, session=session, timeout=30)
    sent[label] = sent.get(label, 0) + 1
    body = _sent_body(response)
    case.validate_response(response, checks=STRICT_CHECKS)
    if ALL_CHECKS:
        try:
            case.validate_response(response)  # every check schemathesis has
        except (Exception, BaseExceptionGroup) as failure:  # a report, not a verdict
            parts = getattr(failure, "exceptions", [failure])
            title = "; ".join(
                f"{type(part).__name__}: {' / '.join(str(part).strip().splitlines()[:4])}"[:300]
                for part in parts
            )
            example = f"{label} -> {response.status_code}: {body[:120]!r} {case.query or ''}"
            findings.setdefault(f"{label}: {title}", set()).add(example)


def test_at_least_10000_generated_requests_were_sent(request: pytest.FixtureRequest) -> None:
    ran = [item for item in request.session.items if "test_api_matches_openapi" in item.name]
    if len(ran) < 6 or SCALE < 1:
        pytest.skip("the schemathesis tests above were not all selected")
    total = sum(sent.values())
    print(f"\nschemathesis sent {total} requests: {sent}")
    assert total >= REQUIRED_REQUESTS, sent
