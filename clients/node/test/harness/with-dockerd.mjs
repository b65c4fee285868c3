#!/usr/bin/env node
// Runs a command with a private Docker engine for the client tests:
//
//   node test/harness/with-dockerd.mjs COMMAND [ARGS...]
//
// When SNAPAGENTD_TEST_DOCKER_HOST is set (scripts/test-clients.sh starts one engine for all
// the Node suites), the command just runs with it. Otherwise this starts a private dockerd with
// scripts/lib.sh (start_private_dockerd: its own data-root and socket under a new short
// directory in /tmp; needs root and Debian's docker.io), runs the command, then stops the
// engine and removes the directory, whatever the command's outcome. The tests start their own
// agents (test/support/agent.ts) against that engine. The command also gets SNAPAGENTD_REPO.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repo = process.env.SNAPAGENTD_REPO ?? resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
const [command, ...args] = process.argv.slice(2);
if (!command) {
  console.error("usage: with-dockerd.mjs COMMAND [ARGS...]");
  process.exit(2);
}

function lib(fn, dir) {
  const script = '. "$1/scripts/lib.sh" && "$2" "$3"';
  return spawnSync("bash", ["-c", script, "bash", repo, fn, dir], { stdio: "inherit" }).status === 0;
}

let engineDir;
const env = { ...process.env, SNAPAGENTD_REPO: repo };
if (!env.SNAPAGENTD_TEST_DOCKER_HOST) {
  engineDir = mkdtempSync("/tmp/sanode-");
  if (!lib("start_private_dockerd", engineDir)) {
    lib("stop_private_dockerd", engineDir);
    rmSync(engineDir, { recursive: true, force: true });
    console.error("could not start a private dockerd (run as root with docker.io installed)");
    process.exit(1);
  }
  env.SNAPAGENTD_TEST_DOCKER_HOST = `unix://${join(engineDir, "docker.sock")}`;
}

function cleanUp() {
  if (engineDir) {
    lib("stop_private_dockerd", engineDir);
    rmSync(engineDir, { recursive: true, force: true });
    engineDir = undefined;
  }
}

const child = spawn(command, args, { stdio: "inherit", env });
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => child.kill(signal));
}
child.on("exit", (code, signal) => {
  cleanUp();
  process.exit(code ?? (signal ? 1 : 0));
});
