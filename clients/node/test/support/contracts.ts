// The shared contract examples (contracts/examples/*.json, described in contracts/README.md)
// and the matcher with their placeholders, as tests/test_contracts.py reads them.
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";

import { CONTRACTS } from "./paths.js";

export interface ExampleRequest {
  method: string;
  path: string;
  query?: Record<string, string>;
  body?: unknown;
  raw_body?: string | { repeat: string; times: number };
}

export interface Exchange {
  title: string;
  operation?: "register" | "lookup" | "lease" | "release" | "list" | "delete" | "evict" | "status";
  request: ExampleRequest;
  response: { status: number; body: any };
}

export interface Scenario {
  name: string;
  description: string;
  agent?: { policy?: Record<string, unknown>; docker?: "unreachable" };
  images?: Record<string, string>;
  exchanges: Exchange[];
}

export function loadScenarios(): Scenario[] {
  const directory = join(CONTRACTS, "examples");
  return readdirSync(directory)
    .filter((name) => name.endsWith(".json"))
    .sort()
    .map((name) => ({ name: name.replace(/\.json$/, ""), ...JSON.parse(readFileSync(join(directory, name), "utf8")) }));
}

export function rawBody(request: ExampleRequest): string | undefined {
  const raw = request.raw_body;
  return raw === undefined || typeof raw === "string" ? raw : raw.repeat.repeat(raw.times);
}

/**
 * The request with each named placeholder replaced by the value an earlier answer bound it to
 * (a lease's id, for its release), as tests/test_contracts.py's bind_request does.
 */
export function bindRequest(request: ExampleRequest, bindings: Map<string, unknown>): ExampleRequest {
  const fill = (value: unknown): unknown => {
    if (typeof value === "string") return bindings.has(value) ? bindings.get(value) : value;
    if (Array.isArray(value)) return value.map(fill);
    if (value !== null && typeof value === "object") {
      return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, fill(item)]));
    }
    return value;
  };
  return {
    ...request,
    ...(request.query ? { query: fill(request.query) as Record<string, string> } : {}),
    ...(request.body !== undefined ? { body: fill(request.body) } : {}),
  };
}

const PLACEHOLDER = /^<(image-id|timestamp|integer|string|any)(?::([^>]+))?>$/;
const KINDS: Record<string, (value: unknown) => boolean> = {
  any: () => true, // what wiring or timing decides (docker.events); the schema still holds
  "image-id": (v) => typeof v === "string" && /^sha256:[0-9a-f]{64}$/.test(v),
  timestamp: (v) => typeof v === "string" && /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/.test(v),
  integer: (v) => Number.isInteger(v) && (v as number) >= 0,
  string: (v) => typeof v === "string",
};

/**
 * Assert `actual` is `expected`, where a placeholder string matches any value of its kind, and
 * a named one (`<kind:name>`) the same value everywhere in a scenario (`bindings`).
 */
export function match(expected: unknown, actual: unknown, bindings: Map<string, unknown>, where = "body"): void {
  const placeholder = typeof expected === "string" ? PLACEHOLDER.exec(expected) : null;
  if (placeholder) {
    const [, kind, name] = placeholder;
    assert.ok(KINDS[kind!]!(actual), `${where}: ${JSON.stringify(actual)} is not a ${kind}`);
    if (name !== undefined) {
      if (!bindings.has(expected as string)) bindings.set(expected as string, actual);
      assert.deepEqual(actual, bindings.get(expected as string), `${where}: ${expected} changed`);
    }
    return;
  }
  if (Array.isArray(expected)) {
    assert.ok(Array.isArray(actual), `${where}: expected a list, got ${JSON.stringify(actual)}`);
    assert.equal(actual.length, expected.length, `${where}: ${JSON.stringify(actual)}`);
    expected.forEach((item, index) => match(item, actual[index], bindings, `${where}[${index}]`));
    return;
  }
  if (expected !== null && typeof expected === "object") {
    assert.ok(actual !== null && typeof actual === "object" && !Array.isArray(actual), `${where}: expected an object`);
    assert.deepEqual(Object.keys(actual).sort(), Object.keys(expected).sort(), `${where}: fields`);
    for (const [key, value] of Object.entries(expected)) {
      match(value, (actual as Record<string, unknown>)[key], bindings, `${where}.${key}`);
    }
    return;
  }
  assert.strictEqual(actual, expected, `${where}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
}
