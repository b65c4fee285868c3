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
 * One snapshot entry. Clients should ignore fields they do not know; new fields may be added. Every entry the agent sends carries `unique_bytes` (older agents leave it out of the DELETE answer and a real eviction's outcomes: read a missing one as `null`).
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
   * Size in bytes: the value given at registration, otherwise Docker's `Size` for the image (which counts shared base layers, so sums over several images over-count). `null` when unknown.
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
  /**
   * Bytes only this image holds: the layers no other image (managed or not) shares, about what removing it frees. `null` until the agent has measured the image's layers (the first eviction run after start-up or after the image appeared does). In the DELETE answer and a real eviction's outcomes: what the image alone held as last measured, that is what its removal freed if it was removed.
   */
  unique_bytes: number | null;
};

/**
 * Outcome of one image removal. `removed`: Docker deleted the image; its bytes are free. `untagged`: only the agent's tag came off; other references keep the image and its bytes, so it frees nothing. `in-use`: a container (running or stopped) uses the image; not removed, retried later. `has-children`: Docker refused, images were committed or built on it; retried later. `referenced`: Docker refused, the image gained a reference since the agent looked; looked at again by the next run. `already-gone`: Docker no longer had it, or the agent's tag had left it. `failed`: any other failure (including Docker unreachable); retried later. `kept`: another entry still holds the same tag and image, so the image stays; only this entry went. `leased`: a lease protects the image; not asked of Docker, retried once the lease has ended. `removed`, `untagged` and `already-gone` confirm the removal (the agent forgets the image); the others leave it pending. Only `removed` counts in reclaimed bytes.
 */
export type RemovalResult = "removed" | "untagged" | "in-use" | "has-children" | "referenced" | "already-gone" | "failed" | "kept" | "leased";

/**
 * A real run: as `RemovalResult`; `kept` there means the key was registered again with this image before Docker was asked, or a leaked image gained a tag meanwhile (it is someone's again): left alone. In a dry run: `planned` (it would be removed now), or, for a removal already pending, `leased` or `in-use` when that is what holds it back.
 */
export type EvictionResult = "removed" | "untagged" | "in-use" | "has-children" | "referenced" | "already-gone" | "failed" | "kept" | "leased" | "planned";

/**
 * `ttl`: older than the TTL (its project's, or the global one). `count`: more than `max_count` snapshots. `size`: total size above `max_size_bytes`. `disk`: the file system of Docker's data root is above the high watermark. `superseded`: another image was registered for the same key, or its tag was re-committed to a newly registered image. `invalidated`: removed with DELETE /v1/snapshots. `repointed`: its tag now names another image, so the recorded image is dangling. `leaked`: a dangling image an entry once referenced, or one carrying the configured `docker.dangling_label` (real runs only).
 */
export type EvictionReason = "ttl" | "count" | "size" | "disk" | "superseded" | "invalidated" | "repointed" | "leaked";

/**
 * A snapshot entry an eviction chose (or would choose), with the reason and the outcome of its removal (and, like every entry, its `unique_bytes`). Dry-run items also carry `age_seconds` and `idle_seconds`; a real run's outcomes carry `detail` instead.
 */
export type EvictedSnapshot = Snapshot & {
  reason: EvictionReason;
  result: EvictionResult;
  /**
   * A real run's outcomes only (always there; `null` when there is nothing to add): what Docker's refusal said (`running container 1d0b2ff5c018`, `stopped container 1d0b2ff5c018`, `dependent child images`, `referenced in multiple repositories`), why the removal failed (Docker's error, `Docker is not reachable: ...`), or what holds an image the agent left alone (`held by <reference>`). Never in a dry run. Older agents do not send it.
   */
  detail?: string | null;
  /**
   * Seconds since `created_at` (dry run only).
   */
  age_seconds?: number;
  /**
   * Seconds since the last use, or since `created_at` if never used (dry run only).
   */
  idle_seconds?: number;
};

/**
 * Stable machine-readable code. Branch on this, never on `message`.
 */
export type ErrorCode = "invalid-json" | "invalid-field" | "image-not-managed" | "access-denied" | "image-not-found" | "snapshot-not-found" | "lease-not-found" | "not-found" | "method-not-allowed" | "body-timeout" | "body-too-large" | "docker-error" | "docker-unavailable" | "journal-unavailable" | "too-many-connections" | "internal-error";

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
   * Maximum age in seconds for this lookup. Defaults to the TTL of the project (`policy.projects` in GET /v1/status) or else the global one (`policy.ttl_seconds`).
   */
  ttl_seconds?: number;
  /**
   * Also take a lease of this many seconds (1 to 86400) on the snapshot found, in the same request, so that no eviction can remove it between the lookup and the router's `docker create`. The answer then has `lease`. Nothing is leased on a miss.
   */
  lease_seconds?: number;
};

/**
 * May be omitted entirely (empty body). Unknown fields are rejected with 400 `invalid-field`.
 */
export type EvictRequest = {
  /**
   * When true, report what a run would remove now and what protects the rest; remove nothing.
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
  /**
   * What Docker's refusal said (`running container 1d0b2ff5c018`, `stopped container 1d0b2ff5c018`, `dependent child images`, `referenced in multiple repositories`), why the removal failed (Docker's error, `Docker is not reachable: ...`), or what holds an image the agent left alone (`held by <reference>`); `null` when there is nothing to add. Older agents do not send it: read a missing one as `null`.
   */
  detail: string | null;
};

/**
 * A real run: `dry_run` false and the outcome of each removal it attempted. A dry run: `dry_run` true, `evicted` in eviction order, and also `skipped` and `disk_bytes_to_free`.
 */
export type EvictResponse = {
  dry_run: boolean;
  evicted: EvictedSnapshot[];
  /**
   * Dry run only: snapshots a rule wanted but a protection kept, in the order the rules met them.
   */
  skipped?: SkippedSnapshot[];
  /**
   * Dry run only: bytes the disk rule wants back (0 unless the file system of Docker's data root is above the high watermark).
   */
  disk_bytes_to_free?: number;
};

export type Policy = {
  /**
   * Snapshots older than this are evicted (reason `ttl`); the default TTL of a lookup.
   */
  ttl_seconds: number;
  /**
   * At most this many snapshots are kept (reason `count`).
   */
  max_count: number;
  /**
   * Total size kept at or below this (reason `size`), counted as `size_accounting` says.
   */
  max_size_bytes: number;
  /**
   * Period of the eviction timer.
   */
  interval_seconds: number;
  /**
   * Count, size and disk never pick a snapshot younger than this (the TTL does).
   */
  min_age_seconds: number;
  /**
   * High watermark on the file system of Docker's data root: a used percentage (`85%`) or free space (`20GiB`); above it, eviction by reason `disk` starts. `off`: no disk rule.
   */
  disk_high: string;
  /**
   * Low watermark, in the same forms: the disk rule evicts until it is met. `off` when `disk_high` is.
   */
  disk_low: string;
  /**
   * How often the disk is measured (a statvfs; a run only above the high mark).
   */
  disk_interval_seconds: number;
  /**
   * What `max_size_bytes` and the disk rule count per image: `unique` bytes (shared layers once) or Docker's `virtual` Size.
   */
  size_accounting: "unique" | "virtual";
  /**
   * Projects with limits of their own (`[policy.projects."name"]`), by name; each is a pool apart from the global one.
   */
  projects: {
    [name: string]: Limits;
  };
};

/**
 * Summary of the most recent eviction run; `null` before the first one.
 */
export type LastEviction = {
  started_at: Timestamp;
  finished_at: Timestamp;
  /**
   * `start`: daemon start-up. `timer`: the periodic timer. `api`: POST /v1/evict. `docker-returned`: Docker became reachable again after a run failed. `events-reconnected`: Docker's event stream was opened again (events may have been lost). `disk`: the disk was found above the high watermark. `sizes-measured`: the first measurement of layer sizes after start-up found work for the size or disk rules.
   */
  trigger: "start" | "timer" | "api" | "docker-returned" | "events-reconnected" | "disk" | "sizes-measured";
  /**
   * Images Docker deleted (their bytes are free).
   */
  removed: number;
  /**
   * Removals a container held back; retried.
   */
  in_use: number;
  /**
   * Images Docker no longer had.
   */
  already_gone: number;
  /**
   * Removals that failed otherwise; retried.
   */
  failed: number;
  /**
   * Removals held back by a lease.
   */
  leased: number;
  /**
   * Removals that only took the agent's tag off: other references keep the image and its bytes (nothing freed).
   */
  untagged: number;
  /**
   * Removals Docker refused: images were committed or built on the image; retried.
   */
  has_children: number;
  /**
   * Removals Docker refused: the image gained a reference since the agent looked; looked at again by the next run.
   */
  referenced: number;
  /**
   * References Docker removed that the agent had not chosen: a tag that moved in the moment between the agent's look and its DELETE (docs/operations.md, Safety). Each is also an ERROR in the log and counted by `snapagentd_wrong_removals_total`. Should stay 0.
   */
  wrong_removals: number;
  /**
   * Unique bytes of the images the run removed (those it had measured); `untagged` ones free nothing.
   */
  reclaimed_bytes: number;
  /**
   * Images of the run's listing whose creation time Docker gave unusably (unparseable, out of range, at or before 1970) or in the future. They never stop a run; a snapshot among them ages from when the agent first saw it.
   */
  odd_images: number;
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
    events: DockerEvents;
  };
  snapshots: {
    /**
     * Number of snapshot entries.
     */
    count: number;
    /**
     * Sum of the known `size_bytes` of the entries, each image once (over-counts shared layers).
     */
    total_size_bytes: number;
    /**
     * Bytes only the snapshots hold (shared layers counted once, layers shared with other images not at all): about what removing them all frees. As of the end of the last eviction run (after its removals) or the last dry run; `null` before one has measured.
     */
    unique_bytes: number | null;
    /**
     * Image removals not yet confirmed; retried by every eviction run.
     */
    pending_removal: number;
    /**
     * Leases held (expired ones are dropped at the next eviction run).
     */
    leases: number;
  };
  disk: DiskStatus;
  policy: Policy;
  last_eviction: LastEviction;
  journal: {
    path: string;
    /**
     * Number of records in the journal file.
     */
    records: number;
  };
  /**
   * The Docker engine the journal describes, and this agent's ownership marker in it (one agent per engine: docs/operations.md).
   */
  engine: {
    /**
     * The engine's ID (`docker info`); `null` until the agent has reached Docker once.
     */
    id: string | null;
    /**
     * The agent's own instance id: random, made once, kept in the journal.
     */
    instance: string | null;
    /**
     * The volume the agent keeps in the engine as its ownership marker: `snapagentd-owner-<instance>`.
     */
    marker: string | null;
  };
};

/**
 * Why a snapshot a rule wanted was left alone. `in-use`: a container (running or stopped) uses its image. `leased`: a lease protects its image. `min-age`: younger than `min_age_seconds` (protects from count, size and disk, never from the TTL). `shared` (size and disk only): its image is also held by a snapshot the rule may not take (a protected one, or one another pool keeps), so removing it would free nothing.
 */
export type Protection = "in-use" | "leased" | "min-age" | "shared";

/**
 * A snapshot a rule of a dry run wanted but could not take, and what protected it; listed once, under the first rule that wanted it.
 */
export type SkippedSnapshot = Snapshot & {
  /**
   * Seconds since `created_at`.
   */
  age_seconds: number;
  /**
   * Seconds since the last use, or since `created_at` if never used.
   */
  idle_seconds: number;
  reason: EvictionReason;
  protected_by: Protection;
};

/**
 * A promise that no eviction (TTL, count, size, disk, or a superseded or invalidated image's removal) removes the image `image_id` before `expires_at`, unless the lease is released first. It protects the image the entry had when the lease was taken. Leases are journalled: they survive restarts.
 */
export type Lease = {
  /**
   * Opaque id; pass it to DELETE /v1/snapshots/lease to release the lease.
   */
  id: string;
  project: string;
  work_item: string;
  image_id: ImageId;
  /**
   * When the protection ends, RFC 3339 UTC.
   */
  expires_at: string;
};

/**
 * Unknown fields are rejected with 400 `invalid-field`.
 */
export type LeaseRequest = {
  project: Project;
  work_item: WorkItem;
  /**
   * How long the lease lasts, 1 to 86400 (a day). Minutes bridge a lookup and a `docker create`; release it early once the container exists.
   */
  seconds: number;
};

export type LeaseResponse = {
  lease: Lease;
};

export type ReleaseResponse = {
  lease: Lease;
  /**
   * Always `true`.
   */
  released: true;
};

/**
 * `lease` is there when the request had `lease_seconds`; `confirmed` says whether Docker confirmed the entry's image or the agent answered from its registry.
 */
export type LookupResponse = {
  snapshot: Snapshot;
  /**
   * `true`: Docker confirmed that the tag names the entry's image, at this lookup or earlier with no image event since that could contradict it. `false`: Docker did not answer within `[docker] lookup_timeout` (default 500 ms), or cannot be reached, and the agent answered from its registry, unchecked (the TTL still applied). Older agents do not send it.
   */
  confirmed: boolean;
  lease?: Lease;
};

/**
 * The limits of one pool of snapshots: the global pool or one project's.
 */
export type Limits = {
  ttl_seconds: number;
  max_count: number;
  max_size_bytes: number;
};

/**
 * The agent's subscription to Docker's event stream (which marks snapshots used as containers are created from them); `null` when the agent does not follow events.
 */
export type DockerEvents = {
  /**
   * The stream is open now.
   */
  connected: boolean;
  /**
   * How often the stream was opened again since the agent started.
   */
  reconnects: number;
} | null;

/**
 * The last measurement of the file system of Docker's data root against the watermarks; `null` when the watermarks are off (or before the first measurement). When it cannot be measured, only `path` and `error` are present.
 */
export type DiskStatus = {
  /**
   * The path measured (`docker.data_root`, else Docker's root dir); `null` if it is not known yet.
   */
  path: string | null;
  /**
   * Used plus available bytes, as df counts them for a user.
   */
  total_bytes?: number;
  /**
   * Available bytes (df's Avail).
   */
  free_bytes?: number;
  /**
   * 1 - free/total (df's Use%, as a fraction).
   */
  used_ratio?: number;
  /**
   * The high watermark in free bytes: eviction starts below it.
   */
  high_free_bytes?: number;
  /**
   * The low watermark in free bytes: eviction stops once this much is free.
   */
  low_free_bytes?: number;
  /**
   * `free_bytes` is below `high_free_bytes`: the disk rule is evicting.
   */
  above_high?: boolean;
  /**
   * Why the disk could not be measured; `null` when it was.
   */
  error: string | null;
} | null;
