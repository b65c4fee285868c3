// The shared contract examples replayed through this client against real agents on a real
// dockerd: an exchange naming an `operation` goes through that typed method, the others
// through `request`; the result must be what the example's answer means. tests/test_contracts.py
// replays the same files against the agent (raw HTTP) and through the Python clients.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ERRORS, SnapagentdClient, SnapagentdError, type ErrorCode } from "../src/index.js";
import { Agent } from "./support/agent.js";
import { type Exchange, bindRequest, loadScenarios, match, rawBody } from "./support/contracts.js";
import { cleanEngine, makeImage } from "./support/docker.js";

const UNREACHABLE_DOCKER = "unix:///nonexistent/snapagentd-contracts/docker.sock";

async function send(client: SnapagentdClient, exchange: Exchange, bindings: Map<string, unknown>): Promise<unknown> {
  const request = bindRequest(exchange.request, bindings);
  const args = (request.body ?? request.query ?? {}) as any;
  switch (exchange.operation) {
    case "register":
      return client.register(args);
    case "lookup":
      return client.lookup(args);
    case "lease":
      return client.lease(args);
    case "release":
      return client.release(args);
    case "list":
      return client.list(args);
    case "delete":
      return client.delete(args);
    case "evict":
      return client.evict(args);
    case "status":
      return client.status();
    case undefined: {
      const data = rawBody(request);
      return client.request(request.method, request.path, {
        ...(request.query ? { query: request.query } : {}),
        ...(data !== undefined ? { data } : request.body !== undefined ? { json: request.body } : {}),
      });
    }
  }
}

/** The typed result of an operation as the JSON answer it was read from. */
function wireAnswer(exchange: Exchange, result: any): unknown {
  switch (exchange.operation) {
    case "register":
      assert.equal(result.created, exchange.response.status === 201, "created is 201");
      return { snapshot: result.snapshot };
    case "lookup": {
      const { lease, confirmed, ...snapshot } = result; // the client puts them on the entry
      return {
        snapshot,
        ...(confirmed === undefined ? {} : { confirmed }),
        ...(lease === undefined ? {} : { lease }),
      };
    }
    case "lease":
      return { lease: result };
    case "release":
      return { lease: result, released: true };
    case "list":
      return { snapshots: result };
    default:
      return result;
  }
}

for (const scenario of loadScenarios()) {
  test(`contract: ${scenario.name}`, async () => {
    await cleanEngine();
    const dockerUrl = scenario.agent?.docker === "unreachable" ? UNREACHABLE_DOCKER : undefined;
    const agent = await Agent.start({ ...(dockerUrl ? { dockerUrl } : {}), policy: scenario.agent?.policy ?? {} });
    try {
      const bindings = new Map<string, unknown>();
      for (const [name, reference] of Object.entries(scenario.images ?? {})) {
        bindings.set(`<image-id:${name}>`, await makeImage(reference));
      }
      const client = new SnapagentdClient({ socketPath: agent.socketPath, timeoutMs: 60_000 });
      for (const [index, exchange] of scenario.exchanges.entries()) {
        const where = `${scenario.name} #${index + 1} (${exchange.title})`;
        let outcome: unknown;
        try {
          outcome = await send(client, exchange, bindings);
        } catch (error) {
          outcome = error;
        }
        const { status, body } = exchange.response;
        if (status >= 200 && status < 300) {
          assert.ok(!(outcome instanceof Error), `${where}: threw ${String(outcome)}`);
          match(body, wireAnswer(exchange, outcome), bindings, where);
        } else if (exchange.operation === "lookup" && body.error.code === "snapshot-not-found") {
          assert.equal(outcome, null, `${where}: a miss is null`);
        } else {
          const code = body.error.code as ErrorCode;
          assert.ok(outcome instanceof ERRORS[code], `${where}: expected ${code}, got ${String(outcome)}`);
          const error = outcome as SnapagentdError;
          assert.deepEqual([error.code, error.status], [code, status], where);
          match(body.error.message, error.message, bindings, where);
        }
      }
    } finally {
      await agent.stop();
      await cleanEngine();
    }
  });
}
