/** The prefix the agent manages by default (`docker.image_prefixes`). */
export const DEFAULT_PREFIX = "cascade-snapshot-";

/**
 * The `repository:tag` a router commits a work item's snapshot to; the rule the agent and the
 * Python client share (contracts/snapshot-tags.json): lower-case "<project>-<work item>",
 * every run of characters other than a-z and 0-9 becomes one "-", leading and trailing "-"
 * go, then prefix + slug + ":latest".
 *
 *     snapshotTag("Proj Snap", "MNG_652/Worker Snapshot!")
 *       === "cascade-snapshot-proj-snap-mng-652-worker-snapshot:latest"
 */
export function snapshotTag(project: string, workItem: string, prefix = DEFAULT_PREFIX): string {
  const slug = `${project}-${workItem}`
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "");
  return `${prefix}${slug}:latest`;
}
