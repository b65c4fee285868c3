// Generated from docs/openapi.json by scripts/generate-types.mjs: do not edit.
// `npm run generate` rewrites it; `npm test` fails while it is out of date.
// snapagentd API 0.1.0

/**
 * Project name as the client chose it: any non-empty string of at most 1024 characters (Unicode code points) without control characters (U+0000-U+001F, U+007F-U+009F). Spaces, `/` and non-ASCII letters are allowed. Compared exactly (case-sensitive, no normalisation).
 */
export type Project = string;

/**
 * Work item name, with the same rules as `project`. Together, (project, work_item) is the key of a snapshot entry.
 */
export type WorkItem = string;

/**
 * A plain `repository[:tag]` reference (no digest, no image id). A missing tag means `latest`; the stored form is always `repository:tag`. The repository must start with one of the configured `docker.image_prefixes` (default `cascade-snapshot-`), otherwise the request fails with 403 `image-not-managed`.
 */
export type ImageReference = string;

/**
 * Docker image id.
 */
export type ImageId = string;

/**
 * RFC 3339 time in UTC with a `Z` suffix and microseconds.
 */
export type Timestamp = string;

/**
 * One snapshot entry. Clients should ignore fields they do not know; new fields may be added.
 */
export type Snapshot = {
  /**
   * Project of a registered entry; the empty string for a discovered entry.
   */
  project: string;
  /**
   * Work item of a registered entry; the image reference for a discovered entry.
   */
  work_item: string;
  /**
   * Image reference in the normalised `repository:tag` form.
   */
  image: string;
  image_id: ImageId;
  /**
   * Size in bytes: the value given at registration, otherwise Docker's `Size` for the image (which counts shared base layers). `null` when unknown.
   */
  size_bytes: number | null;
  /**
   * When the image was created in Docker (its commit time), RFC 3339 UTC; not when it was registered. The TTL and `min_age` are measured from this time.
   */
  created_at: string;
  /**
   * Time of the last successful lookup, RFC 3339 UTC; `null` if never looked up.
   */
  last_used_at: string | null;
  /**
   * `registered`: created by POST /v1/snapshots. `discovered`: found in Docker (managed prefix) at start-up or reconcile with no registration.
   */
  source: "registered" | "discovered";
};

/**
 * Outcome of one image removal. `removed`: Docker removed it. `in-use`: a container uses it; not removed, retried later. `already-gone`: Docker no longer had it. `failed`: any other failure (including Docker unreachable); retried later. `kept`: another entry still holds the same tag and image, so the image stays (DELETE only).
 */
export type RemovalResult = "removed" | "in-use" | "already-gone" | "failed" | "kept";

/**
 * As `RemovalResult`, plus `planned` for every entry of a dry run (nothing was done).
 */
export type EvictionResult = "removed" | "in-use" | "already-gone" | "failed" | "planned";

/**
 * `ttl`: older than the TTL. `count`: more than `max_count` snapshots. `size`: total size above `max_size_bytes`. `superseded`: another image was registered for the same key, or its tag was re-committed to a newly registered image. `invalidated`: removed with DELETE /v1/snapshots. `repointed`: its tag now names another image, so the recorded image is dangling.
 */
export type EvictionReason = "ttl" | "count" | "size" | "superseded" | "invalidated" | "repointed";

/**
 * A snapshot entry with the reason it was chosen and the outcome of its removal.
 */
export type EvictedSnapshot = Snapshot & {
  reason: EvictionReason;
  result: EvictionResult;
};

/**
 * Stable machine-readable code. Branch on this, never on `message`.
 */
export type ErrorCode = "invalid-json" | "invalid-field" | "image-not-managed" | "access-denied" | "image-not-found" | "snapshot-not-found" | "not-found" | "method-not-allowed" | "body-too-large" | "docker-error" | "docker-unavailable" | "journal-unavailable" | "too-many-connections" | "internal-error";

export type Error = {
  error: {
    code: ErrorCode;
    /**
     * Human-readable explanation; names the offending field when there is one. Wording may change.
     */
    message: string;
  };
};

/**
 * Unknown fields are rejected with 400 `invalid-field`.
 */
export type RegisterRequest = {
  project: Project;
  work_item: WorkItem;
  image: ImageReference;
  /**
   * Size to record, in bytes. Omit it to take Docker's `Size` of the image.
   */
  size_bytes?: number;
};

/**
 * Unknown fields are rejected with 400 `invalid-field`.
 */
export type LookupRequest = {
  project: Project;
  work_item: WorkItem;
  /**
   * Maximum age in seconds for this lookup. Defaults to the policy TTL (`policy.ttl_seconds` in GET /v1/status).
   */
  ttl_seconds?: number;
};

/**
 * May be omitted entirely (empty body). Unknown fields are rejected with 400 `invalid-field`.
 */
export type EvictRequest = {
  /**
   * When true, report what would be removed and change nothing.
   */
  dry_run?: boolean;
};

export type SnapshotResponse = {
  snapshot: Snapshot;
};

export type SnapshotList = {
  /**
   * Sorted by project, then work_item (Unicode code point order).
   */
  snapshots: Snapshot[];
};

export type DeleteResponse = {
  snapshot: Snapshot;
  result: RemovalResult;
};

export type EvictResponse = {
  dry_run: boolean;
  evicted: EvictedSnapshot[];
};

export type Policy = {
  /**
   * Snapshots older than this are evicted (reason `ttl`).
   */
  ttl_seconds: number;
  /**
   * At most this many snapshots are kept (reason `count`).
   */
  max_count: number;
  /**
   * Total size kept at or below this (reason `size`).
   */
  max_size_bytes: number;
  /**
   * Period of the eviction timer.
   */
  interval_seconds: number;
  /**
   * The policy never picks a snapshot younger than this.
   */
  min_age_seconds: number;
};

/**
 * Summary of the most recent eviction run; `null` before the first one.
 */
export type LastEviction = {
  started_at: Timestamp;
  finished_at: Timestamp;
  /**
   * `start`: daemon start-up. `timer`: the periodic timer. `api`: POST /v1/evict. `docker-returned`: Docker became reachable again.
   */
  trigger: "start" | "timer" | "api" | "docker-returned";
  removed: number;
  in_use: number;
  already_gone: number;
  failed: number;
  /**
   * Why the run could not complete (for example Docker unreachable); `null` if it completed.
   */
  error: string | null;
} | null;

export type Status = {
  /**
   * snapagentd version.
   */
  version: string;
  docker: {
    reachable: boolean;
    /**
     * Why Docker is unreachable; `null` when reachable.
     */
    error: string | null;
    /**
     * Configured Docker endpoint (`docker.url`).
     */
    url: string;
  };
  snapshots: {
    /**
     * Number of snapshot entries.
     */
    count: number;
    /**
     * Sum of the known `size_bytes` of the entries.
     */
    total_size_bytes: number;
    /**
     * Image removals not yet confirmed; retried by every eviction run.
     */
    pending_removal: number;
  };
  policy: Policy;
  last_eviction: LastEviction;
  journal: {
    path: string;
    /**
     * Number of records in the journal file.
     */
    records: number;
  };
};
