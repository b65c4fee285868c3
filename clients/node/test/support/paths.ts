import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The snapagentd checkout (the harness exports it; else found from build/test/support). */
export const REPO = process.env.SNAPAGENTD_REPO ?? resolve(dirname(fileURLToPath(import.meta.url)), "../../../../..");
export const CONTRACTS = join(REPO, "contracts");

/** The Docker engine the harness started (test/harness/with-dockerd.mjs). */
export function dockerHost(): string {
  const host = process.env.SNAPAGENTD_TEST_DOCKER_HOST;
  if (!host?.startsWith("unix://")) {
    throw new Error("SNAPAGENTD_TEST_DOCKER_HOST is not set: run the tests with `npm test`");
  }
  return host;
}

/** The Python that runs the agent: $SNAPAGENTD_PYTHON, the checkout's .venv, else python3. */
export function agentPython(): string {
  const venv = join(REPO, ".venv", "bin", "python");
  return process.env.SNAPAGENTD_PYTHON ?? (existsSync(venv) ? venv : "python3");
}
