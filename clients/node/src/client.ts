// The client: typed calls over the agent's Unix-socket HTTP/JSON API (docs/api.md), with
// Node's own `http` (socketPath), so no runtime dependencies.
import { request as httpRequest } from "node:http";
import { setTimeout as sleep } from "node:timers/promises";

import { AgentUnreachable, ProtocolError, SnapshotNotFoundError, errorFromAnswer } from "./errors.js";
import type {
  DeleteResponse,
  EvictRequest,
  EvictResponse,
  Lease,
  LeaseRequest,
  LookupRequest,
  RegisterRequest,
  Snapshot,
  Status,
} from "./openapi.js";

export const DEFAULT_SOCKET = "/run/snapagentd/snapagentd.sock";

/**
 * How to retry a connection the agent refused or whose socket is missing, as happens while it
 * restarts. Only connecting is retried: no byte of the request was sent, so it is safe for
 * every request. `attempts` counts all tries (1: never retry); the waits double from
 * `initialDelayMs` up to `maxDelayMs` (defaults: 100 + 200 + 400 + 800 ms).
 */
export interface RetryOptions {
  attempts: number;
  initialDelayMs: number;
  maxDelayMs: number;
}

export const DEFAULT_RETRY: Readonly<RetryOptions> = { attempts: 5, initialDelayMs: 100, maxDelayMs: 1000 };
export const NO_RETRY: Readonly<RetryOptions> = { attempts: 1, initialDelayMs: 0, maxDelayMs: 0 };

export interface ClientOptions {
  /** The agent's socket; default /run/snapagentd/snapagentd.sock. */
  socketPath?: string;
  /** Bounds each whole request, in milliseconds; default 30 000 (an eviction waits for Docker). */
  timeoutMs?: number;
  retry?: RetryOptions;
}

/** The answer to `register`: the entry, and whether the key is new (201) or not (200). */
export interface Registration {
  snapshot: Snapshot;
  created: boolean;
}

/**
 * What `lookup` found: the entry, now marked used; `lease`, the lease taken with it when the
 * request had `lease_seconds` (absent otherwise); and `confirmed`, false when Docker did not
 * answer within the agent's `lookup_timeout` (or cannot be reached) and the agent answered from
 * its registry, unchecked (absent from agents too old to say). The answer has both beside the
 * entry; the client puts them on the entry, so that a lookup still resolves to a `Snapshot`.
 */
export type FoundSnapshot = Snapshot & { lease?: Lease; confirmed?: boolean };

/** The key of an entry: (project, work item). */
export interface SnapshotKey {
  project: string;
  work_item: string;
}

export interface RequestOptions {
  /** Query parameters, sent as %-encoded UTF-8 (a space as %20: a + would be a space). */
  query?: Record<string, string>;
  /** A value to send as the JSON body. */
  json?: unknown;
  /** Raw bytes to send as the body instead. */
  data?: string | Uint8Array;
}

interface Answer {
  status: number;
  body: string;
}

const RETRY_CODES = new Set(["ECONNREFUSED", "ENOENT"]); // agent restarting: nothing was sent

export class SnapagentdClient {
  readonly socketPath: string;
  readonly timeoutMs: number;
  readonly retry: RetryOptions;

  constructor(options: ClientOptions = {}) {
    this.socketPath = options.socketPath ?? DEFAULT_SOCKET;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.retry = options.retry ?? DEFAULT_RETRY;
  }

  /**
   * Record `image` (a managed repository:tag that exists in Docker) as the key's snapshot.
   * Registering the same image again is harmless, so a retry is safe.
   */
  async register(request: RegisterRequest): Promise<Registration> {
    const { status, data } = await this.call("POST", "/v1/snapshots", { json: request });
    return { snapshot: objectField(data, "snapshot") as Snapshot, created: status === 201 };
  }

  /**
   * The key's usable snapshot, now marked used; null on a miss (404 snapshot-not-found: none,
   * invalidated, image gone or repointed, or older than `ttl_seconds`, which defaults to the
   * project's TTL, else the global one). With `lease_seconds` (1 to 86400) the agent also leases
   * the image in the same request, so no eviction can remove it before the router's `docker
   * create`: the result's `lease` (release it once the container exists).
   */
  async lookup(request: LookupRequest): Promise<FoundSnapshot | null> {
    try {
      const { data } = await this.call("POST", "/v1/snapshots/lookup", { json: request });
      const found: FoundSnapshot = { ...(objectField(data, "snapshot") as Snapshot) };
      if (typeof data.confirmed === "boolean") found.confirmed = data.confirmed;
      if (data.lease !== undefined && data.lease !== null) found.lease = objectField(data, "lease") as Lease;
      return found;
    } catch (error) {
      if (error instanceof SnapshotNotFoundError) return null;
      throw error;
    }
  }

  /**
   * Protect the key's current image from every eviction for `seconds` (1 to 86400). Throws
   * SnapshotNotFoundError when the key has no entry. Prefer `lookup` with `lease_seconds`, which
   * cannot miss an eviction between the two calls.
   */
  async lease(request: LeaseRequest): Promise<Lease> {
    const { data } = await this.call("POST", "/v1/snapshots/lease", { json: request });
    return objectField(data, "lease") as Lease;
  }

  /**
   * End a lease early (pass it, or `{ id }`); resolves to it as it was. Throws LeaseNotFoundError
   * when there is no such lease (released already, or expired and dropped: it protects nothing).
   */
  async release(lease: { id: string }): Promise<Lease> {
    const { data } = await this.call("DELETE", "/v1/snapshots/lease", { query: { id: lease.id } });
    if (data.released !== true) throw new ProtocolError("malformed answer from snapagentd: released is not true");
    return objectField(data, "lease") as Lease;
  }

  /** All entries (or one project's), sorted by project, then work item. */
  async list(filter: { project?: string } = {}): Promise<Snapshot[]> {
    const query = filter.project === undefined ? undefined : { project: filter.project };
    const { data } = await this.call("GET", "/v1/snapshots", query ? { query } : {});
    return listField(data, "snapshots") as Snapshot[];
  }

  /**
   * Invalidate the key's entry and try to remove its image now: `result`, and `detail` (what
   * Docker's refusal said, or why the removal failed; null when there is nothing to add, absent
   * from older agents). Throws SnapshotNotFoundError when there is no entry (the caller may
   * treat that as done).
   */
  async delete(key: SnapshotKey): Promise<DeleteResponse> {
    const query = { project: key.project, work_item: key.work_item };
    const { data } = await this.call("DELETE", "/v1/snapshots", { query });
    objectField(data, "snapshot");
    return data as DeleteResponse;
  }

  /**
   * Run an eviction now and return what it removed, in no set order, each outcome with its
   * `detail` (what Docker's refusal said, or null). With `dry_run`, explain one instead: what would go, in eviction order, then `skipped` (what a rule wanted but a
   * protection kept) and `disk_bytes_to_free`; nothing is removed.
   */
  async evict(request: EvictRequest = {}): Promise<EvictResponse> {
    const json = { dry_run: request.dry_run ?? false };
    const { data } = await this.call("POST", "/v1/evict", { json });
    listField(data, "evicted");
    return data as EvictResponse;
  }

  async status(): Promise<Status> {
    const { data } = await this.call("GET", "/v1/status", {});
    objectField(data, "docker");
    return data as Status;
  }

  /**
   * Any request; the answer's JSON object as sent. Errors throw as in the typed methods.
   */
  async request(method: string, path: string, options: RequestOptions = {}): Promise<Record<string, unknown>> {
    return (await this.call(method, path, options)).data;
  }

  private async call(
    method: string,
    path: string,
    options: RequestOptions,
  ): Promise<{ status: number; data: Record<string, unknown> }> {
    const { status, body } = await this.exchange(method, target(path, options.query), payload(options));
    if (status < 200 || status >= 300) throw errorFromAnswer(status, body);
    let data: unknown;
    try {
      data = JSON.parse(body);
    } catch (error) {
      throw new ProtocolError(`malformed answer from snapagentd: not JSON (${String(error)})`, status, body);
    }
    if (data === null || typeof data !== "object" || Array.isArray(data)) {
      throw new ProtocolError("malformed answer from snapagentd: expected a JSON object", status, body);
    }
    return { status, data: data as Record<string, unknown> };
  }

  private async exchange(method: string, path: string, body: Buffer | undefined): Promise<Answer> {
    let delay = this.retry.initialDelayMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.once(method, path, body);
      } catch (error) {
        const code = (error as { connectFailed?: string }).connectFailed;
        if (code === undefined) throw error;
        if (attempt >= this.retry.attempts || !RETRY_CODES.has(code)) {
          throw new AgentUnreachable(this.socketPath, reasonOf(error), { cause: error });
        }
      }
      await sleep(delay); // back-off while the agent restarts
      delay = Math.min(delay * 2, this.retry.maxDelayMs);
    }
  }

  /** One request on a connection of its own (no keep-alive survives an agent restart). */
  private once(method: string, path: string, body: Buffer | undefined): Promise<Answer> {
    return new Promise((resolve, reject) => {
      let connected = false;
      const headers: Record<string, string | number> = { Accept: "application/json", Connection: "close" };
      if (body !== undefined) {
        headers["Content-Type"] = "application/json";
        headers["Content-Length"] = body.length;
      }
      const request = httpRequest({ socketPath: this.socketPath, method, path, headers, agent: false });
      request.setTimeout(this.timeoutMs, () => {
        request.destroy(new AgentUnreachable(this.socketPath, `timed out after ${this.timeoutMs} ms`));
      });
      request.on("socket", (socket) => {
        socket.once("connect", () => {
          connected = true;
        });
      });
      request.on("error", (error: NodeJS.ErrnoException) => {
        if (error instanceof AgentUnreachable) return reject(error);
        if (!connected && error.code) return reject(Object.assign(error, { connectFailed: error.code }));
        if (error.code?.startsWith("HPE_")) {
          return reject(new ProtocolError(`malformed HTTP answer from snapagentd: ${error.message}`));
        }
        reject(new AgentUnreachable(this.socketPath, reasonOf(error), { cause: error }));
      });
      request.on("response", (response) => {
        const chunks: Buffer[] = [];
        response.on("data", (chunk: Buffer) => chunks.push(chunk));
        response.on("error", (error) => reject(new AgentUnreachable(this.socketPath, reasonOf(error))));
        response.on("end", () => {
          resolve({ status: response.statusCode ?? 0, body: Buffer.concat(chunks).toString("utf8") });
        });
      });
      request.end(body);
    });
  }
}

function target(path: string, query: Record<string, string> | undefined): string {
  if (!query || Object.keys(query).length === 0) return path;
  const pairs = Object.entries(query).map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
  return `${path}?${pairs.join("&")}`;
}

function payload(options: RequestOptions): Buffer | undefined {
  if (options.data !== undefined) return Buffer.from(options.data);
  if (options.json !== undefined) return Buffer.from(JSON.stringify(options.json));
  return undefined;
}

function objectField(data: Record<string, unknown>, key: string): Record<string, unknown> {
  const value = data[key];
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ProtocolError(`malformed answer from snapagentd: ${key} is not an object`);
  }
  return value as Record<string, unknown>;
}

function listField(data: Record<string, unknown>, key: string): unknown[] {
  const value = data[key];
  if (!Array.isArray(value)) throw new ProtocolError(`malformed answer from snapagentd: ${key} is not a list`);
  return value;
}

function reasonOf(error: unknown): string {
  const { code, message } = error as NodeJS.ErrnoException;
  const known: Record<string, string> = {
    ENOENT: "No such file or directory",
    ECONNREFUSED: "Connection refused",
    ECONNRESET: "Connection reset by peer",
  };
  return (code && known[code]) || message || String(error);
}
