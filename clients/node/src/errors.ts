// The errors the client throws. Every one is a ClientError:
// - SnapagentdError: the agent answered with an error; `code` is stable (branch on it), and each
//   documented code has its own subclass (ERRORS), named after the code as in the Python client;
// - AgentUnreachable: no HTTP answer (socket missing or refusing after the retries, broken
//   connection, timeout); docs/api.md: carry on without snapshots;
// - ProtocolError: an answer that breaks the contract.
import type { ErrorCode } from "./openapi.js";

/** Anything this client throws. */
export class ClientError extends Error {
  override name = "ClientError";
}

/** No HTTP answer: the agent is not running (or still restarting), or the connection failed. */
export class AgentUnreachable extends ClientError {
  override name = "AgentUnreachable";
  constructor(
    readonly socketPath: string,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`cannot reach snapagentd at ${socketPath}: ${reason}`, options);
  }
}

/** The agent answered, but not as the API promises. */
export class ProtocolError extends ClientError {
  override name = "ProtocolError";
  constructor(
    message: string,
    /** The HTTP status, when a status line arrived. */
    readonly status?: number,
    readonly body?: string,
  ) {
    super(message);
  }
}

/**
 * The agent answered with an error. A code this client does not know yet throws this class
 * itself; the documented ones throw their subclass.
 */
export class SnapagentdError extends ClientError {
  override name = "SnapagentdError";
  /** The documented status of the code; `status` holds the one received. */
  static readonly documentedStatus: number = 0;
  /** `message` is the agent's, for people: its wording may change. */
  constructor(
    readonly code: string,
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

type ErrorClass = (new (code: string, status: number, message: string) => SnapagentdError) & {
  readonly documentedStatus: number;
};

function errorClass(name: string, documentedStatus: number): ErrorClass {
  const cls = class extends SnapagentdError {
    static override readonly documentedStatus = documentedStatus;
    override name = name;
  };
  Object.defineProperty(cls, "name", { value: name });
  return cls;
}

export const InvalidJsonError = errorClass("InvalidJsonError", 400);
export const InvalidFieldError = errorClass("InvalidFieldError", 400);
export const ImageNotManagedError = errorClass("ImageNotManagedError", 403);
export const AccessDeniedError = errorClass("AccessDeniedError", 403);
export const ImageNotFoundError = errorClass("ImageNotFoundError", 404);
export const SnapshotNotFoundError = errorClass("SnapshotNotFoundError", 404);
export const LeaseNotFoundError = errorClass("LeaseNotFoundError", 404);
export const NotFoundError = errorClass("NotFoundError", 404);
export const MethodNotAllowedError = errorClass("MethodNotAllowedError", 405);
export const BodyTimeoutError = errorClass("BodyTimeoutError", 408);
export const BodyTooLargeError = errorClass("BodyTooLargeError", 413);
export const DockerError = errorClass("DockerError", 502);
export const DockerUnavailableError = errorClass("DockerUnavailableError", 503);
export const JournalUnavailableError = errorClass("JournalUnavailableError", 503);
export const InternalError = errorClass("InternalError", 500);
export const TooManyConnectionsError = errorClass("TooManyConnectionsError", 503);

/** The class of every code in the OpenAPI document; the compiler rejects a missing one. */
export const ERRORS: Readonly<Record<ErrorCode, ErrorClass>> = {
  "invalid-json": InvalidJsonError,
  "invalid-field": InvalidFieldError,
  "image-not-managed": ImageNotManagedError,
  "access-denied": AccessDeniedError,
  "image-not-found": ImageNotFoundError,
  "snapshot-not-found": SnapshotNotFoundError,
  "lease-not-found": LeaseNotFoundError,
  "not-found": NotFoundError,
  "method-not-allowed": MethodNotAllowedError,
  "body-timeout": BodyTimeoutError,
  "body-too-large": BodyTooLargeError,
  "docker-error": DockerError,
  "docker-unavailable": DockerUnavailableError,
  "journal-unavailable": JournalUnavailableError,
  "internal-error": InternalError,
  "too-many-connections": TooManyConnectionsError,
};

/** The error for a non-2xx answer: the class of its code, or ProtocolError. */
export function errorFromAnswer(status: number, body: string): ClientError {
  let code: unknown;
  let message: unknown;
  try {
    const error = (JSON.parse(body) as { error?: { code?: unknown; message?: unknown } }).error;
    code = error?.code;
    message = error?.message;
  } catch {
    // not JSON: handled below
  }
  if (typeof code !== "string" || typeof message !== "string") {
    return new ProtocolError(`HTTP ${status} without an error code from snapagentd`, status, body);
  }
  const cls: ErrorClass | undefined = Object.hasOwn(ERRORS, code)
    ? ERRORS[code as ErrorCode]
    : undefined;
  return cls ? new cls(code, status, message) : new SnapagentdError(code, status, message);
}
