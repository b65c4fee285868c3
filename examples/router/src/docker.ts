// The few calls of Docker's HTTP API the router needs, over the engine's Unix socket with Node's
// own `http` (no dependencies): run a container to its end, read its output, commit it.
import { request } from "node:http";

export class DockerApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export class Docker {
  /** `url`: unix:///path/to/docker.sock (the form of DOCKER_HOST). */
  constructor(readonly url: string) {
    if (!url.startsWith("unix://")) throw new Error(`only unix:// Docker URLs are supported: ${url}`);
  }

  private call(method: string, path: string, json?: unknown): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const body = json === undefined ? undefined : Buffer.from(JSON.stringify(json));
      const headers = body ? { "Content-Type": "application/json", "Content-Length": body.length } : {};
      const req = request({ socketPath: this.url.slice("unix://".length), method, path, headers }, (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (chunk: Buffer) => chunks.push(chunk));
        res.on("error", reject);
        res.on("end", () => {
          const data = Buffer.concat(chunks);
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) return resolve(data);
          let message = data.toString("utf8");
          try {
            message = (JSON.parse(message) as { message: string }).message;
          } catch {
            // keep the raw text
          }
          reject(new DockerApiError(status, `Docker: ${method} ${path}: ${status} ${message}`));
        });
      });
      req.on("error", reject);
      req.end(body);
    });
  }

  /** Create a container without network (the private engines have no bridge); returns its id. */
  async create(image: string, command: string[], env: string[]): Promise<string> {
    const config = { Image: image, Cmd: command, Env: env, HostConfig: { NetworkMode: "none" } };
    const made = await this.call("POST", "/containers/create", config);
    return (JSON.parse(made.toString("utf8")) as { Id: string }).Id;
  }

  /** Start the container, wait for its end; its exit code and its output (stdout and stderr). */
  async run(id: string): Promise<{ exitCode: number; output: string }> {
    await this.call("POST", `/containers/${id}/start`);
    const waited = await this.call("POST", `/containers/${id}/wait`);
    const exitCode = (JSON.parse(waited.toString("utf8")) as { StatusCode: number }).StatusCode;
    const logs = await this.call("GET", `/containers/${id}/logs?stdout=1&stderr=1`);
    return { exitCode, output: demultiplex(logs) };
  }

  /** `docker commit`: the container's file system as the image `reference` (repository:tag). */
  async commit(id: string, reference: string): Promise<string> {
    const colon = reference.lastIndexOf(":");
    const query = new URLSearchParams({ container: id, repo: reference.slice(0, colon), tag: reference.slice(colon + 1) });
    const made = await this.call("POST", `/commit?${query}`);
    return (JSON.parse(made.toString("utf8")) as { Id: string }).Id;
  }

  async remove(id: string): Promise<void> {
    await this.call("DELETE", `/containers/${id}?force=1`);
  }
}

/** A container log without a TTY comes in frames: 8-byte header (stream, 0, 0, 0, size). */
function demultiplex(data: Buffer): string {
  const parts: Buffer[] = [];
  for (let offset = 0; offset + 8 <= data.length; ) {
    const size = data.readUInt32BE(offset + 4);
    parts.push(data.subarray(offset + 8, offset + 8 + size));
    offset += 8 + size;
  }
  return Buffer.concat(parts).toString("utf8");
}
