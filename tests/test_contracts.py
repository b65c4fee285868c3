"""The shared contract examples (contracts/examples/*.json), replayed against real agents.

The same files are replayed by the TypeScript client's tests (clients/node/test), so the
agent, the Python client and the TypeScript client cannot disagree about the wire:

- the agent: each request sent as raw HTTP, each answer matched against the example and
  validated against docs/openapi.json;
- the blocking Python client (the asyncio one in test_client_async.py): each exchange that
  names an `operation` through that typed method, the others through `Client.request`;
  the typed result, turned back into wire JSON, must match the example.

contracts/README.md describes the format. Each scenario gets a fresh agent on a clean engine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from snapagentd import client as sac

from .agent import REPO, Agent
from .engine import make_image

CONTRACTS = REPO / "contracts"
SCENARIO_FILES = sorted((CONTRACTS / "examples").glob("*.json"))
OPENAPI = json.loads((REPO / "docs" / "openapi.json").read_text(encoding="utf-8"))
CODES_ONLY_A_STAND_IN_SENDS = (
    "docker-error",
    "journal-unavailable",
    "internal-error",
    "access-denied",
    "too-many-connections",
    "body-timeout",  # a body that does not arrive within 10 s
)
OPERATIONS = ("register", "lookup", "lease", "release", "list", "delete", "evict", "status")
# The typed methods' parameter names, where they are not the request's own field names.
PARAMETERS = {"release": {"id": "lease_id"}}
UNREACHABLE_DOCKER = "unix:///nonexistent/snapagentd-contracts/docker.sock"

# --- the example format -----------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    title: str
    operation: str | None  # the typed client method that sends exactly this request
    method: str
    path: str
    query: dict[str, str] | None
    body: Any  # JSON to send, or None
    raw_body: bytes | None  # bytes to send instead of JSON
    status: int
    response: Any

    @property
    def args(self) -> dict[str, Any]:
        """The typed method's arguments: the JSON body's fields, or the query's."""
        names = PARAMETERS.get(self.operation or "", {})
        return {names.get(k, k): v for k, v in (self.body or self.query or {}).items()}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    policy: dict[str, Any]
    docker_unreachable: bool
    images: dict[str, str]
    exchanges: list[Exchange]


def _raw_body(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    return (value["repeat"] * value["times"]).encode()


def load_scenario(path: Path) -> Scenario:
    data = json.loads(path.read_text(encoding="utf-8"))
    agent = data.get("agent", {})
    exchanges = [
        Exchange(
            title=item["title"],
            operation=item.get("operation"),
            method=item["request"]["method"],
            path=item["request"]["path"],
            query=item["request"].get("query"),
            body=item["request"].get("body"),
            raw_body=_raw_body(item["request"].get("raw_body")),
            status=item["response"]["status"],
            response=item["response"]["body"],
        )
        for item in data["exchanges"]
    ]
    return Scenario(
        name=path.stem,
        description=data["description"],
        policy=agent.get("policy", {}),
        docker_unreachable=agent.get("docker") == "unreachable",
        images=data.get("images", {}),
        exchanges=exchanges,
    )


SCENARIOS = [load_scenario(path) for path in SCENARIO_FILES]
scenarios = pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])


# --- placeholders -----------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"<(image-id|timestamp|integer|string|any)(?::([^>]+))?>")
KINDS: dict[str, Callable[[Any], bool]] = {
    "any": lambda v: True,  # what wiring or timing decides (docker.events); the schema still holds
    "image-id": lambda v: isinstance(v, str) and bool(re.fullmatch(r"sha256:[0-9a-f]{64}", v)),
    "timestamp": lambda v: (
        isinstance(v, str) and bool(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", v))
    ),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "string": lambda v: isinstance(v, str),
}


def match(expected: Any, actual: Any, bindings: dict[str, Any], where: str = "body") -> None:
    """Assert `actual` is `expected`, where a placeholder string matches any value of its kind,
    and a named one (`<kind:name>`) the same value at every place it appears in a scenario."""
    if isinstance(expected, str) and (found := PLACEHOLDER.fullmatch(expected)):
        kind, name = found.groups()
        assert KINDS[kind](actual), f"{where}: {actual!r} is not a {kind}"
        if name is not None:
            bound = bindings.setdefault(expected, actual)
            assert actual == bound, f"{where}: {actual!r}, but {expected} was {bound!r}"
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        assert sorted(actual) == sorted(expected), f"{where}: fields {sorted(actual)}"
        for key, value in expected.items():
            match(value, actual[key], bindings, f"{where}.{key}")
        return
    if isinstance(expected, list):
        assert isinstance(actual, list), f"{where}: expected a list, got {actual!r}"
        assert len(actual) == len(expected), f"{where}: {len(actual)} items: {actual!r}"
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            match(want, got, bindings, f"{where}[{index}]")
        return
    assert type(actual) is type(expected) and actual == expected, (
        f"{where}: expected {expected!r}, got {actual!r}"
    )


def bind_request(exchange: Exchange, bindings: dict[str, Any]) -> Exchange:
    """The exchange with each named placeholder of its request replaced by the value an
    earlier answer bound it to (a lease's id, for its release)."""

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return bindings.get(value, value)
        if isinstance(value, dict):
            return {key: fill(item) for key, item in value.items()}
        if isinstance(value, list):
            return [fill(item) for item in value]
        return value

    return replace(exchange, query=fill(exchange.query), body=fill(exchange.body))


# --- OpenAPI ----------------------------------------------------------------------------------


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = OPENAPI
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def schema_errors(schema: dict[str, Any], value: Any, where: str = "") -> list[str]:
    """What in `value` breaks the OpenAPI 3.0 `schema` (the subset docs/openapi.json uses)."""
    schema = resolve(schema)
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    errors = [e for part in schema.get("allOf", []) for e in schema_errors(part, value, where)]
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind is not None and not checks[kind](value):
        return [*errors, f"{where}: {value!r} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            errors.append(f"{where}: {value!r} has the wrong length")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < schema.get("minimum", value):
            errors.append(f"{where}: {value!r} is below the minimum")
        if value > schema.get("maximum", value):
            errors.append(f"{where}: {value!r} is above the maximum")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [
            f"{where}: {key!r} is missing" for key in schema.get("required", []) if key not in value
        ]
        extra = schema.get("additionalProperties")
        if extra is False:
            errors += [f"{where}: {key!r} is not allowed" for key in value if key not in properties]
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(properties[key], item, f"{where}.{key}")
            elif isinstance(extra, dict):  # a map: every value follows the one schema
                errors += schema_errors(extra, item, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{where}[{index}]")
    return errors


def response_schema(method: str, path: str, status: int) -> dict[str, Any]:
    """The documented schema of this answer; the Error shape for a route the document lacks."""
    operation = OPENAPI["paths"].get(path, {}).get(method.lower())
    if operation is None:
        assert status >= 400, f"{method} {path} is not in docs/openapi.json"
        return {"$ref": "#/components/schemas/Error"}
    responses = operation["responses"]
    response = resolve(responses.get(str(status)) or responses["default"])
    return response["content"]["application/json"]["schema"]


def request_schema(method: str, path: str) -> dict[str, Any] | None:
    body = OPENAPI["paths"].get(path, {}).get(method.lower(), {}).get("requestBody")
    return None if body is None else body["content"]["application/json"]["schema"]


# --- setting a scenario up --------------------------------------------------------------------


def start_scenario(scenario: Scenario, make_agent: Any, docker_client: Any) -> tuple[Agent, dict]:
    """A fresh agent as the scenario asks, then its images (made after the start, so they are
    not discovered unless a reconcile runs); returns the agent and the pre-bound image ids."""
    docker_url = UNREACHABLE_DOCKER if scenario.docker_unreachable else None
    agent = make_agent(docker_url=docker_url, **scenario.policy)
    bindings = {
        f"<image-id:{name}>": make_image(docker_client, reference)
        for name, reference in scenario.images.items()
    }
    return agent, bindings


def describe(scenario: Scenario, index: int) -> str:
    exchange = scenario.exchanges[index]
    return f"{scenario.name} #{index + 1} ({exchange.title})"


# --- replay through the Python clients (shared with test_client_async.py) ---------------------


def client_call(exchange: Exchange) -> tuple[str, dict[str, Any]]:
    """(client method name, keyword arguments) that send this exchange's request."""
    if exchange.operation is not None:
        return exchange.operation, exchange.args
    return "request", {
        "method": exchange.method,
        "path": exchange.path,
        "query": exchange.query,
        "json_body": exchange.body,
        "data": exchange.raw_body,
    }


def wire_answer(operation: str | None, result: Any) -> Any:
    """The typed result of `operation` as the JSON answer it was read from."""
    if operation == "register":
        return {"snapshot": sac.to_json(result.snapshot)}
    if operation == "lookup":
        snapshot = sac.to_json(result)
        lease = snapshot.pop("lease", None)  # a FoundSnapshot holds the lease taken with it
        confirmed = snapshot.pop("confirmed", None)  # and whether Docker confirmed it
        return (
            {"snapshot": snapshot}
            | ({} if confirmed is None else {"confirmed": confirmed})
            | ({} if lease is None else {"lease": lease})
        )
    if operation == "lease":
        return {"lease": sac.to_json(result)}
    if operation == "release":
        return {"lease": sac.to_json(result), "released": True}
    if operation == "list":
        return {"snapshots": sac.to_json(result)}
    return sac.to_json(result)  # delete, evict, status: one result per answer; request: as is


def without_unsent(expected: Any, answer: Any) -> Any:
    """`answer` without the `unique_bytes` a typed result reads as None where the example's
    answer has none (the DELETE answer and a real run's outcomes carry the entry as recorded),
    so the rest of it is still compared field for field."""
    if isinstance(expected, dict) and isinstance(answer, dict):
        return {
            key: without_unsent(expected.get(key), value)
            for key, value in answer.items()
            if not (key == "unique_bytes" and key not in expected and value is None)
        }
    if isinstance(expected, list) and isinstance(answer, list) and len(expected) == len(answer):
        return [without_unsent(want, got) for want, got in zip(expected, answer, strict=True)]
    return answer


def check_client_outcome(
    exchange: Exchange, outcome: Any, bindings: dict[str, Any], where: str
) -> None:
    """`outcome` (a result or the ClientError raised) is what the example's answer means."""
    if 200 <= exchange.status < 300:
        assert not isinstance(outcome, BaseException), f"{where}: raised {outcome!r}"
        answer = without_unsent(exchange.response, wire_answer(exchange.operation, outcome))
        match(exchange.response, answer, bindings, where)
        if exchange.operation == "register":
            assert outcome.created == (exchange.status == 201), where
        return
    code = exchange.response["error"]["code"]
    if exchange.operation == "lookup" and code == "snapshot-not-found":
        assert outcome is None, f"{where}: a miss must be None, got {outcome!r}"
        return
    assert isinstance(outcome, sac.ERRORS[code]), f"{where}: expected {code}, got {outcome!r}"
    assert (outcome.code, outcome.status) == (code, exchange.status), where
    match(exchange.response["error"]["message"], outcome.message, bindings, where)


# --- the tests --------------------------------------------------------------------------------


def test_every_example_file_is_a_scenario() -> None:
    assert {s.name for s in SCENARIOS} >= {
        "snapshot-lifecycle",
        "request-errors",
        "eviction",
        "leases",
    }
    for scenario in SCENARIOS:
        assert scenario.exchanges, scenario.name
        for index, exchange in enumerate(scenario.exchanges):
            assert exchange.operation in {None, *OPERATIONS}, describe(scenario, index)
            assert exchange.body is None or exchange.raw_body is None, describe(scenario, index)


def test_examples_cover_every_error_code_a_real_agent_can_produce() -> None:
    """Codes missing here need a broken journal or Docker, a client running as another user,
    or hundreds of open connections; test_client.py covers them with a stand-in agent."""
    seen = {
        exchange.response["error"]["code"]
        for scenario in SCENARIOS
        for exchange in scenario.exchanges
        if exchange.status >= 400
    }
    assert seen == set(sac.ERRORS) - set(CODES_ONLY_A_STAND_IN_SENDS)


@scenarios
def test_valid_example_requests_follow_the_openapi_document(scenario: Scenario) -> None:
    for index, exchange in enumerate(scenario.exchanges):
        schema = request_schema(exchange.method, exchange.path)
        if exchange.status < 300 and exchange.body is not None and schema is not None:
            assert schema_errors(schema, exchange.body) == [], describe(scenario, index)


@scenarios
def test_agent_answers_as_the_examples_say(scenario: Scenario, make_agent, docker_client) -> None:
    agent, bindings = start_scenario(scenario, make_agent, docker_client)
    for index, example in enumerate(scenario.exchanges):
        where = describe(scenario, index)
        exchange = bind_request(example, bindings)
        status, body = agent.call(
            exchange.method,
            exchange.path,
            exchange.body,
            query=exchange.query,
            raw=exchange.raw_body,
        )
        assert status == exchange.status, f"{where}: {status} {body}"
        match(exchange.response, body, bindings, where)
        schema = response_schema(exchange.method, exchange.path, status)
        assert schema_errors(schema, body) == [], f"{where}: not as docs/openapi.json says"


@scenarios
def test_client_replays_the_examples(scenario: Scenario, make_agent, docker_client) -> None:
    agent, bindings = start_scenario(scenario, make_agent, docker_client)
    client = sac.Client(str(agent.socket_path), timeout=60)
    for index, example in enumerate(scenario.exchanges):
        exchange = bind_request(example, bindings)
        name, kwargs = client_call(exchange)
        try:
            outcome = getattr(client, name)(**kwargs)
        except sac.ClientError as error:
            outcome = error
        check_client_outcome(exchange, outcome, bindings, describe(scenario, index))


REQUEST_BUILDERS = {
    "register": lambda a: sac._register_request(
        a["project"], a["work_item"], a["image"], a.get("size_bytes")
    ),
    "lookup": lambda a: sac._lookup_request(
        a["project"], a["work_item"], a.get("ttl_seconds"), a.get("lease_seconds")
    ),
    "lease": lambda a: sac._lease_request(a["project"], a["work_item"], a["seconds"]),
    "release": lambda a: sac._release_request(a["lease_id"]),
    "list": lambda a: sac._list_request(a.get("project")),
    "delete": lambda a: sac._delete_request(a["project"], a["work_item"]),
    "evict": lambda a: sac._evict_request(a["dry_run"]),
    "status": lambda a: sac._STATUS_REQUEST,
}


@scenarios
def test_typed_calls_send_exactly_the_example_requests(scenario: Scenario) -> None:
    """An exchange naming an operation claims the typed method sends its request: check it
    (no agent needed: this compares the request the client builds)."""
    for index, exchange in enumerate(scenario.exchanges):
        if exchange.operation is None:
            continue
        request = REQUEST_BUILDERS[exchange.operation](exchange.args)
        target = urlsplit(request.target)
        sent_query = {k: v[0] for k, v in parse_qs(target.query, keep_blank_values=True).items()}
        sent_body = None if request.body is None else json.loads(request.body)
        where = describe(scenario, index)
        assert (request.method, target.path) == (exchange.method, exchange.path), where
        assert sent_query == (exchange.query or {}), where
        assert "+" not in target.query, f"{where}: a space must go as %20, never +"
        assert sent_body == exchange.body, where


def test_metrics_answer_as_the_openapi_document_says(agent) -> None:
    """GET /metrics is the one answer that is not JSON: Prometheus text, as documented."""
    from .agent import UnixConnection

    documented = OPENAPI["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    connection = UnixConnection(str(agent.socket_path))
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    content_type = response.getheader("Content-Type", "")
    assert response.status == 200, (response.status, body[:200])
    assert content_type.split(";")[0].strip() in documented, content_type
    assert "version=0.0.4" in content_type
    assert re.search(r"^snapagentd_\w+(\{[^}]*\})? \S+$", body, re.M), body[:500]
