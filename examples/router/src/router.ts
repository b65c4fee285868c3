// The router's one job: run a work item's worker, starting from the work item's snapshot when
// the agent has a usable one and from the base image otherwise, then commit the worker's
// container as the work item's new snapshot and register it with the agent.
import { AgentUnreachable, SnapagentdClient, snapshotTag } from "snapagentd-client";

import { Docker, DockerApiError } from "./docker.js";

export interface RunResult {
  /** Where the worker started: the snapshot, or the base image on a miss. */
  startedFrom: "snapshot" | "base";
  image: string;
  output: string;
  /** The tag the result was committed to, and whether the agent now has it registered. */
  snapshot: string;
  registered: boolean;
}

export interface RouterOptions {
  agent: SnapagentdClient;
  docker: Docker;
  baseImage: string;
  log?: (line: string) => void;
}

/** The worker: appends one line to /work/history and prints the whole history. */
function workerCommand(workItem: string): { command: string[]; env: string[] } {
  const script = 'mkdir -p /work && echo "worked on $WORK_ITEM at $(date -u +%T)" >> /work/history && cat /work/history';
  return { command: ["/bin/sh", "-c", script], env: ["PATH=/bin", `WORK_ITEM=${workItem}`] };
}

export async function runWorkItem(project: string, workItem: string, options: RouterOptions): Promise<RunResult> {
  const { agent, docker, baseImage } = options;
  const log = options.log ?? (() => {});
  const snapshot = snapshotTag(project, workItem);

  let startedFrom: RunResult["startedFrom"] = "base";
  let image = baseImage;
  try {
    const found = await agent.lookup({ project, work_item: workItem }); // null: a cache miss (404)
    if (found) [startedFrom, image] = ["snapshot", found.image];
  } catch (error) {
    if (!(error instanceof AgentUnreachable)) throw error;
    log(`agent unreachable, carrying on without snapshots: ${error.message}`);
  }
  log(`starting ${project}/${workItem} from ${startedFrom} ${image}`);

  const { command, env } = workerCommand(workItem);
  let container: string;
  try {
    container = await docker.create(image, command, env);
  } catch (error) {
    // An eviction can remove a snapshot after the lookup: the docs say to treat that as a miss.
    if (!(error instanceof DockerApiError && error.status === 404 && startedFrom === "snapshot")) throw error;
    log(`snapshot ${image} vanished after the lookup: starting from the base image`);
    [startedFrom, image] = ["base", baseImage];
    container = await docker.create(image, command, env);
  }
  try {
    const { exitCode, output } = await docker.run(container);
    if (exitCode !== 0) throw new Error(`worker exited with ${exitCode}:\n${output}`);
    await docker.commit(container, snapshot);
    log(`committed ${snapshot}`);
    let registered = false;
    try {
      await agent.register({ project, work_item: workItem, image: snapshot });
      registered = true;
      log(`registered ${snapshot}`);
    } catch (error) {
      if (!(error instanceof AgentUnreachable)) throw error;
      log(`agent unreachable, snapshot not registered: ${error.message}`);
    }
    return { startedFrom, image, output, snapshot, registered };
  } finally {
    await docker.remove(container);
  }
}
