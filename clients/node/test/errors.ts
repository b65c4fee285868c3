// One exported class per stable error code: the codes of docs/openapi.json and of the agent's
// own snapagentd/errors.py, with the same statuses and names as the Python client's classes.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import * as client from "../src/index.js";
import { REPO } from "./support/paths.js";

test("ERRORS has a class for every code of the OpenAPI document", () => {
  const openapi = JSON.parse(readFileSync(join(REPO, "docs", "openapi.json"), "utf8"));
  assert.deepEqual(Object.keys(client.ERRORS).sort(), [...openapi.components.schemas.ErrorCode.enum].sort());
});

test("the statuses are the agent's (snapagentd/errors.py)", () => {
  const source = readFileSync(join(REPO, "snapagentd", "errors.py"), "utf8");
  const agent = Object.fromEntries(
    [...source.matchAll(/code,\s*status\s*=\s*"([a-z-]+)",\s*(\d+)/g)].map(([, code, status]) => [code, Number(status)]),
  );
  agent["internal-error"] ??= 500; // the base Fault's default
  const ours = Object.fromEntries(Object.entries(client.ERRORS).map(([code, cls]) => [code, cls.documentedStatus]));
  assert.deepEqual(ours, agent);
});

test("each class is exported under the name the code gives it, as in Python", () => {
  for (const [code, cls] of Object.entries(client.ERRORS)) {
    const pascal = code.split("-").map((part) => part[0]!.toUpperCase() + part.slice(1)).join("");
    const name = pascal.endsWith("Error") ? pascal : `${pascal}Error`;
    assert.equal(cls.name, name);
    assert.equal((client as Record<string, unknown>)[name], cls, `${name} is exported`);
    const error = new cls(code, cls.documentedStatus, "why");
    assert.ok(error instanceof client.SnapagentdError && error instanceof client.ClientError);
    assert.equal(error.name, name);
    assert.equal(error.message, "why");
  }
});

test("an unknown code gives the base class; a body without the shape a ProtocolError", () => {
  const unknown = client.errorFromAnswer(429, '{"error": {"code": "slow-down", "message": "later"}}');
  assert.equal(unknown.constructor, client.SnapagentdError);
  assert.deepEqual([(unknown as client.SnapagentdError).code, (unknown as client.SnapagentdError).status], ["slow-down", 429]);
  const html = client.errorFromAnswer(502, "<html>proxy</html>");
  assert.ok(html instanceof client.ProtocolError);
  assert.equal(html.status, 502);
});
