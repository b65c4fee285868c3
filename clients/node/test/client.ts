// The client beyond the shared examples: no agent, a refusing or hung one, a restart, answers
// only a broken agent gives (from a stand-in socket server), and keys that need encoding.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { type Server, type Socket, createServer } from "node:net";
import { join } from "node:path";
import { after, test } from "node:test";

import * as sac from "../src/index.js";
import { Agent } from "./support/agent.js";
import { cleanEngine, createContainer, imageId, makeImage } from "./support/docker.js";

const FAST_RETRY = { attempts: 3, initialDelayMs: 10, maxDelayMs: 10 };
const directory = mkdtempSync("/tmp/sanode-c-");
after(() => rmSync(directory, { recursive: true, force: true }));

/** A stand-in agent: answers every request with `answer` (raw HTTP), keeps the requests. */
async function canned(name: string, answer: string | null): Promise<{ path: string; requests: string[]; server: Server }> {
  const path = join(directory, `${name}.sock`);
  const requests: string[] = [];
  const server = createServer((socket: Socket) => {
    let data = "";
    socket.on("data", (chunk) => {
      data += chunk.toString("utf8");
      const end = data.indexOf("\r\n\r\n");
      const length = Number(/content-length:\s*(\d+)/i.exec(data)?.[1] ?? 0);
      if (end >= 0 && Buffer.byteLength(data.slice(end + 4)) >= length) {
        requests.push(data);
        if (answer !== null) socket.end(answer); // null: never answer
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  after(() => server.close());
  return { path, requests, server };
}

function http(status: string, body: string, type = "application/json"): string {
  return `HTTP/1.1 ${status}\r\nContent-Type: ${type}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`;
}

test("a missing socket is AgentUnreachable after the retries", async () => {
  const path = join(directory, "none.sock");
  const client = new sac.SnapagentdClient({ socketPath: path, retry: FAST_RETRY });
  await assert.rejects(client.status(), (error: unknown) => {
    assert.ok(error instanceof sac.AgentUnreachable);
    assert.equal(error.message, `cannot reach snapagentd at ${path}: No such file or directory`);
    return true;
  });
});

test("an agent that never answers times out", async () => {
  const hung = await canned("hung", null);
  const client = new sac.SnapagentdClient({ socketPath: hung.path, timeoutMs: 200 });
  await assert.rejects(client.list(), (error: unknown) => error instanceof sac.AgentUnreachable && /timed out/.test(error.message));
});

test("the retry bridges an agent restart", async () => {
  await cleanEngine();
  let agent = await Agent.start();
  try {
    agent = await agent.restart(); // stopped and started again: nothing serves for a while
    const client = new sac.SnapagentdClient({
      socketPath: agent.socketPath,
      retry: { attempts: 100, initialDelayMs: 50, maxDelayMs: 500 },
    });
    const status = await client.status(); // refused or missing at first, then served
    assert.equal(status.docker.reachable, true);
  } finally {
    await agent.stop();
  }
});

for (const [status, code, name] of [
  ["503 Service Unavailable", "journal-unavailable", "JournalUnavailableError"],
  ["502 Bad Gateway", "docker-error", "DockerError"],
  ["500 Internal Server Error", "internal-error", "InternalError"],
  ["403 Forbidden", "access-denied", "AccessDeniedError"],
  ["503 Service Unavailable", "too-many-connections", "TooManyConnectionsError"],
  ["408 Request Timeout", "body-timeout", "BodyTimeoutError"],
] as const) {
  test(`${code} throws ${name}`, async () => {
    const body = JSON.stringify({ error: { code, message: "journal write failed" } });
    const agent = await canned(code, http(status, body));
    const client = new sac.SnapagentdClient({ socketPath: agent.path });
    await assert.rejects(client.register({ project: "p", work_item: "w", image: "cascade-snapshot-x:latest" }), (error: unknown) => {
      assert.ok(error instanceof (sac as any)[name]);
      const { code: got, status: number, message } = error as sac.SnapagentdError;
      assert.deepEqual([got, number, message], [code, Number(status.split(" ")[0]), "journal write failed"]);
      return true;
    });
  });
}

for (const [answer, pattern] of [
  [http("200 OK", "<html>hi</html>", "text/html"), /not JSON/],
  [http("200 OK", "[1, 2]"), /expected a JSON object/],
  [http("200 OK", '{"snapshots": {}}'), /snapshots is not a list/],
  [http("502 Bad Gateway", "<html>proxy</html>", "text/html"), /HTTP 502/],
  ["SMTP ready\r\n\r\n", /malformed HTTP answer/],
] as const) {
  test(`an answer breaking the contract is a ProtocolError (${pattern})`, async () => {
    const agent = await canned(`broken-${pattern.source.replace(/\W/g, "")}`, answer);
    const client = new sac.SnapagentdClient({ socketPath: agent.path });
    await assert.rejects(client.list(), (error: unknown) => error instanceof sac.ProtocolError && pattern.test(error.message));
  });
}

test("the request on the wire: JSON with its type, the query as %-encoded UTF-8", async () => {
  const agent = await canned("wire", http("200 OK", '{"snapshots": []}'));
  const client = new sac.SnapagentdClient({ socketPath: agent.path });
  assert.deepEqual(await client.list({ project: "a+b c/é" }), []);
  await assert.rejects(client.evict({ dry_run: true }), sac.ProtocolError); // not an eviction answer
  const [listing, eviction] = agent.requests;
  assert.ok(listing!.startsWith("GET /v1/snapshots?project=a%2Bb%20c%2F%C3%A9 HTTP/1.1\r\n"), listing);
  assert.match(eviction!, /^POST \/v1\/evict HTTP\/1\.1\r\n/);
  assert.match(eviction!, /\r\nContent-Type: application\/json\r\n/i);
  assert.ok(eviction!.endsWith('\r\n\r\n{"dry_run":true}'), eviction);
});

test("lease, release and a lookup with lease_seconds: the request on the wire", async () => {
  const agent = await canned("lease-wire", http("200 OK", "{}"));
  const client = new sac.SnapagentdClient({ socketPath: agent.path });
  await assert.rejects(client.lease({ project: "P", work_item: "w", seconds: 30 }), sac.ProtocolError);
  await assert.rejects(client.release({ id: "a b+c" }), sac.ProtocolError);
  await client.lookup({ project: "P", work_item: "w", lease_seconds: 60 }).catch(() => undefined);
  const [lease, release, lookup] = agent.requests;
  assert.match(lease!, /^POST \/v1\/snapshots\/lease HTTP\/1\.1\r\n/);
  assert.ok(lease!.endsWith('\r\n\r\n{"project":"P","work_item":"w","seconds":30}'), lease);
  assert.ok(release!.startsWith("DELETE /v1/snapshots/lease?id=a%20b%2Bc HTTP/1.1\r\n"), release);
  assert.ok(lookup!.endsWith('{"project":"P","work_item":"w","lease_seconds":60}'), lookup);
});

test("a lease keeps an image through eviction until it is released; a dry run says why", async () => {
  await cleanEngine();
  const agent = await Agent.start({ policy: { max_count: 0 } }); // evicts every snapshot it may
  try {
    const client = new sac.SnapagentdClient({ socketPath: agent.socketPath });
    const images: Record<string, string> = {};
    for (const name of ["leased", "used"]) {
      const tag = sac.snapshotTag("Proj", name);
      images[name] = await makeImage(tag);
      await client.register({ project: "Proj", work_item: name, image: tag });
    }
    await createContainer(sac.snapshotTag("Proj", "used"));
    const found = await client.lookup({ project: "Proj", work_item: "leased", lease_seconds: 300 });
    assert.ok(found?.lease, "the lookup took a lease");
    assert.equal(found.confirmed, true, "Docker confirmed the image");
    assert.equal(found.lease.image_id, images.leased);
    assert.ok(Date.parse(found.lease.expires_at) > Date.now() + 290_000);
    assert.deepEqual((await client.evict()).evicted, []);

    const explained = await client.evict({ dry_run: true });
    assert.deepEqual(explained.evicted, []);
    assert.equal(explained.disk_bytes_to_free, 0);
    const why = Object.fromEntries((explained.skipped ?? []).map((s) => [s.work_item, [s.reason, s.protected_by]]));
    assert.deepEqual(why, { leased: ["count", "leased"], used: ["count", "in-use"] });
    for (const skipped of explained.skipped ?? []) {
      assert.ok(Number.isInteger(skipped.unique_bytes) && skipped.age_seconds >= 0 && skipped.idle_seconds >= 0);
    }
    assert.equal((await client.status()).snapshots.leases, 1);

    assert.deepEqual(await client.release(found.lease), found.lease);
    await assert.rejects(client.release(found.lease), sac.LeaseNotFoundError);
    const removed = (await client.evict()).evicted.map((e) => [e.image_id, e.result]);
    assert.deepEqual(removed, [[images.leased, "removed"]]);
    assert.equal(await imageId(sac.snapshotTag("Proj", "leased")), null);
    await assert.rejects(client.lease({ project: "Proj", work_item: "leased", seconds: 60 }), sac.SnapshotNotFoundError);
    await assert.rejects(client.lease({ project: "Proj", work_item: "used", seconds: 0 }), sac.InvalidFieldError);
  } finally {
    await agent.stop();
    await cleanEngine();
  }
});

test("keys with +, / and Unicode round-trip through a real agent", async () => {
  await cleanEngine();
  const agent = await Agent.start();
  try {
    const client = new sac.SnapagentdClient({ socketPath: agent.socketPath });
    const key = { project: "a+b c/é", work_item: "w&x=y %2B" };
    const image = sac.snapshotTag(key.project, key.work_item);
    const id = await makeImage(image);
    const registered = await client.register({ ...key, image });
    assert.equal(registered.created, true);
    assert.equal(registered.snapshot.image_id, id);
    assert.deepEqual((await client.list({ project: key.project })).map((s) => s.work_item), [key.work_item]);
    assert.deepEqual(await client.list({ project: "a b c/é" }), []);
    assert.notEqual((await client.lookup(key))?.last_used_at, null);
    assert.equal((await client.delete(key)).result, "removed");
    assert.equal(await client.lookup(key), null);
    await assert.rejects(client.delete(key), sac.SnapshotNotFoundError);
  } finally {
    await agent.stop();
    await cleanEngine();
  }
});
