#!/usr/bin/env node
// router PROJECT WORK_ITEM: run the work item once (see router.ts) and print what happened.
// Environment: SNAPAGENTD_SOCKET (default /run/snapagentd/snapagentd.sock), DOCKER_HOST
// (default unix:///run/docker.sock), ROUTER_BASE_IMAGE (default router-example-base:latest).
import { SnapagentdClient } from "snapagentd-client";

import { Docker } from "./docker.js";
import { runWorkItem } from "./router.js";

const [project, workItem] = process.argv.slice(2);
if (!project || !workItem) {
  console.error("usage: router PROJECT WORK_ITEM");
  process.exit(2);
}
const env = process.env;
const result = await runWorkItem(project, workItem, {
  agent: new SnapagentdClient(env.SNAPAGENTD_SOCKET ? { socketPath: env.SNAPAGENTD_SOCKET } : {}),
  docker: new Docker(env.DOCKER_HOST ?? "unix:///run/docker.sock"),
  baseImage: env.ROUTER_BASE_IMAGE ?? "router-example-base:latest",
  log: (line) => console.error(`router: ${line}`),
});
console.log(`started from: ${result.startedFrom} (${result.image})`);
console.log(`snapshot: ${result.snapshot}${result.registered ? " (registered)" : " (not registered)"}`);
process.stdout.write(result.output);
