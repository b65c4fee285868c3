// The naming rule on the table the agent and the Python client are tested on.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { snapshotTag } from "../src/index.js";
import { CONTRACTS } from "./support/paths.js";

interface Case {
  project: string;
  work_item: string;
  prefix?: string;
  tag: string;
}

const table = JSON.parse(readFileSync(join(CONTRACTS, "snapshot-tags.json"), "utf8")) as { cases: Case[] };

test("snapshotTag follows contracts/snapshot-tags.json", () => {
  assert.ok(table.cases.length >= 10);
  for (const { project, work_item, prefix, tag } of table.cases) {
    const made = prefix === undefined ? snapshotTag(project, work_item) : snapshotTag(project, work_item, prefix);
    assert.equal(made, tag, JSON.stringify({ project, work_item }));
  }
});
