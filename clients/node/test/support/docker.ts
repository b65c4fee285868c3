// Just enough of Docker's HTTP API, over the harness engine's Unix socket, for the tests: make
// one-file images (`docker import` of a tarball built in memory, so nothing is pulled) and
// clean the engine between tests, as tests/engine.py does for the Python suite.
import { randomBytes } from "node:crypto";
import { request } from "node:http";

import { dockerHost } from "./paths.js";

const CLEANUP_PREFIXES = ["cascade-snapshot-", "foreign-"];

export function docker(method: string, path: string, body?: Buffer): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string | number> = {};
    if (body) Object.assign(headers, { "Content-Type": "application/x-tar", "Content-Length": body.length });
    const req = request({ socketPath: dockerHost().slice("unix://".length), method, path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

/** A ustar archive holding one regular file. */
export function tarOf(name: string, content: Buffer): Buffer {
  const header = Buffer.alloc(512);
  const field = (offset: number, length: number, value: string) => header.write(value, offset, length, "ascii");
  field(0, 100, name);
  field(100, 8, "0000644\0");
  field(108, 8, "0000000\0");
  field(116, 8, "0000000\0");
  field(124, 12, `${content.length.toString(8).padStart(11, "0")}\0`);
  field(136, 12, `${Math.floor(Date.now() / 1000).toString(8).padStart(11, "0")}\0`);
  field(148, 8, "        ");
  field(156, 1, "0");
  field(257, 8, "ustar\u000000");
  let sum = 0;
  for (const byte of header) sum += byte;
  field(148, 8, `${sum.toString(8).padStart(6, "0")}\0 `);
  const padding = Buffer.alloc((512 - (content.length % 512)) % 512);
  return Buffer.concat([header, content, padding, Buffer.alloc(1024)]);
}

/** Import a one-file image with unique content as `reference`; returns its id. */
export async function makeImage(reference: string, size = 1024): Promise<string> {
  const colon = reference.lastIndexOf(":");
  const [repo, tag] = colon > reference.lastIndexOf("/") ? [reference.slice(0, colon), reference.slice(colon + 1)] : [reference, "latest"];
  const query = new URLSearchParams({ fromSrc: "-", repo, tag });
  const made = await docker("POST", `/images/create?${query}`, tarOf("payload", randomBytes(size)));
  if (made.status !== 200 || made.body.includes('"error"')) throw new Error(`docker import failed: ${made.body}`);
  return imageId(reference) as Promise<string>;
}

/** Create (never start) a container of `image`, which then counts as in use; returns its id. */
export async function createContainer(image: string): Promise<string> {
  const body = Buffer.from(JSON.stringify({ Image: image, Cmd: ["/payload"], HostConfig: { NetworkMode: "none" } }));
  const made = await new Promise<{ status: number; body: string }>((resolve, reject) => {
    const headers = { "Content-Type": "application/json", "Content-Length": body.length };
    const req = request({ socketPath: dockerHost().slice("unix://".length), method: "POST", path: "/containers/create", headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
  if (made.status !== 201) throw new Error(`docker create failed: ${made.status} ${made.body}`);
  return (JSON.parse(made.body) as { Id: string }).Id;
}

export async function imageId(reference: string): Promise<string | null> {
  const found = await docker("GET", `/images/${encodeURIComponent(reference)}/json`);
  if (found.status === 404) return null;
  if (found.status !== 200) throw new Error(`docker inspect failed: ${found.status} ${found.body}`);
  return (JSON.parse(found.body) as { Id: string }).Id;
}

/**
 * Remove ownership markers (snapagentd/ownership.py): `name`'s, else every agent's (the volumes
 * labelled `snapagentd.instance`), as tests/engine.py does. A test agent's marker left behind
 * would make the next test's agent, with a journal of its own, refuse to start.
 */
export async function removeMarkers(name?: string): Promise<void> {
  let names = name === undefined ? [] : [name];
  if (name === undefined) {
    const filters = encodeURIComponent(JSON.stringify({ label: ["snapagentd.instance"] }));
    const listed = JSON.parse((await docker("GET", `/volumes?filters=${filters}`)).body) as {
      Volumes?: { Name: string }[] | null;
    };
    names = (listed.Volumes ?? []).map((volume) => volume.Name);
  }
  for (const volume of names) await docker("DELETE", `/volumes/${encodeURIComponent(volume)}`);
}

/** Remove every container, every test tag, every dangling image and every agent's marker. */
export async function cleanEngine(): Promise<void> {
  const containers = JSON.parse((await docker("GET", "/containers/json?all=1")).body) as { Id: string }[];
  for (const { Id } of containers) await docker("DELETE", `/containers/${Id}?force=1`);
  const images = JSON.parse((await docker("GET", "/images/json")).body) as { RepoTags: string[] | null }[];
  for (const tag of images.flatMap((image) => image.RepoTags ?? [])) {
    if (CLEANUP_PREFIXES.some((prefix) => tag.startsWith(prefix))) {
      await docker("DELETE", `/images/${encodeURIComponent(tag)}?force=1`);
    }
  }
  await docker("POST", `/images/prune?filters=${encodeURIComponent('{"dangling":["true"]}')}`);
  await removeMarkers();
}
