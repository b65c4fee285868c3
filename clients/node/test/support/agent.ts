// A real snapagentd process for a test, as tests/agent.py makes them for the Python suite: its
// own config, journal and socket in a new directory under /tmp, `python -m snapagentd`.
import { type ChildProcess, spawn } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import { SnapagentdClient } from "../../src/index.js";
import { removeMarkers } from "./docker.js";
import { REPO, agentPython, dockerHost } from "./paths.js";

/**
 * The policy tests/agent.py gives its agents; contracts/README.md names it as the base. The disk
 * watermarks are off: no test controls how full the engine's disk is.
 */
export const BASE_POLICY = { ttl: "24h", max_count: 100, max_size: "10GiB", disk_high: "off", disk_low: "off" };

/** TOML from nested objects: an object value is a sub-table (`[policy."projects"."x"]`). */
export function toml(sections: Record<string, Record<string, unknown>>): string {
  const lines: string[] = [];
  const table = (name: string, values: Record<string, unknown>): void => {
    lines.push(`[${name}]`);
    const nested = Object.entries(values).filter(([, v]) => v !== null && typeof v === "object" && !Array.isArray(v));
    for (const [key, value] of Object.entries(values)) {
      if (!nested.some(([k]) => k === key)) lines.push(`${key} = ${JSON.stringify(value)}`);
    }
    for (const [key, value] of nested) table(`${name}.${JSON.stringify(key)}`, value as Record<string, unknown>);
  };
  for (const [name, values] of Object.entries(sections)) table(name, values);
  return `${lines.join("\n")}\n`;
}

export interface AgentOptions {
  policy?: Record<string, unknown>;
  /** Default: the harness's engine. */
  dockerUrl?: string;
}

export class Agent {
  private constructor(
    readonly directory: string,
    readonly socketPath: string,
    private readonly process: ChildProcess,
    private readonly exited: Promise<number | null>,
  ) {}

  static async start(options: AgentOptions = {}): Promise<Agent> {
    const directory = mkdtempSync("/tmp/sanode-a-");
    const sections: Record<string, Record<string, unknown>> = {
      api: { socket: join(directory, "agent.sock"), socket_mode: "0600" },
      docker: { url: options.dockerUrl ?? dockerHost() },
      policy: { ...BASE_POLICY, ...options.policy },
      journal: { path: join(directory, "state", "journal.jsonl") },
    };
    writeFileSync(join(directory, "snapagentd.toml"), toml(sections));
    const agent = Agent.spawnOn(directory);
    await agent.waitUntilServing();
    return agent;
  }

  /** A daemon process on `directory`'s configuration, logging to its agent.log. */
  private static spawnOn(directory: string): Agent {
    const log = openSync(join(directory, "agent.log"), "a");
    const child = spawn(agentPython(), ["-m", "snapagentd", "--config", join(directory, "snapagentd.toml")], {
      cwd: directory,
      env: { ...process.env, PYTHONPATH: REPO, NOTIFY_SOCKET: "" },
      stdio: ["ignore", log, log],
    });
    closeSync(log); // the child holds its own copy
    const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
    return new Agent(directory, join(directory, "agent.sock"), child, exited);
  }

  /** Waits (30 s at most) until the agent answers its status, through the client's own retry. */
  async waitUntilServing(): Promise<void> {
    const client = new SnapagentdClient({
      socketPath: this.socketPath,
      retry: { attempts: 600, initialDelayMs: 50, maxDelayMs: 50 },
    });
    const died = this.exited.then((code) => {
      throw new Error(`agent exited (${code}) while starting; log:\n${this.log()}`);
    });
    await Promise.race([client.status(), died]);
  }

  log(): string {
    try {
      return readFileSync(join(this.directory, "agent.log"), "utf8");
    } catch {
      return "";
    }
  }

  /**
   * SIGTERM, then wait for the exit; `keep` leaves the directory (and the agent's ownership
   * marker in the engine) for a restart. Otherwise the marker goes too, as tests/agent.py's
   * agents take theirs with them.
   */
  async stop(keep = false): Promise<void> {
    if (this.process.exitCode === null && this.process.signalCode === null) {
      this.process.kill("SIGTERM");
      await this.exited;
    }
    if (keep) return;
    const instance = this.instanceId();
    if (instance !== null) await removeMarkers(`snapagentd-owner-${instance}`).catch(() => undefined);
    rmSync(this.directory, { recursive: true, force: true });
  }

  /** The agent's instance id, from its journal's `instance` record (null before it made one). */
  instanceId(): string | null {
    let journal = "";
    try {
      journal = readFileSync(join(this.directory, "state", "journal.jsonl"), "utf8");
    } catch {
      return null;
    }
    for (const line of journal.split("\n")) {
      try {
        const record = JSON.parse(line) as { op?: unknown; id?: unknown };
        if (record.op === "instance" && typeof record.id === "string") return record.id;
      } catch {
        // a torn last line: not the instance record
      }
    }
    return null;
  }

  /** Stops this process and starts a new one on the same socket and journal, as systemd would
   * restart it; does not wait for it to serve. */
  async restart(): Promise<Agent> {
    await this.stop(true);
    return Agent.spawnOn(this.directory);
  }
}
